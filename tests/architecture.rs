//! The shape of src/: no import cycle between modules (docs/architecture.md).
//!
//! The check reads src/ as text, as `cargo modules dependencies --acyclic` would read the crate, without building
//! it: every `use` tree and every `crate::`/`super::`/`self::` path in a module is an edge to the deepest module it
//! names. An edge between a module and its own ancestor or descendant is how Rust nests modules (a parent declares
//! and re-exports its children, a child uses its parent's types) and is not counted; any other edge is lifted to the
//! two siblings under the modules' common ancestor (`ssh::tunnel -> provider::libvirt::remote` is `ssh -> provider`,
//! `commands::lab -> commands::lifecycle` is `lab -> lifecycle` inside `commands`). The graph of those sibling edges
//! must have no cycle at any level. Unit-test modules (`#[cfg(test)] mod tests`) are left out: they are not part of
//! the library's flow.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Module = Vec<String>;

/// A module's path as written in messages: `crate` for the root, `a::b` otherwise.
fn name(m: &[String]) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

/// The module a file under src/ defines (None for the binary's main.rs).
fn module_of(rel: &Path) -> Option<Module> {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let file = parts.pop()?;
    match file.as_str() {
        "main.rs" if parts.is_empty() => None,
        "lib.rs" if parts.is_empty() => Some(vec![]),
        "mod.rs" => Some(parts),
        f => {
            parts.push(f.strip_suffix(".rs")?.to_string());
            Some(parts)
        }
    }
}

