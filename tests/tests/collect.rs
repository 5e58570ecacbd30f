//! The collectors against real processes, each test in a fresh network namespace with
//! only `lo` (and, for node-exporter, a veth pair inside it), no default route:
//! - the real `prometheus-node-exporter` scraped twice: utilisations in range, rates
//!   from real counters, and a real exposition parsed without a single bad line;
//! - an HTTP server written here that misbehaves on purpose (too big, silent,
//!   trickling, not UTF-8, NaN, bad status): each gives its named error or reject,
//!   within the timeout, and nothing panics;
//! - health probes against a real TCP listener that is stopped and restarted:
//!   unhealthy after exactly `fall` failed probes, healthy after exactly `rise`.
//!
//! Every process and thread started here is stopped by a guard's `Drop`, so a failing
//! assertion leaves nothing behind (and the namespace's removal kills any straggler).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use lb_tests::netns::{Netns, unique_prefix};
use lb_tests::tcp::BackendServer;
use lb_userspace::collect::{
    BackendSample, CollectError, ProbeConfig, Prober, Rejects, ScrapeConfig, Scraper,
};

const NODE_EXPORTER: &str = "/usr/bin/prometheus-node-exporter";

/// A fresh namespace with `lo` up.
fn namespace(tag: &str) -> Netns {
    let ns = Netns::new(format!("{}-{tag}", unique_prefix())).unwrap();
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    ns
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A child process that is killed and reaped when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn require_node_exporter() {
    let installed = std::process::Command::new("dpkg")
        .args(["-s", "prometheus-node-exporter"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        installed && Path::new(NODE_EXPORTER).is_file(),
        "the Debian package prometheus-node-exporter is not installed \
         (`cargo xtask setup` as root installs it)"
    );
}

fn in_unit(v: Option<f64>) -> bool {
    v.is_some_and(|v| (0.0..=1.0).contains(&v))
}

#[test]
fn node_exporter_scraped_twice() {
    require_node_exporter();
    let ns = namespace("ne");
    // A veth pair inside the namespace, so that there is a network device besides lo
    // (node-exporter leaves lo out by itself). No IPv6: no link-local traffic at all.
    ns.sysctl(&[
        ("net/ipv6/conf/all/disable_ipv6", "1"),
        ("net/ipv6/conf/default/disable_ipv6", "1"),
    ])
    .unwrap();
    ns.ip(&[
        "link", "add", "col0", "type", "veth", "peer", "name", "col1",
    ])
    .unwrap();
    for dev in ["col0", "col1"] {
        ns.ip(&["link", "set", dev, "up"]).unwrap();
    }
    ns.ip(&["addr", "add", "198.18.0.1/30", "dev", "col0"])
        .unwrap();
    ns.ip(&["addr", "add", "198.18.0.2/30", "dev", "col1"])
        .unwrap();

    let log_path = std::env::temp_dir().join(format!("{}-node-exporter.log", ns.name()));
    let log = File::create(&log_path).unwrap();
    let mut cmd = ns.command(NODE_EXPORTER);
    cmd.args([
        "--web.listen-address=127.0.0.1:9100",
        // Collectors that only log errors in a container and add nothing here.
        "--no-collector.hwmon",
        "--no-collector.thermal_zone",
        "--no-collector.powersupplyclass",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::from(log));
    let _exporter = ChildGuard(ns.spawn_command(&mut cmd).unwrap());
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let started = Instant::now();
    let (first, second, gap, rejects) = ns
        .run_in(|| {
            runtime().block_on(async {
                let mut cfg = ScrapeConfig::new("http://127.0.0.1:9100/metrics");
                cfg.timeout = Duration::from_secs(3);
                // Real series of the exporter's own HTTP handler: a gauge that is 1
                // while a scrape is served, and a counter of served scrapes.
                cfg.in_flight = Some("promhttp_metric_handler_requests_in_flight".into());
                cfg.requests = Some("promhttp_metric_handler_requests_total{code=\"200\"}".into());
                cfg.latency = Some("go_gc_duration_seconds".into());
                // Wait until it listens; scrapes that fail meanwhile are not counted
                // by this scraper.
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let mut probe = Scraper::new(cfg.clone()).unwrap();
                    if probe.scrape().await.is_ok() {
                        break;
                    }
                    assert!(Instant::now() < deadline, "node-exporter never answered");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // Let the exporter count the scrapes above before the measured ones.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let mut scraper = Scraper::new(cfg).unwrap();
                let t = Instant::now();
                let first = scraper.scrape().await.unwrap();
                tokio::time::sleep(Duration::from_secs(1)).await;
                let second = scraper.scrape().await.unwrap();
                (first, second, t.elapsed(), scraper.rejects().clone())
            })
        })
        .unwrap();
    eprintln!("first {first:?}\nsecond {second:?}\nrejects {rejects:?} ({gap:?} apart)");
    let context = || format!("{second:?} {rejects:?}\nnode-exporter log:\n{}", log_text());

    // The first scrape has gauges only.
    assert!(in_unit(first.memory), "{first:?}");
    assert_eq!(first.in_flight, Some(1.0), "{first:?}");
    assert_eq!(
        (
            first.cpu,
            first.disk_busy,
            first.net_bytes_per_s,
            first.requests_per_s
        ),
        (None, None, None, None)
    );
    // The second has rates.
    assert!(in_unit(second.cpu), "{}", context());
    assert!(in_unit(second.memory), "{}", context());
    assert_eq!(second.in_flight, Some(1.0), "{}", context());
    assert!(
        second.net_bytes_per_s.is_some_and(|v| v >= 0.0),
        "the veth pair gives network series: {}",
        context()
    );
    // One scrape was served between the two: about one per (just over a) second.
    let rps = second.requests_per_s.expect("requests_per_s");
    assert!((0.3..=1.5).contains(&rps), "{rps} {}", context());
    // /proc/diskstats is not per namespace: the machine's disks show, unless it has
    // none that node-exporter reports (then the series is missing, and counted).
    match second.disk_busy {
        Some(v) => assert!((0.0..=1.0).contains(&v), "{}", context()),
        None => {
            eprintln!("no disk series: this machine has no disk node-exporter reports");
            assert!(rejects.missing_series >= 2, "{}", context());
        }
    }
    // Go's GC may not have run between the scrapes; if it did, the mean is sane.
    if let Some(l) = second.latency_s {
        assert!((0.0..1.0).contains(&l), "{}", context());
    }
    // The real exposition follows the format to the letter.
    assert_eq!(
        (
            rejects.bad_lines,
            rejects.duplicate_series,
            rejects.nan_or_infinite
        ),
        (0, 0, 0),
        "{}",
        context()
    );
    assert_eq!(rejects.counter_resets, 0, "{}", context());
    assert_eq!(
        (rejects.timeouts, rejects.oversize, rejects.non_utf8),
        (0, 0, 0)
    );
    eprintln!("node-exporter test took {:?}", started.elapsed());
    let _ = std::fs::remove_file(&log_path);
}

/// An HTTP server that answers by path, some answers broken on purpose.
struct HostileServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl HostileServer {
    fn start(ns: &Netns) -> HostileServer {
        let listener = ns
            .run_in(|| TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let acceptor = ns
            .spawn_in(move || {
                let mut handlers = Vec::new();
                while !flag.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let flag = Arc::clone(&flag);
                            handlers.push(thread::spawn(move || {
                                let _ = serve(stream, &flag);
                            }));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
                for h in handlers {
                    let _ = h.join();
                }
            })
            .unwrap();
        HostileServer {
            addr,
            stop,
            acceptor: Some(acceptor),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for HostileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

/// Waits up to 10 s in small steps, returning early when stopped.
fn idle(stop: &AtomicBool, total: Duration) {
    let until = Instant::now() + total;
    while !stop.load(Ordering::SeqCst) && Instant::now() < until {
        thread::sleep(Duration::from_millis(10));
    }
}

const BIG: usize = 2 * 1024 * 1024;

fn big_body() -> Vec<u8> {
    let mut body = Vec::with_capacity(BIG + 64);
    let mut i = 0u64;
    while body.len() < BIG {
        body.extend_from_slice(format!("filler_total{{n=\"{i}\"}} {i}\n").as_bytes());
        i += 1;
    }
    body
}

fn serve(stream: TcpStream, stop: &AtomicBool) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
    }
    let path = request_line.split(' ').nth(1).unwrap_or("").to_owned();
    let mut out = stream;
    let ok_head = "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n";
    match path.as_str() {
        "/ok" => {
            let body = "up 1\nnode_memory_MemAvailable_bytes 25\nnode_memory_MemTotal_bytes 100\n";
            // Chunked, as node-exporter sends it, in two chunks.
            let (a, b) = body.split_at(10);
            write!(
                out,
                "{ok_head}Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                a.len(),
                b.len()
            )?;
        }
        "/big-close" => {
            write!(out, "{ok_head}Connection: close\r\n\r\n")?;
            out.write_all(&big_body())?;
        }
        "/big-length" => {
            let body = big_body();
            write!(out, "{ok_head}Content-Length: {}\r\n\r\n", body.len())?;
            out.write_all(&body)?;
        }
        "/big-chunked" => {
            write!(out, "{ok_head}Transfer-Encoding: chunked\r\n\r\n")?;
            for chunk in big_body().chunks(4096) {
                write!(out, "{:x}\r\n", chunk.len())?;
                out.write_all(chunk)?;
                out.write_all(b"\r\n")?;
            }
            out.write_all(b"0\r\n\r\n")?;
        }
        "/hang" => idle(stop, Duration::from_secs(10)),
        "/trickle" => {
            write!(out, "{ok_head}Content-Length: 1000\r\n\r\n")?;
            for _ in 0..1000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                out.write_all(b"#")?;
                thread::sleep(Duration::from_millis(50));
            }
        }
        "/binary" => {
            let body: &[u8] = b"up 1\nweird{x=\"\xff\xfe\"} 1\n";
            write!(out, "{ok_head}Content-Length: {}\r\n\r\n", body.len())?;
            out.write_all(body)?;
        }
        "/nan" => {
            let body = "node_memory_MemAvailable_bytes NaN\nnode_memory_MemTotal_bytes 100\n\
                        app_in_flight +Inf\n";
            write!(out, "{ok_head}Content-Length: {}\r\n\r\n{body}", body.len())?;
        }
        "/unavailable" => {
            write!(
                out,
                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
            )?;
        }
        _ => write!(out, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")?,
    }
    out.flush()?;
    // Let the client read everything before the close.
    let _ = out.shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; 1024];
    let _ = (&out).read(&mut sink);
    Ok(())
}

#[test]
fn bad_endpoints_give_named_errors_within_the_timeout() {
    let ns = namespace("bad");
    let server = HostileServer::start(&ns);
    let timeout = Duration::from_millis(700);
    let scraper = |path: &str| {
        let mut cfg = ScrapeConfig::new(server.url(path));
        cfg.timeout = timeout;
        cfg.in_flight = Some("app_in_flight".into());
        Scraper::new(cfg).unwrap()
    };
    type Outcome = (Result<BackendSample, CollectError>, Duration, Rejects);
    let paths = [
        "/ok",
        "/big-close",
        "/big-length",
        "/big-chunked",
        "/hang",
        "/trickle",
        "/binary",
        "/nan",
        "/unavailable",
    ];
    let outcomes: Vec<Outcome> = ns
        .run_in(|| {
            runtime().block_on(async {
                let mut out = Vec::new();
                for path in paths {
                    let mut s = scraper(path);
                    let t = Instant::now();
                    let result = s.scrape().await;
                    out.push((result, t.elapsed(), s.rejects().clone()));
                }
                // Side by side on one thread, as the agent runs them: the silent
                // backend does not hold up the healthy one.
                let (mut silent, mut healthy) = (scraper("/hang"), scraper("/ok"));
                let t = Instant::now();
                let (silent, healthy) = tokio::join!(
                    async { (silent.scrape().await.is_ok(), t.elapsed()) },
                    async { (healthy.scrape().await.is_ok(), t.elapsed()) },
                );
                assert_eq!((silent.0, healthy.0), (false, true));
                assert!(
                    healthy.1 < Duration::from_millis(300) && silent.1 >= timeout,
                    "healthy took {:?}, silent {:?}",
                    healthy.1,
                    silent.1
                );
                out
            })
        })
        .unwrap();
    for (path, (result, took, rejects)) in paths.iter().zip(&outcomes) {
        eprintln!("{path}: {result:?} in {took:?}, {rejects:?}");
    }
    let [
        ok,
        big_close,
        big_length,
        big_chunked,
        hang,
        trickle,
        binary,
        nan,
        unavailable,
    ] = &outcomes[..]
    else {
        unreachable!()
    };

    let sample = ok.0.as_ref().expect("the well-formed answer");
    assert_eq!(sample.memory, Some(0.75));
    for big in [big_close, big_length, big_chunked] {
        assert!(
            matches!(big.0, Err(CollectError::Oversize { limit }) if limit == 1024 * 1024),
            "{:?}",
            big.0
        );
        assert_eq!(
            big.2,
            Rejects {
                oversize: 1,
                ..Rejects::default()
            }
        );
    }
    for slow in [hang, trickle] {
        assert!(
            matches!(slow.0, Err(CollectError::Timeout { after }) if after == timeout),
            "{:?}",
            slow.0
        );
        assert!(
            slow.1 >= timeout && slow.1 < timeout + Duration::from_millis(500),
            "took {:?} with a timeout of {timeout:?}",
            slow.1
        );
        assert_eq!(
            slow.2,
            Rejects {
                timeouts: 1,
                ..Rejects::default()
            }
        );
    }
    assert!(
        matches!(binary.0, Err(CollectError::NotUtf8 { valid_up_to: 14 })),
        "{:?}",
        binary.0
    );
    assert_eq!(
        binary.2,
        Rejects {
            non_utf8: 1,
            ..Rejects::default()
        }
    );
    let sample = nan.0.as_ref().expect("a body with NaN still parses");
    assert_eq!((sample.memory, sample.in_flight), (None, None));
    assert_eq!(nan.2.nan_or_infinite, 2, "{:?}", nan.2);
    assert!(
        matches!(unavailable.0, Err(CollectError::HttpStatus { status: 503 })),
        "{:?}",
        unavailable.0
    );
}

#[test]
fn probes_follow_the_listener_with_rise_and_fall() {
    let ns = namespace("prb");
    let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let mut cfg = ProbeConfig::new(addr);
    cfg.timeout = Duration::from_millis(500);
    cfg.rise = 2;
    cfg.fall = 3;
    let mut prober = Prober::new(cfg);
    let rt = runtime();
    // Each probe runs on a thread in the namespace; the prober moves in and out.
    let probe = |prober: &mut Prober| ns.run_in(|| rt.block_on(prober.probe())).unwrap();

    let server = BackendServer::start(&ns, addr, "b0").unwrap();
    let r = probe(&mut prober);
    assert!(r.ok && r.connect_s.is_some() && r.error.is_none(), "{r:?}");
    assert!(prober.healthy());

    // Stopped: refused at once; healthy until the third failure in a row.
    server.stop();
    for i in 1..=3 {
        let r = probe(&mut prober);
        assert!(!r.ok && r.connect_s.is_none(), "{r:?}");
        assert!(
            r.error.as_deref().unwrap_or("").contains("cannot connect"),
            "{r:?}"
        );
        assert_eq!(prober.healthy(), i < 3, "after {i} failed probes");
    }
    let r = probe(&mut prober);
    assert!(!r.ok && !prober.healthy());

    // Restarted on the same address: healthy again at the second success.
    let _server = BackendServer::start(&ns, addr, "b0").unwrap();
    for i in 1..=2 {
        let r = probe(&mut prober);
        assert!(r.ok, "{r:?}");
        assert_eq!(prober.healthy(), i == 2, "after {i} successful probes");
    }
}

#[test]
fn http_probes() {
    let ns = namespace("hpr");
    let server = HostileServer::start(&ns);
    let rt = runtime();
    let probe = |path: &str| {
        let mut cfg = ProbeConfig::new(server.addr);
        cfg.http_path = Some(path.into());
        cfg.timeout = Duration::from_millis(500);
        cfg.fall = 1;
        let mut prober = Prober::new(cfg);
        let t = Instant::now();
        let r = ns.run_in(|| rt.block_on(prober.probe())).unwrap();
        (r, t.elapsed(), prober.healthy())
    };

    let (r, _, healthy) = probe("/ok");
    assert!(r.ok && healthy, "{r:?}");
    assert_eq!(r.http_status, Some(200));
    assert!(r.connect_s.is_some() && r.http_s.is_some(), "{r:?}");

    let (r, _, healthy) = probe("/unavailable");
    assert!(!r.ok && !healthy, "{r:?}");
    assert_eq!(r.http_status, Some(503));

    // Connected, then no answer: a timeout that still reports the connect time.
    let (r, took, _) = probe("/hang");
    assert!(
        !r.ok && r.connect_s.is_some() && r.http_status.is_none(),
        "{r:?}"
    );
    assert!(r.error.as_deref().unwrap_or("").contains("within"), "{r:?}");
    assert!(took < Duration::from_millis(1000), "took {took:?}");

    let (r, _, _) = probe("no-slash");
    assert!(!r.ok && r.connect_s.is_some(), "{r:?}");
}
