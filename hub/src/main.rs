//! `pos-hub`: thin entry point. As PID 1 it runs the init flow (which starts
//! `pos-hub serve` as its child); otherwise it dispatches a CLI subcommand.

#[global_allocator]
static ALLOC: pos_hub::allocs::Counting = pos_hub::allocs::Counting;

fn main() {
    pos_hub::allocs::installed();
    pos_hub::allocs::tune();
    if std::process::id() == 1 {
        // Never returns: init reboots the box on any failure.
        pos_hub::init::run_as_pid1();
    }
    let code = pos_hub::cli::main();
    std::process::exit(code);
}
