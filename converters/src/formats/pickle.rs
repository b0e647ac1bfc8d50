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

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::fmt::Display;
use std::path::Path;

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
///
/// Kept as an enum so a later, opt-in list (for the distributed-checkpoint `.metadata` pickle,
/// which names `torch.distributed.checkpoint.metadata` dataclasses) can sit beside the default.
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
}

impl AllowList {
    /// Whether `module.name` may appear in a pickle.
    pub fn allows(self, module: &str, name: &str) -> bool {
        match self {
            AllowList::TorchWeights => torch_weights_allows(module, name),
        }
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

/// Declares the opcode constants and [`op_name`] from one list.
macro_rules! opcodes {
    ($($name:ident = $value:expr,)*) => {
        $(const $name: u8 = $value;)*

        fn op_name(op: u8) -> &'static str {
            match op {
                $($name => stringify!($name),)*
                _ => "opcode",
            }
        }
    };
}

// Opcodes (CPython Lib/pickle.py).
opcodes! {
    MARK = b'(',
    STOP = b'.',
    POP = b'0',
    POP_MARK = b'1',
    DUP = b'2',
    FLOAT = b'F',
    INT = b'I',
    BININT = b'J',
    BININT1 = b'K',
    LONG = b'L',
    BININT2 = b'M',
    NONE = b'N',
    PERSID = b'P',
    BINPERSID = b'Q',
    REDUCE = b'R',
    STRING = b'S',
    BINSTRING = b'T',
    SHORT_BINSTRING = b'U',
    UNICODE = b'V',
    BINUNICODE = b'X',
    APPEND = b'a',
    BUILD = b'b',
    GLOBAL = b'c',
    DICT = b'd',
    EMPTY_DICT = b'}',
    APPENDS = b'e',
    GET = b'g',
    BINGET = b'h',
    INST = b'i',
    LONG_BINGET = b'j',
    LIST = b'l',
    EMPTY_LIST = b']',
    OBJ = b'o',
    PUT = b'p',
    BINPUT = b'q',
    LONG_BINPUT = b'r',
    SETITEM = b's',
    TUPLE = b't',
    EMPTY_TUPLE = b')',
    SETITEMS = b'u',
    BINFLOAT = b'G',
    PROTO = 0x80,
    NEWOBJ = 0x81,
    EXT1 = 0x82,
    EXT2 = 0x83,
    EXT4 = 0x84,
    TUPLE1 = 0x85,
    TUPLE2 = 0x86,
    TUPLE3 = 0x87,
    NEWTRUE = 0x88,
    NEWFALSE = 0x89,
    LONG1 = 0x8a,
    LONG4 = 0x8b,
    BINBYTES = b'B',
    SHORT_BINBYTES = b'C',
    SHORT_BINUNICODE = 0x8c,
    BINUNICODE8 = 0x8d,
    BINBYTES8 = 0x8e,
    EMPTY_SET = 0x8f,
    ADDITEMS = 0x90,
    FROZENSET = 0x91,
    NEWOBJ_EX = 0x92,
    STACK_GLOBAL = 0x93,
    MEMOIZE = 0x94,
    FRAME = 0x95,
    BYTEARRAY8 = 0x96,
    NEXT_BUFFER = 0x97,
    READONLY_BUFFER = 0x98,
}

/// Most items the stack may hold at once.
const MAX_STACK: usize = 1 << 20;
/// Most open `MARK`s.
const MAX_MARKS: usize = 1 << 12;
/// Most memo entries.
const MAX_MEMO: usize = 1 << 22;
/// Deepest container nesting of the result (state dicts nest a handful of levels; the bound
/// keeps recursion well inside a 2 MiB thread stack even in debug builds).
const MAX_DEPTH: usize = 100;
/// The result may cost at most `BUDGET_PER_BYTE · input length + BUDGET_FLOOR` units (one per
/// value plus one per 16 bytes of string data), which bounds what memo sharing can expand to.
const BUDGET_PER_BYTE: usize = 8;
const BUDGET_FLOOR: usize = 1 << 20;
/// Python pickles containers in batches of this many items per `MARK`.
const BATCH: usize = 1000;

/// Decode `data` (a whole pickle) under `allow`; `origin` names the file in errors.
pub fn load(data: &[u8], allow: AllowList, origin: &Path) -> Result<Value> {
    Vm {
        data,
        pos: 0,
        op_pos: 0,
        origin,
        allow,
        proto: 0,
        nodes: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    }
    .run()
}

type Id = usize;

/// An object in the VM's arena; containers refer to their items by id so that mutation through
/// one reference is seen through every other, as in Python.
enum Node {
    Leaf(Value),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Set(Vec<Id>),
    Reduce { callable: Id, args: Id, state: Option<Id> },
    Object { class: Id, args: Id, kwargs: Option<Id>, state: Option<Id> },
    PersistentId(Id),
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    op_pos: usize,
    origin: &'a Path,
    allow: AllowList,
    proto: u8,
    nodes: Vec<Node>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
}

impl<'a> Vm<'a> {
    fn err(&self, detail: impl Display) -> Error {
        Error::malformed(self.origin, "pickle", format!("offset {}: {detail}", self.op_pos))
    }

    fn run(mut self) -> Result<Value> {
        loop {
            self.op_pos = self.pos;
            let Some(&op) = self.data.get(self.pos) else {
                return Err(self.err("input ends without a STOP opcode"));
            };
            self.pos += 1;
            if op == STOP {
                let root = self.pop(op)?;
                let mut budget = self.data.len().saturating_mul(BUDGET_PER_BYTE).saturating_add(BUDGET_FLOOR);
                return self.materialize(root, 0, &mut budget);
            }
            self.step(op)?;
        }
    }

