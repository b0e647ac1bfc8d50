//! NeVA / LLaVA as data: where the projector and the vision tower sit in each dialect's names
//! (formats.md §6.1–§6.3), the NeVA special tokens (§6.4), the conversation templates (§9.2), the
//! projector types and their canonical tensors, and the NeVA sections of `model_config.yaml`
//! (§5.3).
//!
//! Canonical names: projector `mm_projector.{weight,bias}` (linear) or `mm_projector.{2k}.*`
//! (`mlpNx_gelu`, LLaVA's `nn.Sequential` indices); vision tower `vision_model.*` (HF
//! `CLIPVisionModel`).

use super::llama::NemoDialect;
use super::yaml::Node;
use serde_json::{json, Value as Json};

/// The pieces appended to a LLaMA SentencePiece model for NeVA (formats.md §6.4), in id order.
pub const EXTRA_IDS: [&str; 8] = [
    "<extra_id_0>",
    "<extra_id_1>",
    "<extra_id_2>",
    "<extra_id_3>",
    "<extra_id_4>",
    "<extra_id_5>",
    "<extra_id_6>",
    "<extra_id_7>",
];
/// NeVA's image patch placeholder (`DEFAULT_IMAGE_PATCH_TOKEN`).
pub const IMAGE_PATCH: &str = "<extra_id_3>";
/// NeVA's image start marker (`media_start_id`).
pub const IMAGE_START: &str = "<extra_id_4>";
/// NeVA's image end marker (`media_end_id`).
pub const IMAGE_END: &str = "<extra_id_5>";

/// llava-hf's image placeholder token.
pub const HF_IMAGE_TOKEN: &str = "<image>";
/// llava-hf's padding token.
pub const HF_PAD_TOKEN: &str = "<pad>";
/// llava-hf resizes its vocabulary to a multiple of this (formats.md §6.3: 32002 → 32064).
pub const HF_VOCAB_MULTIPLE: usize = 64;

/// Where NeVA's projector parameters live (formats.md §6.1).
pub fn projector_prefix(dialect: NemoDialect) -> &'static str {
    match dialect {
        NemoDialect::Mcore => "model.embedding.word_embeddings.adapter_layer.mm_projector_adapter.",
        NemoDialect::Legacy => {
            "model.language_model.embedding.word_embeddings.adapter_layer.mm_projector_adapter."
        }
    }
}

/// Where NeVA keeps an unfrozen HF vision tower (`vision_model.*` follows).
pub fn vision_prefix(dialect: NemoDialect) -> &'static str {
    match dialect {
        NemoDialect::Mcore => "model.embedding.word_embeddings.vision_encoder.",
        NemoDialect::Legacy => "model.language_model.embedding.word_embeddings.vision_encoder.",
    }
}

/// The canonical projector name of a NeVA key, with the dialect it was spelled in.
pub fn neva_projector_canonical(name: &str) -> Option<(NemoDialect, String)> {
    [NemoDialect::Mcore, NemoDialect::Legacy]
        .into_iter()
        .find_map(|d| name.strip_prefix(projector_prefix(d)).map(|rest| (d, rest.to_string())))
        .filter(|(_, rest)| rest.starts_with("mm_projector."))
}

/// The canonical vision name of a NeVA key, with the dialect it was spelled in.
pub fn neva_vision_canonical(name: &str) -> Option<(NemoDialect, String)> {
    [NemoDialect::Mcore, NemoDialect::Legacy]
        .into_iter()
        .find_map(|d| name.strip_prefix(vision_prefix(d)).map(|rest| (d, rest.to_string())))
}

/// LLaVA (liuhaotian) projector key → canonical: `model.mm_projector.X` → `mm_projector.X`. A
/// standalone `mm_projector.bin` uses the same keys; bare `mm_projector.X` is accepted too.
pub fn llava_projector_canonical(name: &str) -> Option<String> {
    let rest = name.strip_prefix("model.").unwrap_or(name);
    rest.starts_with("mm_projector.").then(|| rest.to_string())
}

