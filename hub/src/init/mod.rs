//! PID 1: the boot story of the appliance, top to bottom (see issue 6).
//! Not implemented yet: `run_as_pid1` refuses and halts loudly.

/// Runs the init flow. Never returns.
pub fn run_as_pid1() -> ! {
    eprintln!("pos-hub: init (PID 1) mode is not implemented in this build");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
