//! Diagnostics: one problem in one policy file, located by `file:line:col` and described in
//! plain English for the Information Governance officers who edit `policies/`.

use std::{fmt, path::Path};

/// One problem found while loading a policy directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    /// The file, relative to the policy directory where possible.
    pub file: String,
    /// 1-based line; 0 when the problem concerns the whole file.
    pub line: usize,
    /// 1-based column; 0 when the problem concerns the whole file.
    pub col: usize,
    pub message: String,
}

impl Diagnostic {
    /// A problem with a whole file (missing, unreadable, wrong kind).
    pub fn file(file: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            line: 0,
            col: 0,
            message: message.into(),
        }
    }

    /// A problem at a byte offset into `text`.
    pub fn at(
        file: impl Into<String>,
        text: &str,
        offset: usize,
        message: impl Into<String>,
    ) -> Self {
        let (line, col) = line_col(text, offset);
        Self {
            file: file.into(),
            line,
            col,
            message: message.into(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.col, self.message
            )
        }
    }
}

/// 1-based line and column (in characters) of a byte offset; offsets past the end clamp.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

/// A file's name as shown in diagnostics: relative to `dir` when it is inside it.
pub fn display_name(dir: &Path, path: &Path) -> String {
    path.strip_prefix(dir).unwrap_or(path).display().to_string()
}

/// Turn a miette diagnostic (cedar's errors) into ours: one entry per labelled span, or one
/// for the whole file when cedar gives no span. The message is cedar's, plus its help.
pub fn from_miette(
    file: &str,
    text: &str,
    d: &dyn miette::Diagnostic,
    prefix: &str,
) -> Vec<Diagnostic> {
    let mut message = format!("{prefix}{d}");
    if let Some(help) = d.help() {
        message.push_str(&format!(" (hint: {help})"));
    }
    let mut out: Vec<Diagnostic> = d
        .labels()
        .into_iter()
        .flatten()
        .take(1)
        .map(|label| Diagnostic::at(file, text, label.offset(), message.clone()))
        .collect();
    if out.is_empty() {
        out.push(Diagnostic::file(file, message));
    }
    if let Some(related) = d.related() {
        for r in related {
            out.extend(from_miette(file, text, r, prefix));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let text = "ab\ncd\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 4), (2, 2));
        assert_eq!(line_col(text, 99), (3, 1));
    }

    #[test]
    fn display_has_file_line_col() {
        let d = Diagnostic::at("a.cedar", "x\ny", 2, "bad");
        assert_eq!(d.to_string(), "a.cedar:2:1: bad");
        assert_eq!(Diagnostic::file("b", "gone").to_string(), "b: gone");
    }
}
