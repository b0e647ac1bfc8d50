//! `shardsmith`: one binary to inspect, convert, reshard and verify LLaMA-2 / CLIP / NeVA
//! checkpoints. This file only parses arguments and dispatches; each command is a short function
//! in `shardsmith::commands`.

use clap::{Args, Parser, Subcommand};
use shardsmith::commands::convert::{self, TargetKind};
use shardsmith_converters::formats::hf_dir::WeightFormat;
use shardsmith_converters::names::llama::NemoDialect;
use shardsmith_converters::DType;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "shardsmith",
    version,
    about = "Convert, reshard and verify LLaMA-2 / CLIP / NeVA checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Name a checkpoint's format, layout and architecture and list its tensors (headers only).
    Inspect {
        /// A safetensors file, HF directory, PyTorch checkpoint, .nemo file or extracted .nemo directory.
        path: PathBuf,
        /// Only list tensors whose name matches this glob (e.g. '*layers.0.*').
        #[arg(long)]
        filter: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Convert between HF LLaMA directories and .nemo (any layout, TP, PP), or reshard.
    Convert {
        /// Source: HF directory, .nemo file or extracted .nemo directory.
        src: PathBuf,
        /// Destination: a `.nemo` path, or a directory for HF output.
        dst: PathBuf,
        #[command(flatten)]
        opts: ConvertArgs,
    },
    /// Re-split a .nemo for another tensor/pipeline-parallel size.
    Reshard {
        /// The .nemo file or extracted directory.
        src: PathBuf,
        /// Output .nemo.
        #[arg(short, long)]
        out: PathBuf,
        #[command(flatten)]
        opts: ConvertArgs,
    },
    /// Print what `convert SRC DST` would write (same as `convert --dry-run`).
    Plan {
        /// Source checkpoint.
        src: PathBuf,
        /// Destination it would write.
        dst: PathBuf,
        #[command(flatten)]
        opts: ConvertArgs,
    },
    /// Compare two checkpoints of any formats by canonical tensor name; exit 1 when they differ.
    Diff {
        /// First checkpoint.
        a: PathBuf,
        /// Second checkpoint.
        b: PathBuf,
        /// Accept value differences up to this absolute tolerance (default: bit-identical).
        #[arg(long, default_value_t = 0.0, value_parser = parse_tolerance)]
        atol: f64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a synthetic HF LLaMA-2 checkpoint with real tensor shapes and random bf16 values.
    Synth {
        /// llama2-7b, llama2-13b or llama2-70b.
        #[arg(long)]
        preset: String,
        /// Keep only this many decoder layers (e.g. a 70B-shaped model with 2 layers).
        #[arg(long)]
        layers: Option<usize>,
        /// Seed for the values.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output directory.
        #[arg(short, long)]
        out: PathBuf,
        /// Replace an existing output.
        #[arg(long)]
        force: bool,
    },
    /// Generate text from a prompt (and an image, for vision models), streaming tokens to stdout.
    Generate(GenerateArgs),
    /// Finetune a NeVA / llava-hf checkpoint (stage 1, stage 2 or LoRA) from a YAML config.
    Train {
        /// The training config (see fixtures/train-tiny/train.yaml).
        #[arg(long)]
        config: PathBuf,
        /// Continue from the latest checkpoint under output.dir, or from this checkpoint directory.
        #[arg(long, num_args = 0..=1)]
        resume: Option<Option<PathBuf>>,
        /// Override a config value, e.g. --set trainer.max_steps=20 (repeatable).
        #[arg(long = "set")]
        overrides: Vec<String>,
        /// Start afresh in an output.dir that holds an earlier run, removing its checkpoints,
        /// metrics.jsonl and loss.png (without --resume or --force such a run is refused).
        #[arg(long, conflicts_with = "resume")]
        force: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Score greedy answers of a vision-language model on LLaVA-format records (exact match).
    Evaluate {
        /// The checkpoint (llava-hf or original LLaVA directory, or NeVA .nemo).
        ckpt: PathBuf,
        /// HF CLIP directory (or hf://org/name) for a vision tower the checkpoint does not hold
        /// (default: the one its config names, mm_vision_tower or from_pretrained: a local
        /// directory, or a Hub id looked up in the HuggingFace cache).
        #[arg(long)]
        vision: Option<PathBuf>,
        /// LLaVA-format JSON records; the first human turn is asked, the first gpt turn expected.
        #[arg(long)]
        data: PathBuf,
        /// Image directory (default: the data file's directory).
        #[arg(long)]
        image_folder: Option<PathBuf>,
        /// Most tokens per answer.
        #[arg(long, default_value_t = 16)]
        max_new_tokens: usize,
        /// Chat template (default: the checkpoint's, else vicuna_v1).
        #[arg(long)]
        template: Option<String>,
        /// Print the score as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the synthetic coloured-shapes VQA set of the end-to-end demo.
    DemoData {
        /// Output directory.
        #[arg(short, long)]
        out: PathBuf,
        /// Training images (each gets every question).
        #[arg(long, default_value_t = 200)]
        train: usize,
        /// Held-out images.
        #[arg(long, default_value_t = 30)]
        test: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(8..=4096))]
        size: u32,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Replace the output directory if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Benchmarks (not tests): `bench forward MODEL` times prefill and decode on the CPU;
    /// `bench train-step MODEL` one training step; `bench gpu-layer | gemm | attention | decode |
    /// neva-step` time 7B-sized work over random weights on a GPU (bench/gpu.sh).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Run a checkpoint and compare it with reference outputs or with another checkpoint; exit 1
    /// when it misses its tolerance tier.
    Validate {
        /// The checkpoint to run (HF LLaMA / llava-hf directory, .nemo, hf://org/name).
        ckpt: PathBuf,
        /// Golden outputs: a fixture directory (golden/golden.safetensors) or a .safetensors file.
        #[arg(long, required_unless_present = "against", conflicts_with = "against")]
        reference: Option<PathBuf>,
        /// Another checkpoint of the same model to agree with.
        #[arg(long)]
        against: Option<PathBuf>,
        /// Run at this tensor-parallel size (default: the checkpoint's own; 1 for HF).
        #[arg(long)]
        tp: Option<usize>,
        /// Tensor-parallel size for the --against checkpoint.
        #[arg(long)]
        against_tp: Option<usize>,
        /// HF CLIP directory (or hf://org/name) for a vision tower the checkpoint does not hold
        /// (default: the one its config names, mm_vision_tower or from_pretrained: a local
        /// directory, or a Hub id looked up in the HuggingFace cache).
        #[arg(long)]
        vision: Option<PathBuf>,
        /// Compute dtype: f32, bf16 or f16.
        #[arg(long, default_value = "f32", value_parser = parse_compute_dtype)]
        dtype: candle_core::DType,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Edit checkpoints: rename, drop, extract, resize-vocab, keep-layers, merge-lora, merge, swap-llm.
    Surgery(shardsmith::commands::surgery::SurgeryArgs),
    /// Build a NeVA .nemo from an HF LLaMA, an HF CLIP tower and a projector (file or seed).
    Assemble(AssembleArgs),
}

#[derive(Args)]
struct GenerateArgs {
    /// HF LLaMA / llava-hf directory, .nemo, or hf://org/name.
    ckpt: PathBuf,
    /// The user's message.
    #[arg(short, long)]
    prompt: String,
    /// An image (PNG or JPEG) for a vision model; `<image>` in the prompt marks where it goes
    /// (default: before the text).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Chat template: llama_2, vicuna_v1, nvgpt, plain, or raw (default: vicuna_v1 for vision
    /// models, raw for text models).
    #[arg(long)]
    template: Option<String>,
    /// Template spelling: llava or nemo (default: nemo for .nemo checkpoints).
    #[arg(long)]
    flavour: Option<String>,
    /// System prompt (default: the template's; "" for none).
    #[arg(long)]
    system: Option<String>,
    /// Image aspect handling: pad (LLaVA-1.5), square or keep.
    #[arg(long)]
    aspect: Option<String>,
    /// Tokenizer file or directory (default: the checkpoint's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// HF CLIP directory (or hf://org/name) for a vision tower the checkpoint does not hold
    /// (default: the one its config names, mm_vision_tower or from_pretrained: a local
    /// directory, or a Hub id looked up in the HuggingFace cache).
    #[arg(long)]
    vision: Option<PathBuf>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability.
    #[arg(long)]
    top_p: Option<f64>,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Simulated tensor-parallel size.
    #[arg(long)]
    tp: Option<usize>,
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32", value_parser = parse_compute_dtype)]
    dtype: candle_core::DType,
    /// Where to run: cpu, cuda or cuda:N (cuda needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print one JSON object (prompt ids, new ids, text, timings) instead of streaming.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Time prefill and per-token decode (KV cache) of a model; prints one JSON line.
    Forward {
        /// HF LLaMA / llava-hf directory or .nemo.
        model: PathBuf,
        /// Prompt tokens.
        #[arg(long, default_value_t = 128)]
        prompt_len: usize,
        /// Decode steps.
        #[arg(long, default_value_t = 32)]
        decode: usize,
        /// Timed runs after one warm-up (medians reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Compute dtype: f32, bf16 or f16.
        #[arg(long, default_value = "f32", value_parser = parse_compute_dtype)]
        dtype: candle_core::DType,
        /// Simulated tensor-parallel size.
        #[arg(long)]
        tp: Option<usize>,
        /// Include one image (vision models).
        #[arg(long)]
        image: bool,
    },
    /// Time one training step (forward + backward, clip 1.0, AdamW) of a LLaVA / NeVA model on
    /// the CPU; prints one JSON line.
    TrainStep {
        /// llava-hf directory or NeVA .nemo.
        model: PathBuf,
        /// What trains: 1 (projector), 2 (projector + LLM) or lora (projector + rank-8 adapters).
        #[arg(long, default_value = "2", value_parser = ["1", "2", "lora"])]
        stage: String,
        /// Sequences per step (one image each).
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 64)]
        seq: usize,
        /// Timed steps after one warm-up (median reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Compute dtype: f32, bf16 or f16 (master weights and AdamW state stay f32).
        #[arg(long, default_value = "f32", value_parser = parse_compute_dtype)]
        dtype: candle_core::DType,
        /// Activation checkpointing (each decoder layer recomputed in the backward pass).
        #[arg(long)]
        checkpointing: bool,
    },
    /// LLaMA decoder layers forward + backward over random weights (default 7B-shaped, bf16,
    /// B2 × S4096, 4 layers); prints one JSON line with TFLOP/s.
    GpuLayer {
        #[command(flatten)]
        shape: LlamaShapeArgs,
        #[command(flatten)]
        common: GpuCommonArgs,
        /// Sequences.
        #[arg(long, default_value_t = 2)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 4096)]
        seq: usize,
        /// Run each decoder layer as candle's composed ops instead of one graph node with the
        /// hand-written backward (the default): for comparison.
        #[arg(long)]
        composed: bool,
        /// Keep the weights as f32 variables (master weights, as `train` does) and compute in
        /// --dtype: each step casts them, and the weight gradients are f32 products.
        #[arg(long)]
        f32_masters: bool,
        /// Then one more step with each part of the layer timed by CUDA events (ops::phases):
        /// a second JSON line, "gpu_layer_phases", with the milliseconds by part.
        #[arg(long)]
        phases: bool,
    },
    /// Causal attention kernels forward and forward + backward (default B2 H32 S4096 D128 bf16).
    Attention {
        #[command(flatten)]
        common: GpuCommonArgs,
        /// Sequences.
        #[arg(long, default_value_t = 2)]
        batch: usize,
        /// Query heads.
        #[arg(long, default_value_t = 32)]
        heads: usize,
        /// Key/value heads (GQA when fewer than the query heads).
        #[arg(long, default_value_t = 32)]
        kv_heads: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 4096)]
        seq: usize,
        /// Head dim.
        #[arg(long, default_value_t = 128)]
        head_dim: usize,
        /// bf16 CUDA forward kernels to time (comma-separated: mma, wgmma, wgmma128, ws); default every one
        /// this build and head dim have.
        #[arg(long, value_delimiter = ',')]
        forward: Vec<String>,
        /// bf16 CUDA backward kernels to time (split, wide, fused, wgmma, ws); default every one.
        #[arg(long, value_delimiter = ',')]
        backward: Vec<String>,
        /// Then profile the wgmma kernels (head dim 128, sm_90a build): where their warps spend
        /// their cycles, phase by phase, beside the plain kernels' times (one JSON line each).
        #[arg(long)]
        phases: bool,
    },
    /// The GEMMs of a LLaMA layer's training step (forward x·Wᵀ, input gradient dy·W, weight
    /// gradient dyᵀ·x into f32) at B·S rows, and square ones, through each CUDA GEMM library
    /// (`SHARDSMITH_GEMM`: candle, cublas, cublaslt); one JSON line per product and library.
    Gemm {
        #[command(flatten)]
        shape: LlamaShapeArgs,
        #[command(flatten)]
        common: GpuCommonArgs,
        /// Rows of the products: tokens of a step (B·S).
        #[arg(long, default_value_t = 8192)]
        rows: usize,
        /// Sizes of square products also timed (comma-separated; empty for none).
        #[arg(long, value_delimiter = ',', default_value = "4096,8192")]
        square: Vec<usize>,
        /// Libraries to time (comma-separated: candle, cublas, cublaslt); default all.
        #[arg(long, value_delimiter = ',')]
        backends: Vec<String>,
    },
    /// Prefill + greedy decode of a synthetic LLaMA (random weights on the device, default 7B
    /// shape, 32 layers) with the KV cache; one JSON line per batch size.
    Decode {
        #[command(flatten)]
        shape: LlamaShapeArgs,
        #[command(flatten)]
        common: GpuCommonArgs,
        /// Batch sizes, comma-separated.
        #[arg(long, default_value = "1,8", value_delimiter = ',')]
        batch: Vec<usize>,
        /// Prompt tokens.
        #[arg(long, default_value_t = 128)]
        prompt_len: usize,
        /// Decode steps timed.
        #[arg(long, default_value_t = 128)]
        steps: usize,
        /// Also time the CUDA graph step by kind of launch (RMSNorm, GEMVs, attention, …), each
        /// kind as a graph of its own launches: one more JSON line per batch size.
        #[arg(long)]
        breakdown: bool,
    },
    /// One NeVA stage-1 training step (LLaMA + CLIP ViT + mlp2x_gelu projector over random
    /// weights; default LLaMA-7B + ViT-L/14-336, B4 × S640 with one image each).
    NevaStep {
        #[command(flatten)]
        shape: LlamaShapeArgs,
        #[command(flatten)]
        common: GpuCommonArgs,
        /// CLIP encoder layers.
        #[arg(long, default_value_t = 24)]
        vision_layers: usize,
        /// CLIP width.
        #[arg(long, default_value_t = 1024)]
        vision_hidden: usize,
        /// CLIP heads.
        #[arg(long, default_value_t = 16)]
        vision_heads: usize,
        /// CLIP MLP width.
        #[arg(long, default_value_t = 4096)]
        vision_intermediate: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = 336)]
        image_size: usize,
        /// Patch side.
        #[arg(long, default_value_t = 14)]
        patch: usize,
        /// Sequences (one image each).
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Tokens per sequence (BOS + image tokens + text).
        #[arg(long, default_value_t = 640)]
        seq: usize,
        /// Activation checkpointing.
        #[arg(long)]
        checkpointing: bool,
        /// Run each decoder layer as candle's composed ops instead of one graph node with the
        /// hand-written backward (the default): for comparison.
        #[arg(long)]
        composed: bool,
    },
}

