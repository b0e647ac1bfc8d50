//! Chat templates (formats.md §9.2) and the expansion of `<image>` into image token spans (§6.5).
//!
//! Each template comes in two flavours that differ in more than the separator tokens:
//!
//! * **LLaVA** (liuhaotian and llava-hf): separators `<s>` / `</s>`, the tokenizer adds BOS.
//! * **NeMo** (NeVA): separators `<extra_id_6>` / `<extra_id_7>`, no BOS, a space after every
//!   non-final assistant turn in `v1`, a space after the separator in `llama_2` (left behind by a
//!   character-set `lstrip`), and — for `v1` and `llama_2` only — the "LLaMA tricks" id remap
//!   32003 → 0, 32006 → 1, 32007 → 2 after tokenisation.
//!
//! The renderers follow the reference `Conversation.get_prompt` loops line by line, including
//! Python's `str.lstrip`/`str.rstrip` with a *set of characters*, because their quirks are part of
//! the token sequences the models were trained on.

use crate::infer::tokenizer::Tokenizer;
use crate::{Error, Result};

/// The placeholder a user writes where the image goes.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// `vicuna_v1` system prompt (both flavours).
pub const VICUNA_SYSTEM: &str = "A chat between a curious user and an artificial intelligence \
assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.";

/// The LLaVA-LLaMA-2 system prompt used by the `llama_2` template (both flavours).
pub const LLAVA_LLAMA2_SYSTEM: &str = "You are a helpful language and vision assistant. You are \
able to understand the visual content that the user provides, and assist the user with a variety \
of tasks using natural language.";

/// `nvgpt` default system prompt (note the two trailing newlines).
pub const NVGPT_SYSTEM: &str = "A chat between a curious user and an artificial intelligence \
assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.\n\n";

/// `nvgpt` default SteerLM label line of every assistant turn.
pub const NVGPT_LABEL: &str = "quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,\
correctness:4,coherence:4,complexity:4,verbosity:4";

/// NeVA special pieces (formats.md §6.4).
pub const NEVA_IMAGE_PATCH: &str = "<extra_id_3>";
/// Image start (`media_start_id`).
pub const NEVA_IMAGE_START: &str = "<extra_id_4>";
/// Image end (`media_end_id`).
pub const NEVA_IMAGE_END: &str = "<extra_id_5>";
/// NeMo's BOS substitute.
pub const NEVA_BOS: &str = "<extra_id_6>";
/// NeMo's EOS substitute.
pub const NEVA_EOS: &str = "<extra_id_7>";

/// A conversation template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Template {
    /// `llama_2`: `[INST] <<SYS>> … [/INST]`.
    Llama2,
    /// `vicuna_v1` / `v1`: `USER: … ASSISTANT: …`.
    VicunaV1,
    /// `nvgpt` (NeMo only): `<extra_id_0>System … <extra_id_1>User …`.
    Nvgpt,
    /// `plain` (projector pre-training): the image, then the caption.
    Plain,
}

/// Which code base's version of a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// LLaVA (liuhaotian) and llava-hf.
    Llava,
    /// NeMo NeVA.
    Nemo,
}

/// Who said a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The human.
    User,
    /// The model.
    Assistant,
}

/// A chat: an optional system prompt (the template's default when `None`) and alternating
/// turns starting with the user.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Conversation {
    /// System prompt override.
    pub system: Option<String>,
    /// The turns, user first, alternating.
    pub turns: Vec<(Role, String)>,
}

impl Conversation {
    /// A one-question conversation with the default system prompt.
    pub fn single(user: impl Into<String>) -> Self {
        Self { system: None, turns: vec![(Role::User, user.into())] }
    }

    /// Appends a user turn.
    pub fn user(mut self, text: impl Into<String>) -> Self {
        self.turns.push((Role::User, text.into()));
        self
    }

    /// Appends an assistant turn.
    pub fn assistant(mut self, text: impl Into<String>) -> Self {
        self.turns.push((Role::Assistant, text.into()));
        self
    }

    fn check_alternation(&self) -> Result<()> {
        for (i, (role, _)) in self.turns.iter().enumerate() {
            let want = if i % 2 == 0 { Role::User } else { Role::Assistant };
            if *role != want {
                return Err(Error::Usage(format!(
                    "conversation turn {i} is {role:?}, expected {want:?} (turns alternate, user first)"
                )));
            }
        }
        Ok(())
    }
}

impl Flavour {
    /// `llava` or `nemo`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "llava" | "llava-hf" | "hf" => Ok(Flavour::Llava),
            "nemo" | "neva" => Ok(Flavour::Nemo),
            other => Err(Error::Usage(format!("unknown template flavour {other:?}; valid: llava, nemo"))),
        }
    }

    /// Whether the tokenizer adds BOS to the prompt (LLaVA yes, NeMo's `text_to_ids` no).
    pub fn add_bos(self) -> bool {
        matches!(self, Flavour::Llava)
    }
}

