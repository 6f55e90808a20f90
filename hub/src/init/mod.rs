//! PID 1: the boot story of the appliance, top to bottom (nerves-project/erlinit is
//! the model). When the kernel starts `pos-hub` as init, this module:
//!
//!  1. mounts /proc, /sys, /dev, /run, /tmp and attaches the console;
//!  2. loads the kernel modules the board needs (list written by the image builder);
//!  3. finds the boot disk by its settings partition's label, grows the data
//!     partition to fill the card on first boot, formats it if blank, checks it
//!     (e2fsck) and mounts it read-write at /data, the settings partition read-only
//!     at /config, and remounts the root read-only;
//!  4. sets the hostname, brings up loopback and Ethernet (DHCP or static);
//!  5. starts `pos-hub serve` as its child (the async hub never runs as PID 1),
//!     copies its output to the console and /data/log/hub.log;
//!  6. loops: reaps zombies, pets the watchdog only while the hub answers /healthz,
//!     restarts a hub that died, maps SIGTERM/SIGINT -> reboot, SIGUSR2 -> power off,
//!     SIGUSR1/SIGPWR -> halt;
//!  7. on the way down: stops the hub gracefully, syncs, unmounts, reboots.
//!
//! It never exits and never panics silently: a failure is logged to the console and
//! /data/log/boot.log, and the box reboots after a pause.

pub mod disk;
pub mod net;
pub mod watchdog;

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Where the settings partition is mounted; the hub reads `hub.env` there.
pub const CONFIG_DIR: &str = "/config";
/// Where the data partition is mounted.
pub const DATA_DIR: &str = "/data";
/// How long the hub may take to answer its first health check before the watchdog
/// is left to fire.
const STARTUP_GRACE: Duration = Duration::from_secs(90);
/// How long a hub may go without a good health check before init stops petting.
const UNHEALTHY_AFTER: Duration = Duration::from_secs(15);

/// What the box does when init is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Down {
    Reboot,
    PowerOff,
    Halt,
}

/// The init log: console always, /data/log/boot.log once data is mounted.
#[derive(Clone, Default)]
struct BootLog {
    inner: Arc<Mutex<BootLogInner>>,
}

#[derive(Default)]
struct BootLogInner {
    pending: Vec<String>,
    file: Option<std::fs::File>,
}

impl BootLog {
    /// The console gets `[uptime] pos-hub init: msg`; boot.log the hub's line format
    /// (time, level, source `init`) so `GET /admin/logs` merges it with the hub's.
    fn line(&self, msg: impl AsRef<str>) {
        let up = uptime();
        let msg = msg.as_ref();
        eprintln!("[{up:>8.3}] pos-hub init: {msg}");
        let level = if msg.starts_with("FAILED") || msg.starts_with("PANIC") {
            "ERROR"
        } else {
            "INFO"
        };
        let line = crate::ops::logs::format_line(
            std::time::SystemTime::now(),
            level,
            "init",
            &format!("[{up:.3}] {msg}"),
        );
        let mut g = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        match g.file.as_mut() {
            Some(f) => {
                let _ = writeln!(f, "{line}");
            }
            None => g.pending.push(line),
        }
    }

    fn attach(&self, path: &Path) {
        rotate(path, 1 << 20);
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let mut g = match self.inner.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            let _ = writeln!(
                f,
                "{}",
                crate::ops::logs::format_line(
                    std::time::SystemTime::now(),
                    "INFO",
                    "init",
                    "---- boot ----"
                )
            );
            for l in g.pending.drain(..) {
                let _ = writeln!(f, "{l}");
            }
            g.file = Some(f);
        }
    }

    fn detach(&self) {
        if let Ok(mut g) = self.inner.lock() {
            if let Some(f) = g.file.take() {
                let _ = f.sync_all();
            }
        }
    }
}

fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|t| t.parse().ok()))
        .unwrap_or(0.0)
}