/// A LLaMA shape for the GPU benchmarks (LLaMA-2-7B by default).
#[derive(Args, Clone)]
struct LlamaShapeArgs {
    /// Decoder layers (default: 4 for gpu-layer, 32 otherwise).
    #[arg(long)]
    layers: Option<usize>,
    /// Hidden size.
    #[arg(long, default_value_t = 4096)]
    hidden: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 32)]
    heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = 32)]
    kv_heads: usize,
    /// MLP width.
    #[arg(long, default_value_t = 11008)]
    ffn: usize,
    /// Vocabulary.
    #[arg(long, default_value_t = 32000)]
    vocab: usize,
}

impl LlamaShapeArgs {
    fn shape(&self, default_layers: usize) -> shardsmith::commands::bench_gpu::LlamaShape {
        shardsmith::commands::bench_gpu::LlamaShape {
            layers: self.layers.unwrap_or(default_layers),
            hidden: self.hidden,
            heads: self.heads,
            kv_heads: self.kv_heads,
            ffn: self.ffn,
            vocab: self.vocab,
        }
    }
}

/// Device, dtype and repetitions of the GPU benchmarks.
#[derive(Args, Clone)]
struct GpuCommonArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Compute dtype: bf16, f32 or f16.
    #[arg(long, default_value = "bf16", value_parser = parse_compute_dtype)]
    dtype: candle_core::DType,
    /// Timed runs (median reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
}

