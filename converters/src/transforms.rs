//! Pure, lazy tensor transforms (being written).
