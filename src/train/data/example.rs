//! One record → one tokenised, label-masked training sample (formats.md §9.2, §9.3, §6.5).
//!
//! The masking re-implements the reference preprocessors step by step, because their length
//! arithmetic (the `− 2`, `− 1`, "rounds after the first" corrections) is tuned to how LLaMA's
//! SentencePiece tokenises a round on its own versus inside the whole conversation; computing
//! "the assistant tokens" any other way gives different labels on real data. Both are tested
//! against goldens produced by Python transcriptions run with transformers / sentencepiece
//! (`fixtures/gen/make_train_tiny.py` → `fixtures/train-tiny/golden/masking.json`).
//!
//! **LLaVA flavour** (`llava/train/train.py`): ids come from `tokenizer_image_token` (the text is
//! split on `<image>`, each chunk tokenised with BOS, BOS kept only on the first chunk, one
//! placeholder per image); position 0 (BOS) is masked; the conversation is split into rounds on
//! `</s>` and each round on `" ASSISTANT: "` (v1) or `"[/INST] "` (llama_2); `instruction_len =
//! len(tok(parts[0] + sep)) − 2` tokens of the round are masked and the cursor advances by
//! `round_len = len(tok(round))`; for v1 with a non-legacy tokenizer, rounds after the first
//! subtract 1 from both; everything after the last round is masked; and if the cursor does not
//! land on the real length the whole sample is masked (reported as
//! [`BadReason::LengthMismatch`]). Only then is each placeholder expanded to the model's image
//! tokens ([`ImageTokens::LlavaHf`] / [`ImageTokens::Llava`]), all masked. `plain` masks the
//! image turn (BOS + image).
//!
//! **NeMo flavour** (`neva_dataset.py`): `<image>` is first replaced in the text by the NeVA span
//! (`<extra_id_4>` + `<extra_id_3>`×(n−2) + `<extra_id_5>`), the text is tokenised without BOS,
//! the LLaMA tricks remap v1/llama_2 ids, and lengths are counted on the text: v1
//! `instruction_len = len(ids(parts[0] + " ASSISTANT: ")) − 1`, `round_len = len(ids(round +
//! <extra_id_7>))`, both − 1 after the first round; llama_2 `instruction_len = len(ids(parts[0] +
//! "[/INST] ")) − 2`, plus 1 in the first round, `round_len − 1` after it (NeMo's code; formats.md
//! §9.3 omits the first-round + 1); nvgpt masks system/user text through
//! `<extra_id_1>Assistant\n<extra_id_2>{label}\n`; plain masks the image span. NeMo has no
//! whole-sample mismatch rule; a mismatch is kept and only remarked.
//!
//! **Label convention.** Labels are *not* shifted: `labels[t]` is the target for the token at
//! position `t` (HF/LLaVA), so the loss compares `logits[:, :-1]` with `labels[:, 1:]`. Masked
//! positions hold [`IGNORE_INDEX`] = −100 (`torch.nn.CrossEntropyLoss`'s default). NeMo instead
//! uses −1 and shifts in the dataset (`tokens[:-1]`, `labels[1:]`, with `add_extra_token = 1`
//! tokenising one token past the context); its `labels[t]` is our `labels[t + 1]`.

use crate::infer::template::{
    apply_llama_tricks, Conversation, Flavour, ImageSpan, ImageTokens, Role, Template, IMAGE_PLACEHOLDER,
    NEVA_EOS, NEVA_IMAGE_END, NEVA_IMAGE_PATCH, NEVA_IMAGE_START, NVGPT_LABEL, NVGPT_SYSTEM,
};
use crate::infer::tokenizer::Tokenizer;
use crate::{Error, Result};

use super::records::{Record, Speaker};
use super::BadReason;

/// Label value of positions the loss ignores (HF / LLaVA convention).
pub const IGNORE_INDEX: i64 = -100;

/// Internal id of one LLaVA image placeholder before expansion (LLaVA's −200).
const PLACEHOLDER: u32 = u32::MAX;

