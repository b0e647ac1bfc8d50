//! A restricted pickle reader and a protocol-2 pickle writer for PyTorch checkpoints
//! (formats.md §8.2).
//!
//! Why hand-written: no Rust crate implements torch's persistent-id storage protocol together with
//! a `torch.load(weights_only=True)`-style allow-list of globals, and we also need a writer whose
//! output torch's restricted unpickler accepts. (`serde-pickle`, the closest, has no persistent ids
//! and no allow-list, and cannot write `_rebuild_tensor_v2` calls.)
//!
//! Reading executes nothing. A global is checked against an [`AllowList`] the moment it is named,
//! as torch does, so a pickle that mentions `os.system` fails with [`Error::ForbiddenGlobal`]
//! before anything else happens. A call of an allowed global (`REDUCE`, `NEWOBJ`) becomes an inert
//! [`Value::Reduce`] / [`Value::Object`] for the caller to interpret, except for the few results
//! that later opcodes mutate or that are plain data: `OrderedDict()` becomes a [`Value::Dict`],
//! `set(...)` a [`Value::Set`], `_codecs.encode(...)` and `bytearray(...)` a [`Value::Bytes`].
//!
//! The VM keeps objects in an arena, so memo references and in-place mutation (`BINPUT` and later
//! `SETITEMS` on the same dict) share exactly as in Python. The tree handed out is built at `STOP`
//! under a budget proportional to the input length, so shared references cannot be used as a
//! decompression bomb; the stack, the memo and the nesting depth are bounded too. Malformed input
//! is always a named [`Error::Malformed`] with the opcode offset, never a panic.
//!
//! [`Error::ForbiddenGlobal`]: crate::error::Error::ForbiddenGlobal
//! [`Error::Malformed`]: crate::error::Error::Malformed

mod objects;
mod opcodes;
mod read;
mod write;

#[cfg(test)]
pub(crate) mod build;
#[cfg(test)]
mod tests;

pub use self::read::load;
pub use self::write::dump;

/// Deepest container nesting the reader accepts and the writer emits (state dicts nest a
/// handful of levels; the bound keeps recursion well inside a 2 MiB thread stack even in debug
/// builds).
const MAX_DEPTH: usize = 100;

/// A value decoded from a pickle (or to be written as one).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer that fits in 64 bits.
    Int(i64),
    /// A larger integer: little-endian two's complement bytes, as `LONG1`/`LONG4` store it.
    BigInt(Vec<u8>),
    /// A float.
    Float(f64),
    /// A text string.
    Str(String),
    /// A byte string (`bytes`, `bytearray`, or a protocol-2 `_codecs.encode(..., 'latin1')`).
    Bytes(Vec<u8>),
    /// A tuple.
    Tuple(Vec<Value>),
    /// A list.
    List(Vec<Value>),
    /// A `dict`, `OrderedDict` or `Counter`, in insertion order. Instance attributes set by
    /// `BUILD` (a state dict's `_metadata`) are not kept; the writer emits every dict as an
    /// `OrderedDict`, as `torch.save(model.state_dict())` does.
    Dict(Vec<(Value, Value)>),
    /// A `set` or `frozenset`, in pickle order.
    Set(Vec<Value>),
    /// A reference to a module attribute (class or function), already checked against the
    /// allow-list.
    Global {
        /// Module path, e.g. `torch._utils`.
        module: String,
        /// Attribute name, e.g. `_rebuild_tensor_v2`.
        name: String,
    },
    /// `callable(*args)`, never executed; `state` is what a following `BUILD` supplied.
    Reduce {
        /// What is called (a [`Value::Global`] when read).
        callable: Box<Value>,
        /// The positional arguments (a [`Value::Tuple`]).
        args: Box<Value>,
        /// `BUILD` state, if any.
        state: Option<Box<Value>>,
    },
    /// `class.__new__(class, *args, **kwargs)` (`NEWOBJ`/`NEWOBJ_EX`), never executed.
    Object {
        /// The class (a [`Value::Global`] when read).
        class: Box<Value>,
        /// The positional arguments (a [`Value::Tuple`]).
        args: Box<Value>,
        /// The keyword arguments of `NEWOBJ_EX` (a [`Value::Dict`]).
        kwargs: Option<Box<Value>>,
        /// `BUILD` state, if any.
        state: Option<Box<Value>>,
    },
    /// The argument of `BINPERSID`: for torch, `('storage', class, key, location, numel)`.
    PersistentId(Box<Value>),
}

