//! Tensor parallelism, simulated in one process.
//!
//! A TP-N model runs as N ranks, each a thread holding only its own shard of every weight and
//! executing the same code (SPMD), exactly as N GPUs would. Ranks meet only in the collectives of
//! [`Collective`]; the in-process group implements them with a shared slot per rank and a
//! barrier, and a real NCCL backend can implement the same trait later without touching the
//! models. Reductions add the ranks' tensors in rank order, so every rank gets bit-identical
//! results and a run is deterministic.

use crate::{Error, Result};
use candle_core::{Tensor, D};
use std::sync::{Arc, Condvar, Mutex};

/// What a rank needs from its tensor-parallel group.
pub trait Collective: Send + Sync {
    /// This rank's index in `0..world_size()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world_size(&self) -> usize;
    /// Element-wise sum of `x` over all ranks (every rank passes the same shape).
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor>;
    /// The ranks' `x` concatenated along the last dimension, in rank order.
    fn all_gather_last_dim(&self, x: &Tensor) -> Result<Tensor>;
}

/// A group of one: every collective is the identity.
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn all_gather_last_dim(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
}

/// Shared state of an in-process group: one slot per rank and a reusable barrier that can be
/// aborted, so a rank that fails wakes the others instead of leaving them waiting forever.
struct Group {
    world: usize,
    state: Mutex<GroupState>,
    turn: Condvar,
}

struct GroupState {
    slots: Vec<Option<Tensor>>,
    arrived: usize,
    generation: u64,
    aborted: bool,
}

impl Group {
    fn lock(&self) -> std::sync::MutexGuard<'_, GroupState> {
        // A poisoned lock means a rank panicked; the state is still consistent for aborting.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until every rank has arrived (or the group is aborted).
    fn barrier(&self) -> Result<()> {
        let mut s = self.lock();
        if s.aborted {
            return Err(aborted());
        }
        let generation = s.generation;
        s.arrived += 1;
        if s.arrived == self.world {
            s.arrived = 0;
            s.generation += 1;
            self.turn.notify_all();
            return Ok(());
        }
        while s.generation == generation && !s.aborted {
            s = self.turn.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        if s.aborted {
            return Err(aborted());
        }
        Ok(())
    }

    fn abort(&self) {
        self.lock().aborted = true;
        self.turn.notify_all();
    }

    /// Deposit `x`, wait for everyone, read all slots, wait again so no slot is overwritten
    /// before every rank has read it.
    fn exchange(&self, rank: usize, x: &Tensor) -> Result<Vec<Tensor>> {
        self.lock().slots[rank] = Some(x.clone());
        self.barrier()?;
        let all: Option<Vec<Tensor>> = self.lock().slots.iter().cloned().collect();
        self.barrier()?;
        all.ok_or_else(aborted)
    }
}

fn aborted() -> Error {
    Error::Usage("tensor-parallel group aborted: another rank failed".into())
}

/// One rank's handle on an in-process group.
pub struct InProcessRank {
    group: Arc<Group>,
    rank: usize,
}

impl InProcessRank {
    /// Handles for a group of `world` ranks, element `r` for rank `r`.
    pub fn group(world: usize) -> Vec<InProcessRank> {
        let group = Arc::new(Group {
            world,
            state: Mutex::new(GroupState {
                slots: vec![None; world],
                arrived: 0,
                generation: 0,
                aborted: false,
            }),
            turn: Condvar::new(),
        });
        (0..world).map(|rank| InProcessRank { group: group.clone(), rank }).collect()
    }
}

impl Collective for InProcessRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.group.world
    }
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        let all = self.group.exchange(self.rank, x)?;
        let mut sum = all[0].clone();
        for t in &all[1..] {
            sum = (sum + t)?;
        }
        Ok(sum)
    }
    fn all_gather_last_dim(&self, x: &Tensor) -> Result<Tensor> {
        let all = self.group.exchange(self.rank, x)?;
        Ok(Tensor::cat(&all, D::Minus1)?)
    }
}

/// Run `work(rank_state, collective)` on every rank at once, one thread per rank (inline for a
/// single rank), and return the results in rank order. A failing rank aborts the group so the
/// others return instead of blocking in a collective; the first real error is returned.
pub fn run_ranks<S, T, F>(states: &mut [S], work: F) -> Result<Vec<T>>
where
    S: Send,
    T: Send,
    F: Fn(&mut S, &dyn Collective) -> Result<T> + Sync,
{
    if states.len() == 1 {
        return Ok(vec![work(&mut states[0], &Solo)?]);
    }
    let handles = InProcessRank::group(states.len());
    let results: Vec<Result<T>> = std::thread::scope(|scope| {
        let threads: Vec<_> = states
            .iter_mut()
            .zip(&handles)
            .map(|(state, comm)| {
                let work = &work;
                scope.spawn(move || {
                    let out = work(state, comm);
                    if out.is_err() {
                        comm.group.abort();
                    }
                    out
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|_| Err(Error::Usage("a tensor-parallel rank panicked".into()))))
            .collect()
    });
    // Report the cause, not the "aborted" echoes of the other ranks.
    let is_echo = |e: &Error| matches!(e, Error::Usage(m) if m.starts_with("tensor-parallel group aborted"));
    let mut first_echo = None;
    let mut out = Vec::with_capacity(results.len());
    for r in results {
        match r {
            Ok(v) => out.push(v),
            Err(e) if is_echo(&e) => first_echo = first_echo.or(Some(e)),
            Err(e) => return Err(e),
        }
    }
    match first_echo {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn all_reduce_and_gather_across_four_ranks() {
        let mut ranks: Vec<usize> = (0..4).collect();
        let out = run_ranks(&mut ranks, |r, comm| {
            let x = Tensor::new(&[*r as f32, 1.0], &Device::Cpu)?;
            let sum = comm.all_reduce_sum(&x)?.to_vec1::<f32>()?;
            let gathered = comm.all_gather_last_dim(&x)?.to_vec1::<f32>()?;
            Ok((sum, gathered))
        })
        .unwrap();
        for (sum, gathered) in out {
            assert_eq!(sum, vec![6.0, 4.0]);
            assert_eq!(gathered, vec![0.0, 1.0, 1.0, 1.0, 2.0, 1.0, 3.0, 1.0]);
        }
    }

    #[test]
    fn a_failing_rank_aborts_the_group_instead_of_hanging() {
        let mut ranks: Vec<usize> = (0..3).collect();
        let err = run_ranks(&mut ranks, |r, comm| {
            if *r == 1 {
                return Err(Error::Usage("rank 1 broke".into()));
            }
            comm.all_reduce_sum(&Tensor::new(&[1f32], &Device::Cpu)?)?;
            Ok(())
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "rank 1 broke");
    }
}
