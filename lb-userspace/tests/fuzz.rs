//! Fuzz smoke pass of the parsers that take input from outside the agent: the
//! configuration file (`Config::parse`), the Prometheus text a backend's exporter
//! answers with (`Exposition::parse`, `Scraper::ingest`) and the control socket's
//! request lines (`control::decode`).
//!
//! The invariants are the ones the cargo-fuzz targets check (`fuzz/src/lib.rs`,
//! included below); here proptest feeds them random bytes, random UTF-8, documents
//! built from the grammar with hostile values, and real documents mutated byte- and
//! line-wise (bit flips, insertions, deletions, duplicated, swapped and spliced
//! lines, hostile numbers such as 1e309, NaN and 2^64, nesting 100,000 deep, 100 KiB
//! lines). Nothing may panic; every refusal must be an error with a message.
//!
//! The default case counts keep the whole file at about 10–20 s in a debug build.
//! `LB_FUZZ_CASES=N` runs N cases for every property instead (`cargo xtask fuzz`
//! uses it when cargo-fuzz is unavailable). Failures are not persisted to files:
//! proptest prints the shrunk input, which is all that is needed to reproduce.

#[allow(dead_code)]
#[path = "../../fuzz/src/lib.rs"]
mod check;

use proptest::{prelude::*, sample::Index};

/// `LB_FUZZ_CASES` if set, else `default` cases per property.
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("LB_FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Length of the long lines: 100 KiB.
const LONG: usize = 100 * 1024;

/// What structure-aware mutations of one format work with.
struct Dialect {
    /// Valid documents to start from and to take lines from.
    seeds: &'static [&'static str],
    /// Fragments that mean something in the format.
    tokens: &'static [&'static str],
    /// Openers repeated for deep nesting.
    openers: &'static [&'static str],
    /// Lines with one `@` that becomes 100 KiB of filler.
    long_lines: &'static [&'static str],
}

const CONFIG: Dialect = Dialect {
    seeds: &[check::SEED_CONFIG, check::SEED_CONFIG_MINIMAL],
    tokens: &[
        "[[vip]]\n",
        "[[vip.backend]]\n",
        "[vip.health]\n",
        "[vip.metrics]\nport = 9100\n",
        "[control]\n",
        "[encapsulation]\n",
        "=",
        "\"",
        "'",
        "'''",
        "\"\"\"",
        "\\",
        "\\u0000",
        "\\uD800",
        "#",
        "\n",
        "\r\n",
        "\r",
        "[",
        "]",
        "{",
        "}",
        ",",
        ".",
        "weight = 1\n",
        "weight = 1000001\n",
        "address = \"::\"\n",
        "address = \"224.0.0.1\"\n",
        "port = 0\n",
        "table_size = 4294967295\n",
        "table_size = 65539\n",
        "mac = \"ff:ff:ff:ff:ff:ff\"\n",
        "mac = \"00:00:00:00:00:00\"\n",
        "forwarding = \"ipip\"\n",
        "policy = \"magic\"\n",
        "protocol = \"sctp\"\n",
        "http_path = \"/a b\"\n",
        "vip = []\n",
        "vip = 1\n",
        "backend = [{}]\n",
        "\u{feff}",
        "\0",
        "é",
        "1979-05-27T07:32:00Z",
        "inf",
        "nan",
        "-0.0",
        "true",
    ],
    openers: &["[", "{a=", "a.", "[[a."],
    long_lines: &[
        "address = \"@\"",
        "# @",
        "@",
        "mac = \"@\"",
        "http_path = \"/@\"",
        "weight = @",
    ],
};

const PROM: Dialect = Dialect {
    seeds: &[check::SEED_EXPOSITION, check::SEED_EXPOSITION_EARLIER],
    tokens: &[
        "{",
        "}",
        "\"",
        "\\",
        "\\\"",
        "\\n",
        "\\t",
        "=",
        ",",
        " ",
        "\t",
        "\r",
        "\n",
        "# TYPE node_cpu_seconds_total counter\n",
        "# TYPE app_requests_total histogram\n",
        "# TYPE x\n",
        "# HELP ",
        "NaN",
        "+Inf",
        "-Inf",
        "le=\"+Inf\"",
        "__direction=\"rx\",",
        "node_cpu_seconds_total{cpu=\"0\",mode=\"idle\"} 1e308\n",
        "node_memory_MemTotal_bytes 0\n",
        "node_memory_MemAvailable_bytes -1\n",
        "app_requests_in_flight 1e300\n",
        "app_request_seconds_count{handler=\"/api\"} 0\n",
        "é",
        "\0",
        "\u{feff}",
        " 1700000000000",
        " 99999999999999999999",
    ],
    openers: &["{", "{a=\"", "a{x=\"1\","],
    long_lines: &[
        "node_cpu_seconds_total{cpu=\"0\",mode=\"@\"} 1",
        "# HELP x @",
        "@ 1",
        "app_requests_in_flight{handler=\"/api\"} @",
        "a{@} 1",
    ],
};

