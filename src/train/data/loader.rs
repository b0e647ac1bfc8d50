//! The sample stream and its batches: a seeded permutation per epoch, a resumable cursor, and
//! worker threads that tokenise and decode images ahead of the training step.
//!
//! The stream is the concatenation of the epoch permutations (`rng::permutation(n, seed,
//! epoch)`), so a batch may span an epoch boundary and every batch has exactly `B` samples. The
//! loader's whole state is the seed and the cursor into that stream ([`LoaderState`]: epoch and
//! position), so a resumed run sees the same samples in the same order.
//!
//! Prefetching: worker `w` of `W` loads stream positions `start + w, start + w + W, …` and sends
//! each into its own bounded `sync_channel`; the consumer takes position `g` from worker
//! `(g − start) mod W`. Results therefore arrive in stream order with no reordering buffer, at most
//! `capacity · W` samples are ever ahead, and the output is the single-threaded one exactly (each
//! sample is a pure function of its position). Dropping the loader drops the receivers, which
//! wakes any worker blocked on a full channel, and joins the threads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{bad_record_error, rng, BadRecord, Dataset, OnBadRecord, Sample, IGNORE_INDEX};
use crate::infer::template::ImageSpan;
use crate::{Error, Result};

/// How the loader orders, prepares and pads.
#[derive(Debug, Clone)]
pub struct LoaderOptions {
    /// Shuffle seed (`trainer.seed`).
    pub seed: u64,
    /// Reshuffle every epoch; `false` = file order every epoch.
    pub shuffle: bool,
    /// Background threads (0 = load in the calling thread). The output does not depend on it.
    pub workers: usize,
    /// How many batches the workers may prepare ahead.
    pub prefetch_batches: usize,
    /// Input id of padding positions (LLaVA: `pad_token_id`, which LLaVA sets to `<unk>`; NeMo
    /// pads with 0). Padding is also masked out by `attention_mask` and −100 labels.
    pub pad_id: u32,
    /// Pad the time axis to a multiple of this (NeMo 1.23 pads to 4, later NeMo to 64; LLaVA to
    /// the longest sample, `None`).
    pub pad_to_multiple_of: Option<usize>,
    /// Where the batch tensors are created.
    pub device: Device,
}

impl LoaderOptions {
    /// Shuffled, 2 workers, 2 batches ahead, pad id 0, no rounding, CPU tensors.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            shuffle: true,
            workers: 2,
            prefetch_batches: 2,
            pad_id: 0,
            pad_to_multiple_of: None,
            device: Device::Cpu,
        }
    }
}

/// Where the loader is: enough to continue the same sample sequence after a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    /// The shuffle seed.
    pub seed: u64,
    /// Completed passes over the data.
    pub epoch: u64,
    /// Next position in this epoch's permutation.
    pub position: usize,
    /// Usable samples per epoch when the state was taken (a resume over changed data is refused).
    pub samples_per_epoch: usize,
}

/// A padded micro-batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[B, T]` u32 input ids, right-padded with `pad_id`.
    pub ids: Tensor,
    /// `[B, T]` i64 unshifted targets, −100 on masked and padding positions.
    pub labels: Tensor,
    /// `[B, T]` u8: 1 on real tokens, 0 on padding.
    pub attention_mask: Tensor,
    /// Real length of each sample.
    pub lengths: Vec<usize>,
    /// `[I, 3, H, W]` f32 pixels of the samples that have an image, in batch order; `None` when
    /// no sample has one.
    pub pixel_values: Option<Tensor>,
    /// Per sample: whether it has an image (its row in `pixel_values` is the count of earlier
    /// `true`s).
    pub has_image: Vec<bool>,
    /// Per sample: where its image features go.
    pub image_spans: Vec<Vec<ImageSpan>>,
    /// Per sample: the record id, for messages.
    pub record_ids: Vec<String>,
    /// Per sample: the record's position in the data file.
    pub record_indices: Vec<usize>,
    /// The epoch of the first sample.
    pub epoch: u64,
    /// Unmasked labels at positions ≥ 1: the targets a shifted next-token loss sees.
    pub num_targets: usize,
}

