//! Parallel loops on candle's CPU threads.
//!
//! candle runs its element-wise CPU ops on its own "barrier pool" (the calling thread plus
//! N − 1 workers that spin ~25 000 times after each op before parking). Work on a second pool
//! (rayon) started while those workers were still spinning: two busy threads per core for the
//! first half-millisecond of every GEMM, norm or fused op. `perf` of a 134M bf16 prefill put
//! 20 % of the samples in spin loops and yields. So the kernels here run on candle's pool too:
//! the same threads, warm, for every CPU op of a forward or backward.

use candle_core::utils::barrier_pool;

/// `f(i)` for every `i < n`, spread over candle's CPU threads (the caller included); returns
/// when all are done. Called from inside a pool worker it runs inline.
pub(crate) fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    barrier_pool().execute_chunked(n, |range| range.for_each(&f));
}

/// How many threads [`for_each`] runs on.
pub(crate) fn threads() -> usize {
    barrier_pool().n_workers() + 1
}

/// A raw pointer that parallel tasks writing disjoint parts of one buffer may share.
pub(crate) struct SendPtr<T>(*mut T);

impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
// SAFETY: only handed to tasks that write disjoint elements (each user says why).
unsafe impl<T: Send> Send for SendPtr<T> {}
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    pub(crate) fn new(data: &mut [T]) -> Self {
        SendPtr(data.as_mut_ptr())
    }

    /// Through a method, so closures capture the whole (Sync) wrapper, not its raw field.
    pub(crate) fn get(self) -> *mut T {
        self.0
    }

    /// Elements `start..start + len` of the buffer.
    ///
    /// # Safety
    /// The range is inside the buffer, which outlives `'a`, and no other live reference
    /// overlaps it.
    pub(crate) unsafe fn slice<'a>(self, start: usize, len: usize) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// `f` over the first `len` elements of this thread's scratch buffer `key`, grown as needed and
/// reused without clearing: callers write every element before they read it (zero-filling a
/// fresh buffer per call cost whole percents of a train step). A use nested inside another on
/// the same thread gets a fresh buffer.
pub(crate) fn with_scratch<T: Copy + Default, R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, T::default());
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![T::default(); len]),
    })
}

/// `f(i, piece_i)` over consecutive `chunk`-sized pieces of `data` (the last may be shorter).
pub(crate) fn chunks_mut<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let (len, chunk) = (data.len(), chunk.max(1));
    let ptr = SendPtr::new(data);
    for_each(len.div_ceil(chunk), |i| {
        let start = i * chunk;
        // SAFETY: pieces are disjoint and inside `data`, borrowed mutably for this call.
        f(i, unsafe { ptr.slice(start, chunk.min(len - start)) })
    });
}

/// `f(i, a_i, b_i)` over pieces of two buffers cut into `ca`- and `cb`-sized pieces, paired in
/// order (as many pieces as `a` has).
pub(crate) fn chunks_mut2<A: Send, B: Send>(
    a: &mut [A],
    ca: usize,
    b: &mut [B],
    cb: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) {
    let (la, lb, ca, cb) = (a.len(), b.len(), ca.max(1), cb.max(1));
    let (pa, pb) = (SendPtr::new(a), SendPtr::new(b));
    for_each(la.div_ceil(ca), |i| {
        let (sa, sb) = (i * ca, (i * cb).min(lb));
        // SAFETY: pieces are disjoint and inside `a` and `b`, borrowed mutably for this call.
        let (x, y) = unsafe { (pa.slice(sa, ca.min(la - sa)), pb.slice(sb, cb.min(lb - sb))) };
        f(i, x, y)
    });
}

/// The first error of a parallel loop's fallible tasks (the others still run to the end).
pub(crate) struct FirstError(std::sync::Mutex<Option<candle_core::Error>>);

impl FirstError {
    pub(crate) fn new() -> Self {
        FirstError(std::sync::Mutex::new(None))
    }

    /// Keep `r`'s error unless one came first.
    pub(crate) fn record(&self, r: candle_core::Result<()>) {
        if let Err(e) = r {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
        }
    }

    pub(crate) fn into_result(self) -> candle_core::Result<()> {
        match self.0.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_buffers_once() {
        for (len, chunk) in [(0usize, 3usize), (1, 3), (10, 3), (12, 3), (1000, 7)] {
            let mut v = vec![0u32; len];
            chunks_mut(&mut v, chunk, |i, piece| piece.iter_mut().for_each(|x| *x += 1 + i as u32));
            assert!(v.iter().enumerate().all(|(j, &x)| x == 1 + (j / chunk) as u32), "{len}/{chunk}");
            let (mut a, mut b) = (vec![0u8; len], vec![0u16; 2 * len]);
            chunks_mut2(&mut a, chunk, &mut b, 2 * chunk, |i, x, y| {
                assert_eq!(y.len(), 2 * x.len());
                x.fill(i as u8 + 1);
                y.fill(i as u16 + 1);
            });
            assert!(a.iter().all(|&x| x > 0) && b.iter().all(|&x| x > 0));
        }
    }
}
