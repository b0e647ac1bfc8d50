//! Arbitrary bytes as a pickle under torch's allow-list: decoding must return Ok or a named error,
//! never panic, hang or blow memory. Whatever decodes must encode again (unless it holds an
//! object with keyword arguments, which protocol 2 cannot express), and decode back to the same
//! value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardsmith_converters::formats::pickle::{dump, load, AllowList, Value};
use std::path::Path;

/// Memo sharing lets a few hundred bytes decode to the reader's whole budget (about a million
/// values); decoding the re-encoded form of such a tree again takes seconds under the sanitizer,
/// so the round trip is checked only below this many encoded bytes.
const MAX_ROUND_TRIP: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let origin = Path::new("fuzz");
    let Ok(value) = load(data, AllowList::default(), origin) else { return };
    match dump(&value, origin) {
        Ok(bytes) if bytes.len() <= MAX_ROUND_TRIP => {
            let back = load(&bytes, AllowList::default(), origin).expect("our own pickle decodes");
            assert!(same(&back, &value), "dump then load changed the value:\n{back:?}\n{value:?}");
        }
        Ok(_) => {}
        Err(_) => assert!(has_kwargs(&value), "only objects with keyword arguments fail to encode"),
    }
});

/// Equality with NaN equal to itself (floats compared bit for bit).
fn same(a: &Value, b: &Value) -> bool {
    let all = |x: &[Value], y: &[Value]| x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y));
    let opt = |x: &Option<Box<Value>>, y: &Option<Box<Value>>| match (x, y) {
        (Some(x), Some(y)) => same(x, y),
        (x, y) => x.is_none() && y.is_none(),
    };
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits(),
        (Value::Tuple(x), Value::Tuple(y))
        | (Value::List(x), Value::List(y))
        | (Value::Set(x), Value::Set(y)) => all(x, y),
        (Value::Dict(x), Value::Dict(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|((k, v), (l, w))| same(k, l) && same(v, w))
        }
        (
            Value::Reduce { callable: c, args: a, state: s },
            Value::Reduce { callable: d, args: b, state: t },
        ) => same(c, d) && same(a, b) && opt(s, t),
        (
            Value::Object { class: c, args: a, kwargs: k, state: s },
            Value::Object { class: d, args: b, kwargs: l, state: t },
        ) => same(c, d) && same(a, b) && opt(k, l) && opt(s, t),
        (Value::PersistentId(x), Value::PersistentId(y)) => same(x, y),
        _ => a == b,
    }
}

fn has_kwargs(v: &Value) -> bool {
    match v {
        Value::Object { kwargs: Some(_), .. } => true,
        Value::Tuple(items) | Value::List(items) | Value::Set(items) => items.iter().any(has_kwargs),
        Value::Dict(pairs) => pairs.iter().any(|(k, v)| has_kwargs(k) || has_kwargs(v)),
        Value::Reduce { callable, args, state } => {
            has_kwargs(callable) || has_kwargs(args) || state.as_deref().is_some_and(has_kwargs)
        }
        Value::Object { class, args, state, .. } => {
            has_kwargs(class) || has_kwargs(args) || state.as_deref().is_some_and(has_kwargs)
        }
        Value::PersistentId(p) => has_kwargs(p),
        _ => false,
    }
}