    fn step(&mut self, op: u8) -> Result<()> {
        match op {
            PROTO => {
                let v = self.take(op, 1)?[0];
                if v > 5 {
                    return Err(self.err(format!("unsupported pickle protocol {v} (expected 0 to 5)")));
                }
                self.proto = v;
            }
            // Frames only group opcodes for buffered reading; the contents parse the same.
            FRAME => {
                self.take(op, 8)?;
            }
            MARK => {
                if self.marks.len() >= MAX_MARKS {
                    return Err(self.err(format!("more than {MAX_MARKS} open MARKs")));
                }
                self.marks.push(self.stack.len());
            }
            POP => {
                if self.stack.len() > self.base() {
                    self.stack.pop();
                } else {
                    self.pop_mark(op)?;
                }
            }
            POP_MARK => {
                self.pop_mark(op)?;
            }
            DUP => {
                let top = self.peek(op)?;
                self.push(top)?;
            }
            NONE => self.leaf(Value::None)?,
            NEWTRUE => self.leaf(Value::Bool(true))?,
            NEWFALSE => self.leaf(Value::Bool(false))?,
            INT => {
                let line = self.line(op)?;
                let v = match line {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    s => Value::Int(s.parse().map_err(|_| self.err(format!("bad INT literal {s:?}")))?),
                };
                self.leaf(v)?;
            }
            LONG => {
                let line = self.line(op)?;
                let digits = line.strip_suffix('L').unwrap_or(line);
                let v: i64 = digits
                    .parse()
                    .map_err(|_| self.err(format!("LONG literal {line:?} is not a 64-bit integer")))?;
                self.leaf(Value::Int(v))?;
            }
            BININT => {
                let b = self.take(op, 4)?;
                let v = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                self.leaf(Value::Int(v.into()))?;
            }
            BININT1 => {
                let v = self.take(op, 1)?[0];
                self.leaf(Value::Int(v.into()))?;
            }
            BININT2 => {
                let b = self.take(op, 2)?;
                self.leaf(Value::Int(u16::from_le_bytes([b[0], b[1]]).into()))?;
            }
            LONG1 => {
                let n = self.take(op, 1)?[0] as usize;
                let v = int_from_le(self.take(op, n)?);
                self.leaf(v)?;
            }
            LONG4 => {
                let n = self.len32(op, true)?;
                let v = int_from_le(self.take(op, n)?);
                self.leaf(v)?;
            }
            FLOAT => {
                let line = self.line(op)?;
                let v: f64 = line.parse().map_err(|_| self.err(format!("bad FLOAT literal {line:?}")))?;
                self.leaf(Value::Float(v))?;
            }
            BINFLOAT => {
                let b = self.take(op, 8)?;
                let v = f64::from_be_bytes(b.try_into().map_err(|_| self.err("BINFLOAT needs 8 bytes"))?);
                self.leaf(Value::Float(v))?;
            }
            STRING => {
                let line = self.line(op)?;
                let inner = ["'", "\""]
                    .iter()
                    .find_map(|q| line.strip_prefix(q).and_then(|s| s.strip_suffix(q)))
                    .ok_or_else(|| self.err(format!("STRING literal {line:?} is not quoted")))?;
                if inner.contains('\\') {
                    return Err(self.err("escaped STRING literals (protocol 0) are not supported"));
                }
                let v = Value::Str(inner.to_string());
                self.leaf(v)?;
            }
            UNICODE => {
                let line = self.line(op)?;
                if line.contains('\\') {
                    return Err(self.err("escaped UNICODE literals (protocol 0) are not supported"));
                }
                let v = Value::Str(line.to_string());
                self.leaf(v)?;
            }
            BINSTRING | SHORT_BINSTRING => {
                let n = if op == BINSTRING { self.len32(op, true)? } else { self.take(op, 1)?[0] as usize };
                // Python 2 `str`: text when it decodes, bytes otherwise (torch decodes ASCII).
                let raw = self.take(op, n)?;
                let v = match std::str::from_utf8(raw) {
                    Ok(s) => Value::Str(s.to_string()),
                    Err(_) => Value::Bytes(raw.to_vec()),
                };
                self.leaf(v)?;
            }
            BINUNICODE | SHORT_BINUNICODE | BINUNICODE8 => {
                let n = match op {
                    BINUNICODE => self.len32(op, false)?,
                    SHORT_BINUNICODE => self.take(op, 1)?[0] as usize,
                    _ => self.len64(op)?,
                };
                let bytes = self.take(op, n)?;
                let s = std::str::from_utf8(bytes)
                    .map_err(|e| self.err(format!("{} string is not valid UTF-8 ({e})", op_name(op))))?;
                let v = Value::Str(s.to_string());
                self.leaf(v)?;
            }
            BINBYTES | SHORT_BINBYTES | BINBYTES8 | BYTEARRAY8 => {
                let n = match op {
                    BINBYTES => self.len32(op, false)?,
                    SHORT_BINBYTES => self.take(op, 1)?[0] as usize,
                    _ => self.len64(op)?,
                };
                let v = Value::Bytes(self.take(op, n)?.to_vec());
                self.leaf(v)?;
            }
            EMPTY_TUPLE => self.node(Node::Tuple(Vec::new()))?,
            TUPLE1 | TUPLE2 | TUPLE3 => {
                let n = (op - TUPLE1 + 1) as usize;
                let items = self.pop_n(op, n)?;
                self.node(Node::Tuple(items))?;
            }
            TUPLE => {
                let items = self.pop_mark(op)?;
                self.node(Node::Tuple(items))?;
            }
            EMPTY_LIST => self.node(Node::List(Vec::new()))?,
            LIST => {
                let items = self.pop_mark(op)?;
                self.node(Node::List(items))?;
            }
            APPEND => {
                let item = self.pop(op)?;
                self.extend_list(op, vec![item])?;
            }
            APPENDS => {
                let items = self.pop_mark(op)?;
                self.extend_list(op, items)?;
            }
            EMPTY_DICT => self.node(Node::Dict(Vec::new()))?,
            DICT => {
                let items = self.pop_mark(op)?;
                let pairs = self.pairs(op, items)?;
                self.node(Node::Dict(pairs))?;
            }
            SETITEM => {
                let kv = self.pop_n(op, 2)?;
                self.extend_dict(op, vec![(kv[0], kv[1])])?;
            }
            SETITEMS => {
                let items = self.pop_mark(op)?;
                let pairs = self.pairs(op, items)?;
                self.extend_dict(op, pairs)?;
            }
            EMPTY_SET => self.node(Node::Set(Vec::new()))?,
            ADDITEMS => {
                let items = self.pop_mark(op)?;
                let target = self.peek(op)?;
                match &mut self.nodes[target] {
                    Node::Set(v) => v.extend(items),
                    _ => return Err(self.err(format!("ADDITEMS on a {}, expected a set", self.kind(target)))),
                }
            }
            FROZENSET => {
                let items = self.pop_mark(op)?;
                self.node(Node::Set(items))?;
            }
            GLOBAL => {
                let module = self.line(op)?.to_string();
                let name = self.line(op)?.to_string();
                let g = self.global(module, name)?;
                self.leaf(g)?;
            }
            STACK_GLOBAL => {
                let pair = self.pop_n(op, 2)?;
                let (Some(module), Some(name)) = (self.leaf_str(pair[0]), self.leaf_str(pair[1])) else {
                    return Err(self.err("STACK_GLOBAL needs two strings on the stack"));
                };
                let g = self.global(module.to_string(), name.to_string())?;
                self.leaf(g)?;
            }
            INST => {
                let module = self.line(op)?.to_string();
                let name = self.line(op)?.to_string();
                let g = self.global(module, name)?;
                let args = self.pop_mark(op)?;
                let callable = self.alloc(Node::Leaf(g))?;
                let args = self.alloc(Node::Tuple(args))?;
                let id = self.call(callable, args)?;
                self.push(id)?;
            }
            OBJ => {
                let mut items = self.pop_mark(op)?;
                if items.is_empty() {
                    return Err(self.err("OBJ without a class after MARK"));
                }
                let callable = items.remove(0);
                let args = self.alloc(Node::Tuple(items))?;
                let id = self.call(callable, args)?;
                self.push(id)?;
            }
            REDUCE => {
                let ca = self.pop_n(op, 2)?;
                let id = self.call(ca[0], ca[1])?;
                self.push(id)?;
            }
            NEWOBJ | NEWOBJ_EX => {
                let n = if op == NEWOBJ { 2 } else { 3 };
                let v = self.pop_n(op, n)?;
                let id = self.new_object(op, v[0], v[1], v.get(2).copied())?;
                self.push(id)?;
            }
            BUILD => {
                let state = self.pop(op)?;
                let target = self.peek(op)?;
                match &mut self.nodes[target] {
                    // Instance attributes of an OrderedDict (a state dict's `_metadata`) do not
                    // affect its items; torch allows BUILD here and so do we, dropping them.
                    Node::Dict(_) => {}
                    Node::Reduce { state: s, .. } | Node::Object { state: s, .. } => *s = Some(state),
                    _ => return Err(self.err(format!("BUILD on a {}", self.kind(target)))),
                }
            }
            PERSID => {
                let pid = Value::Str(self.line(op)?.to_string());
                let id = self.alloc(Node::Leaf(pid))?;
                self.persistent(id)?;
            }
            BINPERSID => {
                let id = self.pop(op)?;
                self.persistent(id)?;
            }
            GET | BINGET | LONG_BINGET => {
                let key = self.memo_key(op)?;
                let id = *self
                    .memo
                    .get(&key)
                    .ok_or_else(|| self.err(format!("memo index {key} is not defined")))?;
                self.push(id)?;
            }
            PUT | BINPUT | LONG_BINPUT => {
                let key = self.memo_key(op)?;
                let top = self.peek(op)?;
                self.memoize(key, top)?;
            }
            MEMOIZE => {
                let top = self.peek(op)?;
                self.memoize(self.memo.len() as u64, top)?;
            }
            READONLY_BUFFER => {
                self.peek(op)?;
            }
            EXT1 | EXT2 | EXT4 => {
                return Err(self.err("extension-registry opcodes (EXT1/2/4) are not supported"))
            }
            NEXT_BUFFER => return Err(self.err("out-of-band buffers (NEXT_BUFFER) are not supported")),
            other => return Err(self.err(format!("unknown opcode 0x{other:02x}"))),
        }
        Ok(())
    }

