//! Restricted pickle reader and writer (being written).
