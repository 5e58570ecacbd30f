//! How `lb` writes: every command's output goes through [`Out`], which turns a reader
//! that went away (`lb status | head -1`) into [`OutputError::Closed`], a quiet exit
//! instead of a panic; [`Table`] aligns columns to their content; and the number
//! formats every command shares (thousands separators, weights, bytes, durations).

use std::io::{ErrorKind, Write};

use serde::Serialize;

/// Why output could not be written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The reader closed the pipe: not a failure of `lb`; it stops quietly.
    #[error("standard output was closed")]
    Closed,
    #[error("writing to standard output")]
    Io(#[source] std::io::Error),
    #[error("encoding the JSON output")]
    Json(#[source] serde_json::Error),
}

/// Where a command's output goes (standard output, or a buffer in tests).
pub struct Out<W: Write> {
    writer: W,
}

impl Out<std::io::Stdout> {
    pub fn stdout() -> Out<std::io::Stdout> {
        Out {
            writer: std::io::stdout(),
        }
    }
}

impl<W: Write> Out<W> {
    pub fn new(writer: W) -> Out<W> {
        Out { writer }
    }

    /// Writes `bytes` as they are and flushes, so that a closed pipe shows at once.
    pub fn raw(&mut self, bytes: &[u8]) -> Result<(), OutputError> {
        self.writer
            .write_all(bytes)
            .and_then(|()| self.writer.flush())
            .map_err(|e| match e.kind() {
                ErrorKind::BrokenPipe => OutputError::Closed,
                _ => OutputError::Io(e),
            })
    }

    /// Writes `text` and a newline.
    pub fn line(&mut self, text: &str) -> Result<(), OutputError> {
        let mut bytes = Vec::with_capacity(text.len() + 1);
        bytes.extend_from_slice(text.as_bytes());
        bytes.push(b'\n');
        self.raw(&bytes)
    }

    /// Writes `value` as indented JSON and a newline.
    pub fn json(&mut self, value: &impl Serialize) -> Result<(), OutputError> {
        let text = serde_json::to_string_pretty(value).map_err(OutputError::Json)?;
        self.line(&text)
    }

    /// Writes `value` as JSON on one line (one object per refresh, for `top`).
    pub fn json_line(&mut self, value: &impl Serialize) -> Result<(), OutputError> {
        let text = serde_json::to_string(value).map_err(OutputError::Json)?;
        self.line(&text)
    }

    pub fn into_inner(self) -> W {
        self.writer
    }
}

/// How a column's cells line up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Names and words.
    Left,
    /// Figures.
    Right,
}

/// A table whose column widths come from its content: each column as wide as its
/// widest cell or title, two spaces between columns, no trailing spaces.
#[derive(Debug, Clone)]
pub struct Table {
    titles: Vec<String>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles and alignments.
    pub fn new(columns: &[(&str, Align)]) -> Table {
        Table {
            titles: columns.iter().map(|(t, _)| (*t).to_owned()).collect(),
            align: columns.iter().map(|(_, a)| *a).collect(),
            rows: Vec::new(),
        }
    }

    /// A table without a title row (label and value pairs).
    pub fn untitled(align: &[Align]) -> Table {
        Table {
            titles: Vec::new(),
            align: align.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are empty, extra cells are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells = cells;
        cells.resize(self.align.len(), String::new());
        self.rows.push(cells);
    }

    /// The table as lines, each starting with `indent`.
    pub fn render_indented(&self, indent: &str) -> String {
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = vec![0; self.align.len()];
        for row in std::iter::once(&self.titles).chain(&self.rows) {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        let mut lines = Vec::new();
        let titled = !self.titles.is_empty();
        for row in titled.then_some(&self.titles).into_iter().chain(&self.rows) {
            let mut line = String::from(indent);
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = " ".repeat(widths[i] - width(cell));
                match self.align[i] {
                    Align::Left => {
                        line.push_str(cell);
                        line.push_str(&pad);
                    }
                    Align::Right => {
                        line.push_str(&pad);
                        line.push_str(cell);
                    }
                }
            }
            lines.push(line.trim_end().to_owned());
        }
        lines.join("\n")
    }

    /// The table as lines.
    pub fn render(&self) -> String {
        self.render_indented("")
    }
}

/// `32636` as `32,636`.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A weight in configured units: `5`, `0.95`.
pub fn weight(w: f64) -> String {
    if (w - w.round()).abs() < 0.005 {
        count(w.round().max(0.0) as u64)
    } else {
        let text = format!("{w:.2}");
        text.trim_end_matches('0').to_owned()
    }
}

/// A rate per second: whole numbers with separators from 100 up, one decimal below.
pub fn rate(per_second: f64) -> String {
    if per_second >= 99.95 {
        count(per_second.round() as u64)
    } else {
        format!("{per_second:.1}")
    }
}

/// Bytes with a decimal unit: `512 B`, `12.3 kB`, `4.56 MB`.
pub fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
    if n < 1000.0 {
        return format!("{} B", n.round() as u64);
    }
    let mut value = n;
    let mut unit = "B";
    for u in UNITS {
        if value < 1000.0 {
            break;
        }
        value /= 1000.0;
        unit = u;
    }
    if value >= 100.0 {
        format!("{value:.0} {unit}")
    } else if value >= 10.0 {
        format!("{value:.1} {unit}")
    } else {
        format!("{value:.2} {unit}")
    }
}

