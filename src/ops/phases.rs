//! Where a step's GPU time goes, by named region of the code that queues it
//! (`bench gpu-layer --phases`): a CUDA event recorded on the device's stream before and after
//! each [`region`], the elapsed times summed by name once the step has run ([`take`]). Events
//! time the stream, not the kernels: a region also counts the GPU idling inside it while the
//! host queues its next launch, and the step's time that no region accounts for is what runs
//! outside them (the autograd engine's own work) plus the idle gaps between them.
//!
//! Off unless [`record`] switched it on for the calling thread; a region then costs two event
//! records. Nothing is recorded on the CPU or without the `cuda` feature. Regions do not nest.

use candle_core::{Device, Result};

/// One named region's share of the recorded steps.
#[derive(Clone, Debug, PartialEq)]
pub struct Phase {
    pub name: &'static str,
    /// Times the region ran.
    pub calls: usize,
    /// Milliseconds in all, summed over the calls.
    pub ms: f64,
}

#[cfg(feature = "cuda")]
mod imp {
    use super::Phase;
    use candle_core::cuda_backend::cudarc::driver::{sys::CUevent_flags, CudaEvent, CudaStream, DriverError};
    use candle_core::{Device, Result};
    use std::cell::{Cell, RefCell};

    thread_local! {
        static ON: Cell<bool> = const { Cell::new(false) };
        /// A region is open (regions do not nest: a nested one would count twice).
        static OPEN: Cell<bool> = const { Cell::new(false) };
        static MARKS: RefCell<Vec<(&'static str, CudaEvent, CudaEvent)>> = const { RefCell::new(Vec::new()) };
        /// Events of earlier steps, recorded again instead of created (~200 a 4-layer step).
        static SPARE: RefCell<Vec<CudaEvent>> = const { RefCell::new(Vec::new()) };
    }

    fn wrap(e: DriverError) -> candle_core::Error {
        candle_core::Error::Msg(format!("phase timing events: {e:?}"))
    }

    /// An event with timing (cudarc's default disables it), recorded on `stream` now.
    pub(super) fn mark(stream: &CudaStream) -> Result<CudaEvent> {
        if let Some(e) = SPARE.with(|s| s.borrow_mut().pop()) {
            if e.context() == stream.context() {
                e.record(stream).map_err(wrap)?;
                return Ok(e);
            }
        }
        stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(wrap)
    }

    pub fn record(on: bool) {
        ON.set(on);
        MARKS.take();
    }

    pub fn region<T, E: From<candle_core::Error>>(
        name: &'static str,
        dev: &Device,
        f: impl FnOnce() -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let Device::Cuda(cuda) = dev else { return f() };
        if !ON.get() {
            return f();
        }
        debug_assert!(!OPEN.get(), "ops::phases: region {name} inside another");
        let stream = cuda.cuda_stream();
        let start = mark(&stream)?;
        OPEN.set(true);
        let out = f();
        OPEN.set(false);
        let out = out?;
        let end = mark(&stream)?;
        MARKS.with(|m| m.borrow_mut().push((name, start, end)));
        Ok(out)
    }

    pub fn take() -> Result<Vec<Phase>> {
        let mut phases: Vec<Phase> = Vec::new();
        for (name, start, end) in MARKS.take() {
            let ms = start.elapsed_ms(&end).map_err(wrap)? as f64;
            SPARE.with(|s| s.borrow_mut().extend([start, end]));
            match phases.iter_mut().find(|p| p.name == name) {
                Some(p) => {
                    p.calls += 1;
                    p.ms += ms;
                }
                None => phases.push(Phase { name, calls: 1, ms }),
            }
        }
        Ok(phases)
    }

    /// Milliseconds `f` keeps the stream of `dev` busy, end to end (events around it).
    pub fn span<E: From<candle_core::Error>>(
        dev: &Device,
        f: impl FnOnce() -> std::result::Result<(), E>,
    ) -> std::result::Result<Option<f64>, E> {
        let Device::Cuda(cuda) = dev else {
            f()?;
            return Ok(None);
        };
        let stream = cuda.cuda_stream();
        let start = mark(&stream)?;
        f()?;
        let end = mark(&stream)?;
        Ok(Some(start.elapsed_ms(&end).map_err(wrap)? as f64))
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::Phase;
    use candle_core::{Device, Result};

    pub fn record(_: bool) {}

    pub fn region<T, E>(
        _: &'static str,
        _: &Device,
        f: impl FnOnce() -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        f()
    }

    pub fn take() -> Result<Vec<Phase>> {
        Ok(Vec::new())
    }

    pub fn span<E>(
        _: &Device,
        f: impl FnOnce() -> std::result::Result<(), E>,
    ) -> std::result::Result<Option<f64>, E> {
        f()?;
        Ok(None)
    }
}

/// Switch recording on or off for this thread, dropping what was recorded.
pub fn record(on: bool) {
    imp::record(on)
}

/// Run `f`, which queues work on `dev`, as the region `name` (timed while recording is on).
pub fn region<T, E: From<candle_core::Error>>(
    name: &'static str,
    dev: &Device,
    f: impl FnOnce() -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    imp::region(name, dev, f)
}

/// The regions recorded since [`record`] switched it on, summed by name in the order each first
/// ran (waits for their events), and the record emptied.
pub fn take() -> Result<Vec<Phase>> {
    imp::take()
}

/// Milliseconds the device's stream spends on the work `f` queues, end to end (CUDA only:
/// `None` elsewhere, after running `f`).
pub fn span<E: From<candle_core::Error>>(
    dev: &Device,
    f: impl FnOnce() -> std::result::Result<(), E>,
) -> std::result::Result<Option<f64>, E> {
    imp::span(dev, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the CPU, regions run their closures and record nothing.
    #[test]
    fn cpu_regions_run_and_record_nothing() {
        record(true);
        let v = region("a", &Device::Cpu, || Ok::<_, candle_core::Error>(3)).unwrap();
        assert_eq!(v, 3);
        assert!(span(&Device::Cpu, || Ok::<_, candle_core::Error>(())).unwrap().is_none());
        assert!(take().unwrap().is_empty());
        record(false);
    }
}
