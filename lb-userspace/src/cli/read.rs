//! The text of the read commands (`status`, `vip list`, `backend list`, `explain`,
//! `tables`, `cluster status`), from the agent's typed answers; pure, so tests read them without an
//! agent. `--json` prints the answers themselves instead.

use crate::api::{
    BackendView, ClusterStatus, Control, DatapathCounters, Explanation, FloodStatus, MapMemoryView,
    ModelStatus, ReloadOutcome, Status, TableView, VipView,
};

use super::output::{Align, Table, bytes, count, duration, ms, percent, weight};

/// A datapath counter: what it counts, and where it is.
type Counter = (&'static str, fn(&DatapathCounters) -> u64);

/// Each datapath counter, in the order `status` shows them.
const COUNTERS: &[Counter] = &[
    ("frames received", |d| d.rx_frames),
    ("forwarded to a backend", |d| d.tx),
    ("  of them encapsulated", |d| d.tx_encap),
    ("connection table hits", |d| d.conn_hit),
    ("new flows", |d| d.conn_miss_syn),
    ("non-SYN misses (flows that may break)", |d| {
        d.conn_miss_non_syn
    }),
    ("connection table inserts failed", |d| d.conn_insert_failed),
    ("dropped: no backend", |d| d.drop_no_backend),
    ("dropped: encapsulation failed", |d| d.drop_encap_failed),
    ("ICMP echo requests answered", |d| d.icmp_echo_reply),
    ("ICMP errors forwarded to a backend", |d| {
        d.icmp_error_forwarded
    }),
    ("IPv4 with options (balanced)", |d| d.ipv4_options),
    ("passed to the kernel: not a VIP", |d| d.pass_not_vip),
    ("passed to the kernel: not IP", |d| d.pass_not_ip),
    ("passed to the kernel: fragment", |d| d.pass_fragment),
    ("passed to the kernel: truncated", |d| d.pass_truncated),
    ("passed to the kernel: malformed", |d| d.pass_malformed),
    ("passed to the kernel: IPv6 extension header", |d| {
        d.pass_ipv6_extension
    }),
    ("passed to the kernel: other ICMP", |d| d.pass_icmp_other),
];

/// `lb status`.
pub fn status(s: &Status) -> String {
    let mut head = Table::untitled(&[Align::Left, Align::Left]);
    for (label, value) in [
        ("instance", s.instance.clone()),
        ("interface", s.iface.clone()),
        ("config", s.config.display().to_string()),
        ("uptime", duration(s.uptime_seconds)),
        (
            "VIPs",
            format!(
                "{} with {} backends",
                count(s.vips as u64),
                count(s.backends as u64)
            ),
        ),
        ("policy", s.policy.clone()),
        ("model", model(&s.model)),
        ("last reload", last_reload(s.last_reload.as_ref())),
    ] {
        head.row(vec![label.to_owned(), value]);
    }
    let mut counters = Table::untitled(&[Align::Left, Align::Right]);
    for (label, value) in COUNTERS {
        counters.row(vec![(*label).to_owned(), count(value(&s.datapath))]);
    }
    let mut text = format!(
        "{}\n\ndatapath (frames since it was loaded)\n{}\n\n{}",
        head.render(),
        counters.render_indented("  "),
        flood(&s.flood)
    );
    if let Some(n) = &s.nat {
        text += &format!("\n\n{}", nat(n));
    }
    if !s.maps.is_empty() {
        text += &format!("\n\n{}", maps(&s.maps));
    }
    text
}

/// Full NAT's flows, ports and counters, for `lb status`.
fn nat(n: &crate::api::NatStatus) -> String {
    let mut t = Table::untitled(&[Align::Left, Align::Right]);
    let walked = format!("{} s ago", n.walked_seconds_ago.round() as u64);
    for (label, value) in [
        ("flows (as of the last walk)", count(n.flows)),
        ("  tables walked", walked),
        (
            "ports per source, backend and port",
            count(n.ports_per_source),
        ),
    ] {
        t.row(vec![label.to_owned(), value]);
    }
    for s in &n.sources {
        t.row(vec![
            format!("  {} holds", s.address),
            format!("{} ports", count(s.ports_in_use)),
        ]);
    }
    for (label, value) in [
        ("packets to backends", n.to_backend),
        ("replies to clients", n.to_client),
        ("ports claimed", n.claimed),
        ("  probes that found a port taken", n.port_collisions),
        ("new flows refused: ports exhausted", n.ports_exhausted),
        ("evicted claims made again", n.reclaimed),
        ("flows whose port went to another (new port)", n.lost),
        ("packets to a NAT address no flow holds", n.reply_unknown),
        ("entries expired (idle)", n.expired),
    ] {
        t.row(vec![label.to_owned(), count(value)]);
    }
    format!("full NAT\n{}", t.render_indented("  "))
}

/// The datapath's maps and their memory, for `lb status`.
fn maps(maps: &[MapMemoryView]) -> String {
    let mut t = Table::untitled(&[Align::Left, Align::Right, Align::Right]);
    for m in maps {
        t.row(vec![
            m.name.clone(),
            match m.max_entries {
                1 => "1 entry".to_owned(),
                n if m.name == lb_common::maps::names::RINGS => format!(
                    "{} entries ({} VIPs)",
                    count(u64::from(n)),
                    lb_common::maps::rings_vips(n)
                ),
                n => format!("{} entries", count(u64::from(n))),
            },
            bytes(m.bytes as f64),
        ]);
    }
    let total: u64 = maps.iter().map(|m| m.bytes).sum();
    t.row(vec!["total".to_owned(), String::new(), bytes(total as f64)]);
    format!(
        "maps (memory as the kernel accounts it)\n{}",
        t.render_indented("  ")
    )
}

/// The flood guard's part of `lb status`.
fn flood(f: &FloodStatus) -> String {
    let state = match (f.guard, f.active, f.active_seconds) {
        (false, _, _) => "unknown (the guard's counters are off)".to_owned(),
        (true, true, Some(s)) => format!("FLOOD for {}", duration(s as u64)),
        (true, true, None) => "FLOOD".to_owned(),
        (true, false, _) => "calm".to_owned(),
    };
    let mut t = Table::untitled(&[Align::Left, Align::Right]);
    for (label, value) in [
        ("state", state),
        (
            "new flows per second",
            count(f.new_flows_per_second.round() as u64),
        ),
        (
            "  never sent a second packet",
            count(f.unanswered_per_second.round() as u64),
        ),
        (
            "flood declared from",
            format!("{}/s", count(f.threshold_per_second.round() as u64)),
        ),
        ("floods since start", count(f.episodes)),
        ("new flows held as young", count(f.young)),
        ("  kept (second packet seen)", count(f.promoted)),
        ("young-table writes failed", count(f.young_failed)),
    ] {
        t.row(vec![label.to_owned(), value]);
    }
    let guard = if f.guard {
        "on: new flows enter the connection table on their second packet"
    } else {
        "OFF (--no-flood-guard): every new flow, spoofed or not, takes a connection-table entry"
    };
    format!("flood guard {guard}\n{}", t.render_indented("  "))
}

fn model(m: &ModelStatus) -> String {
    let fit = m.last_fit_seconds.map_or_else(
        || "no fit yet".to_owned(),
        |s| format!("last fit took {s:.2} s"),
    );
    let health = match m.unhealthy_backends.as_slice() {
        [] => "every backend healthy".to_owned(),
        down => format!("unhealthy: {}", down.join(", ")),
    };
    format!("{fit}, {} fit failures; {health}", count(m.fit_failures))
}

fn last_reload(r: Option<&ReloadOutcome>) -> String {
    match r {
        None => "none".to_owned(),
        Some(r) if r.ok => format!("ok, {} ago", duration(r.seconds_ago)),
        Some(r) => format!(
            "REFUSED {} ago, nothing changed: {}",
            duration(r.seconds_ago),
            r.error.as_deref().unwrap_or("no reason given")
        ),
    }
}

/// `lb vip list`.
pub fn vips(vips: &[VipView]) -> String {
    let mut t = Table::new(&[
        ("VIP", Align::Left),
        ("forwarding", Align::Left),
        ("hash", Align::Left),
        ("table slots", Align::Right),
        ("backends", Align::Right),
    ]);
    for v in vips {
        t.row(vec![
            v.vip.clone(),
            v.forwarding.clone(),
            v.hash.clone(),
            count(u64::from(v.table_size)),
            count(v.backends as u64),
        ]);
    }
    t.render()
}

/// `lb backend list` and `lb weight show`.
pub fn backends(views: &[BackendView]) -> String {
    let mut t = Table::new(&[
        ("VIP", Align::Left),
        ("backend", Align::Left),
        ("weight", Align::Right),
        ("configured", Align::Right),
        ("set by", Align::Left),
        ("health", Align::Left),
        ("latency ms", Align::Right),
        ("predicted ms", Align::Right),
        ("new flows", Align::Right),
        ("packets", Align::Right),
        ("bytes", Align::Right),
    ]);
    for b in views {
        t.row(vec![
            b.vip.clone(),
            b.backend.to_string(),
            weight(b.weight),
            count(u64::from(b.configured_weight)),
            b.control.to_string(),
            health(b.healthy).to_owned(),
            ms(b.latency_ms),
            ms(b.predicted_ms),
            count(b.new_flows),
            count(b.packets),
            bytes(b.bytes as f64),
        ]);
    }
    format!(
        "{}\n\n{}",
        t.render(),
        "weight: in force, in configured units; set by: policy, set (until `weight auto` or \
         a reload), pinned, drained;\nnew flows, packets, bytes: sent to the backend since the \
         datapath was loaded"
    )
}

pub(super) fn health(healthy: bool) -> &'static str {
    if healthy { "up" } else { "DOWN" }
}

