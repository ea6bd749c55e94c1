//! Tests: ssh (to be written).
