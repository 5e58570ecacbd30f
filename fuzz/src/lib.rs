//! What every fuzz input is checked for, by the cargo-fuzz targets in `fuzz_targets/`
//! and, through `#[path]`, by the proptest smoke pass in `lb-userspace/tests/fuzz.rs`.
//!
//! The code under test may refuse any input, as long as it says why; these functions
//! panic (which is what a fuzzer reports) only when it panics itself or when one of
//! the cheap invariants below is broken:
//!
//! - config ([`config`]): an error has a message; a configuration that parses obeys
//!   every documented rule (at least one VIP, each with a backend, a prime table, a
//!   total weight above 0, backends sorted, tuning in range, ...) and parses back to
//!   the same [`Config`] from the TOML that [`config_to_toml`] writes for it.
//! - Prometheus text ([`prom_text`]): parsing is deterministic; kept series, bad lines
//!   and duplicates together are at most the number of lines; [`Scraper::ingest`] of
//!   the document after or before a realistic node-exporter answer counts exactly the
//!   parser's bad lines and duplicates and gives only finite, non-negative readings
//!   within their documented bounds.
//! - control API ([`control_api`]): [`control::decode`] refuses with one of its three
//!   kinds of message, or gives a request that encodes and decodes to itself; the
//!   client's response parser takes any bytes without panicking.

use std::time::{Duration, Instant};

use lb_userspace::{
    api::{Envelope, Response, VERSION},
    collect::{
        BackendSample, ScrapeConfig, Scraper,
        prom::{MAX_BYTES_PER_S, MAX_IN_FLIGHT, MAX_LATENCY_S, MAX_REQUESTS_PER_S},
        text::{Exposition, Selector},
    },
    config::{Config, Forwarding, HashFields, MAX_WEIGHT},
    control,
    core::maglev,
};

/// A configuration with every section and field, as an operator would write it.
pub const SEED_CONFIG: &str = include_str!("../seeds/config/full.toml");
/// The smallest useful configuration.
pub const SEED_CONFIG_MINIMAL: &str = include_str!("../seeds/config/minimal.toml");
/// A node-exporter answer with an application's gauge, histogram and counter.
pub const SEED_EXPOSITION: &str = include_str!("../seeds/prom_text/node_exporter.prom");
/// The same answer a little earlier: every counter slightly lower.
pub const SEED_EXPOSITION_EARLIER: &str = include_str!("../seeds/prom_text/earlier.prom");
/// One valid request line of each kind.
pub const SEED_REQUESTS: &[&str] = &[
    include_str!("../seeds/control_api/status.json"),
    include_str!("../seeds/control_api/vip_list.json"),
    include_str!("../seeds/control_api/backend_list.json"),
    include_str!("../seeds/control_api/stats.json"),
    include_str!("../seeds/control_api/weight_set.json"),
    include_str!("../seeds/control_api/weight_pin.json"),
    include_str!("../seeds/control_api/weight_auto.json"),
    include_str!("../seeds/control_api/drain.json"),
    include_str!("../seeds/control_api/undrain.json"),
    include_str!("../seeds/control_api/explain.json"),
    include_str!("../seeds/control_api/reload.json"),
];

/// The config target: bytes as text (invalid UTF-8 replaced, since a config is read
/// as a string and non-UTF-8 never reaches the parser).
pub fn config_bytes(data: &[u8]) {
    config(&String::from_utf8_lossy(data));
}

/// The Prometheus text target: bytes as text (the scraper refuses non-UTF-8 bodies
/// before parsing).
pub fn prom_text_bytes(data: &[u8]) {
    prom_text(&String::from_utf8_lossy(data));
}

/// The control API target: the decoder takes the raw bytes of a request line.
pub fn control_api_bytes(data: &[u8]) {
    control_api(data);
}

