//! A block computed outside autograd, attached to the graph as one node with a hand-written
//! backward.
//!
//! candle's backward visits every node of a block and, for each gradient, zero-fills an
//! accumulator and adds into it (`GradStore::or_insert` + `add`): for a frozen decoder layer
//! in bf16 (NeVA stage 1) that bookkeeping was a fifth of the step. A block whose backward is
//! known in closed form (and whose parameters do not train) can run its forward on detached
//! tensors and join the graph once, through [`opaque`].

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};
use std::sync::{Arc, Mutex};

/// Parameter gradients computed by opaque blocks' backwards, keyed by the parameter's tensor
/// (a variable), until [`GradSink::drain_into`] moves them into a backward's [`GradStore`].
#[derive(Clone, Default)]
pub struct GradSink(Arc<Mutex<Vec<(Tensor, Tensor)>>>);

impl GradSink {
    /// Record `grad` for `param` (summed with any other for the same parameter when drained).
    pub fn deposit(&self, param: &Tensor, grad: Tensor) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push((param.clone(), grad));
    }

    /// Add every recorded gradient into `grads` (to what is there for the same parameter) and
    /// forget them.
    pub fn drain_into(&self, grads: &mut GradStore) -> Result<()> {
        let pending = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        for (param, g) in pending {
            let g = match grads.remove(&param) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            grads.insert(&param, g);
        }
        Ok(())
    }
}

/// The backward of an opaque block: output gradient → input gradient.
pub type Backward = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

struct Opaque {
    /// The block's output, handed over by the forward (then dropped here).
    output: Mutex<Option<Tensor>>,
    backward: Backward,
}

impl Opaque {
    fn take_output(&self) -> Result<Tensor> {
        match self.output.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(y) => Ok(y),
            None => bail!("opaque: forward applied twice"),
        }
    }
}

impl CustomOp1 for Opaque {
    fn name(&self) -> &'static str {
        "opaque"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.take_output()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, y.shape().clone())),
            _ => bail!("opaque: the block's output is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s: &candle_core::CudaStorage,
        _l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = self.take_output()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, y.shape().clone())),
            _ => bail!("opaque: the block's output is not on the GPU"),
        }
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.backward)(dy)?))
    }
}

/// `y`, computed from `x` outside autograd, as a node of x's graph whose backward is
/// `backward(dy) = dx`. `y` must be on x's device; it is copied once into the node.
pub fn opaque(
    x: &Tensor,
    y: Tensor,
    backward: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    // A fresh contiguous buffer starting at offset 0: what a custom op's output must be.
    let y = if y.is_contiguous() && y.layout().start_offset() == 0 { y } else { y.copy()? };
    x.apply_op1(Opaque { output: Mutex::new(Some(y)), backward: Box::new(backward) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_diff, randn};
    use candle_core::Var;

    /// y = 3x² as an opaque block with its closed-form backward agrees with autograd.
    #[test]
    fn opaque_block_backward_matches_autograd() {
        let x = Var::from_tensor(&randn(&[4, 5], 1)).unwrap();
        let probe = randn(&[4, 5], 2);
        let composed = (x.as_tensor().sqr().unwrap() * 3.0).unwrap();
        let xd = x.as_tensor().detach();
        let y = (xd.sqr().unwrap() * 3.0).unwrap();
        let ours = opaque(x.as_tensor(), y, move |dy| dy * (&xd * 6.0)?).unwrap();
        assert_eq!(max_diff(&ours, &composed), 0.0);
        let grad = |y: &Tensor| {
            (y * &probe).unwrap().sum_all().unwrap().backward().unwrap().get(&x).unwrap().clone()
        };
        assert!(max_diff(&grad(&ours), &grad(&composed)) < 1e-6);
    }
}
