//! Training data for NeVA / LLaVA finetuning: conversation records → tokenised, label-masked
//! samples with preprocessed images, in a seeded order that a `--resume` continues exactly,
//! prepared ahead of the training step on worker threads.
//!
//! The stages, each in its own file:
//!
//! * `records.rs` — LLaVA's JSON array and NeMo's `.jsonl` (formats.md §9.1) → [`Record`]s. A file
//!   that is not JSON is one error (line and column); a record of the wrong shape is a
//!   [`BadRecord`].
//! * `example.rs` — template rendering, tokenisation, `<image>` expansion and label masking,
//!   following LLaVA's or NeMo's preprocessors line by line (formats.md §9.2, §9.3, §6.5); see its
//!   docs for the rules and for the label convention (unshifted, −100 = ignored).
//! * `images.rs` — an image directory or `.tar`, and CLIP preprocessing (`infer::image`, §9.4).
//! * `loader.rs` — the per-epoch permutation (`rng.rs`), the resumable [`LoaderState`], the
//!   prefetching workers and the padded [`Batch`].
//!
//! [`Dataset::open`] reads every record, tokenises and masks it (in parallel) and checks that its
//! image exists and has a readable header, so every bad record is known — reported or fatal, per
//! [`OnBadRecord`] — before the first step. Only pixel decoding waits for the loader; an image
//! that fails then is handled by the same policy.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::infer::image::{AspectMode, PixelValues, PreprocessConfig};
use crate::infer::tokenizer::Tokenizer;
use crate::{Error, Result};

mod example;
mod images;
mod loader;
mod records;
mod rng;
#[cfg(test)]
mod tests;

pub use example::{build_example, legacy_tokenizer, Example, ExampleConfig, Remark, IGNORE_INDEX};
pub use images::ImageStore;
pub use loader::{collate, Batch, DataLoader, LoaderOptions, LoaderState};
pub use records::{parse_json_array, parse_jsonl, read_records, Record, Speaker, Turn};

/// What a bad record does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadRecord {
    /// Stop with an error naming the record.
    #[default]
    Error,
    /// Leave the record out, list it in the report, go on.
    Skip,
}

/// A record that cannot be trained on, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BadRecord {
    /// Position in the data file.
    pub index: usize,
    /// The record's `id` (`#<index>` when it has none; `line N` for unparseable `.jsonl` lines).
    pub id: String,
    /// What is wrong.
    pub reason: BadReason,
}

/// Why a record is unusable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "detail")]
pub enum BadReason {
    /// Wrong shape: a field of the wrong type, no `conversations`, an unknown speaker, a `.jsonl`
    /// line that is not JSON.
    Invalid(String),
    /// The image file does not exist.
    MissingImage(PathBuf),
    /// The image file cannot be decoded.
    UnreadableImage {
        /// The file (or `archive.tar:member`).
        path: PathBuf,
        /// The decoder's message.
        detail: String,
    },
    /// More than one image (`MAX_NUM_IMAGES = 1` in NeMo; LLaVA-1.5 likewise).
    TooManyImages(usize),
    /// More than one `<image>` in the text of a one-image record.
    TooManyImageMarkers(usize),
    /// `<image>` in the text of a record without an image.
    MarkerWithoutImage(usize),
    /// `<image>` in an assistant turn.
    ImageInAssistantTurn,
    /// Speakers must alternate human, gpt, human, … (after a leading gpt turn, which is dropped);
    /// `turn` is the index of the first one out of order.
    RolesDoNotAlternate {
        /// Index into `conversations`.
        turn: usize,
    },
    /// No gpt turn to learn from.
    NoAssistantTurn,
    /// Every label is masked (e.g. only empty assistant turns).
    NoTrainableTokens,
    /// LLaVA flavour: the round arithmetic ended at `computed` but the sample has `actual` tokens,
    /// so LLaVA masks the whole sample ("tokenization mismatch").
    LengthMismatch {
        /// Where the masking cursor ended.
        computed: usize,
        /// The real token count.
        actual: usize,
    },
    /// Cutting to `max_len` removed every assistant token.
    AssistantTruncated {
        /// The limit.
        max_len: usize,
    },
    /// Cutting to `max_len` would cut into (or remove) the image tokens.
    ImageTruncated {
        /// The limit.
        max_len: usize,
        /// The sample's full length.
        len: usize,
    },
    /// The template cannot render the record (e.g. `plain` without an image).
    Template(String),
    /// The tokenizer failed on the text.
    Tokenizer(String),
}

