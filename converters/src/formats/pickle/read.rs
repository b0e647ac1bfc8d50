//! The pickle VM: opcode dispatch over an object arena, with the stack, marks, memo and input
//! decoding. What allowed calls become, and the owned tree built at `STOP`, are in
//! [`super::objects`].

use super::objects::budget;
use super::opcodes::*;
use super::{AllowList, Value};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::fmt::Display;
use std::path::Path;

/// Most items the stack may hold at once.
const MAX_STACK: usize = 1 << 20;
/// Most open `MARK`s.
const MAX_MARKS: usize = 1 << 12;
/// Most memo entries.
const MAX_MEMO: usize = 1 << 22;

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
        copy_budget: budget(data.len()),
    }
    .run()
}

/// Index of a node in the arena.
pub(super) type Id = usize;

/// An object in the VM's arena; containers refer to their items by id so that mutation through
/// one reference is seen through every other, as in Python.
pub(super) enum Node {
    Leaf(Value),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Set(Vec<Id>),
    Reduce { callable: Id, args: Id, state: Option<Id> },
    Object { class: Id, args: Id, kwargs: Option<Id>, state: Option<Id> },
    PersistentId(Id),
}

pub(super) struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    op_pos: usize,
    origin: &'a Path,
    pub(super) allow: AllowList,
    proto: u8,
    pub(super) nodes: Vec<Node>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
    /// What calls that copy a container may still copy (see [`Vm::charge_copy`]).
    pub(super) copy_budget: usize,
}

impl<'a> Vm<'a> {
    /// A [`Error::Malformed`] naming the offset of the current opcode.
    pub(super) fn err(&self, detail: impl Display) -> Error {
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
                return self.tree(root, budget(self.data.len()));
            }
            self.step(op)?;
        }
    }

    fn step(&mut self, op: u8) -> Result<()> {
        match op {
            PROTO => {
                let v = self.byte(op)?;
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
                let v = i32::from_le_bytes(self.array(op)?);
                self.leaf(Value::Int(v.into()))?;
            }
            BININT1 => {
                let v = self.byte(op)?;
                self.leaf(Value::Int(v.into()))?;
            }
            BININT2 => {
                let v = u16::from_le_bytes(self.array(op)?);
                self.leaf(Value::Int(v.into()))?;
            }
            LONG1 | LONG4 => {
                let n = self.data_len(op)?;
                let v = int_from_le(self.take(op, n)?);
                self.leaf(v)?;
            }
            FLOAT => {
                let line = self.line(op)?;
                let v: f64 = line.parse().map_err(|_| self.err(format!("bad FLOAT literal {line:?}")))?;
                self.leaf(Value::Float(v))?;
            }
            BINFLOAT => {
                let v = f64::from_be_bytes(self.array(op)?);
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
                let n = self.data_len(op)?;
                // Python 2 `str`: text when it decodes, bytes otherwise (torch decodes ASCII).
                let raw = self.take(op, n)?;
                let v = match std::str::from_utf8(raw) {
                    Ok(s) => Value::Str(s.to_string()),
                    Err(_) => Value::Bytes(raw.to_vec()),
                };
                self.leaf(v)?;
            }
            BINUNICODE | SHORT_BINUNICODE | BINUNICODE8 => {
                let n = self.data_len(op)?;
                let bytes = self.take(op, n)?;
                let s = std::str::from_utf8(bytes)
                    .map_err(|e| self.err(format!("{} string is not valid UTF-8 ({e})", op_name(op))))?;
                let v = Value::Str(s.to_string());
                self.leaf(v)?;
            }
            BINBYTES | SHORT_BINBYTES | BINBYTES8 | BYTEARRAY8 => {
                let n = self.data_len(op)?;
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
                    _ => return Err(self.wrong_target(op, target, "set")),
                }
            }
            FROZENSET => {
                let items = self.pop_mark(op)?;
                self.node(Node::Set(items))?;
            }
            GLOBAL => {
                let g = self.global_lines(op)?;
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
                let g = self.global_lines(op)?;
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

    pub(super) fn alloc(&mut self, node: Node) -> Result<Id> {
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

    pub(super) fn node(&mut self, node: Node) -> Result<()> {
        let id = self.alloc(node)?;
        self.push(id)
    }

    fn leaf(&mut self, v: Value) -> Result<()> {
        self.node(Node::Leaf(v))
    }

    fn pop(&mut self, op: u8) -> Result<Id> {
        let top = self.peek(op)?;
        self.stack.pop();
        Ok(top)
    }

    /// The top `n` items, bottom first.
    fn pop_n(&mut self, op: u8, n: usize) -> Result<Vec<Id>> {
        if self.stack.len() < self.base() + n {
            return Err(self.err(format!("stack underflow at {} (needs {n} items)", op_name(op))));
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    /// The top item, which must lie above the innermost open MARK.
    fn peek(&self, op: u8) -> Result<Id> {
        match self.stack.last() {
            Some(&top) if self.stack.len() > self.base() => Ok(top),
            _ => Err(self.err(format!("stack underflow at {}", op_name(op)))),
        }
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

    /// The next `N` bytes of the input.
    fn array<const N: usize>(&mut self, op: u8) -> Result<[u8; N]> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(op, N)?);
        Ok(out)
    }

    fn byte(&mut self, op: u8) -> Result<u8> {
        Ok(self.array::<1>(op)?[0])
    }

    /// The length prefix of a counted-data opcode: one byte for the `SHORT_` forms and `LONG1`,
    /// four (signed for protocol 1's `BINSTRING` and `LONG4`) for the 32-bit forms, eight for
    /// protocol 4's.
    fn data_len(&mut self, op: u8) -> Result<usize> {
        match op {
            SHORT_BINSTRING | SHORT_BINUNICODE | SHORT_BINBYTES | LONG1 => Ok(self.byte(op)?.into()),
            BINSTRING | LONG4 => self.len32(op, true),
            BINUNICODE | BINBYTES => self.len32(op, false),
            _ => self.len64(op),
        }
    }

    fn len32(&mut self, op: u8, signed: bool) -> Result<usize> {
        let raw = self.array(op)?;
        if signed && i32::from_le_bytes(raw) < 0 {
            return Err(self.err(format!("{} has a negative length", op_name(op))));
        }
        Ok(u32::from_le_bytes(raw) as usize)
    }

    fn len64(&mut self, op: u8) -> Result<usize> {
        let n = u64::from_le_bytes(self.array(op)?);
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
            BINGET | BINPUT => self.byte(op)?.into(),
            LONG_BINGET | LONG_BINPUT => u32::from_le_bytes(self.array(op)?).into(),
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

    /// `GLOBAL`/`INST`: module and name on two lines.
    fn global_lines(&mut self, op: u8) -> Result<Value> {
        let module = self.line(op)?.to_string();
        let name = self.line(op)?.to_string();
        self.global(module, name)
    }

    /// A global named by the pickle, checked against the allow-list.
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
            _ => return Err(self.wrong_target(op, target, "list")),
        }
        Ok(())
    }

    fn extend_dict(&mut self, op: u8, pairs: Vec<(Id, Id)>) -> Result<()> {
        let target = self.peek(op)?;
        match &mut self.nodes[target] {
            Node::Dict(v) => v.extend(pairs),
            _ => return Err(self.wrong_target(op, target, "dict")),
        }
        Ok(())
    }

    /// `op` found a `target` that is not the container it mutates.
    fn wrong_target(&self, op: u8, target: Id, want: &str) -> Error {
        self.err(format!("{} on a {}, expected a {want}", op_name(op), self.kind(target)))
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