/// One turn as the reference loops see it: `None` is the empty slot the model answers into.
type Message<'a> = (Role, Option<&'a str>);

impl Template {
    /// Every accepted name.
    pub const NAMES: [&'static str; 5] = ["llama_2", "vicuna_v1", "v1", "nvgpt", "plain"];

    /// Parses a template name as the NeMo yaml (`conv_template`) or LLaVA (`--version`) spell it.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "llama_2" => Ok(Template::Llama2),
            "vicuna_v1" | "v1" => Ok(Template::VicunaV1),
            "nvgpt" => Ok(Template::Nvgpt),
            "plain" => Ok(Template::Plain),
            other => Err(Error::Usage(format!(
                "unknown chat template {other:?}; valid: {}",
                Self::NAMES.join(", ")
            ))),
        }
    }

    /// The canonical name.
    pub fn name(self) -> &'static str {
        match self {
            Template::Llama2 => "llama_2",
            Template::VicunaV1 => "vicuna_v1",
            Template::Nvgpt => "nvgpt",
            Template::Plain => "plain",
        }
    }

    /// The system prompt used when the conversation gives none.
    pub fn default_system(self) -> &'static str {
        match self {
            Template::Llama2 => LLAVA_LLAMA2_SYSTEM,
            Template::VicunaV1 => VICUNA_SYSTEM,
            Template::Nvgpt => NVGPT_SYSTEM,
            Template::Plain => "",
        }
    }

    /// Whether NeMo remaps `<extra_id_3/6/7>` to 0/1/2 after tokenising this template.
    pub fn uses_llama_tricks(self, flavour: Flavour) -> bool {
        flavour == Flavour::Nemo && matches!(self, Template::VicunaV1 | Template::Llama2)
    }

    /// The full training text of a conversation (formats.md §9.2).
    pub fn render(self, conv: &Conversation, flavour: Flavour) -> Result<String> {
        conv.check_alternation()?;
        self.check_flavour(flavour)?;
        if self == Template::Plain {
            return render_plain(conv, false);
        }
        let messages: Vec<Message> = conv.turns.iter().map(|(r, t)| (*r, Some(t.as_str()))).collect();
        self.render_messages(&self.system(conv)?, &messages, flavour, false)
    }

    /// The prompt the model continues: the conversation (ending with a user turn) plus the empty
    /// assistant slot — ending in `ASSISTANT:` (v1), `[/INST]` (llama_2), or nvgpt's
    /// `<extra_id_1>Assistant\n<extra_id_2>{label}\n`. In the NeMo flavour every `<image>` in a
    /// user turn first becomes `<image>\n`, as NeMo's inference path does (formats.md §6.5).
    pub fn generation_prompt(self, conv: &Conversation, flavour: Flavour) -> Result<String> {
        conv.check_alternation()?;
        self.check_flavour(flavour)?;
        if conv.turns.last().map(|(r, _)| *r) != Some(Role::User) {
            return Err(Error::Usage(
                "a generation prompt needs a conversation ending with a user turn".into(),
            ));
        }
        if self == Template::Plain {
            // NeMo has no plain inference path; this mirrors training: the image, then the caption.
            return render_plain(conv, true);
        }
        let rewritten: Vec<String> = conv
            .turns
            .iter()
            .map(|(role, text)| match (flavour, role) {
                (Flavour::Nemo, Role::User) => {
                    text.replace(IMAGE_PLACEHOLDER, &format!("{IMAGE_PLACEHOLDER}\n"))
                }
                _ => text.clone(),
            })
            .collect();
        let mut messages: Vec<Message> =
            conv.turns.iter().zip(&rewritten).map(|((r, _), t)| (*r, Some(t.as_str()))).collect();
        messages.push((Role::Assistant, None));
        self.render_messages(&self.system(conv)?, &messages, flavour, true)
    }

    fn system(self, conv: &Conversation) -> Result<String> {
        match (&conv.system, self) {
            (Some(s), Template::Plain) if !s.is_empty() => {
                Err(Error::Usage("the plain template has no system prompt".into()))
            }
            (Some(s), _) => Ok(s.clone()),
            (None, _) => Ok(self.default_system().to_owned()),
        }
    }

    fn check_flavour(self, flavour: Flavour) -> Result<()> {
        if self == Template::Nvgpt && flavour == Flavour::Llava {
            return Err(Error::Usage("the nvgpt template exists only in NeMo; use the nemo flavour".into()));
        }
        Ok(())
    }

    fn render_messages(
        self,
        system: &str,
        messages: &[Message],
        flavour: Flavour,
        generation: bool,
    ) -> Result<String> {
        match self {
            Template::VicunaV1 => Ok(render_v1(system, messages, flavour)),
            Template::Llama2 => render_llama2(system, messages, flavour),
            Template::Nvgpt => Ok(render_nvgpt(system, messages, generation)),
            Template::Plain => Err(Error::Usage("plain is rendered separately".into())),
        }
    }
}

