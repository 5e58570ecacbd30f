//! The datapath's rare events through aya-log: a record is made only at the level the
//! program was loaded with (`lb run --datapath-log LEVEL`), reaches the agent's log,
//! and never changes a verdict or a counter; with the log off the verifier removes
//! the records' code. Malformed IP headers stand for the events here: anyone can send
//! one, where a failed connection-table insert or encapsulation cannot be provoked
//! from outside.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::maps::LOG_TARGET;
use lb_tests::{
    packet::{TCP_SYN, send_raw, tcp_frame},
    spread::{Agent, write_config},
    topology::{CLIENT_V4, Topology, VIP_V4},
};
use lb_userspace::{config::Config, dataplane::Dataplane, desired::Desired};
use log::{Level, LevelFilter};

const XDP_PASS: u32 = 2;

const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

const CONFIG: &str = r#"
[[vip]]
address = "198.18.1.1"
port = 80
protocol = "tcp"
table_size = 251
[[vip.backend]]
address = "198.18.0.11"
mac = "02:00:00:00:00:11"
weight = 1
"#;

/// A SYN to the VIP whose IPv4 header length field says 16 bytes, less than the
/// fixed header.
fn short_ihl(lb_mac: [u8; 6], client_mac: [u8; 6], client: Ipv4Addr, vip: Ipv4Addr) -> Vec<u8> {
    let mut frame = tcp_frame(
        lb_mac,
        client_mac,
        IpAddr::V4(client),
        IpAddr::V4(vip),
        41000,
        80,
        TCP_SYN,
        b"",
    );
    frame[14] = 0x44;
    frame
}

/// Malformed frames to the VIP, each with the record it makes at `debug`.
fn malformed() -> Vec<(Vec<u8>, &'static str)> {
    let client = IpAddr::V4(CLIENT_V4);
    let vip = IpAddr::V4(VIP_V4);
    let mut short_total = tcp_frame(LB_MAC, CLIENT_MAC, client, vip, 41001, 80, TCP_SYN, b"");
    short_total[16..18].copy_from_slice(&12u16.to_be_bytes());
    let client6: IpAddr = "fd00:18::1".parse().unwrap();
    let vip6: IpAddr = "fd00:18:1::1".parse().unwrap();
    let mut version4 = tcp_frame(LB_MAC, CLIENT_MAC, client6, vip6, 41002, 80, TCP_SYN, b"");
    version4[14] = 0x40;
    vec![
        (
            short_ihl(LB_MAC, CLIENT_MAC, CLIENT_V4, VIP_V4),
            "malformed IPv4 header from 198.18.0.1 to 198.18.1.1: version and header length 0x44, total length 40; passed",
        ),
        (
            short_total,
            "malformed IPv4 header from 198.18.0.1 to 198.18.1.1: version and header length 0x45, total length 12; passed",
        ),
        (
            version4,
            "malformed IPv6 header from fd00:18::1 to fd00:18:1::1: version 4; passed",
        ),
    ]
}

/// Every record the datapath's log hands over: level, target and text.
#[derive(Clone, Default)]
struct Records(Arc<Mutex<Vec<(Level, String, String)>>>);

impl log::Log for Records {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        self.0.lock().unwrap().push((
            record.level(),
            record.target().to_owned(),
            record.args().to_string(),
        ));
    }

    fn flush(&self) {}
}

/// The balancer loaded with its log at `level` and the test's VIP in its maps.
fn load(level: LevelFilter) -> Dataplane {
    let config = Config::parse(CONFIG).unwrap();
    let desired = Desired::from_config(&config).unwrap();
    let mut dataplane = Dataplane::load_logging(level).expect("loading the XDP program");
    dataplane.apply_and_wait(&desired).unwrap();
    dataplane
}