/// Rust source with comments, string and char literals blanked out, and unit-test modules cut.
fn code_of(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == b'r' && matches!(b.get(i + 1), Some(b'"') | Some(b'#')) && !ident_before(b, i) {
            // Raw string r"..." / r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(c as char);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == b'"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&b'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == b'\'' {
            // A char literal ('a', '\n', '\u{1F600}') or a lifetime ('a): only the first is skipped.
            let end = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..].iter().position(|&x| x == b'\'').map(|p| i + 2 + p)
            } else {
                let ch_len = src[i + 1..].chars().next().map_or(1, char::len_utf8);
                (b.get(i + 1 + ch_len) == Some(&b'\'')).then_some(i + 1 + ch_len)
            };
            match end {
                Some(e) => {
                    out.push_str("' '");
                    i = e + 1;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            let ch = src[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    // Cut `#[cfg(test)] mod NAME { ... }` blocks.
    let mut code = out;
    while let Some(at) = find_test_module(&code) {
        let open = at + code[at..].find('{').unwrap();
        let mut depth = 0;
        let mut end = code.len();
        for (k, ch) in code[open..].char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + k + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        code.replace_range(at..end, "");
    }
    code
}

fn ident_before(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

/// Where a `#[cfg(test)]` attribute stands before an inline `mod NAME {`.
fn find_test_module(code: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(p) = code[from..].find("#[cfg(test)]") {
        let at = from + p;
        let rest = code[at + "#[cfg(test)]".len()..].trim_start();
        let rest = rest.strip_prefix("pub ").unwrap_or(rest).trim_start();
        if let Some(r) = rest.strip_prefix("mod ") {
            let r = r.trim_start();
            let ident_end = r.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(r.len());
            if r[ident_end..].trim_start().starts_with('{') {
                return Some(at);
            }
        }
        from = at + 1;
    }
    None
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Sep,
    Open,
    Close,
    Comma,
    Semi,
    Star,
    Other,
}

fn tokens(code: &str) -> Vec<Tok> {
    let mut out = Vec::new();
    let mut chars = code.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            c if c.is_alphabetic() || c == '_' => {
                let mut end = i + c.len_utf8();
                while let Some(&(j, d)) = chars.peek() {
                    if d.is_alphanumeric() || d == '_' {
                        end = j + d.len_utf8();
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Tok::Ident(code[i..end].to_string()));
            }
            ':' if chars.peek().map(|&(_, d)| d) == Some(':') => {
                chars.next();
                out.push(Tok::Sep);
            }
            '{' => out.push(Tok::Open),
            '}' => out.push(Tok::Close),
            ',' => out.push(Tok::Comma),
            ';' => out.push(Tok::Semi),
            '*' => out.push(Tok::Star),
            c if c.is_whitespace() => {}
            _ => out.push(Tok::Other),
        }
    }
    out
}

/// Expand a `use` tree starting at `toks[*i]` (after `use`), with `prefix` already read; pushes full paths.
fn use_tree(toks: &[Tok], i: &mut usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let mut path = prefix;
    loop {
        match toks.get(*i) {
            Some(Tok::Ident(s)) if s == "as" => {
                *i += 2; // `as name`
                out.push(path);
                return;
            }
            Some(Tok::Ident(s)) => {
                path.push(s.clone());
                *i += 1;
            }
            Some(Tok::Sep) => *i += 1,
            Some(Tok::Star) => {
                *i += 1;
                out.push(path);
                return;
            }
            Some(Tok::Open) => {
                *i += 1;
                loop {
                    match toks.get(*i) {
                        Some(Tok::Close) => {
                            *i += 1;
                            break;
                        }
                        Some(Tok::Comma) => *i += 1,
                        None => return,
                        _ => use_tree(toks, i, path.clone(), out),
                    }
                }
                return;
            }
            _ => {
                out.push(path);
                return;
            }
        }
    }
}

/// Every path a module's code names: its `use` trees and its inline `crate::`/`super::`/`self::` paths.
fn paths_of(code: &str) -> Vec<Vec<String>> {
    let toks = tokens(code);
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Ident(s) if s == "use" => {
                i += 1;
                if toks.get(i) == Some(&Tok::Sep) {
                    i += 1;
                }
                use_tree(&toks, &mut i, Vec::new(), &mut out);
            }
            Tok::Ident(s)
                if (s == "crate" || s == "super" || s == "self")
                    && toks.get(i + 1) == Some(&Tok::Sep)
                    && !(i > 0 && toks[i - 1] == Tok::Sep) =>
            {
                let mut path = vec![s.clone()];
                let mut j = i + 1;
                while toks.get(j) == Some(&Tok::Sep) {
                    match toks.get(j + 1) {
                        Some(Tok::Ident(n)) => {
                            path.push(n.clone());
                            j += 2;
                        }
                        _ => break,
                    }
                }
                out.push(path);
                i = j;
            }
            _ => i += 1,
        }
    }
    out
}

/// The absolute module path `path` (as written in module `from`) names, or None when it is not the crate's.
fn resolve(from: &Module, path: &[String], modules: &BTreeSet<Module>) -> Option<Module> {
    let mut abs: Vec<String> = match path.first().map(String::as_str) {
        Some("crate") => Vec::new(),
        Some("self") => from.clone(),
        Some("super") => from.clone(),
        _ => return None,
    };
    let mut rest = path;
    if rest[0] == "crate" || rest[0] == "self" {
        rest = &rest[1..];
    }
    while rest.first().map(String::as_str) == Some("super") {
        abs.pop()?;
        rest = &rest[1..];
    }
    let mut deepest = abs.clone();
    for seg in rest {
        abs.push(seg.clone());
        if modules.contains(&abs) {
            deepest = abs.clone();
        } else {
            break;
        }
    }
    Some(deepest)
}