    /// Where the innermost open MARK starts.
    fn base(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn alloc(&mut self, node: Node) -> Result<Id> {
        self.nodes.push(node);
        Ok(self.nodes.len() - 1)
    }

    fn push(&mut self, id: Id) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.err(format!("stack deeper than {MAX_STACK} items")));
        }
        self.stack.push(id);
        Ok(())
    }

    fn node(&mut self, node: Node) -> Result<()> {
        let id = self.alloc(node)?;
        self.push(id)
    }

    fn leaf(&mut self, v: Value) -> Result<()> {
        self.node(Node::Leaf(v))
    }

    fn pop(&mut self, op: u8) -> Result<Id> {
        if self.stack.len() <= self.base() {
            return Err(self.err(format!("stack underflow at {}", op_name(op))));
        }
        self.stack.pop().ok_or_else(|| self.err(format!("stack underflow at {}", op_name(op))))
    }

    /// The top `n` items, bottom first.
    fn pop_n(&mut self, op: u8, n: usize) -> Result<Vec<Id>> {
        if self.stack.len() < self.base() + n {
            return Err(self.err(format!("stack underflow at {} (needs {n} items)", op_name(op))));
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    fn peek(&self, op: u8) -> Result<Id> {
        if self.stack.len() <= self.base() {
            return Err(self.err(format!("stack underflow at {}", op_name(op))));
        }
        self.stack.last().copied().ok_or_else(|| self.err(format!("stack underflow at {}", op_name(op))))
    }

    fn pop_mark(&mut self, op: u8) -> Result<Vec<Id>> {
        let mark = self.marks.pop().ok_or_else(|| self.err(format!("{} without a MARK", op_name(op))))?;
        Ok(self.stack.split_off(mark.min(self.stack.len())))
    }

    fn take(&mut self, op: u8, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or_else(|| {
            self.err(format!(
                "truncated: {} needs {n} bytes, {} remain",
                op_name(op),
                self.data.len() - self.pos
            ))
        })?;
        let data: &'a [u8] = self.data;
        self.pos = end;
        Ok(&data[end - n..end])
    }

    fn len32(&mut self, op: u8, signed: bool) -> Result<usize> {
        let b = self.take(op, 4)?;
        let raw = [b[0], b[1], b[2], b[3]];
        if signed && i32::from_le_bytes(raw) < 0 {
            return Err(self.err(format!("{} has a negative length", op_name(op))));
        }
        Ok(u32::from_le_bytes(raw) as usize)
    }

    fn len64(&mut self, op: u8) -> Result<usize> {
        let b = self.take(op, 8)?;
        let n = u64::from_le_bytes(b.try_into().map_err(|_| self.err("length needs 8 bytes"))?);
        // Anything longer than the input cannot be satisfied; say so without allocating.
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.data.len())
            .ok_or_else(|| self.err(format!("truncated: {} declares {n} bytes", op_name(op))))
    }

    fn line(&mut self, op: u8) -> Result<&'a str> {
        let data: &'a [u8] = self.data;
        let rest = &data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.err(format!("truncated: {} argument has no newline", op_name(op))))?;
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| self.err(format!("{} argument is not valid UTF-8", op_name(op))))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn memo_key(&mut self, op: u8) -> Result<u64> {
        Ok(match op {
            BINGET | BINPUT => self.take(op, 1)?[0].into(),
            LONG_BINGET | LONG_BINPUT => {
                let b = self.take(op, 4)?;
                u32::from_le_bytes([b[0], b[1], b[2], b[3]]).into()
            }
            _ => {
                let line = self.line(op)?;
                line.parse().map_err(|_| self.err(format!("bad memo index {line:?}")))?
            }
        })
    }

    fn memoize(&mut self, key: u64, id: Id) -> Result<()> {
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&key) {
            return Err(self.err(format!("more than {MAX_MEMO} memo entries")));
        }
        self.memo.insert(key, id);
        Ok(())
    }

    fn global(&self, module: String, name: String) -> Result<Value> {
        // Protocols 0–2 name Python 2 modules; CPython (and torch's restricted unpickler) map
        // them to their Python 3 names first.
        let module = if self.proto < 3 {
            match module.as_str() {
                "__builtin__" => "builtins".to_string(),
                "copy_reg" => "copyreg".to_string(),
                _ => module,
            }
        } else {
            module
        };
        if !self.allow.allows(&module, &name) {
            return Err(Error::ForbiddenGlobal { path: self.origin.to_path_buf(), module, name });
        }
        Ok(Value::Global { module, name })
    }

    fn leaf_str(&self, id: Id) -> Option<&str> {
        match &self.nodes[id] {
            Node::Leaf(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    fn leaf_global(&self, id: Id) -> Option<(&str, &str)> {
        match &self.nodes[id] {
            Node::Leaf(v) => v.as_global(),
            _ => None,
        }
    }

    fn kind(&self, id: Id) -> &'static str {
        match &self.nodes[id] {
            Node::Leaf(Value::None) => "None",
            Node::Leaf(Value::Bool(_)) => "bool",
            Node::Leaf(Value::Int(_) | Value::BigInt(_)) => "int",
            Node::Leaf(Value::Float(_)) => "float",
            Node::Leaf(Value::Str(_)) => "str",
            Node::Leaf(Value::Bytes(_)) => "bytes",
            Node::Leaf(Value::Global { .. }) => "global",
            Node::Leaf(_) => "value",
            Node::Tuple(_) => "tuple",
            Node::List(_) => "list",
            Node::Dict(_) => "dict",
            Node::Set(_) => "set",
            Node::Reduce { .. } => "call result",
            Node::Object { .. } => "object",
            Node::PersistentId(_) => "persistent id",
        }
    }

    fn pairs(&self, op: u8, items: Vec<Id>) -> Result<Vec<(Id, Id)>> {
        if items.len() % 2 != 0 {
            return Err(self.err(format!("{} with an odd number of items ({})", op_name(op), items.len())));
        }
        Ok(items.chunks_exact(2).map(|c| (c[0], c[1])).collect())
    }

    fn extend_list(&mut self, op: u8, items: Vec<Id>) -> Result<()> {
        let target = self.peek(op)?;
        match &mut self.nodes[target] {
            Node::List(v) => v.extend(items),
            _ => {
                return Err(self.err(format!("{} on a {}, expected a list", op_name(op), self.kind(target))))
            }
        }
        Ok(())
    }

    fn extend_dict(&mut self, op: u8, pairs: Vec<(Id, Id)>) -> Result<()> {
        let target = self.peek(op)?;
        match &mut self.nodes[target] {
            Node::Dict(v) => v.extend(pairs),
            _ => {
                return Err(self.err(format!("{} on a {}, expected a dict", op_name(op), self.kind(target))))
            }
        }
        Ok(())
    }

    fn tuple_items(&self, id: Id, what: &str) -> Result<Vec<Id>> {
        match &self.nodes[id] {
            Node::Tuple(v) => Ok(v.clone()),
            _ => Err(self.err(format!("{what} arguments are a {}, expected a tuple", self.kind(id)))),
        }
    }

    /// `callable(*args)`: the containers and byte strings become plain values, anything else an
    /// inert call node.
    fn call(&mut self, callable: Id, args: Id) -> Result<Id> {
        let Some((module, name)) = self.leaf_global(callable) else {
            return Err(self.err(format!("call of a {}, expected a global", self.kind(callable))));
        };
        let what = format!("{module}.{name}");
        let node = match (module, name) {
            ("collections", "OrderedDict" | "Counter") => {
                let a = self.tuple_items(args, &what)?;
                match a.as_slice() {
                    [] => Node::Dict(Vec::new()),
                    [one] => match &self.nodes[*one] {
                        Node::Dict(pairs) => Node::Dict(pairs.clone()),
                        Node::List(items) | Node::Tuple(items) => {
                            let mut pairs = Vec::with_capacity(items.len());
                            for &item in items {
                                match &self.nodes[item] {
                                    Node::Tuple(kv) | Node::List(kv) if kv.len() == 2 => {
                                        pairs.push((kv[0], kv[1]))
                                    }
                                    _ => {
                                        return Err(
                                            self.err(format!("{what} item is not a (key, value) pair"))
                                        )
                                    }
                                }
                            }
                            Node::Dict(pairs)
                        }
                        _ => return Err(self.err(format!("{what} of a {}", self.kind(*one)))),
                    },
                    _ => return Err(self.err(format!("{what} with {} arguments, expected 0 or 1", a.len()))),
                }
            }
            ("builtins", "set" | "frozenset") => {
                let a = self.tuple_items(args, &what)?;
                match a.as_slice() {
                    [] => Node::Set(Vec::new()),
                    [one] => match &self.nodes[*one] {
                        Node::List(items) | Node::Tuple(items) | Node::Set(items) => Node::Set(items.clone()),
                        _ => return Err(self.err(format!("{what} of a {}", self.kind(*one)))),
                    },
                    _ => return Err(self.err(format!("{what} with {} arguments, expected 0 or 1", a.len()))),
                }
            }
            ("_codecs", "encode") | ("builtins", "bytearray") => {
                let a = self.tuple_items(args, &what)?;
                let bytes = match a.as_slice() {
                    [] => Vec::new(),
                    [one] => match &self.nodes[*one] {
                        Node::Leaf(Value::Bytes(b)) => b.clone(),
                        // `_codecs.encode(s)` defaults to UTF-8.
                        Node::Leaf(Value::Str(s)) => s.as_bytes().to_vec(),
                        _ => return Err(self.err(format!("{what} of a {}", self.kind(*one)))),
                    },
                    [text, encoding] => match (self.leaf_str(*text), self.leaf_str(*encoding)) {
                        (Some(text), Some(encoding)) => {
                            encode_text(text, encoding).map_err(|e| self.err(e))?
                        }
                        _ => return Err(self.err(format!("{what} expects (str, encoding)"))),
                    },
                    _ => return Err(self.err(format!("{what} with {} arguments", a.len()))),
                };
                Node::Leaf(Value::Bytes(bytes))
            }
            _ => {
                self.tuple_items(args, &what)?;
                Node::Reduce { callable, args, state: None }
            }
        };
        self.alloc(node)
    }

    fn new_object(&mut self, op: u8, class: Id, args: Id, kwargs: Option<Id>) -> Result<Id> {
        let Some((module, name)) = self.leaf_global(class) else {
            return Err(self.err(format!("{} of a {}, expected a class", op_name(op), self.kind(class))));
        };
        let what = format!("{module}.{name}");
        self.tuple_items(args, &what)?;
        if let Some(k) = kwargs {
            if !matches!(self.nodes[k], Node::Dict(_)) {
                return Err(self.err(format!("{what} keyword arguments are a {}", self.kind(k))));
            }
        }
        // `cls.__new__` of a container makes it empty; its items follow as SETITEMS/ADDITEMS.
        let node = match (module, name) {
            ("collections", "OrderedDict" | "Counter") => Node::Dict(Vec::new()),
            ("builtins", "set" | "frozenset") => Node::Set(Vec::new()),
            _ => Node::Object { class, args, kwargs, state: None },
        };
        self.alloc(node)
    }

    fn persistent(&mut self, pid: Id) -> Result<()> {
        match self.allow {
            AllowList::TorchWeights => {
                let ok = match &self.nodes[pid] {
                    Node::Tuple(items) => {
                        matches!(
                            items.first().map(|&i| &self.nodes[i]),
                            Some(Node::Leaf(Value::Str(s))) if s == "storage"
                        ) || matches!(
                            items.first().map(|&i| &self.nodes[i]),
                            Some(Node::Leaf(Value::Bytes(b))) if b == b"storage"
                        )
                    }
                    _ => false,
                };
                if !ok {
                    return Err(self.err(format!(
                        "persistent id is a {}, expected a tuple starting with 'storage'",
                        self.kind(pid)
                    )));
                }
            }
        }
        self.node(Node::PersistentId(pid))
    }

    /// Build the owned tree under `id`, charging `budget` so shared references cannot expand
    /// without bound.
    /// Out of line so its locals do not enlarge every recursive frame.
    #[inline(never)]
    fn materialize_dict(&self, pairs: &[(Id, Id)], d: usize, budget: &mut usize) -> Result<Value> {
        // Python semantics: a repeated key keeps its first position and its last value.
        let mut out: Vec<(Value, Value)> = Vec::with_capacity(pairs.len());
        let mut index: HashMap<HashKey, usize> = HashMap::new();
        for &(k, v) in pairs {
            let key = self.materialize(k, d, budget)?;
            let value = self.materialize(v, d, budget)?;
            match HashKey::of(&key) {
                Some(h) => match index.get(&h) {
                    Some(&at) => out[at].1 = value,
                    None => {
                        index.insert(h, out.len());
                        out.push((key, value));
                    }
                },
                None => out.push((key, value)),
            }
        }
        Ok(Value::Dict(out))
    }

    fn materialize(&self, id: Id, depth: usize, budget: &mut usize) -> Result<Value> {
        if depth > MAX_DEPTH {
            return Err(
                self.err(format!("objects nested deeper than {MAX_DEPTH} levels (or a recursive structure)"))
            );
        }
        let cost = 1 + match &self.nodes[id] {
            Node::Leaf(Value::Str(s)) => s.len() / 16,
            Node::Leaf(Value::Bytes(b) | Value::BigInt(b)) => b.len() / 16,
            Node::Leaf(Value::Global { module, name }) => (module.len() + name.len()) / 16,
            _ => 0,
        };
        *budget = budget.checked_sub(cost).ok_or_else(|| {
            self.err("shared references expand beyond the size budget for this input (a pickle bomb?)")
        })?;
        let d = depth + 1;
        let seq = |ids: &[Id], budget: &mut usize| -> Result<Vec<Value>> {
            ids.iter().map(|&i| self.materialize(i, d, budget)).collect()
        };
        let boxed = |i: Id, budget: &mut usize| -> Result<Box<Value>> {
            Ok(Box::new(self.materialize(i, d, budget)?))
        };
        Ok(match &self.nodes[id] {
            Node::Leaf(v) => v.clone(),
            Node::Tuple(v) => Value::Tuple(seq(v, budget)?),
            Node::List(v) => Value::List(seq(v, budget)?),
            Node::Set(v) => Value::Set(seq(v, budget)?),
            Node::Dict(pairs) => self.materialize_dict(pairs, d, budget)?,
            Node::Reduce { callable, args, state } => Value::Reduce {
                callable: boxed(*callable, budget)?,
                args: boxed(*args, budget)?,
                state: state.map(|s| boxed(s, budget)).transpose()?,
            },
            Node::Object { class, args, kwargs, state } => Value::Object {
                class: boxed(*class, budget)?,
                args: boxed(*args, budget)?,
                kwargs: kwargs.map(|k| boxed(k, budget)).transpose()?,
                state: state.map(|s| boxed(s, budget)).transpose()?,
            },
            Node::PersistentId(p) => Value::PersistentId(boxed(*p, budget)?),
        })
    }
}

/// Dict keys that Python would hash equal (`True == 1`).
#[derive(Hash, PartialEq, Eq)]
enum HashKey {
    None,
    Int(i64),
    Str(String),
    Bytes(Vec<u8>),
}

impl HashKey {
    fn of(v: &Value) -> Option<HashKey> {
        Some(match v {
            Value::None => HashKey::None,
            Value::Bool(b) => HashKey::Int(i64::from(*b)),
            Value::Int(i) => HashKey::Int(*i),
            Value::Str(s) => HashKey::Str(s.clone()),
            Value::Bytes(b) => HashKey::Bytes(b.clone()),
            _ => return None,
        })
    }
}

/// `LONG1`/`LONG4` payload → [`Value::Int`] when it fits in 64 bits, else [`Value::BigInt`].
fn int_from_le(b: &[u8]) -> Value {
    let negative = b.last().is_some_and(|&x| x & 0x80 != 0);
    let fill = if negative { 0xff } else { 0x00 };
    let fits = b.len() <= 8 || (b[8..].iter().all(|&x| x == fill) && ((b[7] & 0x80 != 0) == negative));
    if !fits {
        return Value::BigInt(b.to_vec());
    }
    let mut raw = [fill; 8];
    let n = b.len().min(8);
    raw[..n].copy_from_slice(&b[..n]);
    Value::Int(i64::from_le_bytes(raw))
}

/// What `_codecs.encode(text, encoding)` returns, for the encodings pickles use.
fn encode_text(text: &str, encoding: &str) -> std::result::Result<Vec<u8>, String> {
    match encoding.to_ascii_lowercase().replace('_', "-").as_str() {
        "latin1" | "latin-1" | "iso-8859-1" | "iso8859-1" | "l1" => text
            .chars()
            .map(|c| u8::try_from(u32::from(c)).map_err(|_| format!("character {c:?} is not latin-1")))
            .collect(),
        "utf-8" | "utf8" => Ok(text.as_bytes().to_vec()),
        "ascii" if text.is_ascii() => Ok(text.as_bytes().to_vec()),
        other => Err(format!("unsupported encoding {other:?} in _codecs.encode")),
    }
}

/// Encode `value` as a protocol-2 pickle that `torch.load(weights_only=True)` accepts (for the
/// values it allows); `dest` names the output in errors.
///
/// The encoding follows CPython's pickler without memoization (formats.md §8.2 makes memo ops
/// optional): every dict is written as `collections.OrderedDict() + SETITEMS` in batches of
/// 1000, strings as `BINUNICODE`, bytes as `_codecs.encode(latin1_text, 'latin1')`, sets as
/// `builtins.set([...])`. Only [`Value::Object`] with keyword arguments cannot be written
/// (protocol 2 has no `NEWOBJ_EX`).
pub fn dump(value: &Value, dest: &Path) -> Result<Vec<u8>> {
    let mut w = Writer { out: vec![PROTO, 2], dest };
    w.value(value, 0)?;
    w.out.push(STOP);
    Ok(w.out)
}

struct Writer<'a> {
    out: Vec<u8>,
    dest: &'a Path,
}

