//! Tests: virtualbox (to be written).
