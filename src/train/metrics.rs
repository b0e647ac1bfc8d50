//! The run's metrics: a JSONL log (one line per logged optimizer step, appended and flushed as
//! it goes, truncated back on resume), and a progress bar with loss, lr and tokens/s.
//!
//! On `--resume` from the checkpoint at step `s`, [`MetricsLog::resume`] keeps the log's lines
//! up to step `s` byte for byte and drops the rest (steps a crashed run logged after its last
//! checkpoint), so the log continues as an uninterrupted run's would; only the wall-clock
//! fields (`tokens_per_s`, `elapsed_s`) can differ.

use crate::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Deserializer, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

/// One line of `metrics.jsonl`. Non-finite floats are written as `null` and read back as NaN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Optimizer steps completed (1 for the first step).
    pub step: u64,
    /// Mean training loss over the step's global batch.
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    /// The learning rate this step used.
    #[serde(deserialize_with = "nan_if_null")]
    pub lr: f64,
    /// Global gradient L2 norm before clipping.
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm: f64,
    /// Tokens processed in this step (all micro-batches, padding excluded).
    pub tokens: u64,
    /// Samples consumed since the start of training (NeMo's `consumed_samples`).
    pub consumed_samples: u64,
    /// This step's throughput.
    #[serde(deserialize_with = "nan_if_null")]
    pub tokens_per_s: f64,
    /// Training wall time since the start of the run, carried over across resumes.
    #[serde(deserialize_with = "nan_if_null")]
    pub elapsed_s: f64,
    /// Anything else the loop wants to record (e.g. `skipped_records`), after the fixed fields.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

impl StepRecord {
    /// The record as its JSONL line (without the newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("a StepRecord always serialises")
    }
}

/// Writes `dest` atomically: `write` fills a temporary file in the same directory, which is then
/// synced and renamed over `dest`. On error the temporary file is removed.
pub(crate) fn write_atomically(dest: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name =
        dest.file_name().ok_or_else(|| Error::Usage(format!("{}: not a file path", dest.display())))?;
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{}.tmp-{}-{n}", name.to_string_lossy(), std::process::id()));
    let result = write(&tmp).and_then(|()| {
        File::open(&tmp).and_then(|f| f.sync_all()).map_err(io(&tmp))?;
        std::fs::rename(&tmp, dest).map_err(io(dest))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    } else if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    result
}

/// The append-only `metrics.jsonl` of a run.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Starts a fresh log at `path` (an existing file is replaced).
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(|source| Error::Io { path: path.into(), source })?;
        Ok(MetricsLog { path: path.into(), file })
    }

    /// Reopens the log of a run resumed after `step` optimizer steps: lines for steps up to
    /// `step` are kept as they are, later ones (and a torn last line) dropped; the file is
    /// rewritten atomically before appending resumes. A missing file starts empty. Returns the
    /// log and the last kept record (to carry `elapsed_s` and `consumed_samples` over).
    pub fn resume(path: &Path, step: u64) -> Result<(Self, Option<StepRecord>)> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(Error::Io { path: path.into(), source }),
        };
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        let mut keep = String::new();
        let mut last = None;
        for (i, line) in lines.iter().enumerate() {
            let torn = !line.ends_with('\n');
            let rec = match serde_json::from_str::<StepRecord>(line.trim_end_matches('\n')) {
                Ok(r) if !torn => r,
                // Only the last line can be half-written by a killed run.
                _ if i + 1 == lines.len() => break,
                Ok(_) | Err(_) => {
                    return Err(Error::config(path, format!("line {} is not a metrics record", i + 1)))
                }
            };
            if rec.step > step {
                break;
            }
            keep.push_str(line);
            last = Some(rec);
        }
        write_atomically(path, |tmp| {
            std::fs::write(tmp, keep.as_bytes()).map_err(|source| Error::Io { path: tmp.into(), source })
        })?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|source| Error::Io { path: path.into(), source })?;
        Ok((MetricsLog { path: path.into(), file }, last))
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record and flushes it to the OS.
    pub fn append(&mut self, rec: &StepRecord) -> Result<()> {
        let mut line = rec.to_line();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|source| Error::Io { path: self.path.clone(), source })
    }
}

/// Every record of a metrics log, in file order (a torn last line is ignored).
pub fn read_records(path: &Path) -> Result<Vec<StepRecord>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.into(), source })?;
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(r) => out.push(r),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => break,
            Err(e) => return Err(Error::config(path, format!("line {}: {e}", i + 1))),
        }
    }
    Ok(out)
}

/// The training progress bar: `step [====>   ] 12/100 loss 1.2345 lr 2.00e-3 1234 tok/s eta 1m`.
/// Hidden when stderr is not a terminal (the metrics log is the record then).
pub struct TrainProgress {
    bar: ProgressBar,
}