impl Value {
    /// A [`Value::Global`].
    pub fn global(module: &str, name: &str) -> Value {
        Value::Global { module: module.to_string(), name: name.to_string() }
    }

    /// A [`Value::Reduce`] without state.
    pub fn call(callable: Value, args: Vec<Value>) -> Value {
        Value::Reduce { callable: Box::new(callable), args: Box::new(Value::Tuple(args)), state: None }
    }

    /// The string, for [`Value::Str`].
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, for [`Value::Int`].
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The items of a tuple or list.
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::Tuple(v) | Value::List(v) => Some(v),
            _ => None,
        }
    }

    /// `(module, name)` of a [`Value::Global`].
    pub fn as_global(&self) -> Option<(&str, &str)> {
        match self {
            Value::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }

    /// Whether this is the global `module.name`.
    pub fn is_global(&self, module: &str, name: &str) -> bool {
        self.as_global() == Some((module, name))
    }

    /// A short human description for messages and listings (`int 3`, `dict (2 entries)`,
    /// `_io.BytesIO object`).
    pub fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => format!("bool {}", if *b { "True" } else { "False" }),
            Value::Int(i) => format!("int {i}"),
            Value::BigInt(b) => format!("int ({} bytes)", b.len()),
            Value::Float(f) => format!("float {f}"),
            Value::Str(s) if s.chars().count() <= 40 => format!("str {s:?}"),
            Value::Str(s) => format!("str ({} chars)", s.chars().count()),
            Value::Bytes(b) => format!("bytes ({} bytes)", b.len()),
            Value::Tuple(v) => format!("tuple ({} items)", v.len()),
            Value::List(v) => format!("list ({} items)", v.len()),
            Value::Dict(v) => format!("dict ({} entries)", v.len()),
            Value::Set(v) => format!("set ({} items)", v.len()),
            Value::Global { module, name } => format!("global {module}.{name}"),
            Value::Reduce { callable, .. } => match callable.as_global() {
                Some((m, n)) => format!("{m}.{n}(...) result"),
                None => "call result".into(),
            },
            Value::Object { class, .. } => match class.as_global() {
                Some((m, n)) => format!("{m}.{n} object"),
                None => "object".into(),
            },
            Value::PersistentId(_) => "persistent id".into(),
        }
    }
}

/// Which globals a pickle may name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum AllowList {
    /// What `torch.load(weights_only=True)` allows: tensor rebuild functions, storage, tensor and
    /// dtype classes, `collections.OrderedDict`/`Counter`, `torch.Size`, `torch.device`,
    /// `_codecs.encode`, `builtins.set/frozenset/bytearray/complex`; plus `_io.BytesIO`, which
    /// Transformer Engine 1.x stores in `_extra_state` entries of `.nemo` weights (formats.md §2.2)
    /// and which is inert data here because nothing is ever executed. Persistent ids must be
    /// tuples starting with `'storage'`.
    #[default]
    TorchWeights,
    /// The `.metadata` pickle of a torch.distributed.checkpoint (torch_dist) directory
    /// (formats.md §1.6.2): the `torch.distributed.checkpoint.metadata` dataclasses (`Metadata`,
    /// `TensorStorageMetadata`, `BytesStorageMetadata`, `ChunkStorageMetadata`,
    /// `TensorProperties`, `MetadataIndex`, `StorageMeta`, the `_MEM_FORMAT_ENCODING` enum),
    /// `torch.distributed.checkpoint.filesystem._StorageInfo`, their torch < 2.1 home
    /// `torch.distributed._shard.sharded_tensor.metadata`, `torch.Size`, dtypes, layouts and
    /// memory formats, `torch.serialization._get_layout`, `collections.OrderedDict`,
    /// `builtins.set/frozenset`, and the `pathlib` path classes (newer torch pickles
    /// `StorageMeta.checkpoint_id` as a `PosixPath`). No persistent ids.
    DistMetadata,
}

impl AllowList {
    /// Whether `module.name` may appear in a pickle.
    pub fn allows(self, module: &str, name: &str) -> bool {
        match self {
            AllowList::TorchWeights => torch_weights_allows(module, name),
            AllowList::DistMetadata => dist_metadata_allows(module, name),
        }
    }
}

