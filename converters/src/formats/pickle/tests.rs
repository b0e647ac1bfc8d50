use super::build::P;
use super::opcodes::*;
use super::*;
use crate::error::{Error, Result};
use proptest::prelude::*;
use std::path::Path;

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
        ("builtins", "eval", P::new().global("__builtin__", "eval").str("1").raw(&[TUPLE1, REDUCE]).stop()),
        ("subprocess", "Popen", P::new().global("subprocess", "Popen").raw(&[EMPTY_TUPLE, REDUCE]).stop()),
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

#[test]
fn repeated_copies_of_a_shared_container_are_bounded() {
    // d = {0: 0, ...}; then OrderedDict(d), set(l) or _codecs.encode(b) called over and over
    // on the memoised argument: 7 bytes per call, each copying the whole container.
    let calls = |p: P| p.raw(&[BINPUT, 1]).raw(&[BINGET, 0, BINGET, 1, TUPLE1, REDUCE, POP].repeat(2000));
    let dict = P::new().global("collections", "OrderedDict").raw(&[BINPUT, 0, EMPTY_DICT, MARK]);
    let dict = calls(dict.raw(&[BININT1, 0].repeat(10_000)).raw(&[SETITEMS]));
    malformed(&dict.raw(&[NONE]).stop(), "budget");
    let set = P::new().global("builtins", "set").raw(&[BINPUT, 0, EMPTY_LIST, MARK]);
    let set = calls(set.raw(&[BININT1, 0].repeat(10_000)).raw(&[APPENDS]));
    malformed(&set.raw(&[NONE]).stop(), "budget");
    let bytes = P::new().global("_codecs", "encode").raw(&[BINPUT, 0, BINBYTES]);
    let bytes = calls(bytes.raw(&200_000u32.to_le_bytes()).raw(&[7; 200_000]));
    malformed(&bytes.raw(&[NONE]).stop(), "budget");
}
