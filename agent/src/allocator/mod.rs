//! The process's heap allocator.
//!
//! The system's allocator (musl's in the shipped static build) unless a feature picks another:
//! `alloc-mimalloc` or `alloc-jemalloc`, which `cargo xtask bench` builds to compare them on the
//! same scenarios (docs/performance.md has the table and the choice). With `count-allocations`
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
