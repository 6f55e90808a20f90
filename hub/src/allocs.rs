//! Counts heap allocations, for `/metrics` and the benchmark's allocations per
//! event, and keeps glibc's malloc from holding freed memory for ever (the soak's
//! RSS grew 37% with a flat event rate). The binary installs [`Counting`] as its global allocator; it forwards to
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

/// glibc's malloc arenas the hub may use unless `MALLOC_ARENA_MAX` says otherwise. glibc's
/// default is 8 per core, each keeping its own freed memory; two bound the high-water
/// mark, and glibc's per-thread caches keep the hot path off the arena locks.
pub const ARENA_MAX: i32 = 2;

/// Sets the arena limit; the binary calls it first thing, before any thread starts.
pub fn tune() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a malloc parameter; called before other threads.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX);
        }
    }
}

/// Bytes the allocator has handed out and not got back, and bytes it holds free, if
/// it can tell (glibc).
#[cfg(target_env = "gnu")]
pub fn heap() -> Option<(u64, u64)> {
    // SAFETY: mallinfo2 reads the allocator's statistics; no arguments.
    let m = unsafe { libc::mallinfo2() };
    Some(((m.uordblks + m.hblkhd) as u64, m.fordblks as u64))
}

/// Other allocators do not say.
#[cfg(not(target_env = "gnu"))]
pub fn heap() -> Option<(u64, u64)> {
    None
}

/// Gives freed heap memory back to the kernel (glibc); a few ms with a large heap, so
/// callers run it off the runtime's worker threads.
pub fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory; it locks each arena itself.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(all(test, target_env = "gnu"))]
mod tests {
    #[test]
    fn heap_counts_a_live_allocation_and_its_release() {
        // 64 MiB dwarfs what the other tests allocate meanwhile.
        const N: u64 = 64 << 20;
        let (before, _) = super::heap().expect("glibc reports its heap");
        let v = std::hint::black_box(vec![1u8; N as usize]);
        let (during, _) = super::heap().expect("glibc reports its heap");
        assert!(during + 4096 >= before + N, "{before} -> {during}");
        drop(v);
        super::trim();
        let (after, _) = super::heap().expect("glibc reports its heap");
        assert!(after + N / 2 < during, "{during} -> {after}");
    }
}