/// `SeparatorStyle.TWO` (sep `" "`, sep2 `</s>` or `<extra_id_7>`).
fn render_v1(system: &str, messages: &[Message], flavour: Flavour) -> String {
    let (sep, sep2) = match flavour {
        Flavour::Llava => (" ", "</s>"),
        Flavour::Nemo => (" ", NEVA_EOS),
    };
    let role_name = |r: Role| if r == Role::User { "USER" } else { "ASSISTANT" };
    let mut ret = format!("{system}{sep}");
    for (i, (role, message)) in messages.iter().enumerate() {
        match message.filter(|m| !m.is_empty()) {
            Some(m) => {
                ret.push_str(&format!("{}: {m}{}", role_name(*role), if i % 2 == 0 { sep } else { sep2 }));
                // NeMo ≥ 1.23 separates finished rounds with a space.
                if flavour == Flavour::Nemo && i % 2 == 1 && i != messages.len() - 1 {
                    ret.push(' ');
                }
            }
            None => ret.push_str(&format!("{}:", role_name(*role))),
        }
    }
    ret
}

/// `SeparatorStyle.LLAMA_2` (sep `<s>` / `<extra_id_6>`, sep2 `</s>` / `<extra_id_7>`).
fn render_llama2(system: &str, messages: &[Message], flavour: Flavour) -> Result<String> {
    let (sep, sep2, after_sep) = match flavour {
        Flavour::Llava => ("<s>", "</s>", ""),
        Flavour::Nemo => (NEVA_BOS, NEVA_EOS, " "),
    };
    let mut ret = String::new();
    for (i, (_, message)) in messages.iter().enumerate() {
        let message = match message.filter(|m| !m.is_empty()) {
            Some(m) => m,
            None if i == 0 => {
                return Err(Error::Usage("the first llama_2 user turn must not be empty".into()))
            }
            None => continue,
        };
        if i % 2 == 0 {
            // LLaVA drops the <<SYS>> block for an empty system prompt; NeMo always writes it.
            let with_system = if i == 0 && (flavour == Flavour::Nemo || !system.is_empty()) {
                format!("<<SYS>>\n{system}\n<</SYS>>\n\n{message}")
            } else {
                message.to_owned()
            };
            ret.push_str(&format!("{sep}{after_sep}[INST] {with_system} [/INST]"));
        } else {
            ret.push_str(&format!(" {message} {sep2}"));
        }
    }
    // Python's `ret.lstrip(sep)` strips any of sep's characters, not the prefix.
    Ok(ret.trim_start_matches(|c| sep.contains(c)).to_owned())
}

/// `SeparatorStyle.NVGPT` as NeMo's `preprocess_nvgpt` drives it: each assistant turn carries the
/// `<extra_id_2>{label}\n` line; for generation the empty last turn's trailing
/// `\n<extra_id_1>` is removed with a character-set `rstrip` and a newline appended.
fn render_nvgpt(system: &str, messages: &[Message], generation: bool) -> String {
    let mut ret = format!("<extra_id_0>System\n{system}<extra_id_1>");
    for (role, message) in messages {
        let (name, text) = match role {
            Role::User => ("User", message.unwrap_or_default().to_owned()),
            Role::Assistant => {
                ("Assistant", format!("<extra_id_2>{NVGPT_LABEL}\n{}", message.unwrap_or_default()))
            }
        };
        if text.is_empty() {
            ret.push_str(&format!("{name}\n"));
        } else {
            ret.push_str(&format!("{name}\n{text}\n<extra_id_1>"));
        }
    }
    if generation {
        let set = "\n<extra_id_1>";
        let kept = ret.trim_end_matches(|c| set.contains(c)).len();
        ret.truncate(kept);
        ret.push('\n');
    }
    ret
}

/// `plain`: the first user turn is replaced by just the image, the caption follows with `\n`.
fn render_plain(conv: &Conversation, generation: bool) -> Result<String> {
    let max_turns = if generation { 1 } else { 2 };
    if conv.turns.is_empty() || conv.turns.len() > max_turns {
        return Err(Error::Usage(format!(
            "the plain template takes one image turn{}, got {} turns",
            if generation { "" } else { " and one caption" },
            conv.turns.len()
        )));
    }
    if !conv.turns[0].1.contains(IMAGE_PLACEHOLDER) {
        return Err(Error::Usage("the plain template's user turn must contain <image>".into()));
    }
    let mut ret = IMAGE_PLACEHOLDER.to_owned();
    if let Some((_, caption)) = conv.turns.get(1) {
        ret.push_str(caption);
        ret.push('\n');
    }
    Ok(ret)
}