/// Parses `text` as a configuration and checks the result (see the module docs).
pub fn config(text: &str) {
    match Config::parse(text) {
        Err(e) => assert!(
            !e.to_string().trim().is_empty(),
            "an error without a message"
        ),
        Ok(config) => {
            check_config(&config);
            let again = config_to_toml(&config);
            match Config::parse(&again) {
                Ok(back) => assert_eq!(
                    back, config,
                    "the configuration changed on its way through its TOML form:\n{again}"
                ),
                Err(e) => panic!("the TOML form of a valid configuration is refused: {e}\n{again}"),
            }
        }
    }
}

/// The rules `Config::parse` promises for a configuration it accepts.
pub fn check_config(c: &Config) {
    use lb_common::maps::{MAX_BACKENDS, MAX_RING_SIZE, MAX_VIPS};
    assert!(!c.vips.is_empty() && c.vips.len() <= MAX_VIPS as usize);
    let total: usize = c.vips.iter().map(|v| v.backends.len()).sum();
    assert!(total <= MAX_BACKENDS as usize);
    let k = &c.control;
    assert!((100..=60_000).contains(&k.interval_ms));
    assert!(k.move_budget_per_second > 0.0 && k.move_budget_per_second <= 1.0);
    assert!((0.0..=0.5).contains(&k.floor_share));
    assert!(k.smoothing > 0.0 && k.smoothing <= 1.0);
    assert!((0.0..=1.0).contains(&k.hysteresis));
    if let Some(a) = c.encapsulation.source_v4 {
        assert_eq!(a.octets()[2..], [0, 0]);
    }
    if let Some(a) = c.encapsulation.source_v6 {
        assert_eq!(a.octets()[12..], [0, 0, 0, 0]);
    }
    assert!(c.nat.port_min >= 1 && c.nat.port_min <= c.nat.port_max);
    if let Some((_, len)) = c.nat.source_v4 {
        assert!((26..=32).contains(&len));
    }
    if let Some((_, len)) = c.nat.source_v6 {
        assert!((122..=128).contains(&len));
    }
    let mut keys: Vec<_> = c
        .vips
        .iter()
        .map(|v| (v.address, v.port, v.protocol))
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), c.vips.len(), "a VIP configured twice");
    for v in &c.vips {
        assert!(v.port != 0 && !v.address.is_unspecified() && !v.address.is_multicast());
        assert!(!c.nat.contains(v.address), "a VIP among the NAT sources");
        assert!(maglev::is_prime(v.table_size) && v.table_size <= MAX_RING_SIZE);
        assert!(!v.backends.is_empty());
        assert!(
            v.backends.windows(2).all(|w| w[0].address < w[1].address),
            "backends not sorted by address, or one twice"
        );
        assert!(v.backends.iter().any(|b| b.weight > 0));
        for b in &v.backends {
            assert!(b.weight <= MAX_WEIGHT);
            assert!(b.mac != [0; 6] && b.mac[0] & 1 == 0, "not a unicast MAC");
            assert!(!b.address.is_unspecified() && !b.address.is_multicast());
            match v.forwarding {
                Forwarding::Dsr => assert_eq!(b.address.is_ipv4(), v.address.is_ipv4()),
                Forwarding::Ipip => assert!(if b.address.is_ipv4() {
                    c.encapsulation.source_v4.is_some()
                } else {
                    c.encapsulation.source_v6.is_some()
                }),
                Forwarding::Nat => {
                    assert_eq!(b.address.is_ipv4(), v.address.is_ipv4());
                    assert!(if v.address.is_ipv4() {
                        c.nat.source_v4.is_some()
                    } else {
                        c.nat.source_v6.is_some()
                    });
                }
            }
            assert!(
                !c.nat.contains(b.address),
                "a backend among the NAT sources"
            );
        }
        if let Some(h) = &v.health {
            assert!(h.port != 0 && (50..=60_000).contains(&h.interval_ms));
            assert!(h.timeout_ms > 0 && h.timeout_ms <= h.interval_ms);
            assert!((1..=100).contains(&h.rise) && (1..=100).contains(&h.fall));
        }
        if let Some(m) = &v.metrics {
            assert!(m.port != 0 && m.path.starts_with('/'));
            assert!((10..=60_000).contains(&m.timeout_ms));
        }
    }
}