impl Writer<'_> {
    fn value(&mut self, v: &Value, depth: usize) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(Error::invalid(self.dest, format!("value nested deeper than {MAX_DEPTH} levels")));
        }
        let d = depth + 1;
        match v {
            Value::None => self.out.push(NONE),
            Value::Bool(b) => self.out.push(if *b { NEWTRUE } else { NEWFALSE }),
            Value::Int(i) => self.int(*i),
            Value::BigInt(b) => {
                if let Ok(n) = u8::try_from(b.len()) {
                    self.out.extend_from_slice(&[LONG1, n]);
                } else {
                    let n = i32::try_from(b.len())
                        .map_err(|_| Error::invalid(self.dest, "integer too large to pickle"))?;
                    self.out.push(LONG4);
                    self.out.extend_from_slice(&n.to_le_bytes());
                }
                self.out.extend_from_slice(b);
            }
            Value::Float(f) => {
                self.out.push(BINFLOAT);
                self.out.extend_from_slice(&f.to_be_bytes());
            }
            Value::Str(s) => self.str(s)?,
            Value::Bytes(b) => {
                self.global("_codecs", "encode")?;
                let latin1: String = b.iter().map(|&c| char::from(c)).collect();
                self.str(&latin1)?;
                self.str("latin1")?;
                self.out.extend_from_slice(&[TUPLE2, REDUCE]);
            }
            Value::Tuple(items) => self.tuple(items, d)?,
            Value::List(items) => {
                self.out.push(EMPTY_LIST);
                self.appends(items, d)?;
            }
            Value::Set(items) => {
                self.global("builtins", "set")?;
                self.out.push(EMPTY_LIST);
                self.appends(items, d)?;
                self.out.extend_from_slice(&[TUPLE1, REDUCE]);
            }
            Value::Dict(pairs) => {
                self.global("collections", "OrderedDict")?;
                self.out.extend_from_slice(&[EMPTY_TUPLE, REDUCE]);
                for batch in pairs.chunks(BATCH) {
                    if let [(k, v)] = batch {
                        self.value(k, d)?;
                        self.value(v, d)?;
                        self.out.push(SETITEM);
                    } else {
                        self.out.push(MARK);
                        for (k, v) in batch {
                            self.value(k, d)?;
                            self.value(v, d)?;
                        }
                        self.out.push(SETITEMS);
                    }
                }
            }
            Value::Global { module, name } => self.global(module, name)?,
            Value::Reduce { callable, args, state } => {
                self.value(callable, d)?;
                self.call_args(args, d)?;
                self.out.push(REDUCE);
                self.state(state.as_deref(), d)?;
            }
            Value::Object { class, args, kwargs, state } => {
                if kwargs.is_some() {
                    return Err(Error::invalid(
                        self.dest,
                        "cannot pickle an object with keyword arguments in protocol 2 (NEWOBJ_EX is protocol 4)",
                    ));
                }
                self.value(class, d)?;
                self.call_args(args, d)?;
                self.out.push(NEWOBJ);
                self.state(state.as_deref(), d)?;
            }
            Value::PersistentId(pid) => {
                self.value(pid, d)?;
                self.out.push(BINPERSID);
            }
        }
        Ok(())
    }

    fn call_args(&mut self, args: &Value, d: usize) -> Result<()> {
        match args {
            Value::Tuple(items) => self.tuple(items, d),
            other => Err(Error::invalid(
                self.dest,
                format!("call arguments must be a tuple, got {}", other.describe()),
            )),
        }
    }

    fn state(&mut self, state: Option<&Value>, d: usize) -> Result<()> {
        if let Some(s) = state {
            self.value(s, d)?;
            self.out.push(BUILD);
        }
        Ok(())
    }

    /// CPython's `save_long` for protocol 2.
    fn int(&mut self, i: i64) {
        if (0..=0xff).contains(&i) {
            self.out.extend_from_slice(&[BININT1, i as u8]);
        } else if (0..=0xffff).contains(&i) {
            self.out.push(BININT2);
            self.out.extend_from_slice(&(i as u16).to_le_bytes());
        } else if let Ok(small) = i32::try_from(i) {
            self.out.push(BININT);
            self.out.extend_from_slice(&small.to_le_bytes());
        } else {
            // Minimal little-endian two's complement, as CPython's encode_long.
            let mut b = i.to_le_bytes().to_vec();
            while b.len() > 1 {
                let (last, prev) = (b[b.len() - 1], b[b.len() - 2]);
                if (last == 0x00 && prev & 0x80 == 0) || (last == 0xff && prev & 0x80 != 0) {
                    b.pop();
                } else {
                    break;
                }
            }
            self.out.extend_from_slice(&[LONG1, b.len() as u8]);
            self.out.extend_from_slice(&b);
        }
    }

    fn str(&mut self, s: &str) -> Result<()> {
        let n = u32::try_from(s.len()).map_err(|_| {
            Error::invalid(self.dest, format!("string of {} bytes is too long for BINUNICODE", s.len()))
        })?;
        self.out.push(BINUNICODE);
        self.out.extend_from_slice(&n.to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) -> Result<()> {
        if module.contains('\n') || name.contains('\n') {
            return Err(Error::invalid(self.dest, format!("global {module:?}.{name:?} contains a newline")));
        }
        self.out.push(GLOBAL);
        for part in [module, name] {
            self.out.extend_from_slice(part.as_bytes());
            self.out.push(b'\n');
        }
        Ok(())
    }

    fn tuple(&mut self, items: &[Value], d: usize) -> Result<()> {
        if items.is_empty() {
            self.out.push(EMPTY_TUPLE);
            return Ok(());
        }
        let short = items.len() <= 3;
        if !short {
            self.out.push(MARK);
        }
        for item in items {
            self.value(item, d)?;
        }
        self.out.push(match items.len() {
            1 => TUPLE1,
            2 => TUPLE2,
            3 => TUPLE3,
            _ => TUPLE,
        });
        Ok(())
    }

    fn appends(&mut self, items: &[Value], d: usize) -> Result<()> {
        for batch in items.chunks(BATCH) {
            if let [one] = batch {
                self.value(one, d)?;
                self.out.push(APPEND);
            } else {
                self.out.push(MARK);
                for item in batch {
                    self.value(item, d)?;
                }
                self.out.push(APPENDS);
            }
        }
        Ok(())
    }
}