/// Keeps a log file under `max` bytes by moving it to `<name>.1`.
fn rotate(path: &Path, max: u64) {
    if std::fs::metadata(path)
        .map(|m| m.len() > max)
        .unwrap_or(false)
    {
        let _ = std::fs::rename(path, path.with_extension("log.1"));
    }
}

/// Runs the init flow. Never returns.
pub fn run_as_pid1() -> ! {
    let log = BootLog::default();
    let hook_log = log.clone();
    std::panic::set_hook(Box::new(move |info| {
        hook_log.line(format!("PANIC: {info}"));
    }));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| boot(&log)));
    let down = match result {
        Ok(Ok(down)) => down,
        Ok(Err(e)) => {
            log.line(format!("FAILED: {e}; rebooting in 10 s"));
            std::thread::sleep(Duration::from_secs(10));
            Down::Reboot
        }
        Err(_) => {
            log.line("init panicked; rebooting in 10 s");
            std::thread::sleep(Duration::from_secs(10));
            Down::Reboot
        }
    };
    finish(&log, down)
}

/// Everything from the first mount to the main loop's end; returns how to go down.
fn boot(log: &BootLog) -> Result<Down, String> {
    early_mounts()?;
    attach_console();
    log.line(format!(
        "pos-hub {} starting as PID 1",
        crate::update::agent::firmware_version()
    ));

    // Signals are taken synchronously by the main loop; block them before any thread
    // or child exists (children get them unblocked again).
    let signals = init_signals();
    signals
        .thread_block()
        .map_err(|e| format!("block signals: {e}"))?;

    load_modules(log);

    let disk = disk::find_boot_disk(Duration::from_secs(20)).map_err(|e| e.to_string())?;
    log.line(format!(
        "boot disk /dev/{} (settings {}, data {})",
        disk.name,
        disk.settings.display(),
        disk.data.display()
    ));
    match disk::grow_data_partition(&disk) {
        Ok(Some(bytes)) => log.line(format!(
            "first boot on this card: data partition grown to {} MiB",
            bytes >> 20
        )),
        Ok(None) => {}
        Err(e) => log.line(format!(
            "could not grow the data partition (keeps its size): {e}"
        )),
    }
    mount_config(log, &disk);
    mount_data(log, &disk)?;
    factory_reset_if_asked(log);
    log.attach(&Path::new(DATA_DIR).join("log/boot.log"));

    let settings = read_settings(log);
    let hostname = settings
        .get("HOSTNAME")
        .cloned()
        .unwrap_or_else(|| "pos-hub".into());
    if let Err(e) = nix::unistd::sethostname(&hostname) {
        log.line(format!("sethostname {hostname}: {e}"));
    }
    if let Err(e) = net::link_up("lo") {
        log.line(format!("loopback: {e}"));
    }
    start_network(log, &settings, &hostname);

    // Everything writable now lives on /data, /run or /tmp.
    match mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    ) {
        Ok(()) => log.line("root filesystem is read-only"),
        Err(e) => log.line(format!("could not make the root read-only: {e}")),
    }

    let mut dog = match settings.get("WATCHDOG").map(String::as_str) {
        Some("off") => None,
        _ => {
            let secs = settings
                .get("WATCHDOG_TIMEOUT")
                .and_then(|s| s.parse().ok())
                .unwrap_or(15u64);
            match watchdog::Watchdog::open(Duration::from_secs(secs)) {
                Ok(Some(w)) => {
                    log.line(format!(
                        "watchdog {} armed, timeout {:?}",
                        w.identity, w.timeout
                    ));
                    Some(w)
                }
                Ok(None) => {
                    log.line("no hardware watchdog found");
                    None
                }
                Err(e) => {
                    log.line(format!("watchdog: {e}"));
                    None
                }
            }
        }
    };
    let port: u16 = settings
        .get("PORT")
        .and_then(|p| p.parse().ok())
        .unwrap_or(4001);
    let down = supervise(log, &signals, &mut dog, port);
    if let Some(w) = dog {
        w.disarm();
    }
    Ok(down)
}

