//! The protocol-2 pickle writer.

use super::opcodes::*;
use super::{Value, MAX_DEPTH};
use crate::error::{Error, Result};
use std::path::Path;

/// Python pickles containers in batches of this many items per `MARK`.
const BATCH: usize = 1000;

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
    fn invalid(&self, detail: impl Into<String>) -> Error {
        Error::invalid(self.dest, detail)
    }

    fn value(&mut self, v: &Value, depth: usize) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(self.invalid(format!("value nested deeper than {MAX_DEPTH} levels")));
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
                    let n =
                        i32::try_from(b.len()).map_err(|_| self.invalid("integer too large to pickle"))?;
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
                    return Err(self.invalid(
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
            other => Err(self.invalid(format!("call arguments must be a tuple, got {}", other.describe()))),
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
        let n = u32::try_from(s.len())
            .map_err(|_| self.invalid(format!("string of {} bytes is too long for BINUNICODE", s.len())))?;
        self.out.push(BINUNICODE);
        self.out.extend_from_slice(&n.to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) -> Result<()> {
        if module.contains('\n') || name.contains('\n') {
            return Err(self.invalid(format!("global {module:?}.{name:?} contains a newline")));
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