impl std::fmt::Display for BadReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadReason::Invalid(why) => write!(f, "{why}"),
            BadReason::MissingImage(p) => write!(f, "image {} does not exist", p.display()),
            BadReason::UnreadableImage { path, detail } => {
                write!(f, "image {} cannot be read: {detail}", path.display())
            }
            BadReason::TooManyImages(n) => write!(f, "{n} images; only one image per record is supported"),
            BadReason::TooManyImageMarkers(n) => {
                write!(f, "the text has {n} <image> markers for its one image")
            }
            BadReason::MarkerWithoutImage(n) => {
                write!(f, "the text has {n} <image> marker(s) but the record has no image")
            }
            BadReason::ImageInAssistantTurn => write!(f, "<image> in an assistant turn"),
            BadReason::RolesDoNotAlternate { turn } => {
                write!(f, "turn {turn} breaks the human/gpt alternation")
            }
            BadReason::NoAssistantTurn => write!(f, "no assistant (gpt) turn"),
            BadReason::NoTrainableTokens => write!(f, "no assistant tokens to train on"),
            BadReason::LengthMismatch { computed, actual } => write!(
                f,
                "tokenization mismatch: the rounds add up to {computed} tokens, the sample has \
                 {actual}; LLaVA masks such a sample entirely"
            ),
            BadReason::AssistantTruncated { max_len } => {
                write!(f, "every assistant token lies beyond max_len {max_len}")
            }
            BadReason::ImageTruncated { max_len, len } => {
                write!(f, "the image tokens do not fit in max_len {max_len} (sample has {len} tokens)")
            }
            BadReason::Template(why) => write!(f, "{why}"),
            BadReason::Tokenizer(why) => write!(f, "{why}"),
        }
    }
}

impl std::fmt::Display for BadRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "record {:?} (#{}): {}", self.id, self.index, self.reason)
    }
}

/// The error for a bad record under [`OnBadRecord::Error`].
pub(crate) fn bad_record_error(data_path: &Path, bad: &BadRecord) -> Error {
    Error::config(data_path, format!("{bad} (on_bad_record: skip leaves such records out)"))
}

/// Everything [`Dataset::open`] needs.
#[derive(Debug, Clone)]
pub struct DatasetConfig {
    /// LLaVA JSON array, or NeMo `.jsonl`.
    pub data_path: PathBuf,
    /// Image directory or `.tar`; `None` = the data file's directory.
    pub image_folder: Option<PathBuf>,
    /// Template, flavour, image tokens, `max_len`.
    pub example: ExampleConfig,
    /// The vision tower's `preprocessor_config.json`.
    pub preprocess: PreprocessConfig,
    /// `image_aspect_ratio`.
    pub aspect: AspectMode,
    /// Skip or stop on bad records.
    pub on_bad_record: OnBadRecord,
    /// Check at open that every image's header decodes (one small read per image). Missing files
    /// are always reported.
    pub check_images: bool,
}

/// A remark about a usable record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordRemark {
    /// Position in the data file.
    pub index: usize,
    /// The record's id.
    pub id: String,
    /// What was noticed.
    pub remark: Remark,
}

/// What [`Dataset::open`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DataReport {
    /// Records in the file.
    pub records: usize,
    /// Records that became samples.
    pub usable: usize,
    /// Records left out (under [`OnBadRecord::Skip`]), in file order.
    pub bad: Vec<BadRecord>,
    /// Fix-ups and oddities of usable records.
    pub remarks: Vec<RecordRemark>,
    /// Usable samples cut to `max_len`.
    pub truncated: usize,
    /// Usable samples with an image.
    pub with_image: usize,
    /// Sum of the usable samples' token counts (after truncation).
    pub tokens: u64,
    /// Sum of their unmasked labels.
    pub trainable_tokens: u64,
    /// The longest usable sample.
    pub max_tokens: usize,
}

/// One loaded sample: the tokenised example and its preprocessed image.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Ids, labels, image spans.
    pub example: Example,
    /// `[3, H, W]` pixels when the record has an image.
    pub pixels: Option<PixelValues>,
}

/// The usable records of a data file, validated, with the tokenizer and image store to turn
/// each into a [`Sample`].
pub struct Dataset {
    cfg: DatasetConfig,
    tokenizer: Tokenizer,
    records: Vec<Record>,
    /// Sample i is `records[usable[i]]`.
    usable: Vec<usize>,
    /// Token count of each usable sample.
    lengths: Vec<u32>,
    images: Option<ImageStore>,
    report: DataReport,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("data_path", &self.cfg.data_path)
            .field("records", &self.records.len())
            .field("usable", &self.usable.len())
            .field("images", &self.images)
            .finish()
    }
}

