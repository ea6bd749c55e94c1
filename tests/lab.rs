//! Tests: lab (to be written).
