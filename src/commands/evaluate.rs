//! `shardsmith evaluate CKPT --data test.json`: greedy answers to the first question of every
//! LLaVA-format record, scored by exact match (after trimming whitespace) against the record's
//! first assistant turn, per question text and overall.

use super::generate::{Chat, Options};
use crate::infer::generate::{generate, Stop};
use crate::infer::sampling::Sampler;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

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

/// Evaluate `ckpt` on `data` (images under `image_folder`, default: the data file's directory).
pub fn run(ckpt: &Path, data: &Path, image_folder: Option<&Path>, o: &Options, json: bool) -> Result<Score> {
    let text = std::fs::read_to_string(data).with_context(|| format!("reading {}", data.display()))?;
    let records: Vec<serde_json::Value> = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a JSON array of records", data.display()))?;
    let folder = image_folder.map(Path::to_path_buf).unwrap_or_else(|| data.with_file_name(""));
    let mut chat = Chat::open(ckpt, o)?;
    let eos = chat.eos();
    let mut score = Score { total: 0, correct: 0, by_question: BTreeMap::new(), misses: Vec::new() };
    for r in &records {
        let id = r["id"].as_str().unwrap_or("?").to_string();
        let turns =
            r["conversations"].as_array().with_context(|| format!("record {id}: no conversations"))?;
        let (Some(q), Some(a)) = (turns.first(), turns.get(1)) else {
            bail!("record {id}: needs a question and an answer");
        };
        let (question, answer) = (
            q["value"].as_str().unwrap_or_default().to_string(),
            a["value"].as_str().unwrap_or_default().trim().to_string(),
        );
        let image = r["image"].as_str().map(|f| folder.join(f));
        let message = question.replace("<image>\n", "").replace("<image>", "");
        let (prompt, pixels) = chat.prompt(&message, image.as_deref())?;
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
