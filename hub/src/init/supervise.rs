//! The main loop of PID 1: wait for a signal (100 ms ticks until the hub first answers,
//! then 1 s), reap every zombie, restart a hub that died (5 failures in 5 minutes:
//! reboot), ask it for /healthz and pet the watchdog only while it answers (90 s grace
//! at start, 15 s without an answer after), and map SIGTERM/SIGINT -> reboot,
//! SIGUSR2 -> power off, SIGUSR1/SIGPWR -> halt.

use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::bootlog::BootLog;
use super::child;
use super::down::Down;
use super::watchdog;

/// How long the hub may take to answer its first health check before the watchdog
/// is left to fire.
const STARTUP_GRACE: Duration = Duration::from_secs(90);
/// How long a hub may go without a good health check before init stops petting.
const UNHEALTHY_AFTER: Duration = Duration::from_secs(15);

/// The signals init takes synchronously (in [`run`]), blocked in every thread.
pub fn signals() -> SigSet {
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

/// The main loop: supervise the hub until a signal says go down.
pub fn run(
    log: &BootLog,
    signals: &SigSet,
    dog: &mut Option<watchdog::Watchdog>,
    port: u16,
) -> Down {
    let mut child = child::spawn(log).map_err(|e| log.line(e)).ok();
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
                child::stop(log, child.take());
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
            child = child::spawn(log).map_err(|e| log.line(e)).ok();
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
            if child::answers(port) {
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
