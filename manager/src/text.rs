//! Strings that others choose and the operator's terminal shows: what registration
//! accepts, and how the CLI prints the rest.
//!
//! A delegate names itself, its host, its version, tags and targets; a task's output and
//! result message come from whatever it ran. Printed raw, an escape sequence in any of
//! them rewrites the admin's terminal (a registered name once did). So
//! registration refuses control and invisible formatting characters in what it stores,
//! with a message naming the field ([`check_register`]); and the CLI escapes them in
//! everything it prints for people ([`shown`]), also what was stored before this check
//! existed, and in task logs written to a terminal ([`EscapeWriter`]).

use std::borrow::Cow;
use std::io::{self, Write};

use delegate_protocol::RegisterRequest;

/// Characters a terminal acts on or a reader cannot see: controls (C0, DEL, C1) and the
/// invisible formatting ones that reorder or hide text (bidi overrides and isolates,
/// zero-width characters, the BOM).
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{061C}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}')
}

/// `s` as it may be shown on one line: every unsafe character (newlines and tabs too)
/// written as a `\u{…}` escape.
pub fn shown(s: &str) -> Cow<'_, str> {
    escape(s, false)
}

/// Like [`shown`], but keeps line breaks (for multi-line text such as an error chain).
pub fn shown_lines(s: &str) -> Cow<'_, str> {
    escape(s, true)
}

fn escape(s: &str, keep_newlines: bool) -> Cow<'_, str> {
    let bad = |c: char| is_unsafe(c) && !(keep_newlines && c == '\n');
    if !s.chars().any(bad) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if bad(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A registration refused: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct BadField {
    pub field: String,
    pub why: String,
}

fn bad(field: impl Into<String>, why: impl Into<String>) -> BadField {
    BadField {
        field: field.into(),
        why: why.into(),
    }
}

/// A value shown in tables: 1..=`max` characters, none of them unsafe, no space at
/// either end.
fn printable(field: &str, value: &str, max: usize) -> Result<(), BadField> {
    if value.is_empty() {
        return Err(bad(field, "is empty"));
    }
    if value.chars().count() > max {
        return Err(bad(field, format!("is longer than {max} characters")));
    }
    if let Some(c) = value.chars().find(|c| is_unsafe(*c)) {
        return Err(bad(
            field,
            format!(
                "{:?} holds the control or invisible character {}; use printable characters",
                shown(value),
                c.escape_unicode()
            ),
        ));
    }
    if value.trim() != value {
        return Err(bad(
            field,
            format!("{value:?} starts or ends with white space"),
        ));
    }
    Ok(())
}

/// ASCII letters, digits and `extra`, 1..=`max` of them.
fn ascii_word(field: &str, value: &str, max: usize, extra: &str) -> Result<(), BadField> {
    printable(field, value, max)?;
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || extra.contains(*c)))
    {
        return Err(bad(
            field,
            format!(
                "{value:?} holds {c:?}; use ASCII letters, digits and any of {:?}",
                extra
            ),
        ));
    }
    Ok(())
}

/// Most tags (and targets) a delegate may register.
const MAX_LIST: usize = 64;

/// What a delegate may register as: names, hostnames, versions, tags and targets that a
/// table can show as they are, so no registration can drive an operator's terminal.
pub fn check_register(req: &RegisterRequest) -> Result<(), BadField> {
    printable("name", &req.name, 128)?;
    ascii_word("hostname", &req.hostname, 253, "-._")?;
    ascii_word("version", &req.version, 64, ".+-~_")?;
    if req.tags.len() > MAX_LIST {
        return Err(bad("tags", format!("more than {MAX_LIST} tags")));
    }
    for (i, tag) in req.tags.iter().enumerate() {
        let field = format!("tags[{i}]");
        printable(&field, tag, 64)?;
        if tag.contains(|c: char| c == ',' || c.is_whitespace()) {
            return Err(bad(field, format!("{tag:?} holds a comma or white space")));
        }
    }
    if req.targets.len() > MAX_LIST {
        return Err(bad("targets", format!("more than {MAX_LIST} targets")));
    }
    for (i, t) in req.targets.iter().enumerate() {
        ascii_word(&format!("targets[{i}].kind"), &t.kind, 32, "-_")?;
        if let Some(name) = &t.name {
            printable(&format!("targets[{i}].name"), name, 128)?;
        }
    }
    Ok(())
}

/// Writes bytes through with every unsafe character but newline and tab escaped (`\u{…}`,
/// and `\x..` for a byte that is not UTF-8): for a task's log on a terminal. A character
/// split across two writes is held back until its end arrives; call [`finish`] at the
/// end.
///
/// [`finish`]: EscapeWriter::finish
pub struct EscapeWriter<W: Write> {
    inner: W,
    /// The start of a UTF-8 sequence whose end has not arrived yet (at most 3 bytes).
    carry: Vec<u8>,
}

