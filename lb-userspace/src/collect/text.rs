//! A strict parser of the Prometheus text exposition format (version 0.0.4), the
//! format node-exporter and most instrumented services answer `GET /metrics` with.
//!
//! It works line by line and never gives up on a whole document: a line that does not
//! follow the format is skipped and counted in [`Exposition::bad_lines`]; a series (a
//! metric name with one exact label set) that appears more than once is dropped, all
//! of its copies, and the family it belongs to is marked so that nothing is computed
//! from a family whose contents are ambiguous ([`Exposition::duplicates`] counts the
//! extra copies). Values are kept exactly as sent, NaN and infinities included: whoever
//! uses a series decides whether its value makes sense.
//!
//! What the format allows, and so what is accepted:
//! - `# HELP name text` and `# TYPE name counter|gauge|histogram|summary|untyped`; any
//!   other line starting with `#` is a comment. A malformed `TYPE` line is a bad line.
//! - `name{label="value",...} value [timestamp]`, with blanks (spaces, tabs) between
//!   the tokens, an optional trailing comma in the label set, the escapes `\\`, `\"`
//!   and `\n` in label values, a Go-style float value (`NaN`, `+Inf`, `-Inf`, `1e3`)
//!   and an optional integer timestamp in milliseconds (checked, then ignored).
//! - Empty lines, and a trailing `\r` on any line.
//!
//! Anything else on a sample line (an unknown escape, an unclosed quote, a label name
//! given twice, a second value, a name starting with a digit) makes it a bad line.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A label set, sorted by label name, each name at most once.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Labels(Vec<(String, String)>);

impl Labels {
    /// Builds a label set from pairs; `None` if a name appears twice.
    pub fn new(mut pairs: Vec<(String, String)>) -> Option<Labels> {
        pairs.sort();
        if pairs.windows(2).any(|w| w[0].0 == w[1].0) {
            return None;
        }
        Some(Labels(pairs))
    }

    /// The value of label `name`, if the set has it.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(name))
            .ok()
            .map(|i| self.0[i].1.as_str())
    }

    /// The (name, value) pairs, sorted by name.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }

    /// Whether every pair of `other` is also in this set.
    pub fn contains_all(&self, other: &Labels) -> bool {
        other.0.iter().all(|(k, v)| self.get(k) == Some(v.as_str()))
    }
}

/// The declared type of a metric family (`# TYPE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

/// What the exposition holds under one sample name.
#[derive(Debug, PartialEq)]
pub enum Lookup<'a> {
    /// No sample has this name.
    Missing,
    /// At least one series of this name was sent more than once; none of it is used.
    Duplicated,
    /// Every series of this name with its value.
    Found(&'a BTreeMap<Labels, f64>),
}

#[derive(Debug, Default)]
struct Family {
    series: BTreeMap<Labels, f64>,
    /// Label sets seen more than once; never used again in this document. A set, so
    /// that a document of nothing but duplicates still parses in n log n.
    duplicated: BTreeSet<Labels>,
}

/// One parsed document.
#[derive(Debug, Default)]
pub struct Exposition {
    families: HashMap<String, Family>,
    types: HashMap<String, MetricType>,
    /// Lines that do not follow the format and were skipped.
    pub bad_lines: u64,
    /// Copies of series that had already appeared (each extra copy counts once).
    pub duplicates: u64,
}