fn init_signals() -> SigSet {
    let mut s = SigSet::empty();
    for sig in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGPWR,
        Signal::SIGHUP,
    ] {
        s.add(sig);
    }
    s
}

fn early_mounts() -> Result<(), String> {
    let m = |src: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>| {
        let _ = std::fs::create_dir_all(target);
        match mount(Some(src), target, Some(fstype), flags, data) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EBUSY) => Ok(()),
            Err(e) => Err(format!("mount {fstype} on {target}: {e}")),
        }
    };
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    m("proc", "/proc", "proc", nodev, None)?;
    m("sysfs", "/sys", "sysfs", nodev, None)?;
    m(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    m("tmpfs", "/run", "tmpfs", nodev, Some("mode=0755,size=16m"))?;
    m(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777,size=64m"),
    )?;
    Ok(())
}

/// Without /dev/console in the initramfs the kernel gives init no stdio; open it now.
fn attach_console() {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl(F_GETFD) only queries a descriptor.
    let has_stdout = unsafe { libc::fcntl(1, libc::F_GETFD) } != -1;
    if has_stdout {
        return;
    }
    if let Ok(c) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors.
            unsafe { libc::dup2(c.as_raw_fd(), fd) };
        }
    }
}

/// Loads the modules listed (dependencies first) in /etc/modules.load.
fn load_modules(log: &BootLog) {
    let Ok(list) = std::fs::read_to_string("/etc/modules.load") else {
        log.line("no /etc/modules.load: loading no modules");
        return;
    };
    let mut loaded = 0;
    for path in list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        match std::fs::File::open(path) {
            Ok(f) => {
                use std::os::fd::AsRawFd;
                let empty = c"";
                // SAFETY: finit_module(fd, params, flags) with a valid fd and C string.
                let rc = unsafe {
                    libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), empty.as_ptr(), 0)
                };
                let err = std::io::Error::last_os_error();
                if rc == 0 || err.raw_os_error() == Some(libc::EEXIST) {
                    loaded += 1;
                } else if err.raw_os_error() != Some(libc::ENODEV) {
                    log.line(format!("module {path}: {err}"));
                }
            }
            Err(e) => log.line(format!("module {path}: {e}")),
        }
    }
    log.line(format!("{loaded} kernel modules loaded"));
}

fn mount_config(log: &BootLog, d: &disk::BootDisk) {
    let _ = std::fs::create_dir_all(CONFIG_DIR);
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if let Err(e) = mount(
        Some(&d.settings),
        CONFIG_DIR,
        Some("vfat"),
        flags,
        Some("umask=0022,shortname=mixed"),
    ) {
        log.line(format!(
            "settings partition {}: cannot mount: {e} (running on defaults)",
            d.settings.display()
        ));
    }
}

fn mount_data(log: &BootLog, d: &disk::BootDisk) -> Result<(), String> {
    let dev = &d.data;
    match disk::ext4_info(dev).map_err(|e| e.to_string())? {
        None => {
            log.line(format!(
                "data partition {} is blank: creating its filesystem",
                dev.display()
            ));
            let t = Instant::now();
            disk::format_data(dev).map_err(|e| e.to_string())?;
            log.line(format!(
                "data filesystem created in {:.1} s",
                t.elapsed().as_secs_f64()
            ));
        }
        Some(info) => {
            if info.needs_check {
                log.line("data filesystem was not cleanly unmounted: checking it");
            }
            match disk::check_data(dev) {
                Ok(None) => {}
                Ok(Some(report)) => {
                    log.line(format!("e2fsck repaired the data filesystem: {report}"))
                }
                Err(e) => log.line(format!("{e} (mounting anyway)")),
            }
        }
    }
    let _ = std::fs::create_dir_all(DATA_DIR);
    mount(
        Some(dev.as_path()),
        DATA_DIR,
        Some("ext4"),
        MsFlags::MS_NOATIME | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("errors=remount-ro"),
    )
    .map_err(|e| format!("mount data partition {}: {e}", dev.display()))?;
    if let (Ok(Some(fs)), Some(part)) = (disk::ext4_info(dev), disk::dev_bytes(dev)) {
        if part > fs.bytes + (8 << 20) {
            match disk::grow_data_fs(dev) {
                Ok(()) => log.line(format!(
                    "data filesystem grown from {} MiB to {} MiB",
                    fs.bytes >> 20,
                    part >> 20
                )),
                Err(e) => log.line(format!("could not grow the data filesystem: {e}")),
            }
        }
    }
    for sub in ["log", "hub"] {
        let _ = std::fs::create_dir_all(Path::new(DATA_DIR).join(sub));
    }
    Ok(())
}