impl<W: Write> EscapeWriter<W> {
    pub fn new(inner: W) -> Self {
        EscapeWriter {
            inner,
            carry: Vec::new(),
        }
    }

    /// Write out what is held back (an incomplete character, escaped) and flush.
    pub fn finish(mut self) -> io::Result<W> {
        let rest = std::mem::take(&mut self.carry);
        let mut out = String::new();
        for b in rest {
            out.push_str(&format!("\\x{b:02x}"));
        }
        self.inner.write_all(out.as_bytes())?;
        self.inner.flush()?;
        Ok(self.inner)
    }

    fn escaped(&mut self, buf: &[u8]) -> String {
        let mut bytes = std::mem::take(&mut self.carry);
        bytes.extend_from_slice(buf);
        let mut out = String::with_capacity(bytes.len());
        let mut rest: &[u8] = &bytes;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    push_escaped(&mut out, s);
                    break;
                }
                Err(e) => {
                    let (good, after) = rest.split_at(e.valid_up_to());
                    // Checked valid by from_utf8 just above.
                    push_escaped(&mut out, std::str::from_utf8(good).unwrap_or_default());
                    match e.error_len() {
                        Some(n) => {
                            for b in &after[..n] {
                                out.push_str(&format!("\\x{b:02x}"));
                            }
                            rest = &after[n..];
                        }
                        None => {
                            // An incomplete sequence at the end: wait for the rest.
                            self.carry = after.to_vec();
                            break;
                        }
                    }
                }
            }
        }
        out
    }
}

fn push_escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        if is_unsafe(c) && c != '\n' && c != '\t' {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
}

impl<W: Write> Write for EscapeWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let out = self.escaped(buf);
        self.inner.write_all(out.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use delegate_protocol::Target;

    fn req() -> RegisterRequest {
        RegisterRequest {
            name: "web-1".into(),
            hostname: "web-1.example.com".into(),
            version: "1.2.3-rc.1+abc".into(),
            tags: vec!["linux".into(), "eu-west".into()],
            targets: vec![Target {
                kind: "kubernetes".into(),
                name: Some("prod".into()),
            }],
            capacity: 4,
            upgrade_group: None,
        }
    }

    #[test]
    fn ordinary_registrations_pass_and_escapes_are_refused_naming_the_field() {
        check_register(&req()).expect("ordinary");
        let mut r = req();
        r.name = "büro rechner".into();
        check_register(&r).expect("a name may be any printable text");
        for (field, edit) in [
            (
                "name",
                Box::new(|r: &mut RegisterRequest| r.name = "x\u{1b}]0;pwned\u{7}".into())
                    as Box<dyn Fn(&mut RegisterRequest)>,
            ),
            (
                "name",
                Box::new(|r: &mut RegisterRequest| r.name = "evil\u{202e}txt".into()),
            ),
            (
                "name",
                Box::new(|r: &mut RegisterRequest| r.name = String::new()),
            ),
            (
                "hostname",
                Box::new(|r: &mut RegisterRequest| r.hostname = "h\rx".into()),
            ),
            (
                "hostname",
                Box::new(|r: &mut RegisterRequest| r.hostname = "a b".into()),
            ),
            (
                "version",
                Box::new(|r: &mut RegisterRequest| r.version = "1.0\u{9b}2J".into()),
            ),
            (
                "tags[1]",
                Box::new(|r: &mut RegisterRequest| r.tags[1] = "eu\u{1b}[2J".into()),
            ),
            (
                "targets[0].name",
                Box::new(|r: &mut RegisterRequest| r.targets[0].name = Some("p\n".into())),
            ),
        ] {
            let mut r = req();
            edit(&mut r);
            let e = check_register(&r).expect_err(field);
            assert_eq!(e.field, field, "{e}");
            assert!(!e.to_string().contains('\u{1b}'), "{e}");
        }
    }

    #[test]
    fn shown_escapes_controls_and_invisible_characters() {
        assert_eq!(shown("plain"), "plain");
        assert_eq!(shown("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(shown("x\u{202e}y\nz"), "x\\u{202e}y\\u{a}z");
        assert_eq!(shown_lines("x\ny\u{7}"), "x\ny\\u{7}");
    }

    #[test]
    fn the_log_writer_escapes_across_writes_and_keeps_lines() {
        let mut w = EscapeWriter::new(Vec::new());
        w.write_all(b"ok\tline\n\x1b]0;title\x07").expect("write");
        // "é" split over two writes, then a C1 CSI (U+009B) and a stray byte.
        w.write_all(&[0xc3]).expect("write");
        w.write_all(&[0xa9, 0xc2, 0x9b, b'x', 0xff, b'\n', 0xe2])
            .expect("write");
        let out = String::from_utf8(w.finish().expect("finish")).expect("utf8");
        assert_eq!(out, "ok\tline\n\\u{1b}]0;title\\u{7}é\\u{9b}x\\xff\n\\xe2");
    }
}