/// Canonical projector name → llava-hf (`mm_projector.0.*` → `multi_modal_projector.linear_1.*`,
/// `mm_projector.2.*` → `…linear_2.*`); `None` where llava-hf has no such tensor.
pub fn llava_hf_projector_name(canonical: &str) -> Option<String> {
    let rest = canonical.strip_prefix("mm_projector.")?;
    let (index, param) = rest.split_once('.')?;
    let linear = match index {
        "0" => "linear_1",
        "2" => "linear_2",
        _ => return None,
    };
    matches!(param, "weight" | "bias").then(|| format!("multi_modal_projector.{linear}.{param}"))
}

/// A projector architecture (`mm_mlp_adapter_type` / `mm_projector_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProjectorType {
    /// One `Linear(C → H)`: `mm_projector.{weight,bias}`.
    Linear,
    /// `depth` linears with exact GELU between (`mlp2x_gelu` is 2): `mm_projector.{2k}.*`.
    MlpGelu {
        /// Number of linears.
        depth: usize,
    },
}

/// The deepest `mlpNx_gelu` projector accepted: LLaVA uses 2; far deeper is a typo, not a
/// projector (and `mlp1000000000000x_gelu` in a config would otherwise size a list of 2·10¹²
/// tensors to look for).
pub const MAX_MLP_DEPTH: usize = 64;

impl ProjectorType {
    /// Parse `linear` or `mlp{N}x_gelu` with N digits from 1 to [`MAX_MLP_DEPTH`] (LLaVA's
    /// `^mlp(\d+)x_gelu$`); `None` for anything else (`identity` has no weights and cannot be
    /// converted meaningfully, so it is not accepted either).
    pub fn parse(s: &str) -> Option<Self> {
        if s == "linear" {
            return Some(ProjectorType::Linear);
        }
        let digits = s.strip_prefix("mlp")?.strip_suffix("x_gelu")?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let depth: usize = digits.parse().ok()?;
        (1..=MAX_MLP_DEPTH).contains(&depth).then_some(ProjectorType::MlpGelu { depth })
    }

    /// The config spelling.
    pub fn name(self) -> String {
        match self {
            ProjectorType::Linear => "linear".into(),
            ProjectorType::MlpGelu { depth } => format!("mlp{depth}x_gelu"),
        }
    }

    /// Canonical tensors and shapes, in `nn.Sequential` order (weight, then bias, per linear),
    /// for vision width `c` and LLM width `h`.
    pub fn shapes(self, c: usize, h: usize) -> Vec<(String, Vec<usize>)> {
        match self {
            ProjectorType::Linear => {
                vec![("mm_projector.weight".into(), vec![h, c]), ("mm_projector.bias".into(), vec![h])]
            }
            ProjectorType::MlpGelu { depth } => (0..depth)
                .flat_map(|k| {
                    let fan_in = if k == 0 { c } else { h };
                    [
                        (format!("mm_projector.{}.weight", 2 * k), vec![h, fan_in]),
                        (format!("mm_projector.{}.bias", 2 * k), vec![h]),
                    ]
                })
                .collect(),
        }
    }

    /// The type a set of canonical projector names spells: `mm_projector.weight` → linear,
    /// `mm_projector.{0,2,…,2(N−1)}.weight` → `mlpNx_gelu`.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        let mut indices = Vec::new();
        let mut linear = false;
        for n in names {
            let rest = n.strip_prefix("mm_projector.")?;
            match rest.split_once('.') {
                None => linear = true,
                Some((i, _)) => indices.push(i.parse::<usize>().ok()?),
            }
        }
        match (linear, indices.iter().max()) {
            (true, None) => Some(ProjectorType::Linear),
            (false, Some(max)) if max % 2 == 0 => Some(ProjectorType::MlpGelu { depth: max / 2 + 1 }),
            _ => None,
        }
    }
}

/// A conversation template a NeVA bundle is trained with (formats.md §9.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Template {
    /// LLaVA-1.5's `vicuna_v1` (NeMo `v1`).
    VicunaV1,
    /// `llama_2` (LLaVA's llava_llama_2).
    Llama2,
    /// NeMo's `nvgpt`.
    Nvgpt,
}

