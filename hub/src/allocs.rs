//! Counts heap allocations, for `/metrics` and the benchmark's allocations per
//! event. The binary installs [`Counting`] as its global allocator; it forwards to
//! the system allocator and adds one to a per-thread counter, folded into a
//! shared total every [`FOLD`] allocations, so no two threads contend on a cache
//! line per allocation. The total lags by at most `FOLD` per thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Allocations a thread counts before it adds them to the total.
pub const FOLD: u64 = 256;

static TOTAL: AtomicU64 = AtomicU64::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    static LOCAL: Cell<u64> = const { Cell::new(0) };
}

/// The system allocator, counting.
pub struct Counting;

// SAFETY: every call is forwarded unchanged to `System`; counting touches only a
// thread-local Cell and an atomic, neither of which allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        System.realloc(ptr, layout, new_size)
    }
}

#[inline]
fn count() {
    // `try_with`: a thread being torn down has no locals any more.
    let _ = LOCAL.try_with(|c| {
        let n = c.get() + 1;
        if n >= FOLD {
            TOTAL.fetch_add(n, Ordering::Relaxed);
            c.set(0);
        } else {
            c.set(n);
        }
    });
}

/// Marks the counter as installed (the binary calls it at start).
pub fn installed() {
    INSTALLED.store(true, Ordering::Relaxed);
}

/// Heap allocations (and reallocations) so far, if the counter is installed.
pub fn total() -> Option<u64> {
    INSTALLED
        .load(Ordering::Relaxed)
        .then(|| TOTAL.load(Ordering::Relaxed))
}
