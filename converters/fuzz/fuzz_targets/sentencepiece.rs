//! Arbitrary bytes as a SentencePiece `ModelProto` (a `.nemo`'s `tokenizer.model` artifact):
//! parsing and counting return Ok or a named error, never panic; an accepted model takes NeVA's
//! `<extra_id_*>` pieces (unless it has one already) and gives back exactly its own bytes when
//! they are removed again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardsmith_converters::convert::sentencepiece::SentencePieceModel;
use shardsmith_converters::describe::sentencepiece_pieces;
use shardsmith_converters::names::neva::EXTRA_IDS;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let counted = sentencepiece_pieces(data);
    let Ok(sp) = SentencePieceModel::parse(data.to_vec(), Path::new("fuzz.model")) else { return };
    assert_eq!(counted, Some(sp.len()), "the counter and the parser agree on the pieces");
    if let Ok(grown) = sp.with_user_defined(&EXTRA_IDS, Path::new("fuzz.model")) {
        assert_eq!(grown.len(), sp.len() + EXTRA_IDS.len());
        let back = grown.without_appended(&EXTRA_IDS, Path::new("fuzz.model")).expect("we appended them");
        assert_eq!(back.bytes(), sp.bytes());
    }
});