const CONTROL: Dialect = Dialect {
    seeds: check::SEED_REQUESTS,
    tokens: &[
        "{",
        "}",
        "[",
        "]",
        "\"",
        "\\",
        "\\u0000",
        "\\ud800",
        "\\uDFFF",
        ":",
        ",",
        "null",
        "true",
        "\"version\":1,",
        "\"version\":2,",
        "\"request\":\"status\",",
        "\"backend\":\"::1\",",
        "\"weight\":4294967296,",
        "\"weight\":-1,",
        "\"weight\":1.5,",
        "\"vip\":\"x\",",
        "\"extra\":0,",
        "\n",
        "\u{feff}",
        "\0",
        "1e999",
        "-0",
        "\"weight_set\"",
        "\"format_disk\"",
    ],
    openers: &["[", "{\"a\":", "{\"request\":"],
    long_lines: &[
        "{\"version\":1,\"request\":{\"weight_set\":{\"backend\":\"198.18.0.11\",\"vip\":\"@\",\"weight\":1}}}",
        "{\"version\":1,\"request\":\"@\"}",
        "{\"version\":@,\"request\":\"status\"}",
        "@",
    ],
};

/// Numbers that parsers get wrong: overflow, NaN, infinities, underflow, odd spellings.
const HOSTILE_NUMBERS: &[&str] = &[
    "0",
    "-0",
    "-1",
    "+1",
    "00",
    "1.",
    ".5",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775809",
    "99999999999999999999999999999999999999",
    "9007199254740993",
    "1e309",
    "-1e309",
    "1e-400",
    "4.9e-324",
    "1.7976931348623157e308",
    "NaN",
    "nan",
    "+Inf",
    "-Inf",
    "inf",
    "Infinity",
    "0x10",
    "0o7",
    "0b1",
    "1_000",
    "1e",
    "--1",
];

/// One mutation of a document. Positions are `Index`es, scaled to the document.
#[derive(Clone, Debug)]
enum Op {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    Insert(Index, Vec<u8>),
    Token(Index, Index),
    Delete(Index, u16),
    DuplicateLine(Index),
    DeleteLine(Index),
    SwapLines(Index, Index),
    /// A line of another seed document of the same format.
    Splice(Index, Index, Index),
    /// Replaces a run of digits.
    Number(Index, Index),
    /// An opener repeated up to 100,000 times.
    Nest(Index, Index, u32),
    /// A 100 KiB line.
    Long(Index, Index, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Op::FlipBit(i, b)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Op::SetByte(i, b)),
        2 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, v)| Op::Insert(i, v)),
        4 => (any::<Index>(), any::<Index>()).prop_map(|(i, t)| Op::Token(i, t)),
        2 => (any::<Index>(), 1u16..64).prop_map(|(i, n)| Op::Delete(i, n)),
        2 => any::<Index>().prop_map(Op::DuplicateLine),
        2 => any::<Index>().prop_map(Op::DeleteLine),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Op::SwapLines(a, b)),
        2 => (any::<Index>(), any::<Index>(), any::<Index>())
            .prop_map(|(a, s, l)| Op::Splice(a, s, l)),
        4 => (any::<Index>(), any::<Index>()).prop_map(|(a, n)| Op::Number(a, n)),
        1 => (any::<Index>(), any::<Index>(), prop_oneof![1u32..200, 200u32..100_000])
            .prop_map(|(a, o, d)| Op::Nest(a, o, d)),
        1 => (any::<Index>(), any::<Index>(), any::<u8>())
            .prop_map(|(a, t, b)| Op::Long(a, t, b)),
    ]
}

/// Byte ranges of the lines of `doc`, without their `\n`.
fn lines(doc: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, &b) in doc.iter().enumerate() {
        if b == b'\n' {
            out.push(start..i);
            start = i + 1;
        }
    }
    out.push(start..doc.len());
    out
}

