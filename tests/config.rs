//! Tests: config (to be written).
