//! Showing user input in messages: [`shown`] is the one helper every error that echoes a value from a file, a
//! flag or the machine's state goes through, so a value can neither drive the terminal (escape sequences, bidi
//! overrides) nor flood it.

/// Characters shown of one echoed value; the rest is counted, not printed.
pub(crate) const MAX_SHOWN: usize = 100;

/// Control characters (C0, DEL, C1), Unicode bidirectional controls and line/paragraph separators.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
        || matches!(c, '\u{2028}' | '\u{2029}')
}

/// A value as it may appear in a message: unsafe characters written as `\u{1b}` escapes, cut after
/// [`MAX_SHOWN`] characters with how many more there were.
pub(crate) fn shown(s: &str) -> String {
    let total = s.chars().count();
    let mut out = escaped(&s.chars().take(MAX_SHOWN).collect::<String>());
    if total > MAX_SHOWN {
        out.push_str(&format!("…({} more characters)", total - MAX_SHOWN));
    }
    out
}

/// [`shown`] without the cut, for a value that is the output itself (a path in a table), not echoed in a message.
pub(crate) fn escaped(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if is_unsafe(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// `%XX` decoding; None on a malformed escape or a result that is not UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_control_and_bidi_and_cuts() {
        assert_eq!(shown("lab"), "lab");
        assert_eq!(shown("a\u{1b}[31mb\u{7}"), "a\\u{1b}[31mb\\u{7}");
        assert_eq!(shown("x\u{202e}y\u{9b}"), "x\\u{202e}y\\u{9b}");
        assert_eq!(shown("é"), "é");
        let long = "a".repeat(MAX_SHOWN + 5);
        assert_eq!(shown(&long), format!("{}…(5 more characters)", "a".repeat(MAX_SHOWN)));
    }
}