/// Factory reset, asked for by a file named `RESET` on the settings partition (a person
/// with the card in a laptop) or `/data/RESET` (written by the admin API). Wipes the
/// data partition's contents, keeping the store CA (devices keep trusting the box)
/// unless the file says `wipe-ca`. The box then starts unclaimed (unless hub.env
/// names a realm).
fn factory_reset_if_asked(log: &BootLog) {
    let cfg_marker = Path::new(CONFIG_DIR).join("RESET");
    let data_marker = Path::new(DATA_DIR).join("RESET");
    let text = match (
        std::fs::read_to_string(&cfg_marker),
        std::fs::read_to_string(&data_marker),
    ) {
        (Ok(a), _) => a,
        (_, Ok(b)) => b,
        _ => return,
    };
    let wipe_ca = text.to_ascii_lowercase().contains("wipe-ca");
    log.line(format!(
        "FACTORY RESET requested: wiping the data partition{}",
        if wipe_ca {
            " including the store CA"
        } else {
            " (keeping the store CA)"
        }
    ));
    let keep_ca = Path::new(DATA_DIR).join("hub/ca");
    let (mut removed, mut failed) = (0, 0);
    let mut wipe = |p: &Path| {
        let r = if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(p)
        } else {
            std::fs::remove_file(p)
        };
        match r {
            Ok(()) => removed += 1,
            Err(e) => {
                failed += 1;
                log.line(format!("reset: {}: {e}", p.display()));
            }
        }
    };
    if let Ok(rd) = std::fs::read_dir(DATA_DIR) {
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name();
            if name == "lost+found" {
                continue;
            }
            if name == "hub" && !wipe_ca {
                if let Ok(inner) = std::fs::read_dir(&p) {
                    for i in inner.flatten() {
                        if i.path() != keep_ca {
                            wipe(&i.path());
                        }
                    }
                }
                continue;
            }
            wipe(&p);
        }
    }
    if cfg_marker.exists() {
        let remount = |flags: MsFlags| {
            mount(
                None::<&str>,
                CONFIG_DIR,
                None::<&str>,
                MsFlags::MS_REMOUNT
                    | MsFlags::MS_NOSUID
                    | MsFlags::MS_NODEV
                    | MsFlags::MS_NOEXEC
                    | flags,
                None::<&str>,
            )
        };
        let gone = remount(MsFlags::empty()).is_ok() && std::fs::remove_file(&cfg_marker).is_ok();
        nix::unistd::sync();
        let _ = remount(MsFlags::MS_RDONLY);
        if !gone {
            log.line("reset: could not remove RESET from the settings partition: remove it by hand or the box resets at every boot");
        }
    }
    for sub in ["log", "hub"] {
        let _ = std::fs::create_dir_all(Path::new(DATA_DIR).join(sub));
    }
    nix::unistd::sync();
    log.line(format!(
        "factory reset done: {removed} entries removed, {failed} failures"
    ));
}

