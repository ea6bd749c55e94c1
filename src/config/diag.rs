//! Diagnostics for box-config.toml: decoding (UTF-8 only, with the reasons a file is not), positions
//! (`FILE:LINE:COL`) of keys and values found through `toml_edit` spans, and rewording of serde's messages into
//! what a user of the file understands ("unknown key `cpu` in [machine]; expected one of: ...").

use std::fmt;
use std::ops::Range;

use serde::Serialize;

use crate::text::shown;

/// One finding about the config, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub file: String,
    /// 1-based line and column (characters) of the offending key or value; None when the config did not come
    /// from a file (built in code).
    pub line: Option<usize>,
    pub col: Option<usize>,
    pub message: String,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// A non-fatal finding (e.g. a port forwarded on a non-loopback address).
pub type Warning = Diagnostic;

impl Diagnostic {
    /// `FILE:LINE:COL` (or just `FILE`).
    pub fn location(&self) -> String {
        match (self.line, self.col) {
            (Some(l), Some(c)) => format!("{}:{l}:{c}", self.file),
            _ => self.file.clone(),
        }
    }
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location(), self.message)?;
        if let Some(h) = &self.hint {
            write!(f, "\nhint: {h}")?;
        }
        Ok(())
    }
}

/// Everything wrong with a config file, in file order (one per line). `validate --json` downcasts to this to list
/// them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.diagnostics.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    pub diagnostics: Vec<Diagnostic>,
}

/// Decode the file's bytes: UTF-8, with an optional BOM. UTF-16 and invalid UTF-8 say where and what to do.
pub(super) fn decode<'a>(file: &str, bytes: &'a [u8]) -> Result<&'a str, Diagnostic> {
    let save = "save the file as UTF-8 (in most editors: \"Save with encoding\" > UTF-8)";
    let utf16 = |order: &str, how: &str| Diagnostic {
        file: file.to_string(),
        line: Some(1),
        col: Some(1),
        message: format!("the file is UTF-16 ({order}, {how}), not UTF-8"),
        hint: Some(save.to_string()),
    };
    if bytes.starts_with(b"\xFF\xFE") {
        return Err(utf16("little-endian", "byte order mark FF FE"));
    }
    if bytes.starts_with(b"\xFE\xFF") {
        return Err(utf16("big-endian", "byte order mark FE FF"));
    }
    // UTF-16 without a BOM: ASCII interleaved with NULs.
    if bytes.len() >= 2 && bytes.len() % 2 == 0 {
        let (even, odd): (Vec<_>, Vec<_>) = bytes.chunks_exact(2).map(|p| (p[0], p[1])).unzip();
        let nul_share = |v: &[u8]| v.iter().filter(|b| **b == 0).count() * 4 >= v.len() * 3;
        if nul_share(&odd) && !nul_share(&even) {
            return Err(utf16("little-endian", "no byte order mark"));
        }
        if nul_share(&even) && !nul_share(&odd) {
            return Err(utf16("big-endian", "no byte order mark"));
        }
    }
    let body = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let text = std::str::from_utf8(body).map_err(|e| {
        let good = e.valid_up_to();
        let prefix = std::str::from_utf8(&body[..good]).expect("valid prefix");
        let (line, col) = line_col(prefix, good);
        let offset = good + (bytes.len() - body.len());
        Diagnostic {
            file: file.to_string(),
            line: Some(line),
            col: Some(col),
            message: format!("invalid UTF-8 at byte {offset} (0x{:02X})", body[good]),
            hint: Some(save.to_string()),
        }
    })?;
    // TOML allows a carriage return only before a line feed: a file saved with old Mac (CR-only) line endings
    // is one long line to the parser, whose message at the first CR would be empty or misleading.
    if let Some(at) =
        text.match_indices('\r').map(|(i, _)| i).find(|&i| text.as_bytes().get(i + 1) != Some(&b'\n'))
    {
        let (line, col) = line_col(text, at);
        return Err(Diagnostic {
            file: file.to_string(),
            line: Some(line),
            col: Some(col),
            message: "a carriage return (CR) without a line feed: TOML lines end with LF or CR LF, and this file \
                      has CR-only (old Mac) line endings"
                .to_string(),
            hint: Some(
                "save the file with LF (Unix) or CR LF (Windows) line endings (in most editors: \"Line endings\" > \
                 LF)"
                .to_string(),
            ),
        });
    }
    Ok(text)
}

/// 1-based line and character column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut off = offset.min(text.len());
    while !text.is_char_boundary(off) {
        off -= 1;
    }
    let before = &text[..off];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