impl GpuCommonArgs {
    fn common(&self) -> anyhow::Result<shardsmith::commands::bench_gpu::Common> {
        Ok(shardsmith::commands::bench_gpu::Common {
            device: shardsmith::models::parse_device(&self.device)?,
            dtype: self.dtype,
            runs: self.runs,
            warmup: self.warmup,
        })
    }
}

#[derive(Args, Clone)]
struct ConvertArgs {
    /// Target container (default: .nemo when the destination ends in .nemo, else HF).
    #[arg(long, value_enum)]
    to: Option<TargetKind>,
    /// Tensor-parallel size of a .nemo target.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Pipeline-parallel size of a .nemo target.
    #[arg(long, default_value_t = 1)]
    pp: usize,
    /// NeMo key layout: mcore (default for new files) or legacy (no GQA).
    #[arg(long, value_parser = parse_layout)]
    layout: Option<NemoDialect>,
    /// Cast floating-point weights: f32, f16 or bf16.
    #[arg(long, value_parser = parse_dtype)]
    dtype: Option<DType>,
    /// HF weight files: safetensors or bin.
    #[arg(long, default_value = "safetensors", value_parser = parse_weights)]
    weights: WeightFormat,
    /// Largest HF shard, e.g. 5GB, 500MB.
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    max_shard_size: u64,
    /// Vocabulary rows to keep when exporting to HF (default: the tokenizer's size).
    #[arg(long)]
    vocab_size: Option<usize>,
    /// SentencePiece tokenizer.model to register in the .nemo (default: the source's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Write the .nemo as a gzip tar.
    #[arg(long)]
    gzip: bool,
    /// Write an extracted .nemo directory instead of a tar.
    #[arg(long)]
    extracted: bool,
    /// Write the .nemo weights as a Megatron-core distributed checkpoint (`model_weights/`), as
    /// NeMo saves mcore models: zarr (NeMo 1.21–1.23) or torch_dist (later). NeVA .nemo files
    /// in this form need a NeMo from after May 2024 (1.23's NeVA reads per-rank files only).
    /// Default: one model_weights.ckpt per rank.
    #[arg(long, value_enum)]
    dist_ckpt: Option<convert::DistFormat>,
    /// Print the plan (files, tensors, shapes, bytes, padding) and write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
    /// Replace an existing destination.
    #[arg(long)]
    force: bool,
    /// Multimodal: the vision tower `bundle`d into the .nemo, written `separate`ly as an HF CLIP
    /// directory beside it (default for llava-hf), or an HF CLIP directory PATH (or hf://org/name)
    /// to use (bundled).
    #[arg(long, value_parser = |s: &str| Ok::<_, String>(convert::VisionArg::parse(s)))]
    vision: Option<convert::VisionArg>,
    /// Multimodal: conversation template vicuna_v1 (v1), llama_2 or nvgpt.
    #[arg(long, value_parser = shardsmith::commands::assemble::parse_template)]
    template: Option<shardsmith_converters::names::neva::Template>,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("projector_source").required(true).args(["projector", "init_seed"])))]