impl Exposition {
    /// Parses a whole document; never fails, see the module documentation.
    pub fn parse(text: &str) -> Exposition {
        let mut out = Exposition::default();
        for line in text.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            let trimmed = line.trim_matches(is_blank);
            if trimmed.is_empty() {
                continue;
            }
            if let Some(comment) = trimmed.strip_prefix('#') {
                if !out.comment(comment) {
                    out.bad_lines += 1;
                }
                continue;
            }
            match parse_sample(trimmed) {
                Some((name, labels, value)) => out.insert(name, labels, value),
                None => out.bad_lines += 1,
            }
        }
        out
    }

    /// Handles a comment line (without its `#`); false if it is a malformed `TYPE`.
    fn comment(&mut self, rest: &str) -> bool {
        let mut words = rest.split(is_blank).filter(|w| !w.is_empty());
        if words.next() != Some("TYPE") {
            // HELP text is free-form, and other comments are allowed anywhere.
            return true;
        }
        let (Some(name), Some(kind), None) = (words.next(), words.next(), words.next()) else {
            return false;
        };
        let kind = match kind {
            "counter" => MetricType::Counter,
            "gauge" => MetricType::Gauge,
            "histogram" => MetricType::Histogram,
            "summary" => MetricType::Summary,
            "untyped" => MetricType::Untyped,
            _ => return false,
        };
        if !is_metric_name(name) {
            return false;
        }
        self.types.insert(name.to_owned(), kind);
        true
    }

    fn insert(&mut self, name: String, labels: Labels, value: f64) {
        let family = self.families.entry(name).or_default();
        if family.duplicated.contains(&labels) {
            self.duplicates += 1;
            return;
        }
        if family.series.remove(&labels).is_some() {
            self.duplicates += 1;
            family.duplicated.insert(labels);
            return;
        }
        family.series.insert(labels, value);
    }

    /// Every series of the sample name `name` (for histograms and summaries, the
    /// sample names are `NAME_sum`, `NAME_count` and `NAME_bucket`, or `NAME`).
    pub fn lookup(&self, name: &str) -> Lookup<'_> {
        match self.families.get(name) {
            None => Lookup::Missing,
            Some(f) if !f.duplicated.is_empty() => Lookup::Duplicated,
            Some(f) if f.series.is_empty() => Lookup::Missing,
            Some(f) => Lookup::Found(&f.series),
        }
    }

    /// The type a `# TYPE` line declared for family `name`.
    pub fn declared_type(&self, name: &str) -> Option<MetricType> {
        self.types.get(name).copied()
    }

    /// How many distinct series were kept (duplicated ones excluded).
    pub fn series_count(&self) -> usize {
        self.families.values().map(|f| f.series.len()).sum()
    }
}

fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

fn is_name_start(c: u8, colon: bool) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || (colon && c == b':')
}

fn is_name_char(c: u8, colon: bool) -> bool {
    is_name_start(c, colon) || c.is_ascii_digit()
}

/// Whether `s` is a valid metric name, `[a-zA-Z_:][a-zA-Z0-9_:]*`.
pub fn is_metric_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty() && is_name_start(b[0], true) && b[1..].iter().all(|&c| is_name_char(c, true))
}

/// A cursor over one line.
struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.pos).copied()
    }

    fn skip_blanks(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// A name: `[a-zA-Z_(:)][a-zA-Z0-9_(:)]*`, colons only for metric names.
    fn name(&mut self, colon: bool) -> Option<&'a str> {
        let start = self.pos;
        if !self.peek().is_some_and(|c| is_name_start(c, colon)) {
            return None;
        }
        while self.peek().is_some_and(|c| is_name_char(c, colon)) {
            self.pos += 1;
        }
        Some(&self.s[start..self.pos])
    }

    /// A quoted label value with its escapes resolved; the opening quote is next.
    fn quoted(&mut self) -> Option<String> {
        if !self.eat(b'"') {
            return None;
        }
        let mut out = String::new();
        let rest = &self.s[self.pos..];
        let mut chars = rest.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos += i + 1;
                    return Some(out);
                }
                '\\' => match chars.next() {
                    Some((_, '\\')) => out.push('\\'),
                    Some((_, '"')) => out.push('"'),
                    Some((_, 'n')) => out.push('\n'),
                    _ => return None,
                },
                c => out.push(c),
            }
        }
        None
    }

    /// A token up to the next blank or the end of the line.
    fn token(&mut self) -> &'a str {
        let start = self.pos;
        while self.peek().is_some_and(|c| c != b' ' && c != b'\t') {
            self.pos += 1;
        }
        &self.s[start..self.pos]
    }
}