/// A key, value or table header found in the document, with its spans.
struct Entry {
    path: Vec<Seg>,
    spans: Vec<Range<usize>>,
}

/// Positions in the decoded text of one config file.
pub(super) struct Source<'a> {
    pub file: String,
    /// None for a config built in code: diagnostics then name only the file.
    text: Option<&'a str>,
    doc: Option<toml_edit::ImDocument<&'a str>>,
    /// Why the text does not parse as TOML (then `doc` is None).
    syntax: Option<toml_edit::TomlError>,
    /// For one machine of a `[[machine]]` file: where the machine's own tables and keys live (`machine` →
    /// `machine.2`, `forward` → `machine.2.forward`, `ssh.host_port` → `machine.2.ssh_port`, `machine.cpus` →
    /// `defaults.cpus` when inherited, ...), so a rule on the machine points where the value is written. The
    /// longest matching prefix wins.
    remap: Vec<(Vec<String>, Vec<String>)>,
}

impl<'a> Source<'a> {
    /// The text parsed once: its positions, and through [`Source::deserialize`] the typed model.
    pub(super) fn new(file: &str, text: Option<&'a str>) -> Self {
        let parsed = text.map(toml_edit::ImDocument::parse);
        let (doc, syntax) = match parsed {
            Some(Ok(doc)) => (Some(doc), None),
            Some(Err(e)) => (None, Some(e)),
            None => (None, None),
        };
        Self { file: file.to_string(), text, doc, syntax, remap: Vec::new() }
    }

    /// The typed model of the document parsed in [`Source::new`] (no second parse), or the positioned reason it
    /// is not one (a syntax error, a missing key, a wrong type, ...).
    pub(super) fn deserialize<T: serde::de::DeserializeOwned>(&self) -> Result<T, Diagnostic> {
        let result = match (&self.doc, &self.syntax) {
            (Some(doc), _) => T::deserialize(toml_edit::de::Deserializer::from(doc.clone())),
            (None, Some(e)) => Err(toml_edit::de::Error::from(e.clone())),
            (None, None) => T::deserialize(toml_edit::de::Deserializer::from(
                toml_edit::ImDocument::parse("").expect("the empty document parses"),
            )),
        };
        result.map_err(|e| from_toml_error(self, &e))
    }

    /// Whether `machine` is an array of tables (a `[[machine]]` file) rather than one table.
    pub(super) fn is_multi(&self) -> bool {
        self.doc.as_ref().and_then(|d| d.get("machine")).is_some_and(|m| {
            matches!(
                m,
                toml_edit::Item::ArrayOfTables(_) | toml_edit::Item::Value(toml_edit::Value::Array(_))
            )
        })
    }

