//! Tests: live_stack (to be written).
