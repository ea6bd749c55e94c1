//! Tests: vm (to be written).