    /// The decoded text.
    pub(super) fn text(&self) -> Option<&'a str> {
        self.text
    }

    /// Look paths starting with `from` up under `to` instead (see the `remap` field).
    pub(super) fn with_remap(mut self, remap: Vec<(Vec<String>, Vec<String>)>) -> Self {
        self.remap = remap;
        self
    }

    /// A diagnostic at a byte offset.
    pub(super) fn at(&self, offset: usize, message: impl Into<String>) -> Diagnostic {
        let pos = self.text.map(|t| line_col(t, offset));
        Diagnostic {
            file: self.file.clone(),
            line: pos.map(|p| p.0),
            col: pos.map(|p| p.1),
            message: message.into(),
            hint: None,
        }
    }

    /// A diagnostic at the value of a key path (e.g. `["forward", "2", "host"]`: numeric segments index arrays).
    /// Falls back to the nearest ancestor that is in the file, then to the top of the file.
    /// A key a machine's own table does not set is looked up in the shared table next (a machine's
    /// `[machine.provision]` without `guest_path` uses `[provision] guest_path`).
    pub(super) fn at_path(&self, path: &[&str], message: impl Into<String>) -> Diagnostic {
        let offset = self
            .span_of(path)
            .or_else(|| self.span_unmapped(path))
            .or_else(|| (0..path.len()).rev().find_map(|n| self.span_of(&path[..n])))
            .map_or(0, |r| r.start);
        self.at(offset, message)
    }

    /// Span of the value (or table header) at `path`.
    pub(super) fn span_of(&self, path: &[&str]) -> Option<Range<usize>> {
        if path.is_empty() {
            return None;
        }
        let prefix_of =
            |from: &[String]| from.len() <= path.len() && from.iter().zip(path).all(|(a, b)| a == b);
        let mapped: Vec<&str> =
            match self.remap.iter().filter(|(from, _)| prefix_of(from)).max_by_key(|(from, _)| from.len()) {
                Some((from, to)) => {
                    to.iter().map(String::as_str).chain(path[from.len()..].iter().copied()).collect()
                }
                None => path.to_vec(),
            };
        self.span_unmapped(&mapped)
    }

    /// Whether the file writes a value at `path` (remapped for a machine, else in the shared table).
    pub(super) fn written(&self, path: &[&str]) -> bool {
        self.span_of(path).or_else(|| self.span_unmapped(path)).is_some()
    }

    /// Span at `path` as written, without the machine's remapping.
    fn span_unmapped(&self, path: &[&str]) -> Option<Range<usize>> {
        if path.is_empty() {
            return None;
        }
        let mut node = Node::Item(self.doc.as_ref()?.as_item());
        for seg in path {
            node = node.child(seg)?;
        }
        node.span()
    }

    /// Whether the value at `path` (as written) is a TOML datetime (serde reports one as a table).
    fn is_datetime(&self, path: &[Seg]) -> bool {
        let Some(doc) = &self.doc else { return false };
        let mut node = Node::Item(doc.as_item());
        for seg in path {
            let s = match seg {
                Seg::Key(k) => k.clone(),
                Seg::Index(i) => i.to_string(),
            };
            match node.child(&s) {
                Some(n) => node = n,
                None => return false,
            }
        }
        matches!(
            node,
            Node::Item(toml_edit::Item::Value(toml_edit::Value::Datetime(_)))
                | Node::Value(toml_edit::Value::Datetime(_))
        )
    }

    /// The key path of the innermost key, value or table header covering `offset`.
    pub(super) fn path_at(&self, offset: usize) -> Vec<Seg> {
        let Some(doc) = &self.doc else { return vec![] };
        let mut entries = Vec::new();
        collect_table(doc.as_table(), &mut vec![], &mut entries);
        entries
            .into_iter()
            .filter(|e| e.spans.iter().any(|r| r.contains(&offset) || r.start == offset))
            .max_by_key(|e| e.path.len())
            .map(|e| e.path)
            .unwrap_or_default()
    }
}

