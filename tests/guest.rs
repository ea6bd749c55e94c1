//! Tests: guest (to be written).