/// How records become samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExampleConfig {
    /// The chat template.
    pub template: Template,
    /// LLaVA's or NeMo's version of it (and of the masking rules).
    pub flavour: Flavour,
    /// How an image is spelled in the ids; `n` is the number of image features.
    /// LLaVA flavour: [`ImageTokens::LlavaHf`] or [`ImageTokens::Llava`]; NeMo flavour:
    /// [`ImageTokens::Neva`].
    pub image_tokens: ImageTokens,
    /// Samples are cut to this many tokens, keeping the first (the model's context length).
    pub max_len: usize,
    /// `tokenizer.legacy` as LLaVA sees it (`legacy` in `tokenizer_config.json`; `false` for
    /// Vicuna-v1.5 / LLaMA-2 tokenizers saved by recent transformers). Only v1 in the LLaVA
    /// flavour reads it: a non-legacy tokenizer gets the "rounds after the first − 1" rule.
    pub legacy_tokenizer: bool,
}

/// A tokenised training sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Position of the record in the data file.
    pub index: usize,
    /// The record's id.
    pub id: String,
    /// Token ids, image tokens expanded, at most `max_len`.
    pub ids: Vec<u32>,
    /// Unshifted targets, [`IGNORE_INDEX`] where masked (see the module docs).
    pub labels: Vec<i64>,
    /// The image file (relative to the image folder), if any.
    pub image: Option<String>,
    /// Where the image features go: one span per image, in order.
    pub image_spans: Vec<ImageSpan>,
    /// The sample was longer than `max_len` and was cut.
    pub truncated: bool,
    /// Things that were fixed up or look suspicious but do not make the record unusable.
    pub remarks: Vec<Remark>,
}

/// A non-fatal observation about a record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Remark {
    /// The record has an image but its text had no `<image>`: `<image>\n` was put at the front of
    /// the first human turn (LLaVA would silently train without the image).
    ImageMarkerInserted,
    /// NeMo flavour: the masking cursor ended at `computed`, the sample has `actual` tokens. NeMo
    /// trains on such labels as they are; so do we.
    NemoLengthMismatch {
        /// Where the round arithmetic ended.
        computed: usize,
        /// The real token count.
        actual: usize,
    },
}