/// The sibling-level edges of src/: (parent, from child, to child) -> an example `file: path` that made it.
fn edges(src: &Path) -> BTreeMap<(Module, String, String), String> {
    let mut files = Vec::new();
    for e in walkdir::WalkDir::new(src).sort_by_file_name() {
        let e = e.unwrap();
        if e.file_type().is_file() && e.path().extension().is_some_and(|x| x == "rs") {
            let rel = e.path().strip_prefix(src).unwrap().to_path_buf();
            if let Some(m) = module_of(&rel) {
                files.push((rel, m));
            }
        }
    }
    let modules: BTreeSet<Module> = files.iter().map(|(_, m)| m.clone()).collect();
    let mut out = BTreeMap::new();
    for (rel, from) in &files {
        let code = code_of(&std::fs::read_to_string(src.join(rel)).unwrap());
        for path in paths_of(&code) {
            let Some(to) = resolve(from, &path, &modules) else { continue };
            let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if common == from.len() || common == to.len() {
                continue; // ancestor and descendant
            }
            let key = (from[..common].to_vec(), from[common].clone(), to[common].clone());
            out.entry(key).or_insert_with(|| {
                format!("src/{}: {}", rel.to_string_lossy().replace('\\', "/"), path.join("::"))
            });
        }
    }
    out
}

/// The cycles of the sibling graph, each as the sorted names of its modules (strongly connected components).
fn cycles<'a>(edges: &'a BTreeMap<(Module, String, String), String>) -> Vec<(Vec<String>, Vec<String>)> {
    let mut by_parent: BTreeMap<&'a Module, BTreeMap<&'a str, BTreeSet<&'a str>>> = BTreeMap::new();
    for (parent, a, b) in edges.keys() {
        by_parent.entry(parent).or_default().entry(a).or_default().insert(b);
        by_parent.entry(parent).or_default().entry(b).or_default();
    }
    let mut out = Vec::new();
    for (parent, graph) in by_parent {
        // Kosaraju: nodes reachable both ways from each other.
        let nodes: Vec<&'a str> = graph.keys().copied().collect();
        let reach = |start: &'a str| -> BTreeSet<&'a str> {
            let mut seen = BTreeSet::from([start]);
            let mut todo = vec![start];
            while let Some(n) = todo.pop() {
                for &m in &graph[n] {
                    if seen.insert(m) {
                        todo.push(m);
                    }
                }
            }
            seen
        };
        let reaches: BTreeMap<&str, BTreeSet<&str>> = nodes.iter().map(|&n| (n, reach(n))).collect();
        let mut done = BTreeSet::new();
        for &n in &nodes {
            if done.contains(n) {
                continue;
            }
            let scc: Vec<&str> =
                nodes.iter().copied().filter(|&m| reaches[n].contains(m) && reaches[m].contains(n)).collect();
            done.extend(scc.iter().copied());
            if scc.len() > 1 {
                let full: Vec<String> =
                    scc.iter().map(|m| name(&[parent.clone(), vec![m.to_string()]].concat())).collect();
                let why: Vec<String> = edges
                    .iter()
                    .filter(|((p, a, b), _)| {
                        p == parent && scc.contains(&a.as_str()) && scc.contains(&b.as_str())
                    })
                    .map(|((_, a, b), ex)| format!("{a} -> {b} ({ex})"))
                    .collect();
                out.push((full, why));
            }
        }
    }
    out
}

#[test]
fn the_reader_finds_use_trees_and_inline_paths_but_not_comments_or_strings() {
    let code = code_of(
        "use crate::{a::{b, c as d}, e::*};\nuse super::f;\n// use crate::zz;\nfn x() { let s = \"crate::yy\"; \
         crate::g::h(); self::i::j(); let c = '\"'; let l: &'static str = r#\"crate::q\"#; }\n\
         #[cfg(test)]\nmod tests { use crate::t; }\n",
    );
    let paths: Vec<String> = paths_of(&code).iter().map(|p| p.join("::")).collect();
    assert_eq!(paths, ["crate::a::b", "crate::a::c", "crate::e", "super::f", "crate::g::h", "self::i::j"]);
    let modules: BTreeSet<Module> =
        [vec!["a".to_string()], vec!["a".into(), "b".into()], vec!["m".into(), "n".into()]].into();
    let from = vec!["m".to_string(), "n".to_string()];
    let p = |s: &str| s.split("::").map(String::from).collect::<Vec<_>>();
    assert_eq!(resolve(&from, &p("crate::a::b::Thing"), &modules), Some(p("a::b")));
    assert_eq!(resolve(&from, &p("super::super::a::Thing"), &modules), Some(p("a")));
    assert_eq!(resolve(&from, &p("std::fs"), &modules), None);
}