/// Where line `i` starts (a place to insert a whole line).
fn line_start(doc: &[u8], i: &Index) -> usize {
    let l = lines(doc);
    l[i.index(l.len())].start
}

fn apply(doc: &mut Vec<u8>, op: &Op, d: &Dialect) {
    let at = |i: &Index, doc: &Vec<u8>| i.index(doc.len() + 1);
    match op {
        Op::FlipBit(_, bit) | Op::SetByte(_, bit) if doc.is_empty() => {
            doc.push(*bit);
        }
        Op::FlipBit(i, bit) => {
            let p = i.index(doc.len());
            doc[p] ^= 1 << bit;
        }
        Op::SetByte(i, byte) => {
            let p = i.index(doc.len());
            doc[p] = *byte;
        }
        Op::Insert(i, bytes) => {
            let p = at(i, doc);
            doc.splice(p..p, bytes.iter().copied());
        }
        Op::Token(i, t) => {
            let p = at(i, doc);
            let token = t.get(d.tokens).as_bytes();
            doc.splice(p..p, token.iter().copied());
        }
        Op::Delete(i, n) => {
            let p = at(i, doc);
            let end = (p + *n as usize).min(doc.len());
            doc.drain(p..end);
        }
        Op::DuplicateLine(i) => {
            let l = lines(doc);
            let r = l[i.index(l.len())].clone();
            let mut line = doc[r.clone()].to_vec();
            line.push(b'\n');
            doc.splice(r.start..r.start, line);
        }
        Op::DeleteLine(i) => {
            let l = lines(doc);
            let r = l[i.index(l.len())].clone();
            let end = (r.end + 1).min(doc.len());
            doc.drain(r.start..end);
        }
        Op::SwapLines(a, b) => {
            let text = doc.clone();
            let mut l: Vec<&[u8]> = text.split(|&c| c == b'\n').collect();
            let (a, b) = (a.index(l.len()), b.index(l.len()));
            l.swap(a, b);
            *doc = l.join(&b'\n');
        }
        Op::Splice(a, s, l) => {
            let donor = s.get(d.seeds).as_bytes();
            let dl = lines(donor);
            let mut line = donor[dl[l.index(dl.len())].clone()].to_vec();
            line.push(b'\n');
            let p = line_start(doc, a);
            doc.splice(p..p, line);
        }
        Op::Number(a, n) => {
            let mut runs = Vec::new();
            let mut i = 0;
            while i < doc.len() {
                if doc[i].is_ascii_digit() {
                    let start = i;
                    while i < doc.len() && (doc[i].is_ascii_digit() || doc[i] == b'.') {
                        i += 1;
                    }
                    runs.push(start..i);
                } else {
                    i += 1;
                }
            }
            let with = n.get(HOSTILE_NUMBERS).as_bytes();
            if runs.is_empty() {
                let p = at(a, doc);
                doc.splice(p..p, with.iter().copied());
            } else {
                let r = runs[a.index(runs.len())].clone();
                doc.splice(r, with.iter().copied());
            }
        }
        Op::Nest(a, o, depth) => {
            let p = at(a, doc);
            let nest = o.get(d.openers).repeat(*depth as usize);
            doc.splice(p..p, nest.into_bytes());
        }
        Op::Long(a, t, byte) => {
            let filler = match byte % 4 {
                0 => "A".repeat(LONG),
                1 => "9".repeat(LONG),
                2 => "x=\"1\",".repeat(LONG / 6),
                _ => char::from(b' ' + byte % 95).to_string().repeat(LONG),
            };
            let mut line = t.get(d.long_lines).replacen('@', &filler, 1).into_bytes();
            line.push(b'\n');
            let p = line_start(doc, a);
            doc.splice(p..p, line);
        }
    }
}

/// A seed of the dialect with `ops` applied.
fn mutated(d: &'static Dialect) -> impl Strategy<Value = Vec<u8>> {
    (any::<Index>(), prop::collection::vec(op(), 1..6)).prop_map(move |(s, ops)| {
        let mut doc = s.get(d.seeds).as_bytes().to_vec();
        for op in &ops {
            apply(&mut doc, op, d);
        }
        doc
    })
}

/// `doc` with `ops` applied, for generated documents.
fn mutate(doc: String, ops: &[Op], d: &Dialect) -> Vec<u8> {
    let mut doc = doc.into_bytes();
    for op in ops {
        apply(&mut doc, op, d);
    }
    doc
}

