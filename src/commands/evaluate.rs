//! `shardsmith evaluate CKPT --data test.json`: greedy answers to the first question of every
//! record (LLaVA JSON or NeMo `.jsonl`, read by the trainer's reader), scored by exact match
//! (after trimming whitespace) against the assistant turn that follows it, per question text and
//! overall.

use super::generate::{Chat, Options, Prompt};
use crate::infer::generate::{generate, Stop};
use crate::infer::sampling::Sampler;
use crate::infer::template::IMAGE_PLACEHOLDER;
use crate::train::data::{read_records, Record, Speaker};
use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The score.
#[derive(Serialize)]
pub struct Score {
    /// Records answered.
    pub total: usize,
    /// Exact matches.
    pub correct: usize,
    /// Per question text: (correct, total).
    pub by_question: BTreeMap<String, (usize, usize)>,
    /// The first few misses: (id, expected, got).
    pub misses: Vec<(String, String, String)>,
}

/// One record's question, as asked.
struct Case {
    id: String,
    /// The question without its `<image>` marker (the chat places the image).
    message: String,
    answer: String,
    image: Option<PathBuf>,
    /// The record's own system prompt (NeMo `.jsonl`), over the template's.
    system: Option<String>,
}

/// Evaluate `ckpt` on `data` (images under `image_folder`, default: the data file's directory).
pub fn run(ckpt: &Path, data: &Path, image_folder: Option<&Path>, o: &Options, json: bool) -> Result<Score> {
    let records = read_records(data)?;
    if records.is_empty() {
        bail!("{}: no records to evaluate", data.display());
    }
    let folder = image_folder.map(Path::to_path_buf).unwrap_or_else(|| data.with_file_name(""));
    // Every record is checked before the model is loaded and the first answer generated.
    let mut cases = Vec::with_capacity(records.len());
    for r in records {
        let r = r.map_err(|bad| anyhow!("{}: {bad}", data.display()))?;
        let (question, answer) = question_and_answer(&r)
            .map_err(|why| anyhow!("{}: record {:?} (#{}): {why}", data.display(), r.id, r.index))?;
        cases.push(Case {
            message: question.replace("<image>\n", "").replace(IMAGE_PLACEHOLDER, ""),
            answer: answer.trim().to_string(),
            image: r.image.as_deref().map(|f| folder.join(f)),
            system: r.system.clone(),
            id: r.id,
        });
    }
    let mut chat = Chat::open(ckpt, o)?;
    let eos = chat.eos();
    let mut score = Score { total: 0, correct: 0, by_question: BTreeMap::new(), misses: Vec::new() };
    for Case { id, message, answer, image, system } in cases {
        let Prompt { ids: prompt, pixels, .. } =
            chat.prompt(&message, image.as_deref(), system.as_deref())?;
        let Chat { model, tokenizer, .. } = &mut chat;
        let out = generate(
            model,
            tokenizer,
            &prompt,
            pixels.as_ref(),
            &mut Sampler::greedy(),
            Stop { max_new_tokens: o.max_new_tokens, eos },
            |_| {},
        )?;
        let got = out.text.trim().to_string();
        let hit = got == answer;
        let entry = score.by_question.entry(message).or_default();
        entry.1 += 1;
        score.total += 1;
        if hit {
            entry.0 += 1;
            score.correct += 1;
        } else if score.misses.len() < 10 {
            score.misses.push((id, answer, got));
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&score)?);
    } else {
        for (q, (c, t)) in &score.by_question {
            println!("{c:>4}/{t:<4} {q}");
        }
        println!(
            "{}/{} exact matches ({:.1}%)",
            score.correct,
            score.total,
            100.0 * score.correct as f64 / score.total.max(1) as f64
        );
        for (id, want, got) in &score.misses {
            println!("  miss {id}: expected {want:?}, got {got:?}");
        }
    }
    Ok(score)
}

/// The record's first human turn and the gpt turn right after it (a leading gpt turn is skipped,
/// as in training), with at most one `<image>` marker, and one only where there is an image.
fn question_and_answer(r: &Record) -> std::result::Result<(&str, &str), String> {
    let mut turns = r.turns.iter().skip_while(|t| t.from == Speaker::Gpt);
    let (Some(q), Some(a)) = (turns.next(), turns.next()) else {
        return Err("needs a human question followed by a gpt answer".into());
    };
    if (q.from, a.from) != (Speaker::Human, Speaker::Gpt) {
        return Err(format!(
            "needs a human question followed by a gpt answer, got {} then {}",
            q.from, a.from
        ));
    }
    match (r.image.is_some(), q.value.matches(IMAGE_PLACEHOLDER).count()) {
        (false, 0) | (true, 0 | 1) => Ok((&q.value, &a.value)),
        (false, _) => Err("the question has an <image> marker but the record has no image".into()),
        (true, n) => Err(format!("the question has {n} <image> markers for one image")),
    }
}