/// A step of the walk down a `toml_edit` document.
#[derive(Clone, Copy)]
enum Node<'d> {
    Item(&'d toml_edit::Item),
    Table(&'d toml_edit::Table),
    Value(&'d toml_edit::Value),
}

impl<'d> Node<'d> {
    fn child(self, seg: &str) -> Option<Node<'d>> {
        match self {
            Node::Item(toml_edit::Item::ArrayOfTables(a)) => a.get(seg.parse().ok()?).map(Node::Table),
            Node::Item(toml_edit::Item::Value(v)) | Node::Value(v) => match v {
                toml_edit::Value::Array(a) => a.get(seg.parse().ok()?).map(Node::Value),
                toml_edit::Value::InlineTable(t) => t.get(seg).map(Node::Value),
                _ => None,
            },
            Node::Item(i) => i.as_table_like()?.get(seg).map(Node::Item),
            Node::Table(t) => t.get(seg).map(Node::Item),
        }
    }

    fn span(self) -> Option<Range<usize>> {
        match self {
            Node::Item(toml_edit::Item::ArrayOfTables(a)) => a.span().or_else(|| a.get(0)?.span()),
            // An implicit table (`[box.debian]` without `[box]`) has no span of its own: use its first entry's.
            Node::Item(i) => i.span().or_else(|| {
                let t = i.as_table_like()?;
                t.iter()
                    .filter_map(|(k, v)| t.get_key_value(k)?.0.span().or(v.span()))
                    .min_by_key(|r| r.start)
            }),
            Node::Table(t) => t.span(),
            Node::Value(v) => v.span(),
        }
    }
}

fn collect_table(t: &dyn toml_edit::TableLike, path: &mut Vec<Seg>, out: &mut Vec<Entry>) {
    for (k, item) in t.iter() {
        let key_span = t.get_key_value(k).and_then(|(key, _)| key.span());
        path.push(Seg::Key(k.to_string()));
        out.push(Entry { path: path.clone(), spans: key_span.into_iter().chain(item.span()).collect() });
        collect_item(item, path, out);
        path.pop();
    }
}

fn collect_item(item: &toml_edit::Item, path: &mut Vec<Seg>, out: &mut Vec<Entry>) {
    match item {
        toml_edit::Item::Table(t) => collect_table(t, path, out),
        toml_edit::Item::ArrayOfTables(a) => {
            for (i, t) in a.iter().enumerate() {
                path.push(Seg::Index(i));
                out.push(Entry { path: path.clone(), spans: t.span().into_iter().collect() });
                collect_table(t, path, out);
                path.pop();
            }
        }
        toml_edit::Item::Value(v) => collect_value(v, path, out),
        toml_edit::Item::None => {}
    }
}

fn collect_value(v: &toml_edit::Value, path: &mut Vec<Seg>, out: &mut Vec<Entry>) {
    match v {
        toml_edit::Value::InlineTable(t) => collect_table(t, path, out),
        toml_edit::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                path.push(Seg::Index(i));
                out.push(Entry { path: path.clone(), spans: v.span().into_iter().collect() });
                collect_value(v, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

/// Reword a parse or serde error from `toml` into a positioned diagnostic that says what is expected.
fn from_toml_error(src: &Source, e: &toml_edit::de::Error) -> Diagnostic {
    let offset = e.span().map_or(0, |r| r.start);
    let msg = e.message().trim();
    let path = src.path_at(offset);
    let (mut message, mut hint) = reword(msg, &path);
    if src.is_datetime(&path) && message.ends_with(", found a table") {
        message = format!("{}, found a datetime", message.trim_end_matches(", found a table"));
        if message.contains("expected a string") {
            hint =
                Some("TOML reads an unquoted date or time as a datetime: write the value in quotes".into());
        }
    }
    let mut d = src.at(offset, message);
    d.hint = hint;
    d
}

/// Keys the file must have at the top level (serde reports these as missing with the whole file's span).
const ROOT_REQUIRED: &[&str] = &["machine", "box"];

fn reword(msg: &str, path: &[Seg]) -> (String, Option<String>) {
    let first_line = msg.lines().next().unwrap_or(msg);
    let ticked: Vec<String> = backticked(first_line).iter().map(|t| shown(t)).collect();
    let key = path.last().map(seg_name).unwrap_or_default();
    let parent = table_name(&path[..path.len().saturating_sub(1)]);
    if let Some(rest) = first_line.strip_prefix("unknown field ") {
        let unknown = ticked.first().cloned().unwrap_or_default();
        let expected = &ticked[1.min(ticked.len())..];
        let list =
            if rest.contains("there are no fields") { "(none)".to_string() } else { expected.join(", ") };
        // The table the unknown key is in: the path up to the key itself (the innermost entry at the
        // position may be below it, e.g. `[[forward]]` #1 for a top-level key `forward`).
        let parent = match path.iter().rposition(|s| matches!(s, Seg::Key(k) if shown(k) == unknown)) {
            Some(at) => table_name(&path[..at]),
            None => parent,
        };
        let multi_top = parent == "the top level" && expected.iter().any(|k| k == "defaults");
        let hint = match closest(&unknown, expected) {
            _ if multi_top && unknown == "forward" => {
                "in a file of several machines a forward belongs to one \
                machine: write it as [[machine.forward]] after that machine's [[machine]] table"
                    .to_string()
            }
            Some(s) => format!("did you mean `{s}`?"),
            None => format!("remove `{unknown}` or move it to the table it belongs to"),
        };
        let place = if parent == "the top level" { "at" } else { "in" };
        return (format!("unknown key `{unknown}` {place} {parent}; expected one of: {list}"), Some(hint));
    }
    if first_line.starts_with("unknown variant ") {
        let bad = ticked.first().cloned().unwrap_or_default();
        let allowed = ticked[1.min(ticked.len())..].join(", ");
        return (
            format!("bad value \"{bad}\" for `{key}` in {parent}; expected one of: {allowed}"),
            Some(format!("set `{key}` to one of: {allowed}")),
        );
    }
    if first_line.starts_with("missing field ") {
        let field = ticked.first().cloned().unwrap_or_default();
        let (what, place) = if ROOT_REQUIRED.contains(&field.as_str()) {
            (format!("table [{field}]"), String::new())
        } else {
            (format!("key `{field}`"), format!(" in {}", table_name(path)))
        };
        return (
            format!("missing required {what}{place}"),
            Some(format!("add the {what}; see docs/box-config.md")),
        );
    }
    if let Some(rest) = first_line.strip_prefix("invalid type: ") {
        if let Some((found, expected)) = rest.split_once(", expected ") {
            let what = if path.is_empty() { "value".to_string() } else { format!("`{key}` in {parent}") };
            return (
                format!(
                    "wrong type for {what}: expected {}, found {}",
                    type_phrase(expected),
                    found_phrase(found)
                ),
                None,
            );
        }
    }
    if let Some(rest) = first_line.strip_prefix("invalid value: integer ") {
        if let Some((value, expected)) = rest.split_once(", expected ") {
            let value = shown(value.trim_matches('`'));
            let range = match expected {
                "u16" => "from 0 to 65535".to_string(),
                "u32" => "from 0 to 4294967295".to_string(),
                "u64" => "from 0 to 18446744073709551615".to_string(),
                other => format!("({other})"),
            };
            return (
                format!("`{key}` in {parent} is out of range: expected an integer {range}, found {value}"),
                None,
            );
        }
    }
    if first_line.starts_with("number too large") {
        // The document does not parse, so no key path is known here; the position points at the number.
        return (
            "integer out of range: a TOML integer is at most 9223372036854775807".to_string(),
            Some("see docs/box-config.md for the range of each key".into()),
        );
    }
    // Syntax errors: toml's message is already specific ("invalid table header\nexpected `.`, `]`").
    let text = msg.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
    if text.is_empty() {
        return (
            "this is not valid TOML".to_string(),
            Some(
                "see docs/box-config.md for the file's syntax (key = value lines under [table] headers)"
                    .into(),
            ),
        );
    }
    (shown(&text), None)
}

fn backticked(s: &str) -> Vec<String> {
    s.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

fn seg_name(s: &Seg) -> String {
    match s {
        Seg::Key(k) => shown(k),
        Seg::Index(i) => format!("#{}", i + 1),
    }
}

/// How a table is named in messages: `[machine]`, `[box.debian]`, `[[forward]] #2`, `the top level`.
pub(super) fn table_name(path: &[Seg]) -> String {
    if path.is_empty() {
        return "the top level".into();
    }
    match path.last() {
        Some(Seg::Index(i)) => {
            let keys: Vec<String> = path[..path.len() - 1].iter().map(seg_name).collect();
            format!("[[{}]] #{}", keys.join("."), i + 1)
        }
        _ => format!("[{}]", path.iter().map(seg_name).collect::<Vec<_>>().join(".")),
    }
}

fn type_phrase(expected: &str) -> String {
    match expected {
        "u8" | "u16" | "u32" | "u64" | "i8" | "i16" | "i32" | "i64" => "an integer".into(),
        "a string" | "path string" | "a borrowed string" => "a string".into(),
        "a boolean" => "a boolean (true or false)".into(),
        "a sequence" => "an array".into(),
        e if e.starts_with("struct ") || e == "a map" => "a table".into(),
        e if e.starts_with("enum ") => "a string".into(),
        other => other.into(),
    }
}

fn found_phrase(found: &str) -> String {
    let kind = found.split([' ', '`', '"']).next().unwrap_or(found);
    match kind {
        "string" => "a string".into(),
        "integer" => "an integer".into(),
        "floating" => "a float".into(),
        "boolean" => "a boolean".into(),
        "sequence" => "an array".into(),
        "map" => "a table".into(),
        _ => shown(found),
    }
}

/// The candidate closest to `word` by edit distance (optimal string alignment: insertions, deletions,
/// substitutions and swaps of neighbours cost 1), if it is close enough to be a typo.
pub(super) fn closest<'c>(word: &str, candidates: &'c [String]) -> Option<&'c str> {
    candidates
        .iter()
        .map(|c| (strsim::osa_distance(word, c), c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(line_col("ab\ncé d", 7), (2, 4));
        assert_eq!(line_col("", 0), (1, 1));
    }

    #[test]
    fn closest_finds_typos_only() {
        let c: Vec<String> = ["name", "cpus", "memory_mb"].iter().map(|s| s.to_string()).collect();
        assert_eq!(closest("cpu", &c), Some("cpus"));
        assert_eq!(closest("memory", &c), Some("memory_mb"));
        assert_eq!(closest("zzzzzz", &c), None);
        assert_eq!(closest("cpsu", &c), Some("cpus"));
    }

    #[test]
    fn utf16_without_bom_is_detected() {
        let le: Vec<u8> = "[machine]\n".bytes().flat_map(|b| [b, 0]).collect();
        assert!(decode("f", &le).unwrap_err().message.contains("UTF-16 (little-endian"));
        let be: Vec<u8> = "[machine]\n".bytes().flat_map(|b| [0, b]).collect();
        assert!(decode("f", &be).unwrap_err().message.contains("UTF-16 (big-endian"));
    }
}