// ---- Documents built from the grammars, with hostile values among valid ones ----
//
// Each value is a valid one 39 times in 40 and a hostile one otherwise, so that a
// good share of the documents is valid (and so checked for their round trip) and the
// rest fails in one or two places at a time.

fn pick(options: &'static [&'static str]) -> prop::sample::Select<&'static str> {
    prop::sample::select(options)
}

/// A valid value 39 times in 40, else a hostile one.
fn vh(
    valid: &'static [&'static str],
    hostile: &'static [&'static str],
) -> impl Strategy<Value = &'static str> {
    prop_oneof![39 => pick(valid), 1 => pick(hostile)]
}

/// A `key = value` line, absent a third of the time.
fn maybe(
    key: &'static str,
    valid: &'static [&'static str],
    hostile: &'static [&'static str],
) -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just(String::new()),
        2 => vh(valid, hostile).prop_map(move |v| format!("{key} = {v}\n")),
    ]
}

/// A backend at `address` (a TOML value), with a MAC and a weight.
fn arb_backend(address: &'static str) -> impl Strategy<Value = String> {
    (
        prop_oneof![
            39 => Just(address),
            1 => pick(&["\"0.0.0.0\"", "\"ff02::1\"", "\"198.18.0.300\"", "\"\"", "11"]),
        ],
        vh(
            &[
                "\"02:00:00:00:00:11\"",
                "\"02:00:00:00:00:12\"",
                "\"0a:1B:2c:3D:4e:5F\"",
            ],
            &[
                "\"01:00:5e:00:00:01\"",
                "\"00:00:00:00:00:00\"",
                "\"02:00:00:00:00\"",
                "\"02:00:00:00:00:00:00\"",
                "\"02-00-00-00-00-11\"",
                "\"+2:00:00:00:00:11\"",
                "\"é2:00:00:00:00:11\"",
            ],
        ),
        vh(
            &["0", "1", "1", "2", "7", "1000000"],
            &["1000001", "4294967295", "4294967296", "-1", "1.5", "\"1\""],
        ),
    )
        .prop_map(|(a, m, w)| format!("[[vip.backend]]\naddress = {a}\nmac = {m}\nweight = {w}\n"))
}

/// Distinct backends, mostly of the VIP's family (`ipip` may cross families).
fn arb_backends(v6: bool) -> impl Strategy<Value = Vec<String>> {
    const V4: &[&str] = &[
        "\"198.18.0.11\"",
        "\"198.18.0.12\"",
        "\"198.18.0.13\"",
        "\"198.18.0.14\"",
        "\"198.18.0.15\"",
        "\"10.1.2.3\"",
    ];
    const V6: &[&str] = &[
        "\"fd00:18::11\"",
        "\"fd00:18::12\"",
        "\"fd00:18::13\"",
        "\"::ffff:198.18.0.11\"",
        "\"2001:db8::1\"",
        "\"fe80::1\"",
    ];
    let own = if v6 { V6 } else { V4 };
    let pool = prop_oneof![
        19 => Just(own.to_vec()),
        1 => Just([V4, V6].concat()),
    ];
    let count = prop_oneof![1 => Just(0..1), 19 => Just(1..5)];
    (pool, count)
        .prop_flat_map(|(pool, count)| prop::sample::subsequence(pool, count).prop_shuffle())
        .prop_flat_map(|addresses| addresses.into_iter().map(arb_backend).collect::<Vec<_>>())
}

fn arb_vip() -> impl Strategy<Value = String> {
    prop_oneof![arb_vip_of(false), arb_vip_of(true)]
}