impl Dataset {
    /// Reads, validates, tokenises and masks every record (in parallel; the result does not
    /// depend on the thread count). Under [`OnBadRecord::Error`] the first bad record in file
    /// order is the error; under `Skip` it is listed in [`Dataset::report`].
    pub fn open(cfg: DatasetConfig, tokenizer: Tokenizer) -> Result<Self> {
        cfg.example.validate(&tokenizer)?;
        let parsed = read_records(&cfg.data_path)?;
        let needs_images = parsed.iter().any(|r| r.as_ref().is_ok_and(|r| r.image.is_some()));
        let images = if needs_images {
            let folder = match &cfg.image_folder {
                Some(f) => f.clone(),
                None => cfg.data_path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            };
            Some(ImageStore::open(&folder)?)
        } else {
            None
        };
        let checked: Vec<std::result::Result<(Record, Example), BadRecord>> = parsed
            .into_par_iter()
            .map(|parsed| {
                let record = parsed?;
                let bad = |reason| BadRecord { index: record.index, id: record.id.clone(), reason };
                if let (Some(name), Some(store)) = (&record.image, &images) {
                    if cfg.check_images { store.check(name) } else { store.exists(name) }.map_err(bad)?;
                }
                let example = build_example(&tokenizer, &cfg.example, &record).map_err(bad)?;
                Ok((record, example))
            })
            .collect();

        let mut report = DataReport { records: checked.len(), ..DataReport::default() };
        let mut records = Vec::with_capacity(checked.len());
        let (mut usable, mut lengths) = (Vec::new(), Vec::new());
        for item in checked {
            match item {
                Ok((record, example)) => {
                    usable.push(records.len());
                    lengths.push(example.ids.len() as u32);
                    report.usable += 1;
                    report.truncated += usize::from(example.truncated);
                    report.with_image += usize::from(example.image.is_some());
                    report.tokens += example.ids.len() as u64;
                    report.trainable_tokens +=
                        example.labels.iter().filter(|&&l| l != IGNORE_INDEX).count() as u64;
                    report.max_tokens = report.max_tokens.max(example.ids.len());
                    for remark in example.remarks {
                        report.remarks.push(RecordRemark {
                            index: record.index,
                            id: record.id.clone(),
                            remark,
                        });
                    }
                    records.push(record);
                }
                Err(bad) => match cfg.on_bad_record {
                    OnBadRecord::Error => return Err(bad_record_error(&cfg.data_path, &bad)),
                    OnBadRecord::Skip => report.bad.push(bad),
                },
            }
        }
        Ok(Self { cfg, tokenizer, records, usable, lengths, images, report })
    }

    /// Number of usable samples (one epoch).
    pub fn len(&self) -> usize {
        self.usable.len()
    }

    /// Whether no record was usable.
    pub fn is_empty(&self) -> bool {
        self.usable.is_empty()
    }

    /// What [`Dataset::open`] found.
    pub fn report(&self) -> &DataReport {
        &self.report
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &DatasetConfig {
        &self.cfg
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token count of each sample (after truncation), for length statistics or grouping.
    pub fn lengths(&self) -> &[u32] {
        &self.lengths
    }

    /// The record behind sample `i`.
    pub fn record(&self, i: usize) -> &Record {
        &self.records[self.usable[i]]
    }

    /// Sample `i` tokenised and masked (no image decoding).
    pub fn example(&self, i: usize) -> std::result::Result<Example, BadRecord> {
        let record = self.record(i);
        build_example(&self.tokenizer, &self.cfg.example, record).map_err(|reason| BadRecord {
            index: record.index,
            id: record.id.clone(),
            reason,
        })
    }

    /// Sample `i` with its image decoded and preprocessed.
    pub fn load(&self, i: usize) -> std::result::Result<Sample, BadRecord> {
        let example = self.example(i)?;
        let pixels =
            match (&example.image, &self.images) {
                (None, _) => None,
                (Some(name), Some(store)) => {
                    Some(store.load(name, &self.cfg.preprocess, self.cfg.aspect).map_err(|reason| {
                        BadRecord { index: example.index, id: example.id.clone(), reason }
                    })?)
                }
                (Some(name), None) => {
                    return Err(BadRecord {
                        index: example.index,
                        id: example.id.clone(),
                        reason: BadReason::MissingImage(PathBuf::from(name)),
                    })
                }
            };
        Ok(Sample { example, pixels })
    }
}