/// `lb explain`: per backend, its weight in configured units, what decided it, and
/// the decision in the policy's own (finer) units, said as such.
pub fn explain(items: &[Explanation]) -> String {
    let mut blocks = Vec::new();
    for e in items {
        let mut t = Table::untitled(&[Align::Left, Align::Left]);
        let before = e
            .weight_before
            .map(|w| format!(", {} before the policy's last update", weight(w)))
            .unwrap_or_default();
        t.row(vec![
            "weight".into(),
            format!(
                "{} (configured {}{before})",
                weight(e.weight),
                count(u64::from(e.inputs.configured_weight))
            ),
        ]);
        let policy = e.policy.map_or_else(|| "-".to_owned(), |p| p.to_string());
        t.row(vec![
            "set by".into(),
            match e.inputs.control {
                Control::Policy => format!("policy {policy}"),
                held => format!("operator: {held} (policy {policy} waits)"),
            },
        ]);
        if let Some(s) = e.inputs.predicted_latency_s {
            t.row(vec![
                "prediction".into(),
                format!(
                    "{:.2} ms by {}",
                    s * 1000.0,
                    e.inputs.predictor.as_deref().unwrap_or("?")
                ),
            ]);
        }
        if e.policy == Some(crate::core::policy::PolicyKind::Ai) {
            let why = e
                .inputs
                .predictor_why
                .as_deref()
                .unwrap_or("no forecast yet");
            t.row(vec![
                "predictor".into(),
                format!("{} ({why})", e.inputs.predictor_setting),
            ]);
        }
        t.row(vec!["why".into(), e.why.clone()]);
        // The decision's figures are in policy units only when the policy decided.
        if e.inputs.control == Control::Policy && e.weight_before.is_some() {
            t.row(vec![
                String::new(),
                format!(
                    "(figures in policy units: weight 1 is {} of them)",
                    count(u64::from(e.policy_units_per_weight))
                ),
            ]);
        }
        blocks.push(format!(
            "{} backend {}\n{}",
            e.vip,
            e.backend,
            t.render_indented("  ")
        ));
    }
    blocks.join("\n\n")
}