fn arb_vip_of(v6: bool) -> impl Strategy<Value = String> {
    let head = (
        vh(
            if v6 {
                &["\"fd00:18::1\"", "\"fd00:18::2\"", "\"2001:db8::80\""]
            } else {
                &["\"198.18.1.1\"", "\"198.18.1.2\"", "\"192.0.2.1\""]
            },
            &["\"0.0.0.0\"", "\"224.0.0.1\"", "\"::\"", "\"vip.example\""],
        ),
        vh(&["80", "443", "53", "1", "65535"], &["0", "65536", "-1"]),
        vh(&["\"tcp\"", "\"udp\""], &["\"sctp\"", "\"TCP\""]),
        maybe("hash", &["\"5-tuple\"", "\"source\""], &["\"dest\""]),
        maybe(
            "table_size",
            &["251", "65537", "65521", "2", "3"],
            &["1", "0", "65536", "65539", "4294967291"],
        ),
        maybe("forwarding", &["\"dsr\"", "\"ipip\""], &["\"gre\""]),
        maybe(
            "policy",
            &["\"ai\"", "\"equal\"", "\"static\"", "\"reactive\""],
            &["\"magic\""],
        ),
    );
    let health = prop_oneof![
        2 => Just(String::new()),
        1 => (
            maybe("port", &["8080", "65535"], &["0"]),
            maybe(
                "http_path",
                &["\"/healthz\"", "\"/é\"", "\"/a?b=\\\"c\\\"\""],
                &["\"healthz\"", "\"/a b\"", "\"/\\u0007\""],
            ),
            maybe("interval_ms", &["1000", "50", "60000"], &["49", "60001"]),
            maybe("timeout_ms", &["500", "50"], &["0", "100000"]),
            maybe("rise", &["1", "2", "100"], &["0", "101"]),
            maybe("fall", &["1", "3", "100"], &["0", "101"]),
        )
            .prop_map(|(a, b, c, d, e, f)| format!("[vip.health]\n{a}{b}{c}{d}{e}{f}")),
    ];
    let metrics = prop_oneof![
        2 => Just(String::new()),
        1 => (
            vh(&["9100", "65535"], &["0"]),
            maybe("path", &["\"/metrics\"", "\"/m?x=1\""], &["\"metrics\""]),
            maybe("in_flight", &["\"app_requests_in_flight\"", "\"a:b_c\""], &["\"1bad\"", "\"a b\"", "\"\""]),
            maybe("latency", &["\"app_request_seconds\"", "\"x:y\""], &["\"a{b=\\\"c\\\"}\""]),
            maybe("requests", &["\"app_requests_total\""], &["\"é\""]),
            maybe("timeout_ms", &["500", "10", "60000"], &["9", "60001"]),
        )
            .prop_map(|(p, a, b, c, d, e)| format!("[vip.metrics]\nport = {p}\n{a}{b}{c}{d}{e}")),
    ];
    (head, health, metrics, arb_backends(v6)).prop_map(
        |((addr, port, proto, hash, table, fwd, policy), health, metrics, backends)| {
            format!(
                "[[vip]]\naddress = {addr}\nport = {port}\nprotocol = {proto}\n{hash}{table}{fwd}{policy}{health}{metrics}\n{}",
                backends.join("\n")
            )
        },
    )
}

fn arb_config() -> impl Strategy<Value = String> {
    let control = prop_oneof![
        1 => Just(String::new()),
        1 => (
            maybe("interval_ms", &["1000", "100", "60000"], &["99", "60001", "18446744073709551615"]),
            maybe(
                "move_budget_per_second",
                &["0.02", "1", "1.0", "1e-300"],
                &["0.0", "1.5", "nan", "inf"],
            ),
            maybe("floor_share", &["0.01", "0.0", "0.5", "-0.0"], &["0.51", "-inf"]),
            maybe("smoothing", &["0.5", "1.0"], &["0.0", "+nan"]),
            maybe("hysteresis", &["0.05", "0.0", "1.0"], &["1.0000001"]),
        )
            .prop_map(|(a, b, c, d, e)| format!("[control]\n{a}{b}{c}{d}{e}\n")),
    ];
    let encapsulation = prop_oneof![
        1 => Just(String::new()),
        4 => (
            vh(&["source_v4 = \"198.19.0.0\"\n"], &["", "source_v4 = \"198.19.0.1\"\n", "source_v4 = \"fd00:19::\"\n"]),
            vh(&["source_v6 = \"fd00:19::\"\n"], &["", "source_v6 = \"fd00:19::1\"\n", "source_v6 = \"198.19.0.0\"\n"]),
        )
            .prop_map(|(a, b)| format!("[encapsulation]\n{a}{b}\n")),
    ];
    let vips = prop_oneof![
        1 => Just(Vec::new()),
        19 => prop::collection::vec(arb_vip(), 1..4),
    ];
    (control, encapsulation, vips).prop_map(|(c, e, vips)| format!("{c}{e}{}", vips.join("\n")))
}

