//! The ranges every size and duration must fall in, shared by box-config.toml checks and the command-line flags
//! (clap's `value_parser!(u64).range(..)` takes these constants), so a value refused in one place is refused in the
//! other with the same bounds. Out-of-range values are errors, never clamped: a typo'd `memory_mb = 40960000`
//! must not boot a machine, and no deadline may overflow `Instant` arithmetic.

/// CPUs of the guest.
pub const CPUS_MIN: u64 = 1;
pub const CPUS_MAX: u64 = 256;
/// Guest memory in MiB: 256 MiB to 4 TiB.
pub const MEMORY_MB_MIN: u64 = 256;
pub const MEMORY_MB_MAX: u64 = 4 * 1024 * 1024;
/// Disk size in GiB: 2 GiB to 64 TiB (qcow2's own limit).
pub const DISK_GB_MIN: u64 = 2;
pub const DISK_GB_MAX: u64 = 64 * 1024;
/// Every duration in seconds (timeouts, deadlines): 1 s to one day.
pub const SECS_MIN: u64 = 1;
pub const SECS_MAX: u64 = 86_400;
/// Requests of one `load` run.
pub const REQUESTS_MAX: u64 = 10_000_000;
/// Concurrent `load` workers.
pub const CONCURRENCY_MAX: u64 = 256;

/// `"from MIN to MAX UNIT"`, as every range error words it.
pub fn range_text(min: u64, max: u64, unit: &str) -> String {
    format!("from {min} to {max}{unit}")
}