/// Pads samples into a [`Batch`]. All images must have the same size (`keep` aspect mode gives
/// per-image sizes and cannot be batched with others).
pub fn collate(
    samples: &[Sample],
    epoch: u64,
    pad_id: u32,
    pad_to_multiple_of: Option<usize>,
    device: &Device,
) -> Result<Batch> {
    if samples.is_empty() {
        return Err(Error::Usage("cannot collate an empty batch".into()));
    }
    let b = samples.len();
    let longest = samples.iter().map(|s| s.example.ids.len()).max().unwrap_or(0).max(1);
    let t = match pad_to_multiple_of {
        Some(m) if m > 1 => longest.div_ceil(m) * m,
        _ => longest,
    };
    let mut ids = vec![pad_id; b * t]; // [B, T]
    let mut labels = vec![IGNORE_INDEX; b * t]; // [B, T]
    let mut mask = vec![0u8; b * t]; // [B, T]
    let mut pixels = Vec::new();
    let mut image_size = None;
    let mut num_targets = 0;
    for (row, s) in samples.iter().enumerate() {
        let n = s.example.ids.len();
        ids[row * t..row * t + n].copy_from_slice(&s.example.ids);
        labels[row * t..row * t + n].copy_from_slice(&s.example.labels);
        mask[row * t..row * t + n].fill(1);
        num_targets += s.example.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count();
        if let Some(p) = &s.pixels {
            match image_size {
                None => image_size = Some((p.height, p.width)),
                Some(hw) if hw != (p.height, p.width) => {
                    return Err(Error::Usage(format!(
                        "record {:?}: image is {}x{} but another in the batch is {}x{}; images of \
                         different sizes (aspect mode keep) cannot share a batch",
                        s.example.id, p.height, p.width, hw.0, hw.1
                    )))
                }
                Some(_) => {}
            }
            pixels.extend_from_slice(&p.data);
        }
    }
    let pixel_values = match image_size {
        Some((h, w)) => {
            let i = pixels.len() / (3 * h * w);
            Some(Tensor::from_vec(pixels, (i, 3, h, w), device)?) // [I, 3, H, W]
        }
        None => None,
    };
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, t), device)?,
        labels: Tensor::from_vec(labels, (b, t), device)?,
        attention_mask: Tensor::from_vec(mask, (b, t), device)?,
        lengths: samples.iter().map(|s| s.example.ids.len()).collect(),
        pixel_values,
        has_image: samples.iter().map(|s| s.pixels.is_some()).collect(),
        image_spans: samples.iter().map(|s| s.example.image_spans.clone()).collect(),
        record_ids: samples.iter().map(|s| s.example.id.clone()).collect(),
        record_indices: samples.iter().map(|s| s.example.index).collect(),
        epoch,
        num_targets,
    })
}

type Item = (u64, std::result::Result<Sample, BadRecord>);

/// The sample at stream position `g` (a pure function of the dataset, seed and `g`).
struct Order {
    n: u64,
    seed: u64,
    shuffle: bool,
    cached: Option<(u64, Vec<u32>)>,
}

impl Order {
    fn new(n: usize, seed: u64, shuffle: bool) -> Self {
        Self { n: n as u64, seed, shuffle, cached: None }
    }

    fn sample_at(&mut self, g: u64) -> usize {
        let (epoch, pos) = (g / self.n, (g % self.n) as usize);
        if !self.shuffle {
            return pos;
        }
        if self.cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.cached = Some((epoch, rng::permutation(self.n as usize, self.seed, epoch)));
        }
        self.cached.as_ref().map_or(pos, |(_, p)| p[pos] as usize)
    }
}

struct Pipeline {
    start: u64,
    receivers: Vec<Receiver<Item>>,
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl Pipeline {
    fn spawn(
        dataset: &Arc<Dataset>,
        seed: u64,
        shuffle: bool,
        start: u64,
        workers: usize,
        ahead: usize,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let capacity = ahead.div_ceil(workers).max(1);
        let mut pipeline = Pipeline { start, receivers: Vec::new(), stop, handles: Vec::new() };
        for w in 0..workers {
            let (tx, rx) = sync_channel(capacity);
            let (dataset, stop) = (Arc::clone(dataset), Arc::clone(&pipeline.stop));
            let first = start + w as u64;
            let handle = std::thread::Builder::new()
                .name(format!("data-{w}"))
                .spawn(move || worker(&dataset, seed, shuffle, first, workers as u64, &stop, &tx))
                .map_err(|e| Error::Usage(format!("cannot start data worker {w}: {e}")))?;
            pipeline.receivers.push(rx);
            pipeline.handles.push(handle);
        }
        Ok(pipeline)
    }

    fn recv(&self, g: u64) -> Result<std::result::Result<Sample, BadRecord>> {
        let w = ((g - self.start) % self.receivers.len() as u64) as usize;
        match self.receivers[w].recv() {
            Ok((got, item)) if got == g => Ok(item),
            Ok((got, _)) => {
                Err(Error::Usage(format!("data worker {w} delivered sample {got}, expected {g} (a bug)")))
            }
            Err(_) => Err(Error::Usage(format!("data worker {w} stopped unexpectedly"))),
        }
    }
}

fn worker(
    dataset: &Dataset,
    seed: u64,
    shuffle: bool,
    first: u64,
    step: u64,
    stop: &AtomicBool,
    tx: &SyncSender<Item>,
) {
    let mut order = Order::new(dataset.len(), seed, shuffle);
    let mut g = first;
    while !stop.load(Ordering::Relaxed) {
        let item = dataset.load(order.sample_at(g));
        if tx.send((g, item)).is_err() {
            break; // the loader is gone
        }
        g += step;
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Disconnecting wakes workers blocked in `send`; one busy loading stops after that sample.
        self.receivers.clear();
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

/// Batches from a [`Dataset`] in a seeded, resumable order.
pub struct DataLoader {
    dataset: Arc<Dataset>,
    opts: LoaderOptions,
    /// Stream position of the next sample: `epoch · n + position`.
    cursor: u64,
    order: Order,
    pipeline: Option<Pipeline>,
    skipped: Vec<BadRecord>,
}

impl std::fmt::Debug for DataLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataLoader")
            .field("state", &self.state())
            .field("workers", &self.opts.workers)
            .finish()
    }
}

impl DataLoader {
    /// A loader at epoch 0, position 0. Workers start on the first [`DataLoader::next_batch`].
    pub fn new(dataset: Arc<Dataset>, opts: LoaderOptions) -> Result<Self> {
        if dataset.is_empty() {
            return Err(Error::config(
                &dataset.config().data_path,
                format!("no usable record ({} bad)", dataset.report().bad.len()),
            ));
        }
        let order = Order::new(dataset.len(), opts.seed, opts.shuffle);
        Ok(Self { dataset, opts, cursor: 0, order, pipeline: None, skipped: Vec::new() })
    }