struct AssembleArgs {
    /// HF LLaMA directory (or LLaMA .nemo) with a SentencePiece tokenizer.model.
    #[arg(long)]
    llm: PathBuf,
    /// HF CLIP vision directory (CLIPVisionModel or CLIPModel), or hf://org/name.
    #[arg(long)]
    vision: PathBuf,
    /// LLaVA projector weights (mm_projector.bin or .safetensors with model.mm_projector.* keys).
    #[arg(long)]
    projector: Option<PathBuf>,
    /// Initialise the projector from this seed (PyTorch nn.Linear default distribution).
    #[arg(long)]
    init_seed: Option<u64>,
    /// Projector architecture: mlp2x_gelu (default) or linear.
    #[arg(long, value_parser = shardsmith::commands::assemble::parse_projector_type)]
    projector_type: Option<shardsmith_converters::names::neva::ProjectorType>,
    /// Conversation template: vicuna_v1 (default), llama_2 or nvgpt.
    #[arg(long, default_value = "vicuna_v1", value_parser = shardsmith::commands::assemble::parse_template)]
    template: shardsmith_converters::names::neva::Template,
    /// Put the tower's weights inside the .nemo (freeze: false) instead of referencing --vision.
    #[arg(long)]
    bundle_vision: bool,
    /// Output .nemo.
    #[arg(short, long)]
    out: PathBuf,
    /// Tensor-parallel size.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Pipeline-parallel size (mcore only).
    #[arg(long, default_value_t = 1)]
    pp: usize,
    /// NeMo key layout: mcore (default) or legacy (no GQA).
    #[arg(long, value_parser = parse_layout)]
    layout: Option<NemoDialect>,
    /// Cast floating-point weights: f32, f16 or bf16.
    #[arg(long, value_parser = parse_dtype)]
    dtype: Option<DType>,
    /// SentencePiece tokenizer.model to use instead of the LLM's.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Print the plan and write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
    /// Replace an existing destination.
    #[arg(long)]
    force: bool,
}

