//! Locating `VBoxManage` on Linux, macOS and Windows hosts.
//!
//! The search is a pure function of the environment and an `exists` probe, so the Windows rules are unit-tested on
//! any host.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The conventional Windows install location, used when nothing else names one.
pub const WINDOWS_DEFAULT: &str = r"C:\Program Files\Oracle\VirtualBox\VBoxManage.exe";

/// Where VBoxManage is, in this order: the configured path (kept even if missing, so the user sees their own path
/// in the error), each `PATH` entry, then on Windows `%VBOX_MSI_INSTALL_PATH%`, `%VBOX_INSTALL_PATH%`,
/// `%ProgramFiles%\Oracle\VirtualBox` and [`WINDOWS_DEFAULT`].
pub fn locate(
    configured: Option<&Path>,
    windows: bool,
    env: impl Fn(&str) -> Option<OsString>,
    exists: impl Fn(&Path) -> bool,
) -> Option<PathBuf> {
    if let Some(p) = configured {
        return Some(p.to_path_buf());
    }
    let exe = if windows { "VBoxManage.exe" } else { "VBoxManage" };
    let sep = if windows { ';' } else { ':' };
    let path_var = env("PATH").map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    let from_path = path_var
        .split(sep)
        // Windows PATH entries may be quoted (they can contain ';').
        .map(|d| d.trim().trim_matches('"'))
        .filter(|d| !d.is_empty())
        .map(|d| join(d, exe, windows));
    let windows_dirs = if windows {
        {
            ["VBOX_MSI_INSTALL_PATH", "VBOX_INSTALL_PATH"]
                .into_iter()
                .filter_map(&env)
                .chain(
                    env("ProgramFiles")
                        .map(|pf| OsString::from(join(&pf.to_string_lossy(), r"Oracle\VirtualBox", true))),
                )
                .map(|d| join(d.to_string_lossy().trim().trim_matches('"'), exe, true))
                .chain(std::iter::once(PathBuf::from(WINDOWS_DEFAULT)))
                .collect::<Vec<_>>()
        }
    } else {
        Default::default()
    };
    from_path.chain(windows_dirs).find(|p| exists(p))
}

/// `dir` + `file` with the target's separator (Windows paths are built as strings so they stay exact on any host).
fn join(dir: &str, file: &str, windows: bool) -> PathBuf {
    if windows {
        PathBuf::from(format!("{}\\{}", dir.trim_end_matches(['\\', '/']), file))
    } else {
        Path::new(dir).join(file)
    }
}

/// A file we may run: a regular file, executable on Unix.
pub fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| crate::platform::is_executable(&m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn run(
        configured: Option<&str>,
        windows: bool,
        env: &[(&str, &str)],
        present: &[&str],
    ) -> Option<String> {
        let env: HashMap<String, OsString> =
            env.iter().map(|(k, v)| (k.to_string(), OsString::from(v))).collect();
        locate(
            configured.map(Path::new),
            windows,
            |k| env.get(k).cloned(),
            |p| present.contains(&p.to_string_lossy().as_ref()),
        )
        .map(|p| p.to_string_lossy().into_owned())
    }

    #[test]
    fn configured_path_wins_even_when_missing() {
        let got = run(Some("/opt/vb/VBoxManage"), false, &[("PATH", "/usr/bin")], &["/usr/bin/VBoxManage"]);
        assert_eq!(got.as_deref(), Some("/opt/vb/VBoxManage"));
    }

    #[test]
    #[cfg_attr(windows, ignore = "windows: Unix paths (/usr/bin) are not absolute there")]
    fn unix_path_search_in_order() {
        let present = ["/usr/local/bin/VBoxManage", "/usr/bin/VBoxManage"];
        let got = run(None, false, &[("PATH", "/nope::/usr/local/bin:/usr/bin")], &present);
        assert_eq!(got.as_deref(), Some("/usr/local/bin/VBoxManage"));
        assert_eq!(run(None, false, &[("PATH", "/usr/sbin")], &present), None);
        // Windows locations are not searched on Unix.
        assert_eq!(run(None, false, &[("VBOX_MSI_INSTALL_PATH", "/usr/bin")], &present), None);
    }

    #[test]
    fn windows_msi_install_path_with_spaces_and_trailing_backslash() {
        let exe = r"D:\Virtual Box\VBoxManage.exe";
        let env =
            [("PATH", r"C:\Windows\system32;C:\Windows"), ("VBOX_MSI_INSTALL_PATH", r"D:\Virtual Box\")];
        assert_eq!(run(None, true, &env, &[exe, WINDOWS_DEFAULT]).as_deref(), Some(exe));
    }

    #[test]
    fn windows_path_entry_beats_install_dirs_and_quotes_are_stripped() {
        let exe = r"E:\tools\vbox\VBoxManage.exe";
        let env = [("PATH", r#"C:\Windows;"E:\tools\vbox""#), ("VBOX_MSI_INSTALL_PATH", r"D:\VB")];
        assert_eq!(run(None, true, &env, &[exe, r"D:\VB\VBoxManage.exe"]).as_deref(), Some(exe));
    }

    #[test]
    fn windows_program_files_then_default() {
        let pf = r"F:\Programs\Oracle\VirtualBox\VBoxManage.exe";
        let env = [("PATH", r"C:\Windows"), ("ProgramFiles", r"F:\Programs")];
        assert_eq!(run(None, true, &env, &[pf, WINDOWS_DEFAULT]).as_deref(), Some(pf));
        assert_eq!(run(None, true, &env, &[WINDOWS_DEFAULT]).as_deref(), Some(WINDOWS_DEFAULT));
        assert_eq!(run(None, true, &env, &[]), None);
        // A Unix-style name without .exe is not what Windows runs.
        assert_eq!(run(None, true, &[("PATH", r"C:\vb")], &[r"C:\vb\VBoxManage"]), None);
    }
}