impl Template {
    /// The names accepted on the command line.
    pub const NAMES: &'static str = "vicuna_v1 (= v1), llama_2, nvgpt";

    /// Parse our name or NeMo's (`v1`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "vicuna_v1" | "v1" | "llava_v1" => Some(Template::VicunaV1),
            "llama_2" | "llava_llama_2" => Some(Template::Llama2),
            "nvgpt" => Some(Template::Nvgpt),
            _ => None,
        }
    }

    /// shardsmith's name (the chat-template name `generate` takes).
    pub fn name(self) -> &'static str {
        match self {
            Template::VicunaV1 => "vicuna_v1",
            Template::Llama2 => "llama_2",
            Template::Nvgpt => "nvgpt",
        }
    }

    /// NeMo's `data.conv_template` / `mm_cfg.llm.model_type` spelling.
    pub fn neva_name(self) -> &'static str {
        match self {
            Template::VicunaV1 => "v1",
            Template::Llama2 => "llama_2",
            Template::Nvgpt => "nvgpt",
        }
    }

    /// The template a llava-hf `chat_template` (Jinja text) renders, recognised by its fixed
    /// role markers; `None` when it is neither.
    pub fn from_chat_template(jinja: &str) -> Option<Self> {
        if jinja.contains("USER:") && jinja.contains("ASSISTANT:") {
            Some(Template::VicunaV1)
        } else if jinja.contains("[INST]") && jinja.contains("[/INST]") {
            Some(Template::Llama2)
        } else {
            None
        }
    }

    /// A llava-hf processor `chat_template` rendering this template's prompt (LLaVA strings,
    /// formats.md §9.2), or `None` for NeMo-only templates.
    pub fn hf_chat_template(self) -> Option<&'static str> {
        match self {
            Template::VicunaV1 => Some(VICUNA_V1_JINJA),
            Template::Llama2 => Some(LLAMA_2_JINJA),
            Template::Nvgpt => None,
        }
    }
}

/// Jinja that renders a message's text: a plain string, or the text items of a content list.
macro_rules! text_of {
    ($m:literal) => {
        concat!(
            "{% if ", $m, "['content'] is string %}{{ ", $m, "['content'] }}{% else %}{% for item in ", $m,
            "['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
        )
    };
}

/// Jinja that renders `<image>\n` for each image item of a message.
macro_rules! images_of {
    ($m:literal) => {
        concat!(
            "{% if ",
            $m,
            "['content'] is not string %}{% for item in ",
            $m,
            "['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}{% endif %}"
        )
    };
}

/// `{sys} USER: <image>\n{q} ASSISTANT: {a}</s>…` (LLaVA `vicuna_v1`; the system is optional).
const VICUNA_V1_JINJA: &str = concat!(
    "{% for message in messages %}{% if message['role'] == 'system' %}",
    text_of!("message"),
    " {% elif message['role'] == 'user' %}USER: ",
    images_of!("message"),
    text_of!("message"),
    " {% else %}ASSISTANT: ",
    text_of!("message"),
    "</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
);

/// `[INST] <<SYS>>\n{sys}\n<</SYS>>\n\n<image>\n{q} [/INST] {a} </s><s>…` (LLaVA llama_2; the
/// system block only in the first user turn, and only when there is a system message).
const LLAMA_2_JINJA: &str = concat!(
    "{% set ns = namespace(sys='', first=true) %}{% for message in messages %}",
    "{% if message['role'] == 'system' %}{% set ns.sys = ",
    "message['content'] if message['content'] is string else message['content'][0]['text'] %}{% endif %}",
    "{% endfor %}{% for message in messages %}{% if message['role'] == 'user' %}[INST] ",
    "{% if ns.first and ns.sys %}<<SYS>>\n{{ ns.sys }}\n<</SYS>>\n\n{% endif %}{% set ns.first = false %}",
    images_of!("message"),
    text_of!("message"),
    " [/INST]{% elif message['role'] == 'assistant' %} ",
    text_of!("message"),
    " </s><s>{% endif %}{% endfor %}"
);