// ---------------------------------------------------------------------------------------------
// `<image>` → token ids
// ---------------------------------------------------------------------------------------------

/// How a model spells an image in its token sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageTokens {
    /// llava-hf: `<image>` is a vocabulary token (`image_token_index`, 32000 for LLaVA-1.5) and
    /// each one is expanded to `n` (`image_seq_length`) copies.
    LlavaHf {
        /// The `<image>` token id.
        image_token_id: u32,
        /// Image features per image.
        n: usize,
    },
    /// Original LLaVA (`tokenizer_image_token`): the prompt is tokenised in chunks between
    /// `<image>`s (each chunk with its own SentencePiece dummy prefix) and each image becomes
    /// `n` copies of `placeholder_id` (LLaVA's −200, which has no u32 spelling; the model
    /// overwrites these positions anyway).
    Llava {
        /// Any id; the positions are overwritten by image features.
        placeholder_id: u32,
        /// Image features per image.
        n: usize,
    },
    /// NeVA: `<extra_id_4>` + `<extra_id_3>`×(n−2) + `<extra_id_5>` (n tokens, all overwritten),
    /// or with `use_im_start_end` `<extra_id_4>` + `<extra_id_3>`×n + `<extra_id_5>` (n + 2
    /// tokens, the n patches overwritten).
    Neva {
        /// Image features per image (`(crop/patch)²`, 576 at 336 px).
        n: usize,
        /// `mm_cfg.use_im_start_end`.
        use_im_start_end: bool,
    },
}

/// Positions `start..start + len` of the token sequence that image features overwrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSpan {
    /// First overwritten position.
    pub start: usize,
    /// Number of positions (= image features).
    pub len: usize,
}

/// A tokenised prompt: ids and where the images go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTokens {
    /// Token ids, BOS included when the flavour adds one, LLaMA tricks applied.
    pub ids: Vec<u32>,
    /// One span per `<image>`, in order.
    pub image_spans: Vec<ImageSpan>,
}

/// Tokenises a rendered prompt: adds BOS per the flavour, expands every `<image>` per `images`,
/// and applies NeMo's LLaMA-tricks remap when the template/flavour uses it.
///
/// A prompt with `<image>` but no `images` is an error (the placeholder would silently become
/// text).
pub fn tokenize_prompt(
    tokenizer: &Tokenizer,
    prompt: &str,
    template: Template,
    flavour: Flavour,
    images: Option<&ImageTokens>,
) -> Result<PromptTokens> {
    let n_images = prompt.matches(IMAGE_PLACEHOLDER).count();
    let add_bos = flavour.add_bos();
    let mut out = match images {
        _ if n_images == 0 => PromptTokens { ids: tokenizer.encode(prompt, add_bos)?, image_spans: vec![] },
        None => {
            return Err(Error::Usage(format!(
                "the prompt has {n_images} <image> placeholder(s) but no image was given"
            )))
        }
        Some(ImageTokens::LlavaHf { image_token_id, n }) => {
            expand_llava_hf(tokenizer, prompt, add_bos, *image_token_id, *n, n_images)?
        }
        Some(ImageTokens::Llava { placeholder_id, n }) => {
            expand_llava(tokenizer, prompt, add_bos, *placeholder_id, *n)?
        }
        Some(ImageTokens::Neva { n, use_im_start_end }) => {
            expand_neva(tokenizer, prompt, add_bos, *n, *use_im_start_end, n_images)?
        }
    };
    if template.uses_llama_tricks(flavour) {
        apply_llama_tricks(tokenizer, &mut out.ids);
    }
    Ok(out)
}

/// NeMo's `v1`/`llama_2` remap: `<extra_id_3>` → 0 (`<unk>`), `<extra_id_6>` → 1 (`<s>`),
/// `<extra_id_7>` → 2 (`</s>`) — literal ids, as NeMo writes them. Pieces the tokenizer lacks
/// cannot occur and are skipped.
pub fn apply_llama_tricks(tokenizer: &Tokenizer, ids: &mut [u32]) {
    let remap: Vec<(u32, u32)> = [(NEVA_IMAGE_PATCH, 0), (NEVA_BOS, 1), (NEVA_EOS, 2)]
        .iter()
        .filter_map(|(piece, to)| tokenizer.token_to_id(piece).map(|from| (from, *to)))
        .collect();
    for id in ids.iter_mut() {
        if let Some((_, to)) = remap.iter().find(|(from, _)| from == id) {
            *id = *to;
        }
    }
}

