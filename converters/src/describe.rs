//! Architecture description (being written).
