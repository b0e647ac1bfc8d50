//! Bounded memory while streaming, and progress reporting, through one hook.
//!
//! Readers map input files; every page a writer touches would otherwise stay in the process's
//! resident set until the map is dropped, so converting a 13 GB model would show 13 GB RSS. The
//! writers call [`tensor_written`] after each tensor; every [`RELEASE_EVERY`] bytes it tells the
//! kernel (`MADV_DONTNEED`) that the mapped input pages may be dropped from our page tables. They
//! stay in the page cache, and a later read of the same range simply faults them back in, so this
//! never changes what is read — it only keeps peak RSS independent of model size.
//!
//! The same counter feeds progress bars: [`bytes_written`] is cheap to poll from another thread.

use memmap2::{Mmap, UncheckedAdvice};
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// Threads that produce and write tensors in parallel. Each holds at most one output tensor (plus
/// its lazily gathered inputs), so peak memory stays near two tensors on any machine.
pub const WRITER_THREADS: usize = 2;

/// The writers' thread pool ([`WRITER_THREADS`] threads, built once).
pub fn writer_pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(WRITER_THREADS)
            .thread_name(|i| format!("shardsmith-writer-{i}"))
            .build()
            .expect("a two-thread pool can always be built")
    })
}

/// Admission control for tensors in flight: a writer task waits until its output fits under the
/// limit next to the others (a task alone is always admitted). With the limit set to the largest
/// output tensor, peak memory is about one largest tensor, while small tensors still overlap.
pub struct Budget {
    limit: u64,
    used: Mutex<u64>,
    freed: std::sync::Condvar,
}

/// A share of a [`Budget`], returned when dropped.
pub struct BudgetGuard<'b> {
    budget: &'b Budget,
    n: u64,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Budget { limit, used: Mutex::new(0), freed: std::sync::Condvar::new() }
    }

    /// Wait for room for `n` bytes.
    pub fn acquire(&self, n: u64) -> BudgetGuard<'_> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used > 0 && *used + n > self.limit {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += n;
        BudgetGuard { budget: self, n }
    }
}

impl Drop for BudgetGuard<'_> {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().unwrap_or_else(|e| e.into_inner());
        *used -= self.n;
        self.budget.freed.notify_all();
    }
}

/// Bytes written between two releases of mapped input pages.
pub const RELEASE_EVERY: u64 = 64 << 20;

static WRITTEN: AtomicU64 = AtomicU64::new(0);
static SINCE_RELEASE: AtomicU64 = AtomicU64::new(0);
/// Every live mapping of a whole file (from offset 0), with that file.
static MAPS: Mutex<Vec<(Weak<Mmap>, Arc<File>)>> = Mutex::new(Vec::new());

/// Remember a mapping of the whole of `file`, so its pages can be released while streaming and
/// writers can copy its ranges file to file ([`file_of`]).
pub fn register_map(map: &Arc<Mmap>, file: File) {
    let mut maps = MAPS.lock().unwrap_or_else(|e| e.into_inner());
    maps.retain(|(w, _)| w.strong_count() > 0);
    maps.push((Arc::downgrade(map), Arc::new(file)));
}

/// The file `map` maps from its first byte, when it was registered.
pub fn file_of(map: &Arc<Mmap>) -> Option<Arc<File>> {
    let maps = MAPS.lock().unwrap_or_else(|e| e.into_inner());
    maps.iter().find(|(w, _)| std::ptr::eq(w.as_ptr(), Arc::as_ptr(map))).map(|(_, f)| f.clone())
}

/// Record that a writer finished `n` bytes of output.
pub fn tensor_written(n: u64) {
    WRITTEN.fetch_add(n, Ordering::Relaxed);
    if SINCE_RELEASE.fetch_add(n, Ordering::Relaxed) + n >= RELEASE_EVERY {
        SINCE_RELEASE.store(0, Ordering::Relaxed);
        release_mapped_pages();
    }
}

/// Total bytes written by this process so far.
pub fn bytes_written() -> u64 {
    WRITTEN.load(Ordering::Relaxed)
}

/// Drop every registered input mapping's pages from the resident set.
pub fn release_mapped_pages() {
    let maps: Vec<Arc<Mmap>> = {
        let maps = MAPS.lock().unwrap_or_else(|e| e.into_inner());
        maps.iter().filter_map(|(w, _)| w.upgrade()).collect()
    };
    for map in maps {
        // SAFETY: the maps are read-only views of files (never anonymous or written), so after
        // MADV_DONTNEED a read faults the same bytes back in from the page cache or the file.
        // Concurrent readers on other threads therefore still see correct data.
        let _ = unsafe { map.unchecked_advise(UncheckedAdvice::DontNeed) };
    }
}