    /// Samples per epoch.
    pub fn samples_per_epoch(&self) -> usize {
        self.dataset.len()
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }

    /// The position of the next sample; save it with a checkpoint.
    pub fn state(&self) -> LoaderState {
        let n = self.dataset.len() as u64;
        LoaderState {
            seed: self.order.seed,
            epoch: self.cursor / n,
            position: (self.cursor % n) as usize,
            samples_per_epoch: self.dataset.len(),
        }
    }

    /// Continues from a saved state (its seed included), so the next batch is the one that
    /// would have followed when the state was taken.
    pub fn restore(&mut self, state: LoaderState) -> Result<()> {
        let n = self.dataset.len();
        let path = &self.dataset.config().data_path;
        if state.samples_per_epoch != n {
            return Err(Error::config(
                path,
                format!(
                    "cannot resume: the data has {n} usable samples, the saved loader state {} \
                     (the data file or the data settings changed)",
                    state.samples_per_epoch
                ),
            ));
        }
        if state.position >= n {
            return Err(Error::config(
                path,
                format!("cannot resume: position {} is beyond the {n} samples of an epoch", state.position),
            ));
        }
        let cursor = state.epoch.checked_mul(n as u64).and_then(|c| c.checked_add(state.position as u64));
        let Some(cursor) = cursor else {
            return Err(Error::config(path, format!("cannot resume: epoch {} is out of range", state.epoch)));
        };
        self.pipeline = None; // stops and joins the workers of the old position
        self.order = Order::new(n, state.seed, self.opts.shuffle);
        self.opts.seed = state.seed;
        self.cursor = cursor;
        Ok(())
    }

    /// Bad records met while loading (images that failed to decode) under
    /// [`OnBadRecord::Skip`], since the last call.
    pub fn take_skipped(&mut self) -> Vec<BadRecord> {
        std::mem::take(&mut self.skipped)
    }

    /// The next `micro_batch_size` samples, padded. Crossing the end of an epoch continues with
    /// the next epoch's permutation.
    pub fn next_batch(&mut self, micro_batch_size: usize) -> Result<Batch> {
        if micro_batch_size == 0 {
            return Err(Error::Usage("micro_batch_size must be at least 1".into()));
        }
        let n = self.dataset.len() as u64;
        let mut samples = Vec::with_capacity(micro_batch_size);
        let mut epoch = None;
        let mut failed_in_a_row = 0u64;
        while samples.len() < micro_batch_size {
            let g = self.cursor;
            let item = if self.opts.workers == 0 {
                self.dataset.load(self.order.sample_at(g))
            } else {
                let pipeline = match self.pipeline.take() {
                    Some(p) => p,
                    None => Pipeline::spawn(
                        &self.dataset,
                        self.opts.seed,
                        self.opts.shuffle,
                        g,
                        self.opts.workers,
                        self.opts.prefetch_batches.max(1) * micro_batch_size,
                    )?,
                };
                let item = pipeline.recv(g);
                self.pipeline = Some(pipeline);
                item?
            };
            self.cursor += 1;
            match item {
                Ok(sample) => {
                    epoch.get_or_insert(g / n);
                    samples.push(sample);
                    failed_in_a_row = 0;
                }
                Err(bad) => match self.dataset.config().on_bad_record {
                    OnBadRecord::Error => {
                        return Err(bad_record_error(&self.dataset.config().data_path, &bad))
                    }
                    OnBadRecord::Skip => {
                        self.skipped.push(bad);
                        failed_in_a_row += 1;
                        if failed_in_a_row >= n {
                            return Err(Error::config(
                                &self.dataset.config().data_path,
                                "no sample of a whole epoch could be loaded (every image failed)",
                            ));
                        }
                    }
                },
            }
        }
        collate(
            &samples,
            epoch.unwrap_or(0),
            self.opts.pad_id,
            self.opts.pad_to_multiple_of,
            &self.opts.device,
        )
    }
}