impl ConvertArgs {
    fn options(self, dry_run: bool) -> convert::Options {
        convert::Options {
            to: self.to,
            tp: self.tp,
            pp: self.pp,
            layout: self.layout,
            dtype: self.dtype,
            weights: self.weights,
            max_shard_bytes: self.max_shard_size,
            vocab: self.vocab_size,
            tokenizer: self.tokenizer,
            gzip: self.gzip,
            extracted: self.extracted,
            dist_ckpt: self.dist_ckpt,
            dry_run: dry_run || self.dry_run,
            json: self.json,
            force: self.force,
            vision: self.vision,
            template: self.template,
        }
    }
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    match DType::parse(s) {
        Some(d) if d.is_float() && d != DType::F64 => Ok(d),
        _ => Err(format!("'{s}' is not one of f32, f16, bf16")),
    }
}

fn parse_compute_dtype(s: &str) -> Result<candle_core::DType, String> {
    shardsmith::weights::parse_dtype(s).map_err(|e| e.to_string())
}

fn parse_layout(s: &str) -> Result<NemoDialect, String> {
    match s {
        "mcore" => Ok(NemoDialect::Mcore),
        "legacy" => Ok(NemoDialect::Legacy),
        _ => Err(format!("'{s}' is not one of mcore, legacy")),
    }
}