/// `lb tables`: per VIP, its size and digest, then the slots of each backend.
pub fn tables(tables: &[TableView]) -> String {
    let mut blocks = Vec::new();
    for v in tables {
        let mut t = Table::new(&[
            ("backend", Align::Left),
            ("slots", Align::Right),
            ("share", Align::Right),
        ]);
        for (backend, slots) in &v.slots {
            t.row(vec![
                backend.clone(),
                count(*slots as u64),
                percent(*slots as f64, v.size as f64),
            ]);
        }
        blocks.push(format!(
            "VIP {}: {} slots, digest {}\n{}",
            v.vip,
            count(v.size as u64),
            v.digest,
            t.render_indented("  ")
        ));
    }
    blocks.join("\n\n")
}

/// `cluster status` as text.
pub fn cluster(c: &ClusterStatus) -> String {
    if !c.enabled {
        return "not in a fleet: the configuration has no [cluster] section".to_owned();
    }
    let mut out = format!(
        "fleet {} as {}: {}; leader {}{}\n",
        c.cluster,
        c.node,
        if c.connected {
            "connected to etcd".to_owned()
        } else {
            format!(
                "NOT connected to etcd ({}): keeping epoch {}",
                c.last_error.as_deref().unwrap_or("connecting"),
                c.epoch_applied
            )
        },
        c.leader.as_deref().unwrap_or("none"),
        if c.leading { " (this LB)" } else { "" },
    );
    out += &format!(
        "epoch applied here {}, newest {}{}",
        c.epoch_applied,
        c.epoch_newest,
        c.epoch_leader
            .as_ref()
            .map_or_else(String::new, |l| format!(" (from {l})"))
    );
    if c.lag_ms > 0 {
        out += &format!(", waiting {} ms", c.lag_ms);
    }
    out += &format!("\nconfiguration digest {}\n", c.config_digest);
    if let Some(why) = &c.not_applied {
        out += &format!("newest epoch NOT applied: {why}\n");
    }
    if !c.down_here.is_empty() {
        out += &format!(
            "taken out here by this LB's own probes, ahead of the fleet: {}\n",
            c.down_here.join(", ")
        );
    }
    if c.published > 0 || c.fenced > 0 {
        out += &format!(
            "published {} epochs here; {} refused by etcd (another LB led)\n",
            c.published, c.fenced
        );
    }
    for r in &c.refused_records {
        out += &format!("refused record: {r}\n");
    }
    out += &if c.ready {
        "ready: holds the fleet's state (may take traffic)\n".to_owned()
    } else {
        format!("NOT ready: waiting for {}\n", c.waiting_for.join("; "))
    };
    out += &share(c.share.as_ref());
    let mut t = Table::new(&[
        ("node", Align::Left),
        ("epoch", Align::Right),
        ("config", Align::Left),
        ("tables", Align::Left),
        ("age", Align::Right),
        ("vip digests", Align::Left),
    ]);
    for n in &c.nodes {
        let digests: Vec<String> = n
            .tables
            .iter()
            .map(|(vip, d)| format!("{vip}={}", d.as_deref().unwrap_or("-")))
            .collect();
        t.row(vec![
            n.node.clone(),
            n.epoch_applied.to_string(),
            if n.same_config { "same" } else { "DIFFERS" }.to_owned(),
            if n.agrees { "newest" } else { "OTHER" }.to_owned(),
            format!("{} ms", n.age_ms),
            digests.join(" "),
        ]);
    }
    out + &t.render_indented("")
}