/// The HF vision tower ids NeMo and LLaVA reference by name, with their `CLIPVisionConfig`
/// (formats.md §7.3). Matched exactly (id or config), never by substring.
pub fn known_clip_towers() -> [(&'static str, Json); 2] {
    let cfg = |image: usize| {
        json!({
            "attention_dropout": 0.0,
            "hidden_act": "quick_gelu",
            "hidden_size": 1024,
            "image_size": image,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": 4096,
            "layer_norm_eps": 1e-05,
            "model_type": "clip_vision_model",
            "num_attention_heads": 16,
            "num_channels": 3,
            "num_hidden_layers": 24,
            "patch_size": 14,
            "projection_dim": 768
        })
    };
    [("openai/clip-vit-large-patch14-336", cfg(336)), ("openai/clip-vit-large-patch14", cfg(224))]
}

/// The config of a known tower id.
pub fn known_clip_config(name: &str) -> Option<Json> {
    known_clip_towers().into_iter().find(|(id, _)| *id == name).map(|(_, c)| c)
}

/// The known tower id whose architecture `cfg` has (the fields that decide shapes and numerics).
pub fn known_clip_id(cfg: &Json) -> Option<&'static str> {
    const KEYS: [&str; 8] = [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "patch_size",
        "image_size",
        "hidden_act",
        "num_channels",
    ];
    known_clip_towers()
        .into_iter()
        .find(|(_, known)| KEYS.iter().all(|k| cfg.get(*k).is_some() && cfg.get(*k) == known.get(*k)))
        .map(|(id, _)| id)
}

/// What the vision encoder section of the NeVA yaml says (formats.md §5.3).
#[derive(Clone, Debug)]
pub struct VisionYaml {
    /// `from_pretrained`: an HF id or a directory (or null when only the bundle has it).
    pub from_pretrained: Option<String>,
    /// `freeze`: true exactly when the weights are not in the file (NeVA saves a tower iff it is
    /// unfrozen, formats.md §6.1).
    pub freeze: bool,
    /// `patch_dim`.
    pub patch: usize,
    /// Image side (`crop_size: [S, S]`).
    pub image_size: usize,
    /// `hidden_size` (projector input).
    pub hidden: usize,
    /// `vision_select_layer`.
    pub select_layer: isize,
    /// `class_token_length` (1 drops CLS).
    pub class_tokens: usize,
    /// The HF `CLIPVisionConfig`, written as `hf_config` (a shardsmith key NeMo ignores) so that
    /// a bundled tower is self-describing.
    pub hf_config: Option<Json>,
}

/// Provenance a conversion records in the yaml (`converted_from`, a key NeMo ignores) so that
/// converting back restores the source exactly (formats.md §6.3 caveat: the NeVA special tokens
/// take ids other formats use differently).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvertedFrom {
    /// `llava-hf`, `llava` or `hf`.
    pub format: String,
    /// Embedding rows in the source.
    pub vocab_size: usize,
    /// Trailing SentencePiece pieces (`<extra_id_*>`) the conversion appended.
    pub added_pieces: usize,
    /// llava-hf `image_token_index`.
    pub image_token_index: Option<u32>,
    /// llava-hf `pad_token_id`.
    pub pad_token_id: Option<u32>,
}

impl ConvertedFrom {
    /// The yaml mapping.
    pub fn node(&self) -> Node {
        Node::Map(vec![
            ("tool".into(), "shardsmith".into()),
            ("format".into(), self.format.clone().into()),
            ("vocab_size".into(), self.vocab_size.into()),
            ("added_tokenizer_pieces".into(), self.added_pieces.into()),
            ("image_token_index".into(), self.image_token_index.map(|i| i as usize).into()),
            ("pad_token_id".into(), self.pad_token_id.map(|i| i as usize).into()),
        ])
    }

    /// Read it back from a parsed yaml (`None` when absent).
    pub fn from_yaml(v: &serde_yaml::Value) -> Option<Self> {
        let m = v.get("converted_from")?;
        let n = |k: &str| m.get(k).and_then(serde_yaml::Value::as_u64);
        Some(ConvertedFrom {
            format: m.get("format")?.as_str()?.to_string(),
            vocab_size: n("vocab_size")? as usize,
            added_pieces: n("added_tokenizer_pieces").unwrap_or(0) as usize,
            image_token_index: n("image_token_index").map(|i| i as u32),
            pad_token_id: n("pad_token_id").map(|i| i as u32),
        })
    }
}