/// Reads hub.env for the few keys init itself uses. A garbled file is the hub's to
/// report (on the console and in /status); init carries on with defaults.
fn read_settings(log: &BootLog) -> HashMap<String, String> {
    let path = Path::new(CONFIG_DIR).join("hub.env");
    match std::fs::read_to_string(&path) {
        Ok(text) => crate::config::parse_env_file(&text).unwrap_or_else(|(line, m)| {
            log.line(format!(
                "{} line {line}: {m} (network on defaults; the hub reports the error)",
                path.display()
            ));
            HashMap::new()
        }),
        Err(e) => {
            log.line(format!("{}: {e} (defaults)", path.display()));
            HashMap::new()
        }
    }
}

/// Static address or DHCP (in a thread that keeps renewing the lease).
fn start_network(log: &BootLog, s: &HashMap<String, String>, hostname: &str) {
    let ifname = match s.get("NET_INTERFACE") {
        Some(n) => Some(n.clone()),
        None => net::find_ethernet(Duration::from_secs(5)),
    };
    let Some(ifname) = ifname else {
        log.line("no Ethernet interface found: LAN is down (the hub still runs)");
        return;
    };
    if let Err(e) = net::link_up(&ifname) {
        log.line(format!("{ifname}: {e}"));
    }
    if let Some(addr) = s
        .get("NET_ADDRESS")
        .filter(|a| !a.is_empty() && a.as_str() != "dhcp")
    {
        match net::parse_static(
            addr,
            s.get("NET_GATEWAY").map(String::as_str),
            s.get("NET_DNS").map(String::as_str),
        ) {
            Ok(l) => match net::apply(&ifname, &l) {
                Ok(()) => log.line(format!(
                    "{ifname}: static address {}/{}",
                    l.address, l.prefix
                )),
                Err(e) => log.line(format!("{ifname}: {e}")),
            },
            Err(e) => log.line(format!("{e}; falling back to DHCP")),
        }
        if s.get("NET_ADDRESS")
            .is_some_and(|a| net::parse_static(a, None, None).is_ok())
        {
            return;
        }
    }
    let dhcp_log = log.clone();
    let hostname = hostname.to_string();
    let spawned = std::thread::Builder::new()
        .name("dhcp".into())
        .spawn(move || {
            let log = dhcp_log;
            let mut current: Option<net::Lease> = None;
            loop {
                match net::dhcp(&ifname, &hostname, Duration::from_secs(30)) {
                    Ok(l) => {
                        if current.as_ref() != Some(&l) {
                            match net::apply(&ifname, &l) {
                                Ok(()) => log.line(format!(
                                    "{ifname}: DHCP address {}/{} gateway {:?}",
                                    l.address, l.prefix, l.gateway
                                )),
                                Err(e) => log.line(format!("{ifname}: {e}")),
                            }
                        }
                        let renew = l.lease.unwrap_or(Duration::from_secs(3600)) / 2;
                        current = Some(l);
                        std::thread::sleep(renew);
                    }
                    Err(e) => {
                        if current.is_none() {
                            log.line(format!("{e}; retrying"));
                        }
                        std::thread::sleep(Duration::from_secs(10));
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log.line(format!("cannot start DHCP: {e}"));
    }
}

/// Starts the hub as a child with its output copied to the console and hub.log.
fn spawn_hub(log: &BootLog) -> Result<Child, String> {
    let exe = std::fs::read_link("/proc/self/exe").unwrap_or_else(|_| "/init".into());
    let mut cmd = Command::new(exe);
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(Path::new(DATA_DIR).join("hub"));
    let env = Path::new(CONFIG_DIR).join("hub.env");
    if env.exists() {
        cmd.arg("--env-file").arg(&env);
    }
    cmd.env_clear()
        .env("PATH", "/sbin:/bin")
        .env("HOME", DATA_DIR)
        .env("POS_HUB_INIT", "1")
        .env("CLOCK_SET", "on")
        .env("POS_HUB_CONFIG_FILE", &env)
        // Init keeps hub.log (from the hub's output) and boot.log here; the hub reads them.
        .env("POS_HUB_LOG_DIR", Path::new(DATA_DIR).join("log"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec only async-signal-safe calls (sigprocmask via nix).
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            SigSet::all()
                .thread_unblock()
                .map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the hub: {e}"))?;
    let hub_log = Path::new(DATA_DIR).join("log/hub.log");
    let out = child
        .stdout
        .take()
        .map(|o| Box::new(o) as Box<dyn Read + Send>);
    let err = child
        .stderr
        .take()
        .map(|o| Box::new(o) as Box<dyn Read + Send>);
    let sink = Arc::new(Mutex::new(()));
    for stream in [out, err].into_iter().flatten() {
        let path = hub_log.clone();
        let sink = sink.clone();
        let _ = std::thread::Builder::new()
            .name("hub-log".into())
            .spawn(move || copy_log(stream, &path, &sink));
    }
    log.line(format!("hub started (pid {})", child.id()));
    Ok(child)
}

fn copy_log(stream: Box<dyn Read + Send>, path: &Path, sink: &Mutex<()>) {
    let mut lines = BufReader::new(stream);
    let mut buf = Vec::new();
    let mut written = 0u64;
    loop {
        buf.clear();
        match lines.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let _g = sink.lock();
        let _ = std::io::stderr().write_all(&buf);
        // The hub's tracing lines carry their time; anything else it printed (a
        // panic, a library's note) is stamped here so every line in hub.log has one.
        if !crate::ops::logs::is_stamped(&buf) {
            let text = String::from_utf8_lossy(&buf);
            let mut line = crate::ops::logs::format_line(
                std::time::SystemTime::now(),
                "INFO",
                "hub/stderr",
                text.trim_end_matches(['\n', '\r']),
            );
            line.push('\n');
            buf = line.into_bytes();
        }
        written += buf.len() as u64;
        if written > 256 << 10 {
            rotate(path, 4 << 20);
            written = 0;
        }
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(&buf);
        }
    }
}

/// Asks the hub for /healthz over plain HTTP on loopback. Healthy: 200, or a hub
/// that is up but waiting for its settings to be fixed or for space on a full data
/// partition (it answers, so it is not hung: resetting the box would not help and
/// would only loop).
fn hub_answers(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut resp = Vec::new();
    let _ = s.take(8192).read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    text.starts_with("HTTP/1.1 200")
        || text.starts_with("HTTP/1.0 200")
        || text.contains("configError")
        || text.contains("storage_full")
}

/// The main loop: supervise the hub until a signal says go down.
fn supervise(
    log: &BootLog,
    signals: &SigSet,
    dog: &mut Option<watchdog::Watchdog>,
    port: u16,
) -> Down {
    let mut child = spawn_hub(log).map_err(|e| log.line(e)).ok();
    let mut started = Instant::now();
    let mut last_healthy: Option<Instant> = None;
    let mut last_check = Instant::now() - Duration::from_secs(60);
    let mut restarts: Vec<Instant> = Vec::new();
    let mut reported_unhealthy = false;
    loop {
        let tick = if last_healthy.is_some() {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(100)
        };
        if let Some(sig) = wait_signal(signals, tick) {
            let down = match sig {
                libc::SIGTERM | libc::SIGINT => Some(Down::Reboot),
                libc::SIGUSR2 => Some(Down::PowerOff),
                libc::SIGUSR1 | libc::SIGPWR => Some(Down::Halt),
                _ => None,
            };
            if let Some(d) = down {
                log.line(format!("signal {sig}: going down ({d:?})"));
                stop_hub(log, child.take());
                return d;
            }
        }
        // Reap every zombie; notice our hub's exit.
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(st) => {
                    let pid = st.pid();
                    if let (Some(c), Some(p)) = (&child, pid) {
                        if c.id() as i32 == p.as_raw() {
                            log.line(format!("hub exited: {st:?}"));
                            child = None;
                        }
                    }
                }
            }
        }
        if child.is_none() {
            restarts.retain(|t| t.elapsed() < Duration::from_secs(300));
            if restarts.len() >= 5 {
                log.line("the hub failed 5 times in 5 minutes: rebooting");
                return Down::Reboot;
            }
            std::thread::sleep(Duration::from_secs(2 * restarts.len() as u64));
            restarts.push(Instant::now());
            child = spawn_hub(log).map_err(|e| log.line(e)).ok();
            started = Instant::now();
            last_healthy = None;
        }
        // Every 2 s once up; every 100 ms until the first answer (boot time is measured by it).
        let every = if last_healthy.is_some() {
            Duration::from_secs(2)
        } else {
            Duration::from_millis(100)
        };
        if last_check.elapsed() >= every {
            last_check = Instant::now();
            if hub_answers(port) {
                if last_healthy.is_none() {
                    log.line(format!(
                        "hub is up: /healthz answered {:.2} s after it started",
                        started.elapsed().as_secs_f64()
                    ));
                }
                if reported_unhealthy {
                    log.line("hub answers its health check again");
                }
                reported_unhealthy = false;
                last_healthy = Some(Instant::now());
            }
        }
        let healthy = match last_healthy {
            Some(t) => t.elapsed() < UNHEALTHY_AFTER,
            None => started.elapsed() < STARTUP_GRACE,
        };
        if healthy {
            if let Some(w) = dog.as_mut() {
                w.pet();
            }
        } else if !reported_unhealthy {
            reported_unhealthy = true;
            log.line(if dog.is_some() {
                "hub does not answer its health check: no longer petting the watchdog"
            } else {
                "hub does not answer its health check (no watchdog to reset the box)"
            });
        }
    }
}

/// sigtimedwait on the blocked set; `None` on timeout.
fn wait_signal(set: &SigSet, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: SigSet is a transparent wrapper of sigset_t; info may be null.
    let sig = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

/// SIGTERM the hub (it drains and commits), wait up to 25 s, then SIGKILL everyone.
fn stop_hub(log: &BootLog, child: Option<Child>) {
    if let Some(c) = child {
        let pid = Pid::from_raw(c.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let t = Instant::now();
        loop {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {}
                Ok(st) => {
                    log.line(format!(
                        "hub stopped in {:.1} s: {st:?}",
                        t.elapsed().as_secs_f64()
                    ));
                    break;
                }
                Err(_) => break,
            }
            if t.elapsed() > Duration::from_secs(25) {
                log.line("hub did not stop within 25 s: killing it");
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
}

/// Sync, unmount, and reboot / power off / halt. Never returns.
fn finish(log: &BootLog, down: Down) -> ! {
    nix::unistd::sync();
    log.line(format!("unmounting and {down:?}"));
    log.detach();
    for m in [DATA_DIR, CONFIG_DIR] {
        if umount2(m, MntFlags::empty()).is_err() {
            let _ = mount(
                None::<&str>,
                m,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            );
            let _ = umount2(m, MntFlags::MNT_DETACH);
        }
    }
    nix::unistd::sync();
    let param = std::fs::read_to_string("/run/reboot-param").unwrap_or_default();
    loop {
        match down {
            Down::PowerOff => {
                let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
            }
            Down::Halt => {
                let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_HALT_SYSTEM);
            }
            Down::Reboot if !param.trim().is_empty() => {
                // The Pi firmware takes "0 tryboot" as a one-shot trial of the other slot.
                if let Ok(arg) = CString::new(param.trim()) {
                    // SAFETY: reboot(2) RESTART2 with a NUL-terminated argument.
                    unsafe {
                        libc::syscall(
                            libc::SYS_reboot,
                            libc::LINUX_REBOOT_MAGIC1,
                            libc::LINUX_REBOOT_MAGIC2,
                            libc::LINUX_REBOOT_CMD_RESTART2,
                            arg.as_ptr(),
                        );
                    }
                }
                let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
            }
            Down::Reboot => {
                let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
            }
        }
        std::thread::sleep(Duration::from_secs(5));
    }
}