fn expand_llava_hf(
    tokenizer: &Tokenizer,
    prompt: &str,
    add_bos: bool,
    image_token_id: u32,
    n: usize,
    n_images: usize,
) -> Result<PromptTokens> {
    match tokenizer.token_to_id(IMAGE_PLACEHOLDER) {
        Some(id) if id == image_token_id => {}
        found => {
            let found = found.map_or("no such token".into(), |id| format!("it as token {id}"));
            return Err(Error::Tokenizer {
                path: tokenizer.origin().to_path_buf(),
                detail: format!(
                    "<image> should be token {image_token_id} (image_token_index) but the tokenizer has {found}"
                ),
            });
        }
    }
    // `<image>` is an added token, so N copies in the text tokenise to N copies of the id with
    // nothing between them: expanding the ids is the same and cheaper.
    let ids = tokenizer.encode(prompt, add_bos)?;
    let found = ids.iter().filter(|&&id| id == image_token_id).count();
    if found != n_images {
        return Err(Error::Usage(format!(
            "the prompt has {n_images} <image> placeholder(s) but tokenises to {found} image tokens"
        )));
    }
    let mut out = PromptTokens { ids: Vec::with_capacity(ids.len() + n_images * n), image_spans: vec![] };
    for id in ids {
        if id == image_token_id {
            out.image_spans.push(ImageSpan { start: out.ids.len(), len: n });
            out.ids.extend(std::iter::repeat_n(image_token_id, n));
        } else {
            out.ids.push(id);
        }
    }
    Ok(out)
}

fn expand_llava(
    tokenizer: &Tokenizer,
    prompt: &str,
    add_bos: bool,
    placeholder_id: u32,
    n: usize,
) -> Result<PromptTokens> {
    let mut out = PromptTokens { ids: Vec::new(), image_spans: vec![] };
    for (i, chunk) in prompt.split(IMAGE_PLACEHOLDER).enumerate() {
        if i > 0 {
            out.image_spans.push(ImageSpan { start: out.ids.len(), len: n });
            out.ids.extend(std::iter::repeat_n(placeholder_id, n));
        }
        // Every chunk is tokenised on its own; only the first keeps its BOS.
        let ids = tokenizer.encode(chunk, add_bos)?;
        let skip = usize::from(add_bos && i > 0);
        out.ids.extend_from_slice(&ids[skip..]);
    }
    Ok(out)
}