/// Milliseconds to two decimals, or `-` when unknown.
pub fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"))
}

/// A length of time: `45 s`, `3 min 20 s`, `2 h 05 min`, `3 d 4 h`.
pub fn duration(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s} s"),
        (0, 0, _) => format!("{m} min {s:02} s"),
        (0, _, _) => format!("{h} h {m:02} min"),
        _ => format!("{d} d {h} h"),
    }
}

/// A share as a percentage: `33.3 %`.
pub fn percent(part: f64, whole: f64) -> String {
    if whole <= 0.0 {
        return "-".to_owned();
    }
    format!("{:.1} %", 100.0 * part / whole)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_is_as_wide_as_its_content() {
        let mut t = Table::new(&[
            ("VIP", Align::Left),
            ("backend", Align::Left),
            ("slots", Align::Right),
        ]);
        t.row(vec![
            "198.18.1.1:80/tcp".into(),
            "198.18.0.11".into(),
            "21,846".into(),
        ]);
        t.row(vec![
            "[fd00::1]:80/tcp".into(),
            "fd00::b".into(),
            "7".into(),
        ]);
        assert_eq!(
            t.render(),
            "VIP                backend       slots\n\
             198.18.1.1:80/tcp  198.18.0.11  21,846\n\
             [fd00::1]:80/tcp   fd00::b           7"
        );
    }

    #[test]
    fn a_table_counts_characters_not_bytes_and_fills_missing_cells() {
        let mut t = Table::untitled(&[Align::Left, Align::Right, Align::Left]);
        t.row(vec!["weight 1 → 0".into(), "5".into()]);
        t.row(vec!["x".into(), "1,000".into(), "end".into()]);
        assert_eq!(
            t.render_indented("  "),
            "  weight 1 → 0      5\n  x             1,000  end"
        );
    }

    #[test]
    fn numbers_read_with_their_units() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(32_636), "32,636");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(weight(5.0), "5");
        assert_eq!(weight(0.95), "0.95");
        assert_eq!(weight(0.5), "0.5");
        assert_eq!(weight(1000.0), "1,000");
        assert_eq!(rate(1234.4), "1,234");
        assert_eq!(rate(3.25), "3.2");
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(12_345.0), "12.3 kB");
        assert_eq!(bytes(4_560_000.0), "4.56 MB");
        assert_eq!(bytes(123_000_000_000.0), "123 GB");
        assert_eq!(duration(45), "45 s");
        assert_eq!(duration(200), "3 min 20 s");
        assert_eq!(duration(7500), "2 h 05 min");
        assert_eq!(duration(273_600), "3 d 4 h");
        assert_eq!(percent(1.0, 3.0), "33.3 %");
        assert_eq!(ms(None), "-");
    }

    /// A writer whose reader went away.
    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_reader_is_a_quiet_stop_not_a_failure() {
        let mut out = Out::new(Closed);
        assert!(matches!(out.line("x"), Err(OutputError::Closed)));
        assert!(matches!(
            out.json(&serde_json::json!({"a": 1})),
            Err(OutputError::Closed)
        ));
        let mut out = Out::new(Vec::new());
        out.json_line(&serde_json::json!({"a": 1})).unwrap();
        assert_eq!(out.into_inner(), b"{\"a\":1}\n");
    }
}