/// Writes a checked configuration back as TOML that `Config::parse` reads as the
/// same configuration (every default spelled out).
pub fn config_to_toml(c: &Config) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let k = &c.control;
    let _ = writeln!(
        out,
        "[control]\ninterval_ms = {}\nmove_budget_per_second = {:?}\nfloor_share = {:?}\n\
         smoothing = {:?}\nhysteresis = {:?}\n",
        k.interval_ms, k.move_budget_per_second, k.floor_share, k.smoothing, k.hysteresis
    );
    if c.encapsulation.source_v4.is_some() || c.encapsulation.source_v6.is_some() {
        out += "[encapsulation]\n";
        if let Some(a) = c.encapsulation.source_v4 {
            let _ = writeln!(out, "source_v4 = \"{a}\"");
        }
        if let Some(a) = c.encapsulation.source_v6 {
            let _ = writeln!(out, "source_v6 = \"{a}\"");
        }
        out += "\n";
    }
    let n = &c.nat;
    let _ = writeln!(
        out,
        "[nat]\nport_min = {}\nport_max = {}\ntimeout_tcp_s = {}\ntimeout_tcp_closing_s = {}\n\
         timeout_udp_s = {}",
        n.port_min, n.port_max, n.timeout_tcp_s, n.timeout_tcp_closing_s, n.timeout_udp_s
    );
    if let Some((a, len)) = n.source_v4 {
        let _ = writeln!(out, "source_v4 = \"{a}/{len}\"");
    }
    if let Some((a, len)) = n.source_v6 {
        let _ = writeln!(out, "source_v6 = \"{a}/{len}\"");
    }
    out += "\n";
    for v in &c.vips {
        let _ = writeln!(
            out,
            "[[vip]]\naddress = \"{}\"\nport = {}\nprotocol = \"{}\"\nhash = \"{}\"\n\
             table_size = {}\nforwarding = \"{}\"\npolicy = \"{}\"",
            v.address,
            v.port,
            v.protocol,
            match v.hash {
                HashFields::FiveTuple => "5-tuple",
                HashFields::Source => "source",
            },
            v.table_size,
            match v.forwarding {
                Forwarding::Dsr => "dsr",
                Forwarding::Ipip => "ipip",
                Forwarding::Nat => "nat",
            },
            v.policy
        );
        if let Some(h) = &v.health {
            let _ = writeln!(
                out,
                "[vip.health]\nport = {}\ninterval_ms = {}\ntimeout_ms = {}\nrise = {}\nfall = {}",
                h.port, h.interval_ms, h.timeout_ms, h.rise, h.fall
            );
            if let Some(p) = &h.http_path {
                let _ = writeln!(out, "http_path = {}", toml_string(p));
            }
        }
        if let Some(m) = &v.metrics {
            let _ = writeln!(
                out,
                "[vip.metrics]\nport = {}\npath = {}\ntimeout_ms = {}",
                m.port,
                toml_string(&m.path),
                m.timeout_ms
            );
            for (key, value) in [
                ("in_flight", &m.in_flight),
                ("latency", &m.latency),
                ("requests", &m.requests),
            ] {
                if let Some(value) = value {
                    let _ = writeln!(out, "{key} = {}", toml_string(value));
                }
            }
        }
        for b in &v.backends {
            let mac = b.mac.map(|x| format!("{x:02x}")).join(":");
            let _ = writeln!(
                out,
                "\n[[vip.backend]]\naddress = \"{}\"\nmac = \"{mac}\"\nweight = {}",
                b.address, b.weight
            );
        }
        out += "\n";
    }
    out
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out += "\\\"",
            '\\' => out += "\\\\",
            c if c.is_control() => out += &format!("\\u{:04X}", c as u32),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A scraper configured like the seed configuration's `[vip.metrics]`.