fn metric_name() -> impl Strategy<Value = &'static str> {
    vh(
        &[
            "node_cpu_seconds_total",
            "node_memory_MemAvailable_bytes",
            "node_memory_MemTotal_bytes",
            "node_disk_io_time_seconds_total",
            "node_network_receive_bytes_total",
            "node_network_transmit_bytes_total",
            "app_requests_in_flight",
            "app_request_seconds_sum",
            "app_request_seconds_count",
            "app_requests_total",
            "a:b_c",
            "_x",
        ],
        &["1bad", "é", "a-b", ""],
    )
}

fn arb_exposition() -> impl Strategy<Value = String> {
    let labels = vh(
        &[
            "",
            "{}",
            "{cpu=\"0\",mode=\"idle\"}",
            "{cpu=\"0\",mode=\"user\"}",
            "{cpu=\"1\",mode=\"idle\",}",
            "{mode=\"idle\",cpu=\"1\"}",
            "{device=\"eth0\"}",
            "{device=\"lo\"}",
            "{device=\"eth0\",__direction=\"rx\"}",
            "{handler=\"/api\"}",
            "{handler=\"/api\",code=\"200\"}",
            "{ x = \"a,b}=\\\"q\\\"\\n\\\\\" }",
            "{x=\"é\"}",
        ],
        &[
            "{x=\"1\",x=\"2\"}",
            "{x=\"\\t\"}",
            "{x=\"unclosed}",
            "{x=1}",
            "{:x=\"1\"}",
        ],
    );
    let value = vh(
        &[
            "0",
            "1",
            "2.5",
            "1e3",
            "100",
            "1e308",
            "1.7976931348623157e308",
            "4.9e-324",
            "-1",
            "-0",
            "NaN",
            "+Inf",
            "-Inf",
            "inf",
            "1e309",
        ],
        &["0x10", "1_0", "", "one"],
    );
    let sample = (
        metric_name(),
        labels,
        pick(&[" ", "\t", "  "]),
        value,
        vh(
            &["", "", " 1700000000000", " -1"],
            &[" 1.5", " 99999999999999999999"],
        ),
        vh(&["", "", "\r", " "], &[" extra"]),
    )
        .prop_map(|(n, l, s, v, t, e)| format!("{n}{l}{s}{v}{t}{e}"));
    let line = prop_oneof![
        8 => sample,
        1 => (
            metric_name(),
            vh(&["counter", "gauge", "histogram", "summary", "untyped"], &["countr", ""]),
        )
            .prop_map(|(n, k)| format!("# TYPE {n} {k}")),
        1 => metric_name().prop_map(|n| format!("# HELP {n} Some help with \\ and \"quotes\".")),
        1 => pick(&["", "#", "# free comment", "   ", "\t"]).prop_map(str::to_owned),
    ];
    prop::collection::vec(line, 0..60).prop_map(|l| l.join("\n"))
}

fn arb_request_line() -> impl Strategy<Value = String> {
    let backend = vh(
        &["\"198.18.0.11\"", "\"fd00:18::11\"", "\"::ffff:1.2.3.4\""],
        &["\"not-an-ip\"", "\"198.18.0.11:80\"", "11", "null"],
    );
    let vip = vh(
        &[
            "",
            ",\"vip\":null",
            ",\"vip\":\"198.18.1.1:80/tcp\"",
            ",\"vip\":\"[fd00:18::1]:53/udp\"",
            ",\"vip\":\"\\u0000\\ud83d\\ude00\"",
        ],
        &[",\"vip\":1", ",\"vip\":\"\\ud800\""],
    );
    let weight = vh(
        &[",\"weight\":0", ",\"weight\":5", ",\"weight\":4294967295"],
        &[
            ",\"weight\":4294967296",
            ",\"weight\":-1",
            ",\"weight\":1.0",
            ",\"weight\":1e3",
            ",\"weight\":\"5\"",
        ],
    );
    let with_weight = (
        vh(&["weight_set", "weight_pin"], &["weight_auto", "drain"]),
        backend,
        vip,
        weight,
    )
        .prop_map(|(k, b, v, w)| format!("{{\"{k}\":{{\"backend\":{b}{v}{w}}}}}"));
    let backend = vh(
        &["\"198.18.0.11\"", "\"fd00:18::11\""],
        &["\"not-an-ip\"", "11", "null"],
    );
    let vip = vh(
        &["", ",\"vip\":null", ",\"vip\":\"198.18.1.1:80/tcp\""],
        &[",\"vip\":1", ",\"weight\":1", ",\"extra\":1"],
    );
    let without_weight = (
        vh(
            &["weight_auto", "drain", "undrain"],
            &["weight_set", "status"],
        ),
        backend,
        vip,
    )
        .prop_map(|(k, b, v)| format!("{{\"{k}\":{{\"backend\":{b}{v}}}}}"));
    let request = prop_oneof![
        vh(
            &[
                "\"status\"",
                "\"vip_list\"",
                "\"backend_list\"",
                "\"stats\"",
                "\"explain\"",
                "\"reload\"",
            ],
            &[
                "\"Status\"",
                "\"format_disk\"",
                "{\"status\":null}",
                "null",
                "[]"
            ],
        )
        .prop_map(str::to_owned),
        with_weight,
        without_weight,
    ];
    (
        vh(
            &["1"],
            &[
                "0",
                "2",
                "4294967295",
                "4294967296",
                "-1",
                "1.0",
                "\"1\"",
                "null",
            ],
        ),
        request,
        vh(&["", ""], &[",\"extra\":true", ",\"version\":1"]),
        vh(&["", "\n", "\r\n", " \t"], &["\n\n{}", "x"]),
    )
        .prop_map(|(v, r, x, end)| format!("{{\"version\":{v},\"request\":{r}{x}}}{end}"))
}