/// Hand-built pickle bytes for tests of malformed and hostile input.
#[cfg(test)]
pub(crate) mod build {
    /// A pickle under construction; starts with `PROTO 2`.
    pub(crate) struct P(pub(crate) Vec<u8>);

    impl P {
        pub(crate) fn new() -> P {
            P(vec![super::PROTO, 2])
        }

        /// Raw bytes (opcodes and their arguments).
        pub(crate) fn raw(mut self, bytes: &[u8]) -> P {
            self.0.extend_from_slice(bytes);
            self
        }

        pub(crate) fn global(self, module: &str, name: &str) -> P {
            self.raw(&[super::GLOBAL]).raw(module.as_bytes()).raw(b"\n").raw(name.as_bytes()).raw(b"\n")
        }

        /// `BINUNICODE`.
        pub(crate) fn str(self, s: &str) -> P {
            self.raw(&[super::BINUNICODE]).raw(&(s.len() as u32).to_le_bytes()).raw(s.as_bytes())
        }

        /// `BININT`.
        pub(crate) fn int(self, i: i32) -> P {
            self.raw(&[super::BININT]).raw(&i.to_le_bytes())
        }

        pub(crate) fn stop(self) -> Vec<u8> {
            self.raw(&[super::STOP]).0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::build::P;
    use super::*;
    use proptest::prelude::*;

    fn load_torch(bytes: &[u8]) -> Result<Value> {
        load(bytes, AllowList::TorchWeights, Path::new("t.pkl"))
    }

    fn malformed(bytes: &[u8], needle: &str) {
        match load_torch(bytes) {
            Err(Error::Malformed { format: "pickle", detail, .. }) => {
                assert!(detail.contains(needle), "{detail:?} should mention {needle:?}")
            }
            other => panic!("expected a malformed-pickle error mentioning {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn forbidden_globals_are_refused_by_name() {
        let cases: Vec<(&str, &str, Vec<u8>)> = vec![
            // os.system('echo pwned') via GLOBAL + REDUCE
            ("os", "system", P::new().global("os", "system").str("echo pwned").raw(&[TUPLE1, REDUCE]).stop()),
            ("posix", "system", P::new().global("posix", "system").str("id").raw(&[TUPLE1, REDUCE]).stop()),
            (
                "builtins",
                "eval",
                P::new().global("__builtin__", "eval").str("1").raw(&[TUPLE1, REDUCE]).stop(),
            ),
            (
                "subprocess",
                "Popen",
                P::new().global("subprocess", "Popen").raw(&[EMPTY_TUPLE, REDUCE]).stop(),
            ),
            // STACK_GLOBAL and INST name globals too.
            ("os", "system", P::new().str("os").str("system").raw(&[STACK_GLOBAL]).stop()),
            ("os", "system", P::new().raw(&[MARK]).str("ls").raw(b"ios\nsystem\n").stop()),
            // Allowed module, forbidden attribute.
            ("torch", "load", P::new().global("torch", "load").stop()),
            ("collections", "defaultdict", P::new().global("collections", "defaultdict").stop()),
        ];
        for (module, name, bytes) in cases {
            match load_torch(&bytes) {
                Err(Error::ForbiddenGlobal { module: m, name: n, path }) => {
                    assert_eq!((m.as_str(), n.as_str()), (module, name));
                    assert_eq!(path, Path::new("t.pkl"));
                }
                other => panic!("{module}.{name}: expected ForbiddenGlobal, got {other:?}"),
            }
        }
    }

    #[test]
    fn malformed_input_is_named() {
        malformed(&P::new().raw(&[TUPLE2]).stop(), "stack underflow at TUPLE2");
        malformed(
            &P::new().raw(&[EMPTY_DICT]).str("k").str("v").raw(&[SETITEMS]).stop(),
            "SETITEMS without a MARK",
        );
        malformed(&P::new().raw(&[BINGET, 5]).stop(), "memo index 5 is not defined");
        malformed(&P::new().raw(&[BINUNICODE, 9, 0, 0, 0]).raw(b"abc").0, "truncated");
        malformed(&P::new().raw(&[BINBYTES8]).raw(&u64::MAX.to_le_bytes()).0, "truncated");
        malformed(&P::new().raw(&[NONE]).0, "without a STOP");
        malformed(&P::new().raw(&[0xff]).stop(), "unknown opcode 0xff");
        malformed(&P::new().raw(&[EMPTY_LIST]).str("k").str("v").raw(&[SETITEM]).stop(), "SETITEM on a list");
        malformed(&P::new().raw(&[MARK, NONE, DICT]).stop(), "odd number");
        malformed(&P::new().raw(&[NONE, MARK, APPEND]).stop(), "stack underflow at APPEND");
        malformed(&P::new().raw(&[PROTO, 9]).stop(), "unsupported pickle protocol 9");
        malformed(&P::new().raw(&[NONE, BINPERSID]).stop(), "expected a tuple starting with 'storage'");
        malformed(&P::new().raw(&[EXT1, 1]).stop(), "extension-registry");
        malformed(&P::new().str("x").raw(&[EMPTY_TUPLE, REDUCE]).stop(), "call of a str");
        malformed(&P::new().raw(&[0x80]).0, "truncated");
    }

    #[test]
    fn memo_shares_mutation_like_python() {
        // d = {}; memo[0] = d; lst = [d]; d['a'] = 1  → the list sees the key.
        let bytes = P::new()
            .raw(&[EMPTY_DICT, BINPUT, 0, EMPTY_LIST, BINGET, 0, APPEND, BINGET, 0])
            .str("a")
            .int(1)
            .raw(&[SETITEM, POP])
            .stop();
        let v = load_torch(&bytes).unwrap();
        assert_eq!(v, Value::List(vec![Value::Dict(vec![(Value::Str("a".into()), Value::Int(1))])]));
    }

    #[test]
    fn shared_reference_bombs_and_cycles_are_bounded() {
        // l0 = []; l(i+1) = [l(i), l(i)] forty times: 2^40 nodes if expanded naively.
        let mut p = P::new().raw(&[EMPTY_LIST, BINPUT, 0]);
        for _ in 0..40 {
            p = p.raw(&[MARK, BINGET, 0, BINGET, 0, LIST, BINPUT, 0]);
        }
        malformed(&p.stop(), "budget");
        // l = []; l.append(l)
        malformed(&P::new().raw(&[EMPTY_LIST, BINPUT, 0, BINGET, 0, APPEND]).stop(), "nested deeper");
    }

    #[test]
    fn nesting_is_bounded() {
        let nested = |n: usize| P::new().raw(&vec![EMPTY_LIST; n]).raw(&vec![APPEND; n - 1]).stop();
        assert!(load_torch(&nested(MAX_DEPTH)).is_ok());
        malformed(&nested(MAX_DEPTH + 2), "nested deeper");
        let mut deep = Value::None;
        for _ in 0..MAX_DEPTH + 2 {
            deep = Value::List(vec![deep]);
        }
        assert!(matches!(dump(&deep, Path::new("x")), Err(Error::Invalid { .. })));
    }

    #[test]
    fn duplicate_dict_keys_keep_first_position_and_last_value() {
        let bytes = P::new()
            .raw(&[EMPTY_DICT, MARK])
            .str("a")
            .int(1)
            .str("b")
            .int(2)
            .str("a")
            .int(3)
            .raw(&[SETITEMS])
            .stop();
        let v = load_torch(&bytes).unwrap();
        let s = |x: &str| Value::Str(x.into());
        assert_eq!(v, Value::Dict(vec![(s("a"), Value::Int(3)), (s("b"), Value::Int(2))]));
    }

    #[test]
    fn reads_the_formats_md_example_and_protocol_4_opcodes() {
        // formats.md §8.2 example for {"w": bf16 (32000, 4096)}.
        let bytes = P::new()
            .raw(&[EMPTY_DICT, MARK])
            .str("w")
            .global("torch._utils", "_rebuild_tensor_v2")
            .raw(&[MARK, MARK])
            .str("storage")
            .global("torch", "BFloat16Storage")
            .str("0")
            .str("cpu")
            .raw(&[BININT, 0x00, 0x00, 0xd0, 0x07, TUPLE, BINPERSID, BININT1, 0])
            .raw(&[BININT2, 0x00, 0x7d, BININT2, 0x00, 0x10, TUPLE2, BININT2, 0x00, 0x10, BININT1, 1, TUPLE2])
            .raw(&[NEWFALSE])
            .global("collections", "OrderedDict")
            .raw(&[EMPTY_TUPLE, REDUCE, TUPLE, REDUCE, SETITEMS])
            .stop();
        let Value::Dict(items) = load_torch(&bytes).unwrap() else { panic!("not a dict") };
        let Value::Reduce { callable, args, .. } = &items[0].1 else { panic!("not a call") };
        assert!(callable.is_global("torch._utils", "_rebuild_tensor_v2"));
        let args = args.as_seq().unwrap();
        assert_eq!(args[2], Value::Tuple(vec![Value::Int(32000), Value::Int(4096)]));
        let Value::PersistentId(pid) = &args[0] else { panic!("no pid") };
        assert_eq!(pid.as_seq().unwrap()[4], Value::Int(131_072_000));

        // Protocol 4: FRAME, SHORT_BINUNICODE, MEMOIZE, STACK_GLOBAL, SHORT_BINBYTES, sets.
        let p4 = P::new()
            .raw(&[PROTO, 4, FRAME])
            .raw(&40u64.to_le_bytes())
            .raw(&[SHORT_BINUNICODE, 11])
            .raw(b"collections")
            .raw(&[MEMOIZE, SHORT_BINUNICODE, 11])
            .raw(b"OrderedDict")
            .raw(&[MEMOIZE, STACK_GLOBAL, MEMOIZE, EMPTY_TUPLE, REDUCE, MEMOIZE])
            .raw(&[SHORT_BINUNICODE, 1, b'k', SHORT_BINBYTES, 2, 7, 8, SETITEM])
            .raw(&[SHORT_BINUNICODE, 1, b's', EMPTY_SET, MARK, BININT1, 1, NEWTRUE, ADDITEMS, SETITEM])
            .raw(&[SHORT_BINUNICODE, 1, b'f', MARK, NONE, FROZENSET, SETITEM])
            .stop();
        let v = load_torch(&p4).unwrap();
        let s = |x: &str| Value::Str(x.into());
        assert_eq!(
            v,
            Value::Dict(vec![
                (s("k"), Value::Bytes(vec![7, 8])),
                (s("s"), Value::Set(vec![Value::Int(1), Value::Bool(true)])),
                (s("f"), Value::Set(vec![Value::None])),
            ])
        );
    }

    #[test]
    fn bytes_io_extra_state_is_inert_data() {
        // What TE 1.x pickles for `_extra_state`: NEWOBJ(_io.BytesIO) + BUILD((bytes, pos, None)).
        let bytes = P::new()
            .global("_io", "BytesIO")
            .raw(&[EMPTY_TUPLE, NEWOBJ])
            .global("_codecs", "encode")
            .str("\u{00ff}\u{0001}")
            .str("latin1")
            .raw(&[TUPLE2, REDUCE, BININT1, 0, NONE, TUPLE3, BUILD])
            .stop();
        let Value::Object { class, state, .. } = load_torch(&bytes).unwrap() else { panic!("not an object") };
        assert!(class.is_global("_io", "BytesIO"));
        let state = state.unwrap();
        assert_eq!(state.as_seq().unwrap()[0], Value::Bytes(vec![0xff, 0x01]));
    }

    #[test]
    fn ints_match_cpython_encoding() {
        let enc = |i: i64| dump(&Value::Int(i), Path::new("x")).unwrap()[2..].to_vec();
        assert_eq!(enc(5), vec![BININT1, 5, STOP]);
        assert_eq!(enc(300), vec![BININT2, 0x2c, 0x01, STOP]);
        assert_eq!(enc(-1), vec![BININT, 0xff, 0xff, 0xff, 0xff, STOP]);
        assert_eq!(enc(0x8000_0000), vec![LONG1, 5, 0, 0, 0, 0x80, 0, STOP]);
        assert_eq!(enc(-0x8000_0001), vec![LONG1, 5, 0xff, 0xff, 0xff, 0x7f, 0xff, STOP]);
        for i in [i64::MIN, i64::MAX, 1 << 40, -(1 << 40)] {
            assert_eq!(load_torch(&dump(&Value::Int(i), Path::new("x")).unwrap()).unwrap(), Value::Int(i));
        }
    }

    /// Minimal little-endian two's complement of `x`, as CPython's `encode_long`.
    fn minimal_le(x: i128) -> Vec<u8> {
        let mut b = x.to_le_bytes().to_vec();
        while b.len() > 1 {
            let (last, prev) = (b[b.len() - 1], b[b.len() - 2]);
            if (last == 0 && prev & 0x80 == 0) || (last == 0xff && prev & 0x80 != 0) {
                b.pop();
            } else {
                break;
            }
        }
        b
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::None),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            any::<i128>()
                .prop_filter("beyond i64", |x| i64::try_from(*x).is_err())
                .prop_map(|x| Value::BigInt(minimal_le(x))),
            any::<f64>().prop_filter("NaN != NaN", |f| !f.is_nan()).prop_map(Value::Float),
            ".{0,12}".prop_map(Value::Str),
            prop::collection::vec(any::<u8>(), 0..16).prop_map(Value::Bytes),
            Just(Value::global("torch", "bfloat16")),
            Just(Value::global("torch", "Size")),
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Tuple),
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::List),
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Set),
                prop::collection::btree_map(".{0,6}", inner.clone(), 0..5)
                    .prop_map(|m| Value::Dict(m.into_iter().map(|(k, v)| (Value::Str(k), v)).collect())),
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|a| Value::call(Value::global("torch._utils", "_rebuild_tensor_v2"), a)),
                (prop::collection::vec(inner.clone(), 0..3), proptest::option::of(inner.clone())).prop_map(
                    |(a, s)| Value::Object {
                        class: Box::new(Value::global("_io", "BytesIO")),
                        args: Box::new(Value::Tuple(a)),
                        kwargs: None,
                        state: s.map(Box::new),
                    }
                ),
                inner.clone().prop_map(|v| Value::PersistentId(Box::new(Value::Tuple(vec![
                    Value::Str("storage".into()),
                    v
                ])))),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn dump_then_load_is_identity(v in value()) {
            let bytes = dump(&v, Path::new("x")).unwrap();
            prop_assert_eq!(load_torch(&bytes).unwrap(), v);
        }

        // Fuzz-style: arbitrary bytes and corrupted valid pickles never panic.
        #[test]
        fn garbage_never_panics(junk in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = load_torch(&junk);
            let mut with_proto = vec![PROTO, 2];
            with_proto.extend_from_slice(&junk);
            let _ = load_torch(&with_proto);
        }

        #[test]
        fn corrupted_pickles_never_panic(v in value(), at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
            let mut bytes = dump(&v, Path::new("x")).unwrap();
            let i = at.index(bytes.len());
            bytes[i] = byte;
            let _ = load_torch(&bytes);
            let _ = load_torch(&bytes[..cut.index(bytes.len())]);
        }
    }
}