pub fn scraper() -> Scraper {
    let mut cfg = ScrapeConfig::new("http://198.18.0.11:9100/metrics");
    cfg.in_flight = Some("app_requests_in_flight".into());
    cfg.latency = Some("app_request_seconds{handler=\"/api\"}".into());
    cfg.requests = Some("app_requests_total".into());
    Scraper::new(cfg).expect("the fuzz scraper's configuration is valid")
}

/// Parses `text` as an exposition and feeds it to scrapers (see the module docs).
pub fn prom_text(text: &str) {
    let lines = text.split('\n').count() as u64;
    let e = Exposition::parse(text);
    let kept = e.series_count() as u64;
    assert!(
        kept + e.bad_lines + e.duplicates <= lines,
        "{kept} series + {} bad lines + {} duplicates from {lines} lines",
        e.bad_lines,
        e.duplicates
    );
    let again = Exposition::parse(text);
    assert_eq!(
        (
            again.series_count() as u64,
            again.bad_lines,
            again.duplicates
        ),
        (kept, e.bad_lines, e.duplicates),
        "parsing the same text twice differs"
    );
    // Selectors come from the configuration; any text is one or is refused.
    if text.len() <= 4096 {
        let _ = Selector::parse(text);
    }

    // Against a realistic previous answer (rates from the seed's counters to this
    // document's), and as the previous answer of a realistic one.
    let start = Instant::now();
    for docs in [[SEED_EXPOSITION_EARLIER, text], [text, SEED_EXPOSITION]] {
        let mut s = scraper();
        for (i, doc) in docs.into_iter().enumerate() {
            let before = s.rejects().clone();
            // The seeds follow the format (a test checks it), so only the document
            // adds bad lines and duplicates.
            let parsed = if std::ptr::eq(doc, text) {
                (e.bad_lines, e.duplicates)
            } else {
                (0, 0)
            };
            let sample = s.ingest(doc, start + Duration::from_secs(i as u64 + 1));
            check_sample(&sample);
            let after = s.rejects();
            assert_eq!(after.bad_lines - before.bad_lines, parsed.0);
            assert_eq!(after.duplicate_series - before.duplicate_series, parsed.1);
            assert!(after.oversize == 0 && after.timeouts == 0 && after.non_utf8 == 0);
        }
    }
}

/// Every reading is finite, non-negative and within its documented bound.
pub fn check_sample(s: &BackendSample) {
    for (name, value, max) in [
        ("cpu", s.cpu, 1.0),
        ("memory", s.memory, 1.0),
        ("disk_busy", s.disk_busy, 1.0),
        ("net_bytes_per_s", s.net_bytes_per_s, MAX_BYTES_PER_S),
        ("in_flight", s.in_flight, MAX_IN_FLIGHT),
        ("latency_s", s.latency_s, MAX_LATENCY_S),
        ("requests_per_s", s.requests_per_s, MAX_REQUESTS_PER_S),
    ] {
        if let Some(v) = value {
            assert!(
                v.is_finite() && (0.0..=max).contains(&v),
                "{name} = {v} is outside [0, {max}]: {s:?}"
            );
        }
    }
}

/// Decodes `line` as a control request and checks the result (see the module docs).
pub fn control_api(line: &[u8]) {
    match control::decode(line) {
        Err(message) => {
            assert!(
                message == "the request is not UTF-8"
                    || (message.starts_with("bad request: ") && message.len() > 13)
                    || message.starts_with("protocol version "),
                "an unexpected kind of error: {message:?}"
            );
        }
        Ok(request) => {
            let mut again = serde_json::to_vec(&Envelope {
                version: VERSION,
                request: request.clone(),
            })
            .expect("a request always encodes");
            again.push(b'\n');
            assert_eq!(control::decode(&again), Ok(request));
        }
    }
    // What the command line does with the agent's answer.
    if let Ok(text) = std::str::from_utf8(line)
        && let Ok(response) = serde_json::from_str::<Response>(text)
    {
        let back = serde_json::to_string(&response).expect("a response always encodes");
        assert!(serde_json::from_str::<Response>(&back).is_ok(), "{back}");
    }
}
