//! The reader's object model: what a call of an allowed global becomes, and the owned
//! [`Value`] tree built from the arena at `STOP` under the size budget.

use super::opcodes::op_name;
use super::read::{Id, Node, Vm};
use super::{AllowList, Value, MAX_DEPTH};
use crate::error::Result;
use std::collections::HashMap;

/// The result may cost at most `BUDGET_PER_BYTE · input length + BUDGET_FLOOR` units (one per
/// value plus one per 16 bytes of string data), which bounds what memo sharing can expand to.
/// Calls that copy a container are charged against a second budget of the same size. Without
/// repeated memo references a pickle decodes to fewer values than it has bytes, so 8 per byte is
/// ample; the floor is kept small because every input may spend all of it (a 250-byte pickle
/// expanded to 150 MB when it was 2^20).
const BUDGET_PER_BYTE: usize = 8;
const BUDGET_FLOOR: usize = 1 << 16;

/// The budget, in units, for an input of `input_len` bytes.
pub(super) fn budget(input_len: usize) -> usize {
    input_len.saturating_mul(BUDGET_PER_BYTE).saturating_add(BUDGET_FLOOR)
}

impl Vm<'_> {
    pub(super) fn leaf_str(&self, id: Id) -> Option<&str> {
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

    /// The Python type of a node, for messages.
    pub(super) fn kind(&self, id: Id) -> &'static str {
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

    /// The items of the argument tuple of a call of `what`.
    fn tuple_items(&self, id: Id, what: &str) -> Result<&[Id]> {
        match &self.nodes[id] {
            Node::Tuple(v) => Ok(v),
            _ => Err(self.err(format!("{what} arguments are a {}, expected a tuple", self.kind(id)))),
        }
    }

    /// The single optional argument of a container constructor (`OrderedDict(x)`, `set(x)`).
    fn optional_arg(&self, args: Id, what: &str) -> Result<Option<Id>> {
        match self.tuple_items(args, what)? {
            [] => Ok(None),
            [one] => Ok(Some(*one)),
            a => Err(self.err(format!("{what} with {} arguments, expected 0 or 1", a.len()))),
        }
    }

    /// `callable(*args)`: the containers and byte strings become plain values, anything else an
    /// inert call node.
    pub(super) fn call(&mut self, callable: Id, args: Id) -> Result<Id> {
        let Some((module, name)) = self.leaf_global(callable) else {
            return Err(self.err(format!("call of a {}, expected a global", self.kind(callable))));
        };
        let what = format!("{module}.{name}");
        let node = match (module, name) {
            ("collections", "OrderedDict" | "Counter") => match self.optional_arg(args, &what)? {
                None => Node::Dict(Vec::new()),
                Some(one) => match &self.nodes[one] {
                    Node::Dict(pairs) => Node::Dict(pairs.clone()),
                    Node::List(items) | Node::Tuple(items) => {
                        let mut pairs = Vec::with_capacity(items.len());
                        for &item in items {
                            match &self.nodes[item] {
                                Node::Tuple(kv) | Node::List(kv) if kv.len() == 2 => {
                                    pairs.push((kv[0], kv[1]))
                                }
                                _ => return Err(self.err(format!("{what} item is not a (key, value) pair"))),
                            }
                        }
                        Node::Dict(pairs)
                    }
                    _ => return Err(self.err(format!("{what} of a {}", self.kind(one)))),
                },
            },
            ("builtins", "set" | "frozenset") => match self.optional_arg(args, &what)? {
                None => Node::Set(Vec::new()),
                Some(one) => match &self.nodes[one] {
                    Node::List(items) | Node::Tuple(items) | Node::Set(items) => Node::Set(items.clone()),
                    _ => return Err(self.err(format!("{what} of a {}", self.kind(one)))),
                },
            },
            ("_codecs", "encode") | ("builtins", "bytearray") => {
                let bytes = match self.tuple_items(args, &what)? {
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
                    a => return Err(self.err(format!("{what} with {} arguments", a.len()))),
                };
                Node::Leaf(Value::Bytes(bytes))
            }
            _ => {
                self.tuple_items(args, &what)?;
                Node::Reduce { callable, args, state: None }
            }
        };
        self.charge_copy(&node)?;
        self.alloc(node)
    }

    /// `OrderedDict(d)`, `set(l)` and `_codecs.encode(b)` copy their argument, as Python does;
    /// charge the copy so that calling them again and again on one shared large container (a few
    /// bytes per call) cannot grow the arena quadratically in the input length.
    fn charge_copy(&mut self, node: &Node) -> Result<()> {
        let cost = match node {
            Node::Dict(items) => items.len(),
            Node::Set(items) => items.len(),
            Node::Leaf(Value::Bytes(b)) => b.len() / 16,
            _ => 0,
        };
        self.copy_budget = self.copy_budget.checked_sub(cost).ok_or_else(|| {
            self.err("calls copy more than the size budget for this input allows (a pickle bomb?)")
        })?;
        Ok(())
    }

    pub(super) fn new_object(&mut self, op: u8, class: Id, args: Id, kwargs: Option<Id>) -> Result<Id> {
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

    pub(super) fn persistent(&mut self, pid: Id) -> Result<()> {
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
            AllowList::DistMetadata => {
                return Err(
                    self.err("persistent id in a distributed-checkpoint metadata pickle, which has none")
                )
            }
        }
        self.node(Node::PersistentId(pid))
    }

    /// The owned tree under `root`, built within `budget` units.
    pub(super) fn tree(&self, root: Id, mut budget: usize) -> Result<Value> {
        self.materialize(root, 0, &mut budget)
    }

    /// A dict's part of [`Vm::materialize`]; out of line so its locals do not enlarge every
    /// recursive frame.
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

    /// Build the owned tree under `id`, charging `budget` so shared references cannot expand
    /// without bound.
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
