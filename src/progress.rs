//! A progress bar with bytes/s for long writes, shown only on a terminal (quiet in pipes).

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Polls the converters' written-bytes counter from a background thread until dropped.
pub struct WriteProgress {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WriteProgress {
    /// Start a bar for `total` bytes when stderr is a terminal; a no-op otherwise.
    pub fn start(total: u64, what: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        if !std::io::stderr().is_terminal() || total == 0 {
            return WriteProgress { stop, thread: None };
        }
        let bar = ProgressBar::new(total).with_message(what.to_string());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        let base = shardsmith_converters::progress::bytes_written();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                bar.set_position(shardsmith_converters::progress::bytes_written() - base);
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            bar.finish_and_clear();
        });
        WriteProgress { stop, thread: Some(thread) }
    }
}

impl Drop for WriteProgress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