impl TrainProgress {
    /// A bar for `max_steps` optimizer steps, starting at `start_step` (non-zero on resume).
    pub fn new(max_steps: u64, start_step: u64) -> Self {
        let bar =
            if std::io::stderr().is_terminal() { ProgressBar::new(max_steps) } else { ProgressBar::hidden() };
        bar.set_style(
            ProgressStyle::with_template("train [{bar:30}] {pos}/{len} {msg} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_position(start_step);
        bar.reset_eta();
        TrainProgress { bar }
    }

    /// Moves to `rec.step` and shows its loss, lr and throughput.
    pub fn update(&self, rec: &StepRecord) {
        self.bar.set_position(rec.step);
        self.bar.set_message(progress_message(rec));
    }

    /// Prints a line above the bar (or to stderr when the bar is hidden).
    pub fn println(&self, msg: &str) {
        if self.bar.is_hidden() {
            eprintln!("{msg}");
        } else {
            self.bar.println(msg);
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// `loss 1.2345 lr 2.00e-03 1234 tok/s`.
pub fn progress_message(rec: &StepRecord) -> String {
    format!("loss {:.4} lr {:.2e} {:.0} tok/s", rec.loss, rec.lr, rec.tokens_per_s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: u64, loss: f64) -> StepRecord {
        StepRecord {
            step,
            loss,
            lr: 1e-3 * step as f64,
            grad_norm: 0.5,
            tokens: 100,
            consumed_samples: 8 * step,
            tokens_per_s: 1234.5,
            elapsed_s: step as f64 * 0.25,
            extra: Default::default(),
        }
    }

    #[test]
    fn record_line_round_trip() {
        let mut r = rec(3, 1.5);
        r.extra.insert("skipped_records".into(), 2.into());
        let line = r.to_line();
        assert!(
            line.starts_with(r#"{"step":3,"loss":1.5,"lr":0.003,"grad_norm":0.5,"tokens":100,"#),
            "{line}"
        );
        assert!(line.ends_with(r#""elapsed_s":0.75,"skipped_records":2}"#), "{line}");
        assert_eq!(serde_json::from_str::<StepRecord>(&line).unwrap(), r);
        // NaN and inf go out as null and come back as NaN.
        let mut r = rec(1, f64::NAN);
        r.grad_norm = f64::INFINITY;
        let back: StepRecord = serde_json::from_str(&r.to_line()).unwrap();
        assert!(r.to_line().contains(r#""loss":null"#) && back.loss.is_nan() && back.grad_norm.is_nan());
        assert_eq!(progress_message(&rec(2, 1.23456)), "loss 1.2346 lr 2.00e-3 1234 tok/s");
    }

    #[test]
    fn append_then_resume_truncates_after_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");

        // Uninterrupted run: 6 steps.
        let mut log = MetricsLog::create(&path).unwrap();
        for s in 1..=6 {
            log.append(&rec(s, 2.0 / s as f64)).unwrap();
        }
        drop(log);
        let uninterrupted = std::fs::read(&path).unwrap();

        // A run that logged 5 steps, crashed mid-line, and resumes from its step-3 checkpoint.
        let mut log = MetricsLog::create(&path).unwrap();
        for s in 1..=5 {
            log.append(&rec(s, 2.0 / s as f64)).unwrap();
        }
        drop(log);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"step":6,"loss":0.3"#).unwrap();
        drop(f);
        let (mut log, last) = MetricsLog::resume(&path, 3).unwrap();
        assert_eq!(last, Some(rec(3, 2.0 / 3.0)));
        assert_eq!(read_records(&path).unwrap().iter().map(|r| r.step).collect::<Vec<_>>(), vec![1, 2, 3]);
        for s in 4..=6 {
            log.append(&rec(s, 2.0 / s as f64)).unwrap();
        }
        drop(log);
        assert_eq!(std::fs::read(&path).unwrap(), uninterrupted);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file left behind");

        // Resuming at the end keeps everything; at 0 keeps nothing; a missing log starts empty.
        let (_, last) = MetricsLog::resume(&path, 6).unwrap();
        assert_eq!(last.unwrap().step, 6);
        assert_eq!(std::fs::read(&path).unwrap(), uninterrupted);
        let (_, last) = MetricsLog::resume(&path, 0).unwrap();
        assert!(last.is_none() && std::fs::read(&path).unwrap().is_empty());
        let (mut log, last) = MetricsLog::resume(&dir.path().join("new.jsonl"), 5).unwrap();
        assert!(last.is_none());
        log.append(&rec(6, 1.0)).unwrap();
        assert_eq!(read_records(log.path()).unwrap(), vec![rec(6, 1.0)]);
    }

    #[test]
    fn sparse_logs_resume_at_the_last_logged_step_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let mut log = MetricsLog::create(&path).unwrap();
        for s in [2, 4, 6, 8] {
            log.append(&rec(s, 1.0)).unwrap();
        }
        let (_, last) = MetricsLog::resume(&path, 5).unwrap();
        assert_eq!(last.unwrap().step, 4);
        assert_eq!(read_records(&path).unwrap().len(), 2);
    }

    #[test]
    fn corrupt_lines_in_the_middle_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let good = rec(1, 1.0).to_line();
        std::fs::write(&path, format!("{good}\nnot json\n{}\n", rec(2, 1.0).to_line())).unwrap();
        let e = MetricsLog::resume(&path, 5).err().unwrap().to_string();
        assert!(e.contains("line 2 is not a metrics record"), "{e}");
        let e = read_records(&path).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        // The file is untouched by the failed resume.
        assert!(std::fs::read_to_string(&path).unwrap().contains("not json"));
    }

    #[test]
    fn atomic_write_cleans_up_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.bin");
        let e = write_atomically(&dest, |tmp| {
            std::fs::write(tmp, b"partial").unwrap();
            Err(Error::Usage("boom".into()))
        });
        assert!(e.is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        write_atomically(&dest, |tmp| {
            std::fs::write(tmp, b"ok").map_err(|source| Error::Io { path: tmp.into(), source })
        })
        .unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"ok");
    }

    #[test]
    fn hidden_progress_bar_is_harmless() {
        let p = TrainProgress::new(10, 3);
        p.update(&rec(4, 1.0));
        p.finish();
    }
}
