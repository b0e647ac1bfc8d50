//! A LLaMA-2 language model run at tensor-parallel size N: N [`Llama`] ranks driven together by
//! [`crate::parallel::run_ranks`]. Image features (NeVA / LLaVA) are computed once, outside the
//! ranks, and written over the embeddings of their token positions on every rank (the vision
//! tower and projector are replicated in NeVA, so every rank would compute the same values).

use crate::models::llama::{canonical_shard_spec, Llama, LlamaOutput, RankLayout};
use crate::parallel::run_ranks;
use crate::weights::{rank_tensors, TensorMapBackend};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use shardsmith_converters::convert::llama::CanonicalLlama;
use shardsmith_converters::names::llama::LlamaHparams;
use shardsmith_converters::shard;

/// Features that replace the embeddings of `features.dim(0)` consecutive positions of one
/// sequence, starting at `start`.
#[derive(Clone, Debug)]
pub struct ImageSpan {
    /// Which sequence of the batch.
    pub batch: usize,
    /// First position overwritten.
    pub start: usize,
    /// [N, H] projected image features.
    pub features: Tensor,
}

/// LLaMA at TP = N, in one process.
pub struct ParallelLlama {
    ranks: Vec<Llama>,
    hparams: LlamaHparams,
}

impl ParallelLlama {
    /// Split `c` for `tp` ranks (lazily, with the resharder's rules) and load each rank's shard
    /// in `dtype` on `device`.
    pub fn load(c: &CanonicalLlama, tp: usize, dtype: DType, device: &Device) -> Result<Self> {
        let hp = &c.hparams;
        if tp == 0 {
            return Err(Error::Usage("--tp must be at least 1".into()));
        }
        let padded_vocab = shard::padded_vocab(hp.vocab, shard::divisible_by_for_hf_vocab(hp.vocab), tp);
        let ranks = (0..tp)
            .map(|rank| {
                let tensors =
                    rank_tensors(&c.tensors, tp, rank, |n| canonical_shard_spec(n, hp.vocab, padded_vocab))?;
                let vb = TensorMapBackend::new(tensors, &c.origin).into_var_builder(dtype, device);
                Llama::load(vb, hp, RankLayout { tp, rank, padded_vocab })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ParallelLlama { ranks, hparams: hp.clone() })
    }

    /// The single rank of a TP-1 model (training runs at TP 1).
    pub fn single_mut(&mut self) -> Result<&mut Llama> {
        match self.ranks.as_mut_slice() {
            [one] => Ok(one),
            ranks => Err(Error::Usage(format!("expected a TP-1 model, this one runs {} ranks", ranks.len()))),
        }
    }

    /// The ranks, in order.
    pub fn ranks(&self) -> &[Llama] {
        &self.ranks
    }

    /// The ranks, in order, mutably.
    pub fn ranks_mut(&mut self) -> &mut [Llama] {
        &mut self.ranks
    }

    /// A TP-1 model from one rank (e.g. built over trainable variables).
    pub fn from_rank(rank: Llama, hparams: LlamaHparams) -> Self {
        ParallelLlama { ranks: vec![rank], hparams }
    }

    /// The model's hyper-parameters.
    pub fn hparams(&self) -> &LlamaHparams {
        &self.hparams
    }

    /// Tensor-parallel size.
    pub fn tp(&self) -> usize {
        self.ranks.len()
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        self.ranks[0].dtype()
    }

    /// The weights' device.
    pub fn device(&self) -> &Device {
        self.ranks[0].device()
    }

    /// Tokens in the KV cache.
    pub fn position(&self) -> usize {
        self.ranks[0].position()
    }

    /// Allocate KV caches for sequences of up to `positions` tokens ([`Llama::reserve`]).
    pub fn reserve(&mut self, positions: usize) {
        self.ranks.iter_mut().for_each(|r| r.reserve(positions));
    }

    /// Decode through recorded CUDA graphs where they apply (the default) or eagerly
    /// ([`Llama::set_graph_decode`]).
    #[cfg(feature = "cuda")]
    pub fn set_graph_decode(&mut self, on: bool) {
        self.ranks.iter_mut().for_each(|r| r.set_graph_decode(on));
    }

    /// Free the KV caches and rotary tables ([`Llama::release_caches`]).
    pub fn release_caches(&mut self) {
        self.ranks.iter_mut().for_each(Llama::release_caches);
    }

    /// Start a new sequence.
    pub fn reset(&mut self) {
        self.ranks.iter_mut().for_each(Llama::reset);
    }

    /// ids [B, T] (u32) after the cached tokens, with `images` written over their positions.
    /// Returns rank 0's output (every rank holds the same after the final gather).
    pub fn forward(
        &mut self,
        ids: &Tensor,
        images: &[ImageSpan],
        last_only: bool,
        hidden_states: bool,
    ) -> Result<LlamaOutput> {
        // A decode step on one CUDA rank: replayed from a recorded graph where it applies.
        #[cfg(feature = "cuda")]
        if let ([rank], true) = (self.ranks.as_mut_slice(), images.is_empty() && last_only && !hidden_states)
        {
            if let Some(out) = rank.graph_step(ids)? {
                return Ok(out);
            }
        }
        let mut outs = run_ranks(&mut self.ranks, |rank, comm| {
            let mut x = rank.embed(ids, comm)?;
            for span in images {
                x = overwrite(&x, span)?;
            }
            rank.forward_embeds(&x, comm, last_only, hidden_states)
        })?;
        Ok(outs.swap_remove(0))
    }
}

/// x [B, T, H] with rows `start..start+N` of sequence `batch` replaced by the span's features.
fn overwrite(x: &Tensor, span: &ImageSpan) -> Result<Tensor> {
    let (b, t, h) = x.dims3()?;
    let (n, fh) = span.features.dims2()?;
    if span.batch >= b || span.start + n > t || fh != h {
        return Err(Error::Usage(format!(
            "image features [{n}, {fh}] at sequence {} position {} do not fit the embeddings [{b}, {t}, {h}]",
            span.batch, span.start
        )));
    }
    let features = span.features.to_dtype(x.dtype())?.unsqueeze(0)?;
    Ok(x.slice_assign(&[span.batch..span.batch + 1, span.start..span.start + n, 0..h], &features)?)
}