#[test]
fn records_are_made_at_the_level_loaded_and_change_no_verdict() {
    let frames = malformed();
    for level in [LevelFilter::Off, LevelFilter::Warn, LevelFilter::Debug] {
        let mut dataplane = load(level);
        let records = Records::default();
        let mut reader = dataplane.take_log(records.clone()).unwrap();
        for (frame, _) in &frames {
            let mut out = vec![0u8; frame.len() + 256];
            let result = dataplane
                .program()
                .unwrap()
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    ..TestRunOptions::default()
                })
                .expect("BPF_PROG_TEST_RUN");
            out.truncate(result.data_size_out as usize);
            assert_eq!(result.return_value, XDP_PASS, "log {level}");
            assert_eq!(&out, frame, "log {level}: the frame changed");
        }
        let stats = dataplane.global_stats().unwrap();
        assert_eq!(stats.pass_malformed, frames.len() as u64, "log {level}");
        assert_eq!(stats.rx_frames, frames.len() as u64, "log {level}");
        reader.flush();
        let got = std::mem::take(&mut *records.0.lock().unwrap());
        if level < LevelFilter::Debug {
            assert!(got.is_empty(), "log {level} made records: {got:?}");
            continue;
        }
        let want: Vec<(Level, String, String)> = frames
            .iter()
            .map(|(_, text)| (Level::Debug, LOG_TARGET.to_owned(), (*text).to_owned()))
            .collect();
        assert_eq!(got, want, "log {level}");
    }
}

/// The mechanism behind "off costs nothing": the level is a constant to the
/// verifier, which removes the code of every record below it. Each level that makes
/// fewer records leaves a smaller program.
#[test]
fn the_verifier_removes_the_records_below_the_level() {
    let size = |level| {
        load(level)
            .program()
            .unwrap()
            .info()
            .unwrap()
            .size_translated()
            .expect("the kernel reports the program's size")
    };
    let (off, warn, debug) = (
        size(LevelFilter::Off),
        size(LevelFilter::Warn),
        size(LevelFilter::Debug),
    );
    assert!(
        off < warn && warn < debug,
        "bytes after verification: off {off}, warn {warn}, debug {debug}"
    );
}

/// The packet counter of malformed headers, as `lb status` shows it.
fn malformed_count(agent: &Agent) -> u64 {
    let status: serde_json::Value =
        serde_json::from_str(&agent.ctl(&["status", "--json"]).unwrap()).unwrap();
    status["datapath"]["pass_malformed"].as_u64().unwrap()
}

/// Polls `done` every 50 ms for at most 10 s.
fn wait_until(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn a_malformed_packet_reaches_the_agents_log_with_datapath_log_debug_only() {
    let topo = Topology::build(1).unwrap();
    let config = write_config(&topo, &[1], "").unwrap();
    let frame = short_ihl(
        topo.lb().mac().octets(),
        topo.client().mac().octets(),
        CLIENT_V4,
        VIP_V4,
    );
    // Sent out of the load balancer's bridge port, straight to its interface: the
    // bridge itself would drop it (its netfilter hook checks IPv4 headers).
    let port = topo.lb_bridge_port().to_owned();
    let send = || {
        topo.switch()
            .run_in(|| send_raw(&port, &frame))
            .unwrap()
            .expect("sending the malformed frame")
    };
    let expected =
        "malformed IPv4 header from 198.18.0.1 to 198.18.1.1: version and header length 0x44";

    let logging = ["--metrics-address", "off", "--datapath-log", "debug"];
    let mut agent = Agent::start(&topo, &config, &logging).unwrap();
    let before = malformed_count(&agent);
    let sent = Instant::now();
    send();
    let mut log = Vec::new();
    let found = wait_until(|| {
        log.extend(agent.drain_log());
        log.iter().any(|l| l.contains(expected))
    });
    assert!(
        found,
        "no record in the agent's log ({} malformed headers counted, {before} before):\n{}",
        malformed_count(&agent),
        log.join("\n")
    );
    let took = sent.elapsed();
    let line = log.iter().find(|l| l.contains(expected)).unwrap();
    assert!(
        line.contains("DEBUG") && line.contains(LOG_TARGET),
        "{line}"
    );
    assert_eq!(malformed_count(&agent), before + 1);
    agent.stop().unwrap();

    // The next agent adopts the datapath and replaces its program with one loaded
    // with the log off (the default).
    let mut agent = Agent::start(&topo, &config, &["--metrics-address", "off"]).unwrap();
    let before = malformed_count(&agent);
    send();
    assert!(
        wait_until(|| malformed_count(&agent) == before + 1),
        "the frame did not reach the program"
    );
    // Five times as long as the record took to show above, and at least 0.5 s.
    std::thread::sleep((took * 5).max(Duration::from_millis(500)));
    let mut log = agent.drain_log();
    log.extend(agent.stop().unwrap());
    assert!(
        !log.iter()
            .any(|l| l.contains(LOG_TARGET) || l.contains("malformed")),
        "a record with the log off:\n{}",
        log.join("\n")
    );
}
