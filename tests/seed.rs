//! Tests: seed (to be written).