// ---- The properties ----

proptest! {
    // About 2–3 ms a case in a debug build on a busy machine.
    #![proptest_config(cases(400))]

    #[test]
    fn random_bytes(data in prop::collection::vec(any::<u8>(), 0..512)) {
        check::config_bytes(&data);
        check::prom_text_bytes(&data);
        check::control_api_bytes(&data);
    }

    #[test]
    fn random_utf8(text in any::<String>()) {
        check::config(&text);
        check::prom_text(&text);
        check::control_api(text.as_bytes());
    }

    #[test]
    fn random_text_of_format_characters(text in "[\\[\\]{}\"'=,.#:\\\\ \t\r\na-z0-9_+-]{0,200}") {
        check::config(&text);
        check::prom_text(&text);
        check::control_api(text.as_bytes());
    }
}

proptest! {
    // About 5 and 3 ms a case in a debug build on a busy machine.
    #![proptest_config(cases(500))]

    #[test]
    fn generated_configs(text in arb_config(), ops in prop::collection::vec(op(), 0..3)) {
        check::config(&text);
        check::config_bytes(&mutate(text, &ops, &CONFIG));
    }

    #[test]
    fn mutated_config(doc in mutated(&CONFIG)) {
        check::config_bytes(&doc);
    }
}

proptest! {
    // About 8 and 10 ms a case: every case also ingests the two seed expositions.
    #![proptest_config(cases(250))]

    #[test]
    fn generated_expositions(text in arb_exposition(), ops in prop::collection::vec(op(), 0..3)) {
        check::prom_text(&text);
        check::prom_text_bytes(&mutate(text, &ops, &PROM));
    }

    #[test]
    fn mutated_exposition(doc in mutated(&PROM)) {
        check::prom_text_bytes(&doc);
    }
}

proptest! {
    // About 0.5 and 1.2 ms a case.
    #![proptest_config(cases(800))]

    #[test]
    fn generated_requests(line in arb_request_line(), ops in prop::collection::vec(op(), 0..3)) {
        check::control_api(line.as_bytes());
        check::control_api(&mutate(line, &ops, &CONTROL));
    }

    #[test]
    fn mutated_request(doc in mutated(&CONTROL)) {
        check::control_api_bytes(&doc);
    }
}

// ---- Fixed hostile inputs, run every time ----

