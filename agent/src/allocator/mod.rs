//! The process's heap allocator.
//!
//! The shipped build (`cargo xtask image`) takes jemalloc (`alloc-jemalloc`), tuned below; other
//! builds the system's allocator, or mimalloc (`alloc-mimalloc`). `cargo xtask bench` compares
//! them on the same scenarios (docs/performance.md has the table and the choice). With `count-allocations`
//! (the bench's counting build) every allocation is also counted and the bytes in use tracked,
//! so the bench can report allocations per request and live heap per pod; with `dhat-heap` the
//! heap profiler records where each allocation was made (`cargo xtask bench --heap-profile`).

#[cfg(all(feature = "alloc-mimalloc", feature = "alloc-jemalloc"))]
compile_error!("features alloc-mimalloc and alloc-jemalloc pick different allocators: choose one");
#[cfg(all(feature = "dhat-heap", feature = "count-allocations"))]
compile_error!("features dhat-heap and count-allocations both wrap the allocator: choose one");

// dhat's recorder allocates through the system's allocator itself.
#[cfg(not(any(
    feature = "dhat-heap",
    feature = "alloc-mimalloc",
    feature = "alloc-jemalloc"
)))]
use std::alloc::System as Backing;

#[cfg(all(not(feature = "dhat-heap"), feature = "alloc-mimalloc"))]
use mimalloc::MiMalloc as Backing;
#[cfg(all(not(feature = "dhat-heap"), feature = "alloc-jemalloc"))]
use tikv_jemallocator::Jemalloc as Backing;

/// jemalloc's options, read at its start (the `_RJEM_MALLOC_CONF` variable still overrides):
/// one arena, since a few threads share the work and an arena per core holds memory apart; and
/// freed pages returned at once rather than after ten seconds, since a burst of first requests
/// would otherwise leave its peak resident. Measured: 1,000 pods cached 38 -> 21 MiB, idle
/// 29 -> 12 MiB, CPU per request unchanged (docs/performance.md).
#[cfg(feature = "alloc-jemalloc")]
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_CONF: ConfString =
    ConfString(c"narenas:1,dirty_decay_ms:0,muzzy_decay_ms:0".as_ptr());

/// A C string jemalloc reads at start-up (its `malloc_conf`, a `const char *`).
#[cfg(feature = "alloc-jemalloc")]
#[repr(transparent)]
struct ConfString(*const std::ffi::c_char);

// SAFETY: the pointer is to a static C string, never written.
#[cfg(feature = "alloc-jemalloc")]
unsafe impl Sync for ConfString {}

#[cfg(not(any(feature = "count-allocations", feature = "dhat-heap")))]
#[global_allocator]
static GLOBAL: Backing = Backing;

#[cfg(feature = "dhat-heap")]
#[global_allocator]
static GLOBAL: dhat::Alloc = dhat::Alloc;

/// The heap profile's recorder (`dhat-heap` builds): writes the profile when dropped, at the
/// end of `main`, to `PIA_DHAT_OUT` (the bench names it) or `dhat-heap.json`.
#[cfg(feature = "dhat-heap")]
pub fn profile() -> dhat::Profiler {
    let file = std::env::var("PIA_DHAT_OUT").unwrap_or_else(|_| "dhat-heap.json".into());
    dhat::Profiler::builder().file_name(file).build()
}

#[cfg(feature = "count-allocations")]
pub use self::counting::{allocations, live_bytes};

#[cfg(feature = "count-allocations")]
mod counting;
