//! Hand-built pickle bytes for tests of malformed and hostile input.

use super::opcodes::{BININT, BINUNICODE, GLOBAL, PROTO, STOP};

/// A pickle under construction; starts with `PROTO 2`.
pub(crate) struct P(pub(crate) Vec<u8>);

impl P {
    pub(crate) fn new() -> P {
        P(vec![PROTO, 2])
    }

    /// Raw bytes (opcodes and their arguments).
    pub(crate) fn raw(mut self, bytes: &[u8]) -> P {
        self.0.extend_from_slice(bytes);
        self
    }

    pub(crate) fn global(self, module: &str, name: &str) -> P {
        self.raw(&[GLOBAL]).raw(module.as_bytes()).raw(b"\n").raw(name.as_bytes()).raw(b"\n")
    }

    /// `BINUNICODE`.
    pub(crate) fn str(self, s: &str) -> P {
        self.raw(&[BINUNICODE]).raw(&(s.len() as u32).to_le_bytes()).raw(s.as_bytes())
    }

    /// `BININT`.
    pub(crate) fn int(self, i: i32) -> P {
        self.raw(&[BININT]).raw(&i.to_le_bytes())
    }

    pub(crate) fn stop(self) -> Vec<u8> {
        self.raw(&[STOP]).0
    }
}