/// Parses `{name="value",...}`; the opening brace is next.
fn parse_labels(cur: &mut Cursor<'_>) -> Option<Labels> {
    if !cur.eat(b'{') {
        return None;
    }
    let mut pairs = Vec::new();
    loop {
        cur.skip_blanks();
        if cur.eat(b'}') {
            break;
        }
        let name = cur.name(false)?;
        cur.skip_blanks();
        if !cur.eat(b'=') {
            return None;
        }
        cur.skip_blanks();
        let value = cur.quoted()?;
        pairs.push((name.to_owned(), value));
        cur.skip_blanks();
        if cur.eat(b',') {
            continue;
        }
        if cur.eat(b'}') {
            break;
        }
        return None;
    }
    Labels::new(pairs)
}

/// Parses a float as Prometheus writes them (Go's `strconv.FormatFloat` and the
/// spellings `NaN`, `+Inf`, `-Inf`).
pub fn parse_value(s: &str) -> Option<f64> {
    // Rust accepts "inf", "infinity" and "nan" in any case, with an optional sign,
    // which covers Go's spellings; it rejects hex floats and underscores, as Go does
    // for this format.
    if s.is_empty() || s.contains('_') {
        return None;
    }
    s.parse::<f64>().ok()
}

/// Parses one sample line (already trimmed, not a comment).
fn parse_sample(line: &str) -> Option<(String, Labels, f64)> {
    let mut cur = Cursor { s: line, pos: 0 };
    let name = cur.name(true)?;
    cur.skip_blanks();
    let labels = if cur.peek() == Some(b'{') {
        let labels = parse_labels(&mut cur)?;
        cur.skip_blanks();
        labels
    } else {
        Labels::default()
    };
    let value = parse_value(cur.token())?;
    cur.skip_blanks();
    let timestamp = cur.token();
    if !timestamp.is_empty() && timestamp.parse::<i64>().is_err() {
        return None;
    }
    cur.skip_blanks();
    if cur.peek().is_some() {
        return None;
    }
    Some((name.to_owned(), labels, value))
}

/// A metric name with optional label matchers, as written in the configuration:
/// `name` or `name{label="value",...}`. A series matches when it has every listed
/// label with exactly that value (it may have more labels).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    pub name: String,
    pub labels: Labels,
}

impl Selector {
    /// Parses a selector; `None` if it is not one.
    pub fn parse(s: &str) -> Option<Selector> {
        let s = s.trim_matches(is_blank);
        let mut cur = Cursor { s, pos: 0 };
        let name = cur.name(true)?;
        cur.skip_blanks();
        let labels = if cur.peek() == Some(b'{') {
            parse_labels(&mut cur)?
        } else {
            Labels::default()
        };
        cur.skip_blanks();
        if cur.peek().is_some() {
            return None;
        }
        Some(Selector {
            name: name.to_owned(),
            labels,
        })
    }

    /// The same matchers on another sample name (for `_sum` and `_count`).
    pub fn with_name(&self, name: String) -> Selector {
        Selector {
            name,
            labels: self.labels.clone(),
        }
    }

