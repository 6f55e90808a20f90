//! The hub as init's child: `pos-hub serve` started from the same binary with a clean
//! environment and the signals unblocked, its output copied line by line to the
//! console and /data/log/hub.log (rotated at 4 MiB), asked for /healthz over loopback,
//! and stopped with SIGTERM (25 s to drain and commit) then SIGKILL.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::bootlog::{rotate, BootLog};
use super::{CONFIG_DIR, DATA_DIR};

/// Starts the hub as a child with its output copied to the console and hub.log.
pub fn spawn(log: &BootLog) -> Result<Child, String> {
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
pub fn answers(port: u16) -> bool {
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

/// SIGTERM the hub (it drains and commits), wait up to 25 s, then SIGKILL everyone.
pub fn stop(log: &BootLog, child: Option<Child>) {
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