fn expand_neva(
    tokenizer: &Tokenizer,
    prompt: &str,
    add_bos: bool,
    n: usize,
    use_im_start_end: bool,
    n_images: usize,
) -> Result<PromptTokens> {
    if n == 0 || (n < 2 && !use_im_start_end) {
        return Err(Error::Usage(format!("too few NeVA image feature tokens: {n}")));
    }
    let id = |piece: &str| {
        tokenizer.token_to_id(piece).ok_or_else(|| Error::Tokenizer {
            path: tokenizer.origin().to_path_buf(),
            detail: format!(
                "{piece} is not in the vocabulary; NeVA needs <extra_id_0…7> (add them with add_special_tokens)"
            ),
        })
    };
    let (start_id, end_id) = (id(NEVA_IMAGE_START)?, id(NEVA_IMAGE_END)?);
    id(NEVA_IMAGE_PATCH)?;
    let patches = if use_im_start_end { n } else { n - 2 };
    let span_text = format!("{NEVA_IMAGE_START}{}{NEVA_IMAGE_END}", NEVA_IMAGE_PATCH.repeat(patches));
    let ids = tokenizer.encode(&prompt.replace(IMAGE_PLACEHOLDER, &span_text), add_bos)?;

    // Like NeMo's `replace_media_embeddings`: find each end token, step back to the start.
    let mut image_spans = Vec::new();
    // With use_im_start_end the start/end tokens bracket the n overwritten patches.
    let total = if use_im_start_end { n + 2 } else { n };
    for (end, _) in ids.iter().enumerate().filter(|(_, &t)| t == end_id) {
        if end + 1 < total || ids[end + 1 - total] != start_id {
            return Err(Error::Usage(format!(
                "image end token at position {end} is not preceded by a {total}-token image span"
            )));
        }
        let first_patch = end + 1 - total + usize::from(use_im_start_end);
        let span = ImageSpan { start: first_patch, len: n };
        image_spans.push(span);
    }
    if image_spans.len() != n_images {
        return Err(Error::Usage(format!(
            "the prompt has {n_images} <image> placeholder(s) but {} image spans were found \
             (the text itself contains {NEVA_IMAGE_END}?)",
            image_spans.len()
        )));
    }
    Ok(PromptTokens { ids, image_spans })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const SYS_V1: &str = VICUNA_SYSTEM;
    const SYS_L2: &str = LLAVA_LLAMA2_SYSTEM;

    fn one_turn() -> Conversation {
        Conversation::single("u1").assistant("a1")
    }

    fn two_turns() -> Conversation {
        one_turn().user("u2").assistant("a2")
    }

    fn render(t: Template, c: &Conversation, f: Flavour) -> String {
        t.render(c, f).unwrap()
    }

    fn gen(t: Template, c: &Conversation, f: Flavour) -> String {
        t.generation_prompt(c, f).unwrap()
    }

    #[test]
    fn parse_names() {
        assert_eq!(Template::parse("v1").unwrap(), Template::VicunaV1);
        assert_eq!(Template::parse("vicuna_v1").unwrap(), Template::VicunaV1);
        assert_eq!(Template::parse("llama_2").unwrap(), Template::Llama2);
        assert_eq!(Template::parse("nvgpt").unwrap(), Template::Nvgpt);
        assert_eq!(Template::parse("plain").unwrap(), Template::Plain);
        let err = Template::parse("chatml").unwrap_err().to_string();
        assert!(err.contains("llama_2, vicuna_v1, v1, nvgpt, plain"), "{err}");
        assert!(Flavour::parse("nemo").is_ok() && Flavour::parse("x").is_err());
    }

    #[test]
    fn vicuna_v1_llava() {
        let f = Flavour::Llava;
        let t = Template::VicunaV1;
        assert_eq!(render(t, &one_turn(), f), format!("{SYS_V1} USER: u1 ASSISTANT: a1</s>"));
        assert_eq!(
            render(t, &two_turns(), f),
            format!("{SYS_V1} USER: u1 ASSISTANT: a1</s>USER: u2 ASSISTANT: a2</s>")
        );
        assert_eq!(gen(t, &Conversation::single("u1"), f), format!("{SYS_V1} USER: u1 ASSISTANT:"));
        assert_eq!(
            gen(t, &one_turn().user("u2"), f),
            format!("{SYS_V1} USER: u1 ASSISTANT: a1</s>USER: u2 ASSISTANT:")
        );
    }

    #[test]
    fn vicuna_v1_nemo() {
        let f = Flavour::Nemo;
        let t = Template::VicunaV1;
        assert_eq!(render(t, &one_turn(), f), format!("{SYS_V1} USER: u1 ASSISTANT: a1<extra_id_7>"));
        assert_eq!(
            render(t, &two_turns(), f),
            format!("{SYS_V1} USER: u1 ASSISTANT: a1<extra_id_7> USER: u2 ASSISTANT: a2<extra_id_7>")
        );
        assert_eq!(gen(t, &Conversation::single("u1"), f), format!("{SYS_V1} USER: u1 ASSISTANT:"));
        assert_eq!(
            gen(t, &one_turn().user("u2"), f),
            format!("{SYS_V1} USER: u1 ASSISTANT: a1<extra_id_7> USER: u2 ASSISTANT:")
        );
    }

    #[test]
    fn llama_2_llava() {
        let f = Flavour::Llava;
        let t = Template::Llama2;
        assert_eq!(
            render(t, &one_turn(), f),
            format!("[INST] <<SYS>>\n{SYS_L2}\n<</SYS>>\n\nu1 [/INST] a1 </s>")
        );
        assert_eq!(
            render(t, &two_turns(), f),
            format!("[INST] <<SYS>>\n{SYS_L2}\n<</SYS>>\n\nu1 [/INST] a1 </s><s>[INST] u2 [/INST] a2 </s>")
        );
        assert_eq!(
            gen(t, &Conversation::single("u1"), f),
            format!("[INST] <<SYS>>\n{SYS_L2}\n<</SYS>>\n\nu1 [/INST]")
        );
        assert_eq!(
            gen(t, &one_turn().user("u2"), f),
            format!("[INST] <<SYS>>\n{SYS_L2}\n<</SYS>>\n\nu1 [/INST] a1 </s><s>[INST] u2 [/INST]")
        );
        // LLaVA omits the <<SYS>> block for an empty system prompt.
        let c = Conversation { system: Some(String::new()), ..Conversation::single("u1") };
        assert_eq!(gen(t, &c, f), "[INST] u1 [/INST]");
    }

    #[test]
    fn llama_2_nemo() {
        let f = Flavour::Nemo;
        let t = Template::Llama2;
        assert_eq!(
            render(t, &one_turn(), f),
            format!(" [INST] <<SYS>>\n{SYS_L2}\n<</SYS>>\n\nu1 [/INST] a1 <extra_id_7>")
        );
        assert_eq!(
            render(t, &two_turns(), f),
            format!(
                " [INST] <<SYS>>\n{SYS_L2}\n<</SYS>>\n\nu1 [/INST] a1 <extra_id_7><extra_id_6> [INST] u2 [/INST] a2 <extra_id_7>"
            )
        );
        assert_eq!(
            gen(t, &Conversation::single("u1"), f),
            format!(" [INST] <<SYS>>\n{SYS_L2}\n<</SYS>>\n\nu1 [/INST]")
        );
    }

    #[test]
    fn nvgpt_nemo() {
        let f = Flavour::Nemo;
        let t = Template::Nvgpt;
        let sys = NVGPT_SYSTEM;
        let label = NVGPT_LABEL;
        assert_eq!(
            render(t, &one_turn(), f),
            format!("<extra_id_0>System\n{sys}<extra_id_1>User\nu1\n<extra_id_1>Assistant\n<extra_id_2>{label}\na1\n<extra_id_1>")
        );
        assert_eq!(
            render(t, &two_turns(), f),
            format!(
                "<extra_id_0>System\n{sys}<extra_id_1>User\nu1\n<extra_id_1>Assistant\n<extra_id_2>{label}\na1\n\
                 <extra_id_1>User\nu2\n<extra_id_1>Assistant\n<extra_id_2>{label}\na2\n<extra_id_1>"
            )
        );
        assert_eq!(
            gen(t, &Conversation::single("u1"), f),
            format!(
                "<extra_id_0>System\n{sys}<extra_id_1>User\nu1\n<extra_id_1>Assistant\n<extra_id_2>{label}\n"
            )
        );
        assert!(t.render(&one_turn(), Flavour::Llava).is_err());
    }

    #[test]
    fn plain_both_flavours() {
        let c = Conversation::single("<image>\nwhat is this").assistant("a cat");
        for f in [Flavour::Llava, Flavour::Nemo] {
            assert_eq!(render(Template::Plain, &c, f), "<image>a cat\n");
            assert_eq!(gen(Template::Plain, &Conversation::single("<image>"), f), "<image>");
            assert!(Template::Plain.render(&c.clone().user("<image>").assistant("x"), f).is_err());
            assert!(Template::Plain.render(&Conversation::single("no image").assistant("x"), f).is_err());
        }
    }

    #[test]
    fn nemo_generation_adds_newline_after_image() {
        let c = Conversation::single("<image>Describe.");
        assert_eq!(
            gen(Template::VicunaV1, &c, Flavour::Nemo),
            format!("{SYS_V1} USER: <image>\nDescribe. ASSISTANT:")
        );
        assert_eq!(
            gen(Template::VicunaV1, &c, Flavour::Llava),
            format!("{SYS_V1} USER: <image>Describe. ASSISTANT:")
        );
    }

    #[test]
    fn turns_must_alternate() {
        let c = Conversation { system: None, turns: vec![(Role::Assistant, "x".into())] };
        assert!(Template::VicunaV1.render(&c, Flavour::Llava).is_err());
        assert!(Template::VicunaV1.generation_prompt(&one_turn(), Flavour::Llava).is_err());
    }

    fn fixture_tokenizer(name: &str, file: &str) -> Tokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name);
        Tokenizer::from_file(dir.join(file)).unwrap()
    }

    fn neva_tokenizer() -> Tokenizer {
        let mut tok = fixture_tokenizer("llama-gqa", "tokenizer.model");
        let extra: Vec<String> = (0..8).map(|i| format!("<extra_id_{i}>")).collect();
        tok.add_special_tokens(&extra.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
        tok
    }

    #[test]
    fn neva_image_span_with_llama_tricks() {
        let tok = neva_tokenizer();
        let base = tok.vocab_size() as u32 - 8; // <extra_id_0> id
        let (start, end) = (base + 4, base + 5);
        let prompt = gen(Template::VicunaV1, &Conversation::single("<image>Hi"), Flavour::Nemo);
        let images = ImageTokens::Neva { n: 6, use_im_start_end: false };
        let out = tokenize_prompt(&tok, &prompt, Template::VicunaV1, Flavour::Nemo, Some(&images)).unwrap();
        assert_eq!(out.image_spans.len(), 1);
        let ImageSpan { start: s, len } = out.image_spans[0];
        assert_eq!(len, 6);
        // start, 4 patches remapped to 0, end; no BOS in the NeMo flavour.
        assert_eq!(&out.ids[s..s + len], &[start, 0, 0, 0, 0, end]);
        assert_ne!(out.ids[0], 1);

        let images = ImageTokens::Neva { n: 6, use_im_start_end: true };
        let out = tokenize_prompt(&tok, &prompt, Template::VicunaV1, Flavour::Nemo, Some(&images)).unwrap();
        let ImageSpan { start: s, len } = out.image_spans[0];
        assert_eq!(len, 6);
        assert_eq!(out.ids[s - 1], start);
        assert_eq!(&out.ids[s..s + len], &[0; 6]);
        assert_eq!(out.ids[s + len], end);

        // nvgpt keeps the patch ids (no LLaMA tricks).
        let prompt = gen(Template::Nvgpt, &Conversation::single("<image>Hi"), Flavour::Nemo);
        let images = ImageTokens::Neva { n: 4, use_im_start_end: false };
        let out = tokenize_prompt(&tok, &prompt, Template::Nvgpt, Flavour::Nemo, Some(&images)).unwrap();
        let ImageSpan { start: s, len } = out.image_spans[0];
        assert_eq!(&out.ids[s..s + len], &[start, base + 3, base + 3, end]);
    }

    #[test]
    fn llama_tricks_remap_separators() {
        let tok = neva_tokenizer();
        let prompt = Template::VicunaV1.render(&two_turns(), Flavour::Nemo).unwrap();
        let out = tokenize_prompt(&tok, &prompt, Template::VicunaV1, Flavour::Nemo, None).unwrap();
        assert_eq!(out.ids.iter().filter(|&&id| id == 2).count(), 2);
        assert!(out.ids.iter().all(|&id| id < tok.vocab_size() as u32 - 8));
    }

    #[test]
    fn llava_chunks_and_placeholder() {
        let tok = fixture_tokenizer("llama-gqa", "tokenizer.json");
        let prompt = gen(Template::VicunaV1, &Conversation::single("<image>\nHi"), Flavour::Llava);
        let images = ImageTokens::Llava { placeholder_id: 0, n: 5 };
        let out = tokenize_prompt(&tok, &prompt, Template::VicunaV1, Flavour::Llava, Some(&images)).unwrap();
        let (before, after) = prompt.split_once("<image>").unwrap();
        let first = tok.encode(before, true).unwrap();
        let second = tok.encode(after, true).unwrap();
        let mut want = first.clone();
        want.extend([0; 5]);
        want.extend(&second[1..]);
        assert_eq!(out.ids, want);
        assert_eq!(out.image_spans, vec![ImageSpan { start: first.len(), len: 5 }]);
        assert!(tokenize_prompt(&tok, &prompt, Template::VicunaV1, Flavour::Llava, None).is_err());
    }

    /// One `fixtures/llava-tiny/golden/generate.json` case.
    struct LlavaCase {
        prompt: String,
        question: String,
        unexpanded: Vec<u32>,
        expanded: Vec<u32>,
    }

    fn llava_tiny_cases() -> Option<Vec<LlavaCase>> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llava-tiny");
        let text = std::fs::read_to_string(dir.join("golden/generate.json")).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
        };
        let cases = json["cases"].as_array().unwrap();
        Some(
            cases
                .iter()
                .map(|c| LlavaCase {
                    prompt: c["prompt"].as_str().unwrap().to_owned(),
                    question: c["question"].as_str().unwrap().to_owned(),
                    unexpanded: ids(&c["input_ids_unexpanded"]),
                    expanded: ids(&c["input_ids"]),
                })
                .collect(),
        )
    }

    #[test]
    fn llava_tiny_prompts_match_the_reference_processor() {
        let Some(cases) = llava_tiny_cases() else {
            return; // fixture not generated yet
        };
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llava-tiny");
        let hf = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let sp = Tokenizer::from_file(dir.join("tokenizer.model")).unwrap();
        let image_id = hf.token_to_id("<image>").unwrap();
        assert_eq!(image_id, 256);
        for LlavaCase { prompt, question, unexpanded, expanded } in cases {
            let conv = Conversation::single(format!("<image>\n{question}"));
            assert_eq!(gen(Template::VicunaV1, &conv, Flavour::Llava), prompt);
            let n = expanded.len() - unexpanded.len() + 1;
            let start = unexpanded.iter().position(|&id| id == image_id).unwrap();

            // llava-hf: the processor expands <image> in the text.
            let images = ImageTokens::LlavaHf { image_token_id: image_id, n };
            let out =
                tokenize_prompt(&hf, &prompt, Template::VicunaV1, Flavour::Llava, Some(&images)).unwrap();
            assert_eq!(out.ids, expanded);
            assert_eq!(out.image_spans, vec![ImageSpan { start, len: n }]);

            // Original LLaVA's tokenizer_image_token over the SentencePiece model gives the same.
            let images = ImageTokens::Llava { placeholder_id: image_id, n };
            let out =
                tokenize_prompt(&sp, &prompt, Template::VicunaV1, Flavour::Llava, Some(&images)).unwrap();
            assert_eq!(out.ids, expanded);
            assert_eq!(out.image_spans, vec![ImageSpan { start, len: n }]);

            let wrong = ImageTokens::LlavaHf { image_token_id: image_id + 1, n };
            assert!(tokenize_prompt(&hf, &prompt, Template::VicunaV1, Flavour::Llava, Some(&wrong)).is_err());
        }
    }
}