#[test]
fn a_cycle_is_found_at_its_level() {
    let dir = tempfile::tempdir().unwrap();
    let w = |p: &str, s: &str| {
        let f = dir.path().join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, s).unwrap();
    };
    w("lib.rs", "mod a; mod b; mod c;");
    w("a.rs", "use crate::b::X;");
    w("b/mod.rs", "mod inner; pub struct X; use self::inner::Y;");
    w("b/inner.rs", "use crate::c::Z; use super::X;");
    w("c.rs", "pub struct Z;");
    assert!(cycles(&edges(dir.path())).is_empty(), "b -> c and a -> b, b <-> b::inner is nesting");
    w("c.rs", "pub struct Z; use crate::a::W;");
    let found = cycles(&edges(dir.path()));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, ["a", "b", "c"]);
    assert!(found[0].1.iter().any(|e| e == "b -> c (src/b/inner.rs: crate::c::Z)"), "{:?}", found[0].1);
}

#[test]
fn no_import_cycle_between_modules() {
    let src = crate::support::repo().join("src");
    let found = cycles(&edges(&src));
    let report: Vec<String> = found
        .iter()
        .map(|(scc, why)| format!("cycle {}:\n    {}", scc.join(" <-> "), why.join("\n    ")))
        .collect();
    assert!(
        report.is_empty(),
        "import cycles in src/ (docs/architecture.md says where each kind of code goes):\n{}",
        report.join("\n")
    );
}

/// What only `src/platform` may write (docs/architecture.md, "platform"): OS calls, OS-specific std modules, Linux
/// `/proc` paths and `cfg` switches on the OS. Comment lines are skipped; string literals are not (a `"/proc/...`
/// path is what it finds there).
const PLATFORM_ONLY: &[&str] = &[
    "libc::",
    "std::os::unix",
    "std::os::windows",
    "windows_sys::",
    "\"/proc/",
    "cfg(unix)",
    "cfg(windows)",
    "cfg(not(unix))",
    "cfg(not(windows))",
    "cfg(target_os",
    "cfg!(unix)",
    "cfg!(windows)",
    "cfg!(target_os",
];

/// The lines of a source text that use something only the platform layer may use: (line number, line).
fn platform_specific_lines(src: &str) -> Vec<(usize, String)> {
    src.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
        .filter(|(_, l)| PLATFORM_ONLY.iter().any(|p| l.contains(p)))
        .map(|(n, l)| (n + 1, l.trim().to_string()))
        .collect()
}

#[test]
fn the_platform_check_sees_code_but_not_comments_or_test_skips() {
    let src = "/// reads /proc/self/mounts\nlet x = unsafe { libc::geteuid() };\n#[cfg_attr(windows, ignore = \"why\")]\n\
               let t = std::fs::read(\"/proc/cpuinfo\");\n#[cfg(windows)]\n";
    let lines: Vec<usize> = platform_specific_lines(src).into_iter().map(|(n, _)| n).collect();
    assert_eq!(lines, [2, 4, 5]);
}

#[test]
fn nothing_outside_src_platform_is_platform_specific() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let platform = src.join("platform");
    let mut found = Vec::new();
    for e in walkdir::WalkDir::new(&src).sort_by_file_name() {
        let e = e.unwrap();
        if e.path().starts_with(&platform) || e.path().extension() != Some(std::ffi::OsStr::new("rs")) {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap();
        for (n, line) in platform_specific_lines(&text) {
            found.push(format!("{}:{n}: {line}", e.path().strip_prefix(&src).unwrap().display()));
        }
    }
    assert!(
        found.is_empty(),
        "OS-specific code outside src/platform (move it behind a function of src/platform/mod.rs):\n{}",
        found.join("\n")
    );
}