    /// Whether a series with these labels is selected.
    pub fn matches(&self, labels: &Labels) -> bool {
        labels.contains_all(&self.labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        Labels::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
        .unwrap()
    }

    fn value(e: &Exposition, name: &str, l: &[(&str, &str)]) -> Option<f64> {
        match e.lookup(name) {
            Lookup::Found(s) => s.get(&labels(l)).copied(),
            _ => None,
        }
    }

    #[test]
    fn parses_the_grammar() {
        let text = "# HELP a_total Counts, with \\ and \"quotes\".\n\
                    # TYPE a_total counter\n\
                    a_total{x=\"1\",y=\"two\"} 3\n\
                    a_total{y=\"b\",x=\"2\",} 4.5e3 1700000000000\n\
                    \n\
                    # just a comment\n\
                    b\t 7  \r\n\
                    c { z = \"a,b}=\\\"q\\\"\\n\\\\\" } -1\n\
                    d:sub_total 1\n\
                    e{} +Inf\n\
                    f -Inf\n\
                    g NaN\n";
        let e = Exposition::parse(text);
        assert_eq!(e.bad_lines, 0);
        assert_eq!(e.duplicates, 0);
        assert_eq!(e.declared_type("a_total"), Some(MetricType::Counter));
        assert_eq!(value(&e, "a_total", &[("x", "1"), ("y", "two")]), Some(3.0));
        assert_eq!(
            value(&e, "a_total", &[("x", "2"), ("y", "b")]),
            Some(4500.0)
        );
        assert_eq!(value(&e, "b", &[]), Some(7.0));
        assert_eq!(value(&e, "c", &[("z", "a,b}=\"q\"\n\\")]), Some(-1.0));
        assert_eq!(value(&e, "d:sub_total", &[]), Some(1.0));
        assert_eq!(value(&e, "e", &[]), Some(f64::INFINITY));
        assert_eq!(value(&e, "f", &[]), Some(f64::NEG_INFINITY));
        assert!(value(&e, "g", &[]).unwrap().is_nan());
        assert_eq!(e.series_count(), 8);
    }

    #[test]
    fn counts_bad_lines_and_keeps_the_rest() {
        let bad = [
            "1abc 1",
            "a{x=\"1\" 1",
            "a{x=1} 1",
            "a{x=\"1\"",
            "a{x=\"\\t\"} 1",
            "a{x=\"1\",x=\"2\"} 1",
            "a{1x=\"1\"} 1",
            "a",
            "a one",
            "a 0x10",
            "a 1_000",
            "a 1 2 3",
            "a 1 1.5",
            "a{x=\"1\"}} 1",
            "a{:x=\"1\"} 1",
            "{\"a\"} 1",
            "# TYPE a",
            "# TYPE a countr",
            "# TYPE a counter extra",
        ];
        let mut text = String::from("ok 1\n");
        for line in bad {
            text.push_str(line);
            text.push('\n');
        }
        text.push_str("ok2 2\n");
        let e = Exposition::parse(&text);
        assert_eq!(e.bad_lines, bad.len() as u64);
        assert_eq!(value(&e, "ok", &[]), Some(1.0));
        assert_eq!(value(&e, "ok2", &[]), Some(2.0));
        assert_eq!(e.series_count(), 2);
    }

    #[test]
    fn duplicates_poison_their_family() {
        let text = "a{x=\"1\"} 1\na{x=\"2\"} 2\na{x=\"1\"} 3\na{x=\"1\"} 4\nb 1\n";
        let e = Exposition::parse(text);
        assert_eq!(e.duplicates, 2);
        assert_eq!(e.lookup("a"), Lookup::Duplicated);
        assert_eq!(value(&e, "b", &[]), Some(1.0));
        assert_eq!(e.lookup("zzz"), Lookup::Missing);
        // Label order does not make a different series.
        let e = Exposition::parse("a{x=\"1\",y=\"2\"} 1\na{y=\"2\",x=\"1\"} 1\n");
        assert_eq!(e.duplicates, 1);
    }

    #[test]
    fn garbage_never_panics() {
        let inputs = [
            "",
            "\n\n\n",
            "{",
            "}",
            "a{",
            "a{x",
            "a{x=",
            "a{x=\"",
            "a{x=\"\\",
            "a{x=\"é\\ü\"} 1",
            "é 1",
            "a{x=\"é\"} 1",
            "#",
            "# TYPE",
            "<html><body>Not found</body></html>",
            "\u{0}\u{1}\u{7f}",
        ];
        for input in inputs {
            let _ = Exposition::parse(input);
            let _ = Selector::parse(input);
        }
        let e = Exposition::parse("a{x=\"é\"} 1");
        assert_eq!(value(&e, "a", &[("x", "é")]), Some(1.0));
    }

    #[test]
    fn selectors() {
        let s = Selector::parse("http_requests_total{code=\"200\"}").unwrap();
        assert_eq!(s.name, "http_requests_total");
        assert!(s.matches(&labels(&[("code", "200"), ("path", "/")])));
        assert!(!s.matches(&labels(&[("code", "500")])));
        assert!(!s.matches(&labels(&[])));
        let s = Selector::parse(" in_flight ").unwrap();
        assert!(s.matches(&labels(&[("any", "thing")])));
        for bad in ["", "1x", "a{", "a b", "a{x=1}", "a{x=\"1\"} 1"] {
            assert_eq!(Selector::parse(bad), None, "{bad:?}");
        }
    }
}