/// The NeVA sections of `model_config.yaml`.
#[derive(Clone, Debug)]
pub struct NevaYaml {
    /// Conversation template.
    pub template: Template,
    /// Projector architecture.
    pub projector: ProjectorType,
    /// Vision encoder section.
    pub vision: VisionYaml,
    /// `mm_cfg.llm.freeze` (false: the LLM weights are in the file).
    pub llm_freeze: bool,
    /// `mm_cfg.llm.from_pretrained`.
    pub llm_from_pretrained: Option<String>,
    /// `use_im_start_end`.
    pub use_im_start_end: bool,
    /// `data.image_token_len` (N features per image).
    pub image_token_len: usize,
    /// `data.image_aspect_ratio`.
    pub image_aspect_ratio: String,
    /// `tokenizer.model` / `tokenizer.tokenizer_model` value (`nemo:<hash>_tokenizer.model`).
    pub tokenizer_model: String,
    /// Provenance for exact round trips.
    pub converted_from: Option<ConvertedFrom>,
}

/// The NeVA model class.
pub const NEVA_TARGET: &str =
    "nemo.collections.multimodal.models.multimodal_llm.neva.neva_model.MegatronNevaModel";

fn json_to_node(v: &Json) -> Option<Node> {
    Some(match v {
        Json::Null => Node::Null,
        Json::Bool(b) => Node::Bool(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Node::Int(i),
            None => Node::Float(n.as_f64()?),
        },
        Json::String(s) => Node::Str(s.clone()),
        Json::Array(items) => {
            let items: Option<Vec<Node>> = items
                .iter()
                .map(|i| json_to_node(i).filter(|n| !matches!(n, Node::Map(_) | Node::Seq(_))))
                .collect();
            Node::Seq(items?)
        }
        Json::Object(m) => {
            Node::Map(m.iter().filter_map(|(k, v)| Some((k.clone(), json_to_node(v)?))).collect())
        }
    })
}