impl ExampleConfig {
    /// Checks the combination once, before any record is read, so that a configuration mistake is
    /// one error rather than a bad-record report for every sample.
    pub fn validate(&self, tokenizer: &Tokenizer) -> Result<()> {
        let usage = |m: String| Err(Error::Usage(m));
        if self.max_len == 0 {
            return usage("max_len must be at least 1".into());
        }
        let n = match &self.image_tokens {
            ImageTokens::LlavaHf { n, .. } | ImageTokens::Llava { n, .. } | ImageTokens::Neva { n, .. } => *n,
        };
        if n == 0 {
            return usage("the number of image tokens must be at least 1".into());
        }
        match (self.flavour, &self.image_tokens) {
            (Flavour::Llava, ImageTokens::Neva { .. }) => {
                return usage(
                    "NeVA image spans (<extra_id_4>…<extra_id_5>) go with the nemo flavour; \
                     the llava flavour expands <image> as llava-hf or original LLaVA do"
                        .into(),
                )
            }
            (Flavour::Nemo, ImageTokens::LlavaHf { .. } | ImageTokens::Llava { .. }) => {
                return usage(
                    "the nemo flavour expands <image> into a NeVA span; use ImageTokens::Neva".into(),
                )
            }
            (Flavour::Nemo, ImageTokens::Neva { n, use_im_start_end: false }) if *n < 2 => {
                return usage(format!("a NeVA image span without use_im_start_end needs n >= 2, got {n}"))
            }
            _ => {}
        }
        match self.flavour {
            Flavour::Llava => {
                if self.template == Template::Nvgpt {
                    return usage("the nvgpt template exists only in NeMo; use the nemo flavour".into());
                }
                if tokenizer.bos_id().is_none() {
                    return Err(Error::Tokenizer {
                        path: tokenizer.origin().to_path_buf(),
                        detail: "the llava flavour needs a BOS token (LLaVA's tokenizer adds <s>)".into(),
                    });
                }
            }
            Flavour::Nemo => {
                for i in 0..8 {
                    let piece = format!("<extra_id_{i}>");
                    if tokenizer.token_to_id(&piece).is_none() {
                        return Err(Error::Tokenizer {
                            path: tokenizer.origin().to_path_buf(),
                            detail: format!(
                                "{piece} is not in the vocabulary; the nemo flavour needs NeVA's \
                                 <extra_id_0…7> (add them with add_special_tokens)"
                            ),
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// `tokenizer.legacy` as transformers resolves it for a LLaMA tokenizer directory: the `legacy`
/// key of `tokenizer_config.json`, and `true` (transformers' default) when the file or key is
/// missing. Feeds [`ExampleConfig::legacy_tokenizer`].
pub fn legacy_tokenizer(dir: &std::path::Path) -> Result<bool> {
    let path = dir.join("tokenizer_config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::config(&path, format!("not valid JSON: {e}")))?;
    match json.get("legacy") {
        None | Some(serde_json::Value::Null) => Ok(true),
        Some(v) => v.as_bool().ok_or_else(|| Error::config(&path, "`legacy` must be true or false")),
    }
}

/// Tokenises and masks one record. Every problem with the record is a [`BadReason`]; the
/// configuration must have passed [`ExampleConfig::validate`].
pub fn build_example(
    tokenizer: &Tokenizer,
    cfg: &ExampleConfig,
    record: &Record,
) -> std::result::Result<Example, BadReason> {
    let mut remarks = Vec::new();
    let mut turns = conversation_turns(record)?;
    fix_image_marker(record, &mut turns, &mut remarks)?;
    if cfg.template == Template::Plain {
        if record.image.is_none() {
            return Err(BadReason::Template("the plain template needs an image".into()));
        }
        if turns.len() != 2 {
            return Err(BadReason::Template(format!(
                "the plain template takes one image turn and one caption, got {} turns",
                turns.len()
            )));
        }
        // LLaVA and NeMo both replace the first turn by the bare image.
        turns[0].1 = IMAGE_PLACEHOLDER.to_owned();
    }
    let has_image = record.image.is_some();
    let (mut ids, mut labels, image_spans) = match cfg.flavour {
        Flavour::Llava => llava_sample(tokenizer, cfg, &turns, has_image)?,
        Flavour::Nemo => nemo_sample(tokenizer, cfg, record, &turns, has_image, &mut remarks)?,
    };
    for span in &image_spans {
        labels[span.start..span.start + span.len].fill(IGNORE_INDEX);
    }
    if labels.iter().all(|&l| l == IGNORE_INDEX) {
        return Err(BadReason::NoTrainableTokens);
    }
    let truncated = ids.len() > cfg.max_len;
    if truncated {
        if image_spans.iter().any(|s| s.start + s.len > cfg.max_len) {
            return Err(BadReason::ImageTruncated { max_len: cfg.max_len, len: ids.len() });
        }
        ids.truncate(cfg.max_len);
        labels.truncate(cfg.max_len);
        if labels.iter().all(|&l| l == IGNORE_INDEX) {
            return Err(BadReason::AssistantTruncated { max_len: cfg.max_len });
        }
    }
    Ok(Example {
        index: record.index,
        id: record.id.clone(),
        ids,
        labels,
        image: record.image.clone(),
        image_spans,
        truncated,
        remarks,
    })
}

type Turns = Vec<(Role, String, Option<String>)>;

/// The turns to render: a leading gpt turn dropped (LLaVA and NeMo do), roles alternating from
/// the human, at least one assistant turn.
fn conversation_turns(record: &Record) -> std::result::Result<Turns, BadReason> {
    let skip = usize::from(record.turns.first().is_some_and(|t| t.from == Speaker::Gpt));
    let mut turns = Vec::with_capacity(record.turns.len());
    for (k, turn) in record.turns.iter().enumerate().skip(skip) {
        let want = if (k - skip) % 2 == 0 { Speaker::Human } else { Speaker::Gpt };
        if turn.from != want {
            return Err(BadReason::RolesDoNotAlternate { turn: k });
        }
        let role = if want == Speaker::Human { Role::User } else { Role::Assistant };
        turns.push((role, turn.value.clone(), turn.label.clone()));
    }
    if !turns.iter().any(|(r, _, _)| *r == Role::Assistant) {
        return Err(BadReason::NoAssistantTurn);
    }
    Ok(turns)
}

/// One image needs exactly one `<image>`, in a human turn; text-only records need none.
fn fix_image_marker(
    record: &Record,
    turns: &mut Turns,
    remarks: &mut Vec<Remark>,
) -> std::result::Result<(), BadReason> {
    if turns.iter().any(|(r, t, _)| *r == Role::Assistant && t.contains(IMAGE_PLACEHOLDER)) {
        return Err(BadReason::ImageInAssistantTurn);
    }
    let markers: usize = turns.iter().map(|(_, t, _)| t.matches(IMAGE_PLACEHOLDER).count()).sum();
    match (&record.image, markers) {
        (None, 0) | (Some(_), 1) => Ok(()),
        (None, n) => Err(BadReason::MarkerWithoutImage(n)),
        (Some(_), 0) => {
            turns[0].1.insert_str(0, "<image>\n");
            remarks.push(Remark::ImageMarkerInserted);
            Ok(())
        }
        (Some(_), n) => Err(BadReason::TooManyImageMarkers(n)),
    }
}

fn encode(tokenizer: &Tokenizer, text: &str, add_bos: bool) -> std::result::Result<Vec<u32>, BadReason> {
    tokenizer.encode(text, add_bos).map_err(|e| BadReason::Tokenizer(e.to_string()))
}

/// Python's `labels[a:b] = IGNORE` with its slice rules (negative ends count from the back, ends
/// are clipped): the reference arithmetic can produce such bounds on odd data.
fn mask(labels: &mut [i64], a: isize, b: isize) {
    let len = labels.len() as isize;
    let clip = |x: isize| if x < 0 { (x + len).max(0) } else { x.min(len) };
    let (a, b) = (clip(a), clip(b));
    if a < b {
        labels[a as usize..b as usize].fill(IGNORE_INDEX);
    }
}

fn conversation(turns: &Turns) -> Conversation {
    Conversation { system: None, turns: turns.iter().map(|(r, t, _)| (*r, t.clone())).collect() }
}

/// Ids, unshifted labels and image spans before truncation.
type Built = (Vec<u32>, Vec<i64>, Vec<ImageSpan>);

// ---------------------------------------------------------------------------------------------
// LLaVA
// ---------------------------------------------------------------------------------------------

/// `tokenizer(text).input_ids` of transformers' `LlamaTokenizer`, which LLaVA trains with: BOS,
/// then the text. One rule of its `tokenize` differs from plain SentencePiece (which
/// `Tokenizer` follows for a `tokenizer.model`): a text that starts with a special token (a
/// llama_2 round starts with `<s>`) loses the lone dummy-prefix `▁` before it.
fn llava_encode(tokenizer: &Tokenizer, text: &str) -> std::result::Result<Vec<u32>, BadReason> {
    let mut ids = encode(tokenizer, text, true)?;
    let special = [tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.unk_id()];
    if let (Some(space), [_, second, third, ..]) = (tokenizer.token_to_id("\u{2581}"), ids.as_slice()) {
        let starts_with_it = tokenizer.id_to_token(*third).is_some_and(|t| text.starts_with(t.as_str()));
        if *second == space && special.contains(&Some(*third)) && starts_with_it {
            ids.remove(1);
        }
    }
    Ok(ids)
}

/// LLaVA's `tokenizer_image_token` (or the plain tokenizer call for text-only samples).
fn llava_tokens(
    tokenizer: &Tokenizer,
    text: &str,
    has_image: bool,
) -> std::result::Result<Vec<u32>, BadReason> {
    if !has_image {
        return llava_encode(tokenizer, text);
    }
    let chunks = text
        .split(IMAGE_PLACEHOLDER)
        .map(|c| llava_encode(tokenizer, c))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let bos = tokenizer.bos_id();
    let offset = usize::from(bos.is_some() && chunks[0].first().copied() == bos);
    let mut out = Vec::with_capacity(chunks.iter().map(Vec::len).sum::<usize>() + chunks.len());
    if offset == 1 {
        out.push(chunks[0][0]);
    }
    for (i, chunk) in chunks.iter().enumerate() {
        if i > 0 {
            out.push(PLACEHOLDER);
        }
        out.extend(chunk.iter().skip(offset));
    }
    Ok(out)
}

fn llava_sample(
    tokenizer: &Tokenizer,
    cfg: &ExampleConfig,
    turns: &Turns,
    has_image: bool,
) -> std::result::Result<Built, BadReason> {
    let mut turns = turns.clone();
    if has_image {
        // `preprocess_multimodal`: the image moves to the front of its turn, then a newline.
        for (_, text, _) in turns.iter_mut().filter(|(_, t, _)| t.contains(IMAGE_PLACEHOLDER)) {
            let rest = text.replace(IMAGE_PLACEHOLDER, "");
            *text = format!("{IMAGE_PLACEHOLDER}\n{}", rest.trim()).trim().to_owned();
        }
    }
    let (ids, labels) = if cfg.template == Template::Plain {
        let text = format!("{IMAGE_PLACEHOLDER}{}\n", turns[1].1);
        let ids = llava_tokens(tokenizer, &text, true)?;
        let mut labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let image_turn = llava_tokens(tokenizer, IMAGE_PLACEHOLDER, true)?.len();
        mask(&mut labels, 0, image_turn as isize);
        (ids, labels)
    } else {
        let text = cfg
            .template
            .render(&conversation(&turns), Flavour::Llava)
            .map_err(|e| BadReason::Template(e.to_string()))?;
        llava_mask(tokenizer, cfg, &text, has_image)?
    };
    Ok(expand_placeholders(&ids, &labels, &cfg.image_tokens))
}

fn llava_mask(
    tokenizer: &Tokenizer,
    cfg: &ExampleConfig,
    text: &str,
    has_image: bool,
) -> std::result::Result<(Vec<u32>, Vec<i64>), BadReason> {
    let ids = llava_tokens(tokenizer, text, has_image)?;
    let mut labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    // LLaVA counts `input_ids != pad_token_id`; with pad = unk that would also drop real <unk>
    // tokens of the text, so the true length is used.
    let total = ids.len() as isize;
    let sep = match cfg.template {
        Template::VicunaV1 => " ASSISTANT: ",
        Template::Llama2 => "[/INST] ",
        other => return Err(BadReason::Template(format!("no LLaVA masking for {}", other.name()))),
    };
    let minus_one_after_first = cfg.template == Template::VicunaV1 && !cfg.legacy_tokenizer;
    let len = |s: &str| llava_tokens(tokenizer, s, has_image).map(|v| v.len() as isize);
    let mut cur: isize = 1;
    mask(&mut labels, 0, cur);
    for (i, round) in text.split("</s>").enumerate() {
        if round.is_empty() {
            break;
        }
        let parts: Vec<&str> = round.split(sep).collect();
        if parts.len() != 2 {
            break;
        }
        let mut round_len = len(round)?;
        let mut instruction_len = len(&format!("{}{sep}", parts[0]))? - 2;
        if i != 0 && minus_one_after_first {
            round_len -= 1;
            instruction_len -= 1;
        }
        mask(&mut labels, cur, cur + instruction_len);
        cur += round_len;
    }
    mask(&mut labels, cur, isize::MAX);
    if cur != total {
        return Err(BadReason::LengthMismatch { computed: cur.max(0) as usize, actual: total as usize });
    }
    Ok((ids, labels))
}

/// Each placeholder becomes the model's `n` image tokens, all masked.
fn expand_placeholders(ids: &[u32], labels: &[i64], image_tokens: &ImageTokens) -> Built {
    let (id, n) = match *image_tokens {
        ImageTokens::LlavaHf { image_token_id, n } => (image_token_id, n),
        ImageTokens::Llava { placeholder_id, n } => (placeholder_id, n),
        // Rejected by `validate`; expand to nothing recognisable rather than panic.
        ImageTokens::Neva { n, .. } => (0, n),
    };
    let images = ids.iter().filter(|&&i| i == PLACEHOLDER).count();
    let mut out_ids = Vec::with_capacity(ids.len() + images * n);
    let mut out_labels = Vec::with_capacity(out_ids.capacity());
    let mut spans = Vec::with_capacity(images);
    for (&i, &l) in ids.iter().zip(labels) {
        if i == PLACEHOLDER {
            spans.push(ImageSpan { start: out_ids.len(), len: n });
            out_ids.extend(std::iter::repeat_n(id, n));
            out_labels.extend(std::iter::repeat_n(IGNORE_INDEX, n));
        } else {
            out_ids.push(i);
            out_labels.push(l);
        }
    }
    (out_ids, out_labels, spans)
}

// ---------------------------------------------------------------------------------------------
// NeMo
// ---------------------------------------------------------------------------------------------

fn nemo_sample(
    tokenizer: &Tokenizer,
    cfg: &ExampleConfig,
    record: &Record,
    turns: &Turns,
    has_image: bool,
    remarks: &mut Vec<Remark>,
) -> std::result::Result<Built, BadReason> {
    let ImageTokens::Neva { n, use_im_start_end } = cfg.image_tokens else {
        return Err(BadReason::Template("the nemo flavour needs NeVA image tokens".into()));
    };
    let mut turns = turns.clone();
    if has_image {
        let patches = if use_im_start_end { n } else { n.saturating_sub(2) };
        let span = format!("{NEVA_IMAGE_START}{}{NEVA_IMAGE_END}", NEVA_IMAGE_PATCH.repeat(patches));
        for (_, text, _) in &mut turns {
            *text = text.replace(IMAGE_PLACEHOLDER, &span);
        }
    }
    let ids_of = |s: &str| encode(tokenizer, s, false);
    let len = |s: &str| ids_of(s).map(|v| v.len() as isize);
    let text = match cfg.template {
        Template::Plain => format!("{}{}\n", turns[0].1, turns[1].1),
        Template::Nvgpt => render_nvgpt(record.system.as_deref().unwrap_or(NVGPT_SYSTEM), &turns),
        t => {
            t.render(&conversation(&turns), Flavour::Nemo).map_err(|e| BadReason::Template(e.to_string()))?
        }
    };
    let mut ids = ids_of(&text)?;
    if cfg.template.uses_llama_tricks(Flavour::Nemo) {
        apply_llama_tricks(tokenizer, &mut ids);
    }
    let mut labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let mut cur: isize = 0;
    match cfg.template {
        // `preprocess_plain`: mask the tokens of the image turn.
        Template::Plain => mask(&mut labels, 0, len(&turns[0].1)?),
        Template::VicunaV1 | Template::Llama2 => {
            let (sep, v1) = match cfg.template {
                Template::VicunaV1 => (" ASSISTANT: ", true),
                _ => ("[/INST] ", false),
            };
            for (i, round) in text.split(NEVA_EOS).enumerate() {
                if round.is_empty() {
                    break;
                }
                let parts: Vec<&str> = round.split(sep).collect();
                if parts.len() != 2 {
                    break;
                }
                let mut round_len = len(&format!("{round}{NEVA_EOS}"))?;
                let prompt = len(&format!("{}{sep}", parts[0]))?;
                let mut instruction_len = if v1 { prompt - 1 } else { prompt - 2 };
                if i > 0 {
                    round_len -= 1;
                    if v1 {
                        instruction_len -= 1;
                    }
                } else if !v1 {
                    instruction_len += 1;
                }
                mask(&mut labels, cur, cur + instruction_len);
                cur += round_len;
            }
        }
        Template::Nvgpt => {
            const CONV_SEP: &str = "<extra_id_1>";
            let sep = format!("{CONV_SEP}Assistant\n");
            let rounds: Vec<&str> = text.split(CONV_SEP).collect();
            let mut regrouped = vec![rounds[..rounds.len().min(3)].join(CONV_SEP)];
            for k in (3..rounds.len()).step_by(2) {
                regrouped.push(rounds[k..(k + 2).min(rounds.len())].join(CONV_SEP));
            }
            for round in &regrouped {
                if round.is_empty() {
                    break;
                }
                let parts: Vec<&str> = round.split(sep.as_str()).collect();
                if parts.len() != 2 {
                    break;
                }
                let label_line = nvgpt_label_line(parts[1]);
                let instruction_len = len(&format!("{}{sep}{label_line}", parts[0]))?;
                let round_len = len(&format!("{round}{CONV_SEP}"))?;
                mask(&mut labels, cur, cur + instruction_len);
                cur += round_len;
            }
        }
    }
    if cfg.template != Template::Plain {
        mask(&mut labels, cur, isize::MAX);
        if cur != ids.len() as isize {
            remarks.push(Remark::NemoLengthMismatch { computed: cur.max(0) as usize, actual: ids.len() });
        }
    }
    let spans = if has_image { neva_spans(tokenizer, &ids, n, use_im_start_end)? } else { Vec::new() };
    Ok((ids, labels, spans))
}

/// NeMo's `conv_nvgpt` prompt with the per-turn SteerLM label (default [`NVGPT_LABEL`]).
fn render_nvgpt(system: &str, turns: &Turns) -> String {
    let mut ret = format!("<extra_id_0>System\n{system}<extra_id_1>");
    for (role, text, label) in turns {
        match role {
            Role::User => ret.push_str(&format!("User\n{text}\n<extra_id_1>")),
            Role::Assistant => {
                let label = label.as_deref().unwrap_or(NVGPT_LABEL);
                ret.push_str(&format!("Assistant\n<extra_id_2>{label}\n{text}\n<extra_id_1>"));
            }
        }
    }
    ret
}

/// `re.compile("<extra_id_2>quality:.*\n").search(text)`: the label line, newline included.
fn nvgpt_label_line(text: &str) -> &str {
    const START: &str = "<extra_id_2>quality:";
    let Some(start) = text.find(START) else { return "" };
    match text[start + START.len()..].find('\n') {
        Some(nl) => &text[start..start + START.len() + nl + 1],
        None => "",
    }
}

/// The NeVA spans, found the way `replace_media_embeddings` does: each end token, stepped back.
fn neva_spans(
    tokenizer: &Tokenizer,
    ids: &[u32],
    n: usize,
    use_im_start_end: bool,
) -> std::result::Result<Vec<ImageSpan>, BadReason> {
    let id = |p: &str| tokenizer.token_to_id(p).unwrap_or(u32::MAX);
    let (start_id, end_id) = (id(NEVA_IMAGE_START), id(NEVA_IMAGE_END));
    let total = if use_im_start_end { n + 2 } else { n };
    let mut spans = Vec::new();
    for (end, _) in ids.iter().enumerate().filter(|(_, &t)| t == end_id) {
        if end + 1 < total || ids[end + 1 - total] != start_id {
            return Err(BadReason::Template(format!(
                "image end token at position {end} does not close a {total}-token image span \
                 (does the text spell {NEVA_IMAGE_END} itself?)"
            )));
        }
        spans.push(ImageSpan { start: end + 1 - total + usize::from(use_im_start_end), len: n });
    }
    if spans.len() != 1 {
        return Err(BadReason::Template(format!("expected one NeVA image span, found {}", spans.len())));
    }
    Ok(spans)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::template::NVGPT_SYSTEM;

    #[test]
    fn python_slice_masking() {
        let masked = |a, b| {
            let mut l = vec![1i64; 5];
            mask(&mut l, a, b);
            l.iter().map(|&x| u8::from(x == IGNORE_INDEX)).collect::<Vec<_>>()
        };
        assert_eq!(masked(1, 3), [0, 1, 1, 0, 0]);
        assert_eq!(masked(3, 1), [0; 5]);
        assert_eq!(masked(0, -1), [1, 1, 1, 1, 0]); // Python: labels[0:-1]
        assert_eq!(masked(4, 100), [0, 0, 0, 0, 1]);
        assert_eq!(masked(7, isize::MAX), [0; 5]);
    }

    #[test]
    fn nvgpt_rendering_matches_the_template_and_finds_the_label_line() {
        let turns: Turns = vec![
            (Role::User, "u1".into(), None),
            (Role::Assistant, "a1".into(), None),
            (Role::User, "u2".into(), None),
            (Role::Assistant, "a2".into(), None),
        ];
        let conv = Conversation::single("u1").assistant("a1").user("u2").assistant("a2");
        assert_eq!(render_nvgpt(NVGPT_SYSTEM, &turns), Template::Nvgpt.render(&conv, Flavour::Nemo).unwrap());
        let line = format!("<extra_id_2>{NVGPT_LABEL}\n");
        assert_eq!(nvgpt_label_line(&format!("Assistant\n{line}a1\n")), line);
        assert_eq!(nvgpt_label_line("<extra_id_2>quality:4"), "");
        assert_eq!(nvgpt_label_line("<extra_id_2>humor:4\n"), "");
    }

    fn neva_tokenizer() -> Tokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llama-gqa");
        let mut tok = Tokenizer::from_file(dir.join("tokenizer.model")).unwrap();
        let extra: Vec<String> = (0..8).map(|i| format!("<extra_id_{i}>")).collect();
        tok.add_special_tokens(&extra.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
        tok
    }

    fn record(image: Option<&str>, turns: &[(Speaker, &str)]) -> Record {
        Record {
            index: 0,
            id: "r".into(),
            image: image.map(str::to_owned),
            system: None,
            turns: turns
                .iter()
                .map(|(f, v)| super::super::Turn { from: *f, value: (*v).into(), label: None })
                .collect(),
        }
    }

    #[test]
    fn neva_spans_with_and_without_start_end_tokens() {
        let tok = neva_tokenizer();
        let start = tok.token_to_id(NEVA_IMAGE_START).unwrap();
        let end = tok.token_to_id(NEVA_IMAGE_END).unwrap();
        let rec = record(Some("x.png"), &[(Speaker::Human, "<image>\nHi"), (Speaker::Gpt, "the model")]);
        for use_im_start_end in [false, true] {
            let cfg = ExampleConfig {
                template: Template::VicunaV1,
                flavour: Flavour::Nemo,
                image_tokens: ImageTokens::Neva { n: 5, use_im_start_end },
                max_len: 4096,
                legacy_tokenizer: false,
            };
            cfg.validate(&tok).unwrap();
            let ex = build_example(&tok, &cfg, &rec).unwrap();
            let [ImageSpan { start: s, len: 5 }] = ex.image_spans[..] else { panic!("{:?}", ex.image_spans) };
            if use_im_start_end {
                assert_eq!((ex.ids[s - 1], &ex.ids[s..s + 5], ex.ids[s + 5]), (start, &[0u32; 5][..], end));
            } else {
                assert_eq!(&ex.ids[s..s + 5], &[start, 0, 0, 0, end]);
            }
            assert!(ex.labels[..s + 5].iter().all(|&l| l == IGNORE_INDEX));
            assert!(ex.labels.iter().any(|&l| l != IGNORE_INDEX));
            assert!(!ex.ids.contains(&1), "NeMo adds no BOS");
        }
    }

    #[test]
    fn configuration_mistakes_are_errors() {
        let neva = neva_tokenizer();
        let hf = Tokenizer::from_file(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llava-tiny/tokenizer.json"),
        )
        .unwrap();
        let ok = ExampleConfig {
            template: Template::VicunaV1,
            flavour: Flavour::Llava,
            image_tokens: ImageTokens::LlavaHf { image_token_id: 256, n: 16 },
            max_len: 64,
            legacy_tokenizer: false,
        };
        ok.validate(&hf).unwrap();
        let err = |cfg: ExampleConfig, tok: &Tokenizer| cfg.validate(tok).unwrap_err().to_string();
        assert!(err(ExampleConfig { max_len: 0, ..ok.clone() }, &hf).contains("max_len"));
        assert!(err(ExampleConfig { template: Template::Nvgpt, ..ok.clone() }, &hf).contains("nvgpt"));
        let neva_tokens = ImageTokens::Neva { n: 16, use_im_start_end: false };
        assert!(err(ExampleConfig { image_tokens: neva_tokens.clone(), ..ok.clone() }, &hf).contains("nemo"));
        let nemo = ExampleConfig { flavour: Flavour::Nemo, ..ok.clone() };
        assert!(err(nemo.clone(), &neva).contains("ImageTokens::Neva"));
        let nemo = ExampleConfig { image_tokens: neva_tokens, ..nemo };
        nemo.validate(&neva).unwrap();
        assert!(err(nemo.clone(), &hf).contains("<extra_id_0>"));
        let tiny = ImageTokens::Neva { n: 1, use_im_start_end: false };
        assert!(err(ExampleConfig { image_tokens: tiny, ..nemo }, &neva).contains("n >= 2"));
    }

    #[test]
    fn legacy_flag_from_tokenizer_config() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        assert!(!legacy_tokenizer(&fixtures.join("llava-tiny")).unwrap());
        assert!(legacy_tokenizer(&fixtures.join("does-not-exist")).unwrap());
    }
}
