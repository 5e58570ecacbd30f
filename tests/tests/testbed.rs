//! The policy testbed's pieces (`lb_tests::testbed`), each on its own: the emulated
//! backend's capacity, slowdown, fail-fast mode and metrics; the open-loop load
//! generator's rate and its latency from the scheduled start; long-lived (`/hold`)
//! connections and their client; and one short run of scenario S2 through the real
//! agent and the real XDP datapath.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lb_tests::netns::{Netns, unique_prefix};
use lb_tests::testbed::backend::{BackendSpec, EmulatedBackend, Endpoints};
use lb_tests::testbed::hold::{HoldClients, HoldSpec, Stage};
use lb_tests::testbed::loadgen::{self, LoadSpec, Outcome};
use lb_tests::testbed::report::RunMetrics;
use lb_tests::testbed::scenario::{self, RunOptions, Scenario};
use lb_tests::topology::Topology;
use lb_userspace::core::policy::{PolicyKind, Variant};

/// The backend's address inside a one-namespace world.
const ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
/// The application port in tests (the testbed's 80 is the health endpoint).
const APP: u16 = 8080;

/// Whether the agent's configuration gets `[vip.health]` and `[vip.metrics]`.
const HEALTH_METRICS: bool = true;

/// One namespace with 198.18.0.11 on `lo`, and a backend serving it.
fn lonely_backend(slots: usize, service_ms: u64) -> (Netns, EmulatedBackend) {
    let ns = Netns::new(format!("{}-tb", unique_prefix())).unwrap();
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    ns.ip(&["addr", "add", &format!("{ADDR}/32"), "dev", "lo"])
        .unwrap();
    let own = IpAddr::V4(ADDR);
    let backend = EmulatedBackend::start_with(
        &ns,
        BackendSpec::new("b0", slots, Duration::from_millis(service_ms)),
        Endpoints {
            app: vec![SocketAddr::new(own, APP)],
            probe: Some(SocketAddr::new(own, 80)),
            metrics: Some(SocketAddr::new(own, 9100)),
        },
    )
    .unwrap();
    (ns, backend)
}