fn parse_weights(s: &str) -> Result<WeightFormat, String> {
    match s {
        "safetensors" => Ok(WeightFormat::Safetensors),
        "bin" => Ok(WeightFormat::Bin),
        _ => Err(format!("'{s}' is not one of safetensors, bin")),
    }
}

/// A finite, non-negative tolerance ([`shardsmith::commands::diff::check_tolerance`]).
fn parse_tolerance(s: &str) -> Result<f64, String> {
    let t = s.parse::<f64>().map_err(|_| format!("'{s}' is not a finite tolerance >= 0"))?;
    shardsmith::commands::diff::check_tolerance(t)
        .map_err(|_| format!("'{s}' is not a finite tolerance >= 0"))
}

/// `5GB`, `500MB`, `100KB`, `1GiB` or plain bytes (HF's decimal units; `iB` binary).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("bad size '{s}'"))?;
    let mult = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("bad size unit in '{s}' (use B, KB, MB, GB, KiB, MiB, GiB)")),
    };
    Ok((n * mult) as u64)
}

/// The compute commands allocate and free tensor-sized buffers on every op. glibc hands buffers
/// above its mmap threshold back to the kernel on free (and trims the heap top), so the next op
/// faults in and zeroes fresh pages: 15–30 % of a CPU train step in `perf`. Raising the threshold
/// to 1 GiB and not trimming keeps freed memory for reuse (measured: 134M stage-1 f32 train step
/// 2.31 → 1.62–1.68 s). Growing the heap 256 MiB at a time (`M_TOP_PAD`, default 128 KiB) cut
/// the rest: a 134M bf16 stage-2 run's kernel time 4.6–5.0 → 1.5 s (page faults, zeroing and
/// TLB-shootdown IPIs), same peak RSS. The peak RSS is unchanged: the memory was in use at the
/// peak anyway. Only for compute: converters stream in small chunks and their peak RSS is a
/// documented bound.
fn keep_freed_memory_for_reuse() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any worker thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// Die quietly, as `cat` and `grep` do, when the reader of stdout goes away (`shardsmith inspect
/// X | head`). Rust ignores SIGPIPE, which turns the closed pipe into a panic inside `println!`.
/// A conversion killed this way leaves at most a hidden temp file, as on Ctrl-C (`atomic.rs`).
fn die_on_closed_stdout() {
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of one signal, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    die_on_closed_stdout();
    let cli = Cli::parse();
    let compute = matches!(
        cli.command,
        Command::Generate(_)
            | Command::Train { .. }
            | Command::Evaluate { .. }
            | Command::Bench { .. }
            | Command::Validate { .. }
    );
    if compute {
        keep_freed_memory_for_reuse();
    }
    run(cli.command)
}