/// Rewrite a LLaMA NeMo yaml mapping ([`super::llama::LlamaHparams::nemo_yaml_map`]) into a NeVA
/// one: the tokenizer section gains `tokenizer_model` (the LLaVA converter registers both keys,
/// formats.md §1.4), `mm_cfg` and `data` are added, `target` becomes `MegatronNevaModel`.
pub fn neva_yaml_map(mut map: Vec<(String, Node)>, n: &NevaYaml) -> Vec<(String, Node)> {
    for (k, v) in map.iter_mut() {
        match k.as_str() {
            "tokenizer" => {
                if let Node::Map(t) = v {
                    for (tk, tv) in t.iter_mut() {
                        if tk == "model" {
                            *tv = n.tokenizer_model.clone().into();
                        }
                    }
                    let at = t.iter().position(|(tk, _)| tk == "model").map_or(t.len(), |i| i + 1);
                    t.insert(at, ("tokenizer_model".into(), n.tokenizer_model.clone().into()));
                }
            }
            "target" => *v = NEVA_TARGET.into(),
            _ => {}
        }
    }
    let v = &n.vision;
    let mut vision = vec![
        ("from_pretrained".into(), v.from_pretrained.clone().into()),
        ("from_hf".into(), true.into()),
        ("patch_dim".into(), v.patch.into()),
        ("crop_size".into(), Node::Seq(vec![v.image_size.into(), v.image_size.into()])),
        ("hidden_size".into(), v.hidden.into()),
        ("vision_select_layer".into(), (v.select_layer as i64).into()),
        ("class_token_length".into(), v.class_tokens.into()),
        ("freeze".into(), v.freeze.into()),
    ];
    if let Some(cfg) = v.hf_config.as_ref().and_then(json_to_node) {
        vision.push(("hf_config".into(), cfg));
    }
    let template = n.template.neva_name();
    let mm_cfg = Node::Map(vec![
        (
            "llm".into(),
            Node::Map(vec![
                ("from_pretrained".into(), n.llm_from_pretrained.clone().into()),
                ("freeze".into(), n.llm_freeze.into()),
                ("model_type".into(), template.into()),
            ]),
        ),
        ("vision_encoder".into(), Node::Map(vision)),
        ("pretrain_mm_mlp_adapter".into(), Node::Null),
        ("mm_mlp_adapter_type".into(), n.projector.name().into()),
        ("use_im_start_end".into(), n.use_im_start_end.into()),
        ("model_type".into(), template.into()),
    ]);
    let data = Node::Map(vec![
        ("is_multimodal".into(), true.into()),
        ("sep_image_conv_front".into(), false.into()),
        ("image_token_len".into(), n.image_token_len.into()),
        ("conv_template".into(), template.into()),
        ("image_folder".into(), Node::Null),
        ("image_aspect_ratio".into(), n.image_aspect_ratio.clone().into()),
        ("lazy_preprocess".into(), true.into()),
    ]);
    let at = map.iter().position(|(k, _)| k == "target").unwrap_or(map.len());
    let mut extra = vec![("mm_cfg".to_string(), mm_cfg), ("data".to_string(), data)];
    if let Some(c) = &n.converted_from {
        extra.push(("converted_from".into(), c.node()));
    }
    map.splice(at..at, extra);
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projector_types_parse_and_name_their_tensors() {
        assert_eq!(ProjectorType::parse("mlp2x_gelu"), Some(ProjectorType::MlpGelu { depth: 2 }));
        assert_eq!(ProjectorType::parse("linear"), Some(ProjectorType::Linear));
        assert_eq!(ProjectorType::parse("identity"), None);
        // Digits only, 1 to MAX_MLP_DEPTH: a typo'd depth must not size 10^12 tensors (fuzzer).
        assert_eq!(ProjectorType::parse("mlp64x_gelu"), Some(ProjectorType::MlpGelu { depth: 64 }));
        for bad in
            ["mlp0x_gelu", "mlp65x_gelu", "mlp1000000000000x_gelu", "mlp+2x_gelu", "mlpx_gelu", "mlp 2x_gelu"]
        {
            assert_eq!(ProjectorType::parse(bad), None, "{bad}");
        }
        let names: Vec<String> =
            ProjectorType::MlpGelu { depth: 2 }.shapes(48, 64).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            ["mm_projector.0.weight", "mm_projector.0.bias", "mm_projector.2.weight", "mm_projector.2.bias"]
        );
        assert_eq!(
            ProjectorType::from_names(names.iter().map(String::as_str)),
            Some(ProjectorType::MlpGelu { depth: 2 })
        );
        assert_eq!(
            ProjectorType::from_names(["mm_projector.weight", "mm_projector.bias"]),
            Some(ProjectorType::Linear)
        );
        assert_eq!(
            llava_hf_projector_name("mm_projector.2.bias").as_deref(),
            Some("multi_modal_projector.linear_2.bias")
        );
        assert_eq!(
            llava_projector_canonical("model.mm_projector.0.weight").as_deref(),
            Some("mm_projector.0.weight")
        );
    }

    #[test]
    fn known_towers_match_by_config_not_name() {
        let cfg = known_clip_config("openai/clip-vit-large-patch14-336").unwrap();
        assert_eq!(known_clip_id(&cfg), Some("openai/clip-vit-large-patch14-336"));
        let mut other = cfg.clone();
        other["num_hidden_layers"] = json!(3);
        assert_eq!(known_clip_id(&other), None);
        assert_eq!(known_clip_config("openai/clip-vit-large-patch14-336-extra"), None);
    }

    #[test]
    fn converted_from_round_trips_through_yaml() {
        let c = ConvertedFrom {
            format: "llava-hf".into(),
            vocab_size: 320,
            added_pieces: 8,
            image_token_index: Some(256),
            pad_token_id: None,
        };
        let text = super::super::yaml::emit(&[("converted_from".into(), c.node())]);
        let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(ConvertedFrom::from_yaml(&v), Some(c));
    }
}