#[test]
fn seeds_are_valid_documents() {
    for seed in CONFIG.seeds {
        let config = lb_userspace::config::Config::parse(seed).unwrap();
        check::check_config(&config);
        check::config(seed);
    }
    for seed in PROM.seeds {
        let e = lb_userspace::collect::text::Exposition::parse(seed);
        assert_eq!((e.bad_lines, e.duplicates), (0, 0));
        check::prom_text(seed);
    }
    // The seed documents give every reading, so mutations start from the full path.
    let mut s = check::scraper();
    let t = std::time::Instant::now();
    s.ingest(check::SEED_EXPOSITION_EARLIER, t);
    let sample = s.ingest(
        check::SEED_EXPOSITION,
        t + std::time::Duration::from_secs(2),
    );
    check::check_sample(&sample);
    for (name, v) in [
        ("cpu", sample.cpu),
        ("memory", sample.memory),
        ("disk_busy", sample.disk_busy),
        ("net", sample.net_bytes_per_s),
        ("in_flight", sample.in_flight),
        ("latency", sample.latency_s),
        ("requests", sample.requests_per_s),
    ] {
        assert!(v.is_some(), "no {name} from the seeds: {sample:?}");
    }
    for seed in CONTROL.seeds {
        lb_userspace::control::decode(seed.as_bytes()).unwrap();
        check::control_api(seed.as_bytes());
    }
}

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    const DEPTH: usize = 100_000;
    for text in [
        format!("a = {}", "[".repeat(DEPTH)),
        format!("a = {}", "{a=".repeat(DEPTH)),
        format!("{}1", "a.".repeat(DEPTH)),
        format!("{}a = 1", "a.".repeat(DEPTH)),
        format!("[{}a]", "a.".repeat(DEPTH)),
        format!("[[{}a]]", "a.".repeat(DEPTH)),
        "[".repeat(DEPTH),
        format!("[[vip]]\naddress = {}", "[".repeat(DEPTH)),
    ] {
        check::config(&text);
    }
    for text in [
        "[".repeat(DEPTH),
        "{\"a\":".repeat(DEPTH),
        format!(
            "{{\"version\":1,\"request\":{}",
            "{\"weight_set\":".repeat(DEPTH)
        ),
        format!("{{\"ok\":true,\"result\":{}", "[".repeat(DEPTH)),
    ] {
        check::control_api(text.as_bytes());
        assert!(lb_userspace::control::decode(text.as_bytes()).is_err());
    }
    for text in [
        format!("a{}", "{".repeat(DEPTH)),
        format!("a{{x=\"{}\"}} 1", "\\\"".repeat(DEPTH)),
    ] {
        check::prom_text(&text);
    }
}

#[test]
fn long_lines_and_large_documents() {
    let filler = "A".repeat(LONG);
    check::config(&format!("[[vip]]\naddress = \"{filler}\"\n"));
    check::config(&format!("# {filler}\n{}", check::SEED_CONFIG));
    check::prom_text(&format!(
        "{}\nnode_cpu_seconds_total{{cpu=\"0\",mode=\"{filler}\"}} 1\n",
        check::SEED_EXPOSITION
    ));
    check::prom_text(&format!("{filler} 1"));
    check::control_api(format!("{{\"version\":1,\"request\":\"{filler}\"}}").as_bytes());
    // 1 MiB of pseudo-random bytes (xorshift, fixed seed), as a misbehaving exporter
    // or a client writing garbage would send.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let garbage: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    check::config_bytes(&garbage);
    check::prom_text_bytes(&garbage);
    check::control_api_bytes(&garbage);
    // A 1 MiB exposition of distinct series (the scraper's default body limit).
    let mut big = String::new();
    let mut i = 0;
    while big.len() < 1 << 20 {
        big += &format!("app_requests_in_flight{{handler=\"/h{i}\"}} 1\n");
        i += 1;
    }
    let e = lb_userspace::collect::text::Exposition::parse(&big);
    assert_eq!(e.series_count(), i);
    check::prom_text(&big);
}

/// A backend's exporter answering with its body limit (1 MiB) of series that each
/// appear twice. Found by the fuzz pass: duplicated label sets were looked up in a
/// `Vec`, so this document took quadratic time (about 36 s in an optimized build,
/// minutes in a debug one) during which the agent's single-threaded runtime was
/// blocked. They are now kept in a set. The bound below is generous (a linear parse
/// takes about a second in a debug build); quadratic time exceeds it many times over.
#[test]
fn a_body_of_duplicated_series_parses_in_linear_time() {
    let mut doc = String::new();
    let mut i = 0u64;
    while doc.len() < (1 << 20) - 40 {
        let line = format!("a{{x=\"{i:x}\"}} 1\n");
        doc += &line;
        doc += &line;
        i += 1;
    }
    let start = std::time::Instant::now();
    let e = lb_userspace::collect::text::Exposition::parse(&doc);
    let took = start.elapsed();
    assert_eq!(e.duplicates, i);
    assert_eq!(e.series_count(), 0);
    // 1 MiB of distinct series parses in about a second in a debug build; allow sixty
    // times that.
    assert!(took < std::time::Duration::from_secs(60), "took {took:?}");
}