/// Run one command; its exit status.
fn run(command: Command) -> ExitCode {
    let result = match command {
        Command::Inspect { path, filter, json } => {
            shardsmith::commands::inspect::run(&path, filter.as_deref(), json)
        }
        Command::Convert { src, dst, opts } => convert::run(&src, &dst, &opts.options(false)),
        Command::Reshard { src, out, opts } => {
            let mut o = opts.options(false);
            match o.to.replace(TargetKind::Nemo) {
                Some(TargetKind::Hf) => Err(anyhow::anyhow!(
                    "reshard writes a .nemo; to write an HF directory use `shardsmith convert SRC DST --to hf`"
                )),
                _ => convert::run(&src, &out, &o),
            }
        }
        Command::Plan { src, dst, opts } => convert::run(&src, &dst, &opts.options(true)),
        Command::Diff { a, b, atol, json } => match shardsmith::commands::diff::run(&a, &b, atol, json) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
        Command::Synth { preset, layers, seed, out, force } => {
            shardsmith::commands::synth::run(&preset, layers, seed, &out, force)
        }
        Command::Surgery(args) => shardsmith::commands::surgery::run(args),
        Command::Assemble(a) => {
            use shardsmith_converters::convert::assemble::ProjectorSource;
            let projector = match (a.projector, a.init_seed) {
                (Some(p), _) => ProjectorSource::File(p),
                (None, seed) => ProjectorSource::Seed(seed.unwrap_or_default()),
            };
            let o = shardsmith::commands::assemble::Options {
                llm: a.llm,
                vision: a.vision,
                projector,
                projector_type: a.projector_type,
                template: a.template,
                bundle_vision: a.bundle_vision,
                tokenizer: a.tokenizer,
                convert: convert::Options {
                    to: Some(TargetKind::Nemo),
                    tp: a.tp,
                    pp: a.pp,
                    layout: a.layout,
                    dtype: a.dtype,
                    weights: WeightFormat::Safetensors,
                    max_shard_bytes: 5_000_000_000,
                    vocab: None,
                    tokenizer: None,
                    gzip: false,
                    extracted: false,
                    dist_ckpt: None,
                    dry_run: a.dry_run,
                    json: a.json,
                    force: a.force,
                    vision: None,
                    template: None,
                },
            };
            shardsmith::commands::assemble::run(&o, &a.out)
        }
        Command::Generate(a) => {
            let device = match shardsmith::models::parse_device(&a.device) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let o = shardsmith::commands::generate::Options {
                device,
                prompt: a.prompt,
                image: a.image,
                template: a.template,
                flavour: a.flavour,
                system: a.system,
                aspect: a.aspect,
                tokenizer: a.tokenizer,
                vision: a.vision,
                max_new_tokens: a.max_new_tokens,
                temperature: a.temperature,
                top_p: a.top_p,
                seed: a.seed,
                tp: a.tp,
                dtype: a.dtype,
                json: a.json,
            };
            shardsmith::commands::generate::run(&a.ckpt, &o)
        }
        Command::Train { config, resume, overrides, force, json } => {
            shardsmith::commands::train::train(&config, resume, overrides, force, json)
        }
        Command::Evaluate { ckpt, vision, data, image_folder, max_new_tokens, template, json } => {
            let o = shardsmith::commands::generate::Options {
                prompt: String::new(),
                image: None,
                template,
                flavour: None,
                system: None,
                aspect: None,
                tokenizer: None,
                vision,
                max_new_tokens,
                temperature: 0.0,
                top_p: None,
                seed: 0,
                tp: None,
                dtype: candle_core::DType::F32,
                device: candle_core::Device::Cpu,
                json,
            };
            shardsmith::commands::evaluate::run(&ckpt, &data, image_folder.as_deref(), &o, json).map(|_| ())
        }
        Command::DemoData { out, train, test, size, seed, force } => {
            shardsmith::commands::train::demo_data(&out, train, test, size, seed, force)
        }
        Command::Bench {
            what: BenchCommand::Forward { model, prompt_len, decode, runs, dtype, tp, image },
        } => {
            let o = shardsmith::commands::bench::Options { prompt_len, decode, runs, dtype, tp, image };
            shardsmith::commands::bench::forward(&model, &o)
        }
        Command::Bench {
            what: BenchCommand::TrainStep { model, stage, batch, seq, runs, dtype, checkpointing },
        } => {
            use shardsmith::commands::bench;
            use shardsmith::train::model::Stage;
            let stage = match stage.as_str() {
                "1" => Stage::Projector,
                "2" => Stage::ProjectorAndLlm,
                _ => Stage::Lora(bench::bench_lora()),
            };
            let o = bench::TrainStepOptions { stage, batch, seq, runs, dtype, checkpointing };
            bench::train_step(&model, &o)
        }
        Command::Bench {
            what: BenchCommand::GpuLayer { shape, common, batch, seq, composed, f32_masters, phases },
        } => common.common().and_then(|c| {
            let masters = f32_masters.then_some(candle_core::DType::F32);
            let o =
                shardsmith::commands::bench_gpu::GpuLayerOptions { layer_nodes: !composed, masters, phases };
            shardsmith::commands::bench_gpu::gpu_layer(&shape.shape(4), batch, seq, &o, &c)
        }),
        Command::Bench {
            what:
                BenchCommand::Attention {
                    common,
                    batch,
                    heads,
                    kv_heads,
                    seq,
                    head_dim,
                    forward,
                    backward,
                    phases,
                },
        } => common.common().and_then(|c| {
            let kernels =
                shardsmith::commands::bench_gpu::AttentionKernels::named(&forward, &backward, phases)?;
            shardsmith::commands::bench_gpu::attention(batch, heads, kv_heads, seq, head_dim, &kernels, &c)
        }),
        Command::Bench { what: BenchCommand::Gemm { shape, common, rows, square, backends } } => {
            common.common().and_then(|c| {
                let backends = backends
                    .iter()
                    .map(|b| shardsmith::ops::linear::GemmBackend::named(b))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                shardsmith::commands::bench_gpu::gemm(&shape.shape(1), rows, &square, &backends, &c)
            })
        }
        Command::Bench {
            what: BenchCommand::Decode { shape, common, batch, prompt_len, steps, breakdown },
        } => common.common().and_then(|c| {
            shardsmith::commands::bench_gpu::decode(
                &shape.shape(32),
                &batch,
                prompt_len,
                steps,
                breakdown,
                &c,
            )
        }),
        Command::Bench {
            what:
                BenchCommand::NevaStep {
                    shape,
                    common,
                    vision_layers,
                    vision_hidden,
                    vision_heads,
                    vision_intermediate,
                    image_size,
                    patch,
                    batch,
                    seq,
                    checkpointing,
                    composed,
                },
        } => {
            use shardsmith::commands::bench_gpu::{neva_step, ClipShape, NevaStepOptions};
            let v = ClipShape {
                layers: vision_layers,
                hidden: vision_hidden,
                heads: vision_heads,
                intermediate: vision_intermediate,
                image: image_size,
                patch,
            };
            let mut s = shape.shape(32);
            if shape.vocab == 32000 {
                s.vocab = 32064; // llava-hf's: 32000 + the image token, padded
            }
            let o = NevaStepOptions { batch, seq, checkpointing, layer_nodes: !composed };
            common.common().and_then(|c| neva_step(&s, &v, &o, &c))
        }
        Command::Validate { ckpt, reference, against, tp, against_tp, vision, dtype, json } => {
            use shardsmith::commands::validate::{self, Against};
            let target = match (&reference, &against) {
                (Some(r), _) => Against::Reference(r),
                (None, Some(b)) => Against::Checkpoint(b),
                (None, None) => {
                    eprintln!("error: give --reference FIXTURE or --against CHECKPOINT");
                    return ExitCode::from(2);
                }
            };
            match validate::run(&ckpt, target, tp, against_tp, dtype, vision.as_deref(), json) {
                Ok(true) => Ok(()),
                Ok(false) => return ExitCode::from(1),
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, skipping a cause whose text the message above already contains
/// (our errors embed their I/O cause, anyhow contexts do not).
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}