fn dist_metadata_allows(module: &str, name: &str) -> bool {
    match module {
        "torch.distributed.checkpoint.metadata" => matches!(
            name,
            "Metadata"
                | "TensorStorageMetadata"
                | "BytesStorageMetadata"
                | "ChunkStorageMetadata"
                | "TensorProperties"
                | "MetadataIndex"
                | "StorageMeta"
                | "_MEM_FORMAT_ENCODING"
        ),
        "torch.distributed.checkpoint.filesystem" => name == "_StorageInfo",
        "torch.distributed._shard.sharded_tensor.metadata" => {
            matches!(name, "TensorProperties" | "MEM_FORMAT_ENCODING")
        }
        "torch" => {
            name == "Size"
                || TORCH_DTYPES.contains(&name)
                || TORCH_LAYOUTS_AND_QSCHEMES.contains(&name)
                || TORCH_MEMORY_FORMATS.contains(&name)
        }
        "torch.serialization" => name == "_get_layout",
        "collections" => name == "OrderedDict",
        "builtins" => matches!(name, "set" | "frozenset"),
        "pathlib" => {
            matches!(name, "Path" | "PosixPath" | "WindowsPath" | "PurePosixPath" | "PureWindowsPath")
        }
        _ => false,
    }
}

fn torch_weights_allows(module: &str, name: &str) -> bool {
    match module {
        "collections" => matches!(name, "OrderedDict" | "Counter"),
        "torch._utils" => matches!(
            name,
            "_rebuild_tensor"
                | "_rebuild_tensor_v2"
                | "_rebuild_tensor_v3"
                | "_rebuild_parameter"
                | "_rebuild_parameter_with_state"
                | "_rebuild_qtensor"
                | "_rebuild_sparse_tensor"
                | "_rebuild_meta_tensor_no_storage"
                | "_rebuild_nested_tensor"
                | "_rebuild_wrapper_subclass"
                | "_rebuild_device_tensor_from_numpy"
                | "_rebuild_device_tensor_from_cpu_tensor"
        ),
        "torch._tensor" => name == "_rebuild_from_type_v2",
        "torch.nn.parameter" => name == "Parameter",
        "torch.serialization" => name == "_get_layout",
        "torch" => {
            matches!(name, "Size" | "device" | "Tensor")
                || TORCH_DTYPES.contains(&name)
                || TORCH_LAYOUTS_AND_QSCHEMES.contains(&name)
                || STORAGE_CLASSES.contains(&name)
                || TENSOR_CLASSES.contains(&name)
        }
        "torch.cuda" => STORAGE_CLASSES.contains(&name) || TENSOR_CLASSES.contains(&name),
        // `UntypedStorage.__module__`, as `_rebuild_tensor_v3` pickles name it.
        "torch.storage" => matches!(name, "UntypedStorage" | "TypedStorage"),
        "_codecs" => name == "encode",
        "builtins" => matches!(name, "set" | "frozenset" | "bytearray" | "complex"),
        "_io" | "io" => name == "BytesIO",
        _ => false,
    }
}

/// `str(dtype)` without the `torch.` prefix, for every dtype torch registers.
const TORCH_DTYPES: &[&str] = &[
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
    "complex32",
    "complex64",
    "complex128",
    "quint8",
    "qint8",
    "qint32",
    "quint4x2",
    "quint2x4",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "bits8",
    "bits16",
    "bits1x8",
    "bits2x4",
    "bits4x2",
];

const TORCH_LAYOUTS_AND_QSCHEMES: &[&str] = &[
    "strided",
    "sparse_coo",
    "sparse_csr",
    "sparse_csc",
    "sparse_bsr",
    "sparse_bsc",
    "_mkldnn",
    "jagged",
    "per_tensor_affine",
    "per_channel_affine",
    "per_tensor_symmetric",
    "per_channel_symmetric",
    "per_channel_affine_float_qparams",
];

const TORCH_MEMORY_FORMATS: &[&str] =
    &["contiguous_format", "channels_last", "channels_last_3d", "preserve_format"];

const STORAGE_CLASSES: &[&str] = &[
    "UntypedStorage",
    "TypedStorage",
    "DoubleStorage",
    "FloatStorage",
    "HalfStorage",
    "BFloat16Storage",
    "LongStorage",
    "IntStorage",
    "ShortStorage",
    "CharStorage",
    "ByteStorage",
    "BoolStorage",
    "ComplexDoubleStorage",
    "ComplexFloatStorage",
    "QUInt8Storage",
    "QInt8Storage",
    "QInt32Storage",
    "QUInt4x2Storage",
    "QUInt2x4Storage",
];

const TENSOR_CLASSES: &[&str] = &[
    "DoubleTensor",
    "FloatTensor",
    "HalfTensor",
    "BFloat16Tensor",
    "LongTensor",
    "IntTensor",
    "ShortTensor",
    "CharTensor",
    "ByteTensor",
    "BoolTensor",
];