/// Sends one HTTP/1.0 request from inside `ns`; returns the response.
fn get(ns: &Netns, port: u16, path: &str) -> String {
    let path = path.to_owned();
    ns.run_in(move || {
        let mut s = TcpStream::connect((ADDR, port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .unwrap()
}

/// Starts `n` requests at once from inside `ns`; returns each one's response time
/// and body, sorted by time.
fn concurrent(ns: &Netns, n: usize) -> Vec<(Duration, String)> {
    let mut out = ns
        .run_in(move || {
            let start = Instant::now();
            let threads: Vec<_> = (0..n)
                .map(|_| {
                    std::thread::spawn(move || {
                        let mut s = TcpStream::connect((ADDR, APP)).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
                        let mut body = Vec::new();
                        s.read_to_end(&mut body).unwrap();
                        (start.elapsed(), String::from_utf8_lossy(&body).into_owned())
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect::<Vec<_>>()
        })
        .unwrap();
    out.sort();
    out
}

/// A held connection is answered by its backend, line after line, outside the
/// slots and the request metrics; its client records every answer, and the error
/// that ends a connection whose backend went away.
#[test]
fn held_connections_are_answered_until_closed_and_their_end_is_recorded() {
    let (ns, backend) = lonely_backend(1, 200);
    // By hand: the head, the name, then the name for each line (two sent at once).
    let raw = ns
        .run_in(|| {
            let mut s = TcpStream::connect((ADDR, APP)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET /hold HTTP/1.0\r\n\r\na\nb\n").unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
        .unwrap();
    assert_eq!(
        raw, "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nb0\nb0\nb0\n",
        "{raw:?}"
    );
    let holds = HoldClients::start(
        &ns,
        HoldSpec {
            interval: (Duration::from_millis(50), Duration::from_millis(100)),
            ..HoldSpec::new(SocketAddr::new(IpAddr::V4(ADDR), APP))
        },
    )
    .unwrap();
    let ids = holds.open(20).unwrap();
    assert_eq!(ids, (0..20).collect::<Vec<_>>());
    // Twenty held at once on one slot of 200 ms: none waits for a slot.
    std::thread::sleep(Duration::from_millis(600));
    let counts = backend.counts();
    assert_eq!((counts.holds, counts.held), (21, 20), "{counts:?}");
    assert_eq!((counts.accepted, counts.in_flight), (0, 0), "{counts:?}");
    assert!(backend.exposition().contains("app_requests_in_flight 0"));
    let stopped = holds.stop().unwrap();
    for h in &stopped {
        assert!(h.kept(), "{}", h.describe());
        assert!(h.answers.len() >= 4, "{}", h.describe());
        assert!(h.local_port.is_some());
    }
    // The backend goes: an open connection ends with an error, recorded.
    let holds =
        HoldClients::start(&ns, HoldSpec::new(SocketAddr::new(IpAddr::V4(ADDR), APP))).unwrap();
    holds.open(3).unwrap();
    drop(backend);
    std::thread::sleep(Duration::from_millis(800));
    for h in holds.stop().unwrap() {
        let e = h
            .error
            .as_ref()
            .unwrap_or_else(|| panic!("{}", h.describe()));
        assert_eq!(e.stage, Stage::Ping, "{}", h.describe());
        assert!(!h.kept());
    }
}

#[test]
fn backend_serves_slots_at_a_time_and_queues_the_rest() {
    let (ns, backend) = lonely_backend(2, 50);
    let times = concurrent(&ns, 4);
    for (_, response) in &times {
        assert!(response.starts_with("HTTP/1.0 200 OK\r\n"), "{response}");
        assert!(response.ends_with("\r\n\r\nb0"), "{response}");
    }
    let ms: Vec<u128> = times.iter().map(|(d, _)| d.as_millis()).collect();
    // Two slots of 50 ms: two answers at about 50 ms, two at about 100 ms.
    assert!(ms[0] >= 48 && ms[1] < 90, "{ms:?}");
    assert!(ms[2] >= 95 && ms[3] >= 98 && ms[3] < 160, "{ms:?}");
    let counts = backend.counts();
    assert_eq!((counts.accepted, counts.served, counts.failed), (4, 4, 0));
    assert_eq!(counts.in_flight, 0);
    // Busy time: four services of 50 ms.
    assert!(
        (counts.busy_slot_s - 0.2).abs() < 0.005,
        "{}",
        counts.busy_slot_s
    );
}

#[test]
fn slowdown_stretches_the_service_time_and_can_be_undone() {
    let (ns, backend) = lonely_backend(4, 40);
    let controls = backend.controls();
    controls.set_slowdown(3.0);
    let slow = concurrent(&ns, 1)[0].0.as_millis();
    assert!((118..200).contains(&slow), "{slow} ms at 3x");
    controls.set_slowdown(1.0);
    let normal = concurrent(&ns, 1)[0].0.as_millis();
    assert!((38..90).contains(&normal), "{normal} ms at 1x");
    // The health endpoint answers at once, outside the slots.
    controls.set_slowdown(50.0);
    let t = Instant::now();
    let probe = get(&ns, 80, "/");
    assert!(probe.starts_with("HTTP/1.0 200 OK"), "{probe}");
    assert!(t.elapsed() < Duration::from_millis(500));
}

#[test]
fn fail_fast_answers_503_at_once_and_looks_idle() {
    let (ns, backend) = lonely_backend(2, 100);
    backend.set_fail_fast(true);
    let t = Instant::now();
    let answers = concurrent(&ns, 6);
    assert!(t.elapsed() < Duration::from_millis(90), "{:?}", t.elapsed());
    for (_, response) in &answers {
        assert!(response.starts_with("HTTP/1.0 503 "), "{response}");
    }
    let counts = backend.counts();
    assert_eq!((counts.served, counts.failed), (0, 6));
    assert_eq!(counts.busy_slot_s, 0.0);
    // Health checks still pass: a shallow check does not see the failure.
    assert!(get(&ns, 80, "/").starts_with("HTTP/1.0 200"));
    let metrics = get(&ns, 9100, "/metrics");
    assert!(
        metrics.contains("\napp_requests_total{code=\"503\"} 6\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\napp_requests_in_flight 0\n"),
        "{metrics}"
    );
}

/// The value of the sample line `series` (exact name and labels) in `text`.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn metrics_count_what_was_served() {
    let (ns, backend) = lonely_backend(3, 30);
    concurrent(&ns, 7);
    let response = get(&ns, 9100, "/metrics");
    let (head, text) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    let served = backend.counts().served as f64;
    assert_eq!(served, 7.0);
    assert_eq!(value(text, "app_request_duration_seconds_count"), served);
    assert_eq!(
        value(text, "app_request_duration_seconds_bucket{le=\"+Inf\"}"),
        served
    );
    assert_eq!(value(text, "app_requests_total{code=\"200\"}"), served);
    assert_eq!(value(text, "app_requests_in_flight"), 0.0);
    // 7 requests of 30 ms on 3 slots: at least 3 of them waited one service.
    let sum = value(text, "app_request_duration_seconds_sum");
    assert!(sum > 7.0 * 0.03 + 3.0 * 0.03 - 0.01, "{sum}");
    assert_eq!(
        value(text, "app_request_duration_seconds_bucket{le=\"0.01\"}"),
        0.0
    );
    // CPU: 7 × 30 ms of slot time over 3 slots is 70 ms of "user".
    let user = value(text, "node_cpu_seconds_total{cpu=\"0\",mode=\"user\"}");
    assert!((user - 0.07).abs() < 0.003, "{user}");
    let idle = value(text, "node_cpu_seconds_total{cpu=\"0\",mode=\"idle\"}");
    assert!(idle > 0.0);
    // The agent's own strict parser accepts every line.
    let doc = lb_userspace::collect::text::Exposition::parse(text);
    assert_eq!(doc.bad_lines, 0, "{text}");
    assert!(get(&ns, 9100, "/other").starts_with("HTTP/1.1 404"));
}

#[test]
fn cpu_counters_never_go_down_while_saturated() {
    use lb_userspace::collect::{ScrapeConfig, Scraper};
    let (ns, backend) = lonely_backend(2, 20);
    // 30 requests of 20 ms on 2 slots: 300 ms of saturation.
    let client = {
        let ns = ns.borrowed();
        std::thread::spawn(move || concurrent(&ns, 30))
    };
    std::thread::sleep(Duration::from_millis(30));
    let mut scraper =
        Scraper::new(ScrapeConfig::new(format!("http://{ADDR}:9100/metrics"))).unwrap();
    let (mut idle, mut user) = (0.0, 0.0);
    let mut cpus = Vec::new();
    for _ in 0..100 {
        let text = backend.exposition();
        let i = value(&text, "node_cpu_seconds_total{cpu=\"0\",mode=\"idle\"}");
        let u = value(&text, "node_cpu_seconds_total{cpu=\"0\",mode=\"user\"}");
        assert!(
            i >= idle && u >= user,
            "idle {idle} -> {i}, user {user} -> {u}"
        );
        (idle, user) = (i, u);
        cpus.extend(scraper.ingest(&text, Instant::now()).cpu);
        std::thread::sleep(Duration::from_millis(2));
    }
    client.join().unwrap();
    assert_eq!(scraper.rejects().counter_resets, 0);
    // Every reading during the saturation is (nearly) 100 % busy.
    assert!(cpus.len() > 50, "{cpus:?}");
    assert!(cpus[..50].iter().all(|&c| c > 0.95), "{cpus:?}");
}

#[test]
fn agent_collectors_read_the_backend() {
    use lb_userspace::collect::{ProbeConfig, Prober, ScrapeConfig, Scraper};
    let (ns, backend) = lonely_backend(3, 30);
    let mut cfg = ScrapeConfig::new(format!("http://{ADDR}:9100/metrics"));
    cfg.in_flight = Some("app_requests_in_flight".into());
    cfg.latency = Some("app_request_duration_seconds".into());
    cfg.requests = Some("app_requests_total".into());
    let mut scraper = Scraper::new(cfg).unwrap();
    let mut probe_cfg = ProbeConfig::new(SocketAddr::new(IpAddr::V4(ADDR), 80));
    probe_cfg.http_path = Some("/".into());
    let mut prober = Prober::new(probe_cfg);
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    ns.run_in(|| runtime().block_on(scraper.scrape()).unwrap())
        .unwrap();
    concurrent(&ns, 6);
    let (sample, probe) = ns
        .run_in(|| {
            let rt = runtime();
            (
                rt.block_on(scraper.scrape()).unwrap(),
                rt.block_on(prober.probe()),
            )
        })
        .unwrap();
    assert_eq!(sample.in_flight, Some(0.0), "{sample:?}");
    let latency = sample.latency_s.expect("a latency");
    assert!((0.03..0.08).contains(&latency), "{sample:?}");
    assert!(sample.requests_per_s.is_some_and(|r| r > 0.0), "{sample:?}");
    let cpu = sample.cpu.expect("a CPU utilisation");
    assert!(cpu > 0.2 && cpu <= 1.0, "{sample:?}");
    assert_eq!(scraper.rejects().bad_lines, 0);
    assert!(probe.ok, "{probe:?}");
    assert_eq!(probe.http_status, Some(200));
    assert_eq!(backend.counts().probes, 1);
}

/// A client and one backend on the bridged segment, the backend's application on its
/// own address (no load balancer in the way).
fn direct_world(slots: usize, service_ms: u64) -> (Topology, EmulatedBackend, SocketAddr) {
    let topo = Topology::build(1).unwrap();
    let host = topo.backend(0);
    let own = IpAddr::V4(host.ipv4());
    let target = SocketAddr::new(own, APP);
    let backend = EmulatedBackend::start_with(
        host.ns(),
        BackendSpec::new("backend0", slots, Duration::from_millis(service_ms)),
        Endpoints {
            app: vec![target],
            probe: None,
            metrics: None,
        },
    )
    .unwrap();
    (topo, backend, target)
}

#[test]
fn load_generator_keeps_its_rate() {
    let (topo, backend, target) = direct_world(64, 5);
    let mut spec = LoadSpec::new(target, 300.0, Duration::from_secs(3));
    spec.seed = 42;
    let report = loadgen::run(topo.client().ns(), spec).unwrap();
    let n = report.total();
    assert!(
        (810..=990).contains(&n),
        "{n} requests: {}",
        report.summary()
    );
    assert_eq!(report.ok(), n, "{}", report.summary());
    assert_eq!(backend.counts().served as usize, n);
    // Arrivals are spread over the whole schedule, not bunched.
    let first_half = report
        .records
        .iter()
        .filter(|r| r.scheduled < Duration::from_millis(1500))
        .count();
    assert!(
        (n as f64 * 0.4..n as f64 * 0.6).contains(&(first_half as f64)),
        "{first_half} of {n} in the first half"
    );
    assert!(report.mean_lag() < 0.005, "{}", report.summary());
    // Same seed, same schedule.
    let again = loadgen::run(topo.client().ns(), {
        let mut s = LoadSpec::new(target, 300.0, Duration::from_millis(300));
        s.seed = 42;
        s
    })
    .unwrap();
    for (a, b) in again.records.iter().zip(&report.records) {
        assert_eq!(a.scheduled, b.scheduled);
    }
}

#[test]
fn latency_counts_from_the_scheduled_start() {
    let (topo, _backend, target) = direct_world(16, 20);
    // The rate function runs on the generator's thread: stalling it once for 300 ms
    // holds back every request due meanwhile, as an overloaded generator would.
    let stalled = Arc::new(AtomicBool::new(false));
    let flag = stalled.clone();
    let mut spec = LoadSpec::new(target, 100.0, Duration::from_secs(2));
    spec.rate = Arc::new(move |t| {
        if t >= 0.5 && !flag.swap(true, Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(300));
        }
        100.0
    });
    let report = loadgen::run(topo.client().ns(), spec).unwrap();
    assert!(stalled.load(Ordering::SeqCst));
    assert_eq!(report.ok(), report.total(), "{}", report.summary());
    let late: Vec<_> = report
        .records
        .iter()
        .filter(|r| r.lag() > Duration::from_millis(150))
        .collect();
    assert!(
        !late.is_empty(),
        "no request started late: {}",
        report.summary()
    );
    for r in &report.records {
        assert!(r.started >= r.scheduled, "{r:?}");
        // Latency = lateness + the exchange (at least the 20 ms service).
        assert!(r.latency >= r.lag() + Duration::from_millis(19), "{r:?}");
    }
    for r in late {
        assert!(r.latency > Duration::from_millis(170), "{r:?}");
        assert!(matches!(r.outcome, Outcome::Ok(_)));
    }
}

#[test]
fn scenario_s2_runs_through_the_agent_and_xdp() {
    let mut s2 = Scenario::get("S2", Duration::from_secs(8)).unwrap();
    // A fifth of S2's load: even the slowed backend keeps up under `static`, so any
    // error is the harness's or the datapath's, not the scenario's.
    let rate = 0.2 * s2.capacity();
    s2.rate = loadgen::constant(rate);
    let mut opts = RunOptions::new(Variant::of(PolicyKind::Static));
    opts.health_metrics = HEALTH_METRICS;
    opts.warmup = Duration::from_millis(1500);
    let run = scenario::run(&s2, &opts).unwrap();
    let metrics = RunMetrics::compute(&s2, &run);
    let log = run.agent_log.join("\n");
    assert_eq!(metrics.error_rate, 0.0, "{}\n{log}", run.load.summary());
    assert!(
        (rate * 8.0 * 0.8..rate * 8.0 * 1.2).contains(&(run.load.total() as f64)),
        "{}",
        run.load.summary()
    );
    for (i, c) in run.counts.iter().enumerate() {
        assert!(
            c.served > 0,
            "backend{i} served nothing: {}",
            run.load.summary()
        );
    }
    // Every response came through the load balancer, which counted its flows.
    let last = run.samples.last().unwrap();
    let flows: u64 = last.backends.iter().map(|b| b.new_flows).sum();
    assert!(flows >= run.load.total() as u64, "{flows} flows");
    assert_eq!(metrics.conn_miss_non_syn, 0);
    // `static` keeps its configured weights.
    assert_eq!(metrics.slots_moved_per_min, 0.0);
    assert!(run.samples.len() >= 8, "{} samples", run.samples.len());
}