/// The flow-sharing lines of `lb cluster status`.
fn share(s: Option<&crate::share::ShareState>) -> String {
    let Some(s) = s else {
        return "flow sharing: off (no [cluster] share_listen): a flow whose LB leaves \
                keeps its backend only if its slot did not move since it began\n"
            .to_owned();
    };
    let mut out = format!(
        "flow sharing on {}: reported {}, sent {} ({} bytes), received {}, inserted {}, \
         kept {}, refused {}\n",
        s.listen.map_or_else(|| "-".to_owned(), |a| a.to_string()),
        s.reported,
        s.flows_sent,
        s.bytes_sent,
        s.flows_received,
        s.flows_inserted,
        s.flows_kept,
        s.flows_refused
    );
    if s.ring_full + s.peer_slow + s.unnamed > 0 {
        out += &format!(
            "  NOT shared: {} (datapath ring full), {} (a peer too slow), {} (VIP or \
             backend gone)\n",
            s.ring_full, s.peer_slow, s.unnamed
        );
    }
    if let Some(why) = &s.last_refusal {
        out += &format!("  last refusal: {why}\n");
    }
    for (node, p) in &s.peers {
        out += &format!(
            "  peer {node} {}: to it {}, from it {}{}\n",
            p.address.map_or_else(|| "-".to_owned(), |a| a.to_string()),
            match (p.sending, p.dump_sent) {
                (true, _) => "streaming",
                (false, true) => "reconnecting",
                (false, false) => "connecting",
            },
            match (p.receiving, p.dump_received) {
                (true, true) => "streaming",
                (true, false) => "dump under way",
                (false, true) => "disconnected (dump was received)",
                (false, false) => "nothing yet",
            },
            p.last_error
                .as_ref()
                .map_or_else(String::new, |e| format!(" (last error: {e})"))
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::api::ExplainInputs;

    #[test]
    fn status_shows_the_model_and_a_refused_reload() {
        let s = Status {
            instance: "default".into(),
            iface: "eth0".into(),
            uptime_seconds: 200,
            vips: 1,
            backends: 3,
            policy: "ai".into(),
            model: ModelStatus {
                fit_failures: 2,
                last_fit_seconds: Some(0.125),
                unhealthy_backends: vec!["198.18.0.13".into()],
            },
            last_reload: Some(ReloadOutcome {
                seconds_ago: 5,
                ok: false,
                error: Some("vip[0].port: bad".into()),
            }),
            ..Status::default()
        };
        let text = status(&s);
        assert!(
            text.contains(
                "model        last fit took 0.12 s, 2 fit failures; unhealthy: 198.18.0.13"
            ),
            "{text}"
        );
        assert!(
            text.contains("REFUSED 5 s ago, nothing changed: vip[0].port: bad"),
            "{text}"
        );
        assert!(text.contains("uptime       3 min 20 s"), "{text}");
        assert!(text.contains("flood guard OFF"), "{text}");
        assert!(!text.contains("maps (memory"), "no maps, no block: {text}");
        assert!(!text.contains("full NAT"), "no NAT VIP, no block: {text}");
        let with_nat = status(&Status {
            nat: Some(crate::api::NatStatus {
                flows: 1234,
                ports_per_source: 64512,
                sources: vec![crate::api::NatSourceUse {
                    address: "198.18.200.1".into(),
                    ports_in_use: 1234,
                }],
                ports_exhausted: 7,
                ..Default::default()
            }),
            ..s.clone()
        });
        assert!(with_nat.contains("198.18.200.1 holds"), "{with_nat}");
        assert!(with_nat.contains("1,234 ports"), "{with_nat}");
        assert!(
            with_nat
                .lines()
                .any(|l| l.contains("ports exhausted") && l.ends_with(" 7")),
            "{with_nat}"
        );
        let with_maps = status(&Status {
            maps: vec![
                MapMemoryView {
                    name: "CONNS_V4".into(),
                    max_entries: 1 << 20,
                    bytes: 104_955_904,
                    ..MapMemoryView::default()
                },
                MapMemoryView {
                    name: "VIPS".into(),
                    max_entries: 64,
                    bytes: 4_096,
                    ..MapMemoryView::default()
                },
                MapMemoryView {
                    name: "RINGS".into(),
                    max_entries: lb_common::maps::rings_entries(8),
                    bytes: 2_105_344,
                    ..MapMemoryView::default()
                },
            ],
            ..s
        });
        assert!(
            with_maps.contains("RINGS     262,148 entries (8 VIPs)  2.11 MB"),
            "{with_maps}"
        );
        assert!(
            with_maps.lines().any(
                |l| l.trim_start().starts_with("CONNS_V4") && l.contains(" 1,048,576 entries ")
            ),
            "{with_maps}"
        );
        assert!(with_maps.contains("total"), "{with_maps}");
        assert!(!text.contains('{'), "{text}");
    }

    #[test]
    fn tables_are_text_not_json() {
        let t = TableView {
            vip: "198.18.1.1:80/tcp".into(),
            size: 7,
            digest: "d9e8a718b48a4644".into(),
            slots: BTreeMap::from([("198.18.0.11".into(), 4), ("198.18.0.12".into(), 3)]),
        };
        assert_eq!(
            tables(&[t]),
            "VIP 198.18.1.1:80/tcp: 7 slots, digest d9e8a718b48a4644\n\
             \x20 backend      slots   share\n\
             \x20 198.18.0.11      4  57.1 %\n\
             \x20 198.18.0.12      3  42.9 %"
        );
    }

    #[test]
    fn explain_names_the_units_of_both_scales() {
        let e = Explanation {
            vip: "198.18.1.1:80/tcp".into(),
            backend: "198.18.0.11".parse().unwrap(),
            policy: Some(crate::core::policy::PolicyKind::Ai),
            inputs: ExplainInputs {
                configured_weight: 1,
                control: Control::Policy,
                predicted_latency_s: Some(0.0123),
                predictor: Some("svr".into()),
                predictor_setting: crate::core::model::PredictorSetting::Auto,
                predictor_why: Some("svr: svr has a rolling MAE of 0.0010".into()),
            },
            weight_before: Some(1.0),
            weight: 0.9,
            policy_units_per_weight: 3333,
            why: "ai: target 2,900 (filtered, noise 10), smoothed to 3,000".into(),
        };
        let text = explain(&[e]);
        assert!(
            text.contains("weight      0.9 (configured 1, 1 before"),
            "{text}"
        );
        assert!(text.contains("weight 1 is 3,333 of them"), "{text}");
        assert!(text.contains("12.30 ms by svr"), "{text}");
        assert!(
            text.contains("predictor   auto (svr: svr has a rolling MAE of 0.0010)"),
            "{text}"
        );
    }

    #[test]
    fn cluster_status_says_readiness_and_each_peers_sharing() {
        let mut c = ClusterStatus {
            enabled: true,
            cluster: "edge".into(),
            node: "lb-a".into(),
            waiting_for: vec!["the flows of lb-b".into()],
            ..ClusterStatus::default()
        };
        let text = cluster(&c);
        assert!(
            text.contains("NOT ready: waiting for the flows of lb-b"),
            "{text}"
        );
        assert!(text.contains("flow sharing: off"), "{text}");
        c.ready = true;
        c.share = Some(crate::share::ShareState {
            listen: Some("198.18.0.2:7947".parse().unwrap()),
            reported: 5,
            ring_full: 2,
            peers: [(
                "lb-b".to_owned(),
                crate::share::PeerState {
                    address: Some("198.18.0.3:7947".parse().unwrap()),
                    sending: true,
                    dump_sent: true,
                    receiving: true,
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        });
        let text = cluster(&c);
        assert!(text.contains("ready: holds the fleet's state"), "{text}");
        assert!(
            text.contains("flow sharing on 198.18.0.2:7947: reported 5"),
            "{text}"
        );
        assert!(
            text.contains("NOT shared: 2 (datapath ring full)"),
            "{text}"
        );
        assert!(
            text.contains("peer lb-b 198.18.0.3:7947: to it streaming, from it dump under way"),
            "{text}"
        );
    }
}
