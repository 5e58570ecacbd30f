//! The cost of the XDP program per packet, measured by the kernel through
//! `BPF_PROG_TEST_RUN`, for each path a packet can take, against a floor: `lb_pass`,
//! which only returns `XDP_PASS`, run on the same frame. What the figures include
//! besides the program (the test-run loop, the timer) is in the floor too, so the
//! ratio to the floor is the figure to compare across machines.
//!
//! Run it as `cargo bench -p lb-tests --bench datapath` (as root: it loads BPF
//! programs). It prints a table and writes every figure as JSON to the file named by
//! `LB_BENCH_JSON`, or else to `target/bench/datapath.json` under the workspace root.
//!
//! # Method
//!
//! Most cases run one `BPF_PROG_TEST_RUN` with `repeat` = [`REPEAT`] and take the
//! average `duration` the kernel reports (integer nanoseconds: the kernel divides the
//! loop's time by `repeat` and drops the fraction). The kernel does not reset the
//! frame between repetitions, so each repetition sees the output of the one before;
//! every case below is chosen so that this output takes the same path again:
//! - L2 DSR rewrites only the Ethernet addresses, which the program does not read,
//!   so an established flow stays an established flow and a SYN stays a SYN;
//! - a non-VIP packet is passed unchanged.
//!
//! Encapsulation does not repeat: the output has a new outer IPv4 header (protocol
//! 4), which the next repetition would pass as "not a VIP", and `data` moves 20 bytes
//! further into the headroom each time. Live-frame mode (`BPF_F_TEST_XDP_LIVE_FRAMES`,
//! which resets `data`) does not help either: it resets only the packet pointers,
//! not the bytes of a recycled page (Documentation/bpf/bpf_prog_run.rst), so a
//! recycled frame starts with the tail of the outer header the last run wrote;
//! it also transmits every `XDP_TX` frame and times that transmission. So the
//! encapsulation case makes [`CALLS`] separate runs with `repeat` = 1 and averages the
//! per-run durations the kernel reports, and is compared with a floor measured the
//! same way (`lb_pass`, repeat = 1, same number of calls). A run alone carries a
//! fixed cost the repeated loop spreads out (the timer, and an indirect call instead
//! of the XDP dispatcher), so the bench also measures the established DSR case that
//! way: encapsulation's extra cost over DSR in single runs (where that fixed cost
//! cancels), added to the repeated established figure, estimates encapsulation on the
//! repeated-loop scale.
//!
//! # References
//!
//! Three programs of the same object that are never attached measure parts of the
//! paths on the datapath's own maps, in the same rounds: a connection write alone
//! (what every SYN pays), a connection lookup alone (what every established packet
//! pays), and the established path with only what forwarding needs (no counters, no
//! VIP check by id). They show how much of each target the kernel's map operations
//! leave to the rest of the program (docs/BENCHMARKS.md).
//!
//! # Verification
//!
//! Every measurement reads the datapath's named counters (`GlobalStats`) before and
//! after, and checks that exactly the counters of its path grew, each by exactly the
//! number of program runs, and every other counter not at all (`lb_pass` touches
//! none). It also checks the verdict, the output frame, and the per-backend packet
//! counter of the flow's backend.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_common::{
    maps::programs,
    types::{FlowKey, GlobalStats},
};
use lb_tests::packet::{TCP_ACK, TCP_SYN, tcp_frame, verify_checksums};
use lb_userspace::{
    config::Config,
    dataplane::{Dataplane, DataplaneError},
    desired::{Desired, addr_bytes},
};

/// Repetitions of one `BPF_PROG_TEST_RUN` in the repeated cases.
const REPEAT: u32 = 1_000_000;
/// Separate runs (repeat = 1) per round in the single-run cases.
const CALLS: u32 = 200_000;
/// Rounds; within a round every case runs once, in order, so that a disturbance of
/// the machine touches all cases alike. The median over rounds is reported.
const ROUNDS: usize = 25;

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// One VIP per measured path, with the default (largest) table size, as deployed.
const CONFIG: &str = r#"
[encapsulation]
source_v4 = "198.19.0.0"
source_v6 = "fd00:19::"

[[vip]]
address = "198.18.1.1"
port = 80
protocol = "tcp"
[[vip.backend]]
address = "198.18.0.11"
mac = "02:00:00:00:00:11"
weight = 1
[[vip.backend]]
address = "198.18.0.12"
mac = "02:00:00:00:00:12"
weight = 2
[[vip.backend]]
address = "198.18.0.13"
mac = "02:00:00:00:00:13"
weight = 3

[[vip]]
address = "fd00:18:1::1"
port = 80
protocol = "tcp"
[[vip.backend]]
address = "fd00:18::11"
mac = "02:00:00:00:00:21"
weight = 1
[[vip.backend]]
address = "fd00:18::12"
mac = "02:00:00:00:00:22"
weight = 1

[[vip]]
address = "198.18.1.2"
port = 443
protocol = "tcp"
forwarding = "ipip"
[[vip.backend]]
address = "198.18.2.21"
mac = "02:00:00:00:00:fe"
weight = 1

[nat]
source_v4 = "198.18.200.0/30"

[[vip]]
address = "198.18.1.3"
port = 80
protocol = "tcp"
forwarding = "nat"
[[vip.backend]]
address = "198.18.3.11"
mac = "02:00:00:00:00:fe"
weight = 1
[[vip.backend]]
address = "198.18.3.12"
mac = "02:00:00:00:00:fe"
weight = 1
"#;

/// Which program of the object a case runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Program {
    Pass,
    Balancer,
    /// `lb_ref_conn_insert`: one connection-table write alone.
    RefInsert,
    /// `lb_ref_conn_lookup`: one connection-table lookup alone.
    RefLookup,
    /// `lb_ref_forward_only`: the established path without counters or VIP check.
    RefForwardOnly,
}

impl Program {
    fn name(self) -> &'static str {
        match self {
            Program::Pass => programs::PASS,
            Program::Balancer => programs::BALANCER,
            Program::RefInsert => programs::REF_CONN_INSERT,
            Program::RefLookup => programs::REF_CONN_LOOKUP,
            Program::RefForwardOnly => programs::REF_FORWARD_ONLY,
        }
    }
}

/// How a case is timed (see the module documentation).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Method {
    /// One test run with `repeat` = [`REPEAT`]; the kernel's average.
    Repeat,
    /// [`CALLS`] test runs with `repeat` = 1; the mean of the kernel's durations.
    Single,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Repeat => "repeat",
            Method::Single => "single_runs",
        }
    }

    fn describe(self) -> String {
        match self {
            Method::Repeat => format!(
                "one BPF_PROG_TEST_RUN with repeat={REPEAT}; the kernel-reported average duration"
            ),
            Method::Single => format!(
                "{CALLS} BPF_PROG_TEST_RUN calls with repeat=1; mean of the kernel-reported durations"
            ),
        }
    }
}

/// What the output frame must be.
enum Output {
    /// Unchanged.
    Same,
    /// L2 DSR to a backend: its MAC as destination; the source is our MAC after one
    /// run, and the backend's after more (each run moves the destination to the
    /// source); everything after the Ethernet addresses unchanged.
    Dsr { backend_mac: [u8; 6] },
    /// IPv4-in-IPv4 to `backend` via `next_hop`, the input's IP packet inside.
    Ipip { next_hop: [u8; 6], backend: [u8; 4] },
    /// Full NAT: to `mac`, IPv4 destination `dst` (the backend, or the client for a
    /// reply), the same length.
    Nat { mac: [u8; 6], dst: [u8; 4] },
}

struct Case {
    key: &'static str,
    title: &'static str,
    program: Program,
    method: Method,
    frame: Vec<u8>,
    verdict: u32,
    /// The counters that grow by one per run; every other one must stay.
    counters: &'static [&'static str],
    output: Output,
    /// The backend whose packet counter grows by one per run.
    backend_id: Option<u32>,
    /// The case whose time this one is divided by.
    floor: &'static str,
    /// Upper bound on the ratio to the floor.
    target: Option<f64>,
}

impl Case {
    /// A program that passes `frame` unchanged, moves no counter and returns
    /// `XDP_PASS` (the reference programs: when their one map operation succeeded),
    /// repeated: the floor and the references.
    fn reference(key: &'static str, title: &'static str, program: Program, frame: &[u8]) -> Case {
        Case {
            key,
            title,
            program,
            method: Method::Repeat,
            frame: frame.to_vec(),
            verdict: XDP_PASS,
            counters: &[],
            output: Output::Same,
            backend_id: None,
            floor: "floor",
            target: None,
        }
    }
}

/// One measurement of one case.
#[derive(Clone, Copy)]
struct Sample {
    /// Kernel-reported nanoseconds per program run.
    ns: f64,
    /// This thread's CPU time over the whole syscall, per program run: meaningful only
    /// for the repeated method, where the syscall's own cost (about a microsecond) is
    /// spread over `repeat` runs. It keeps the fraction the kernel's integer average
    /// drops, and like the kernel's figure it excludes time the thread was preempted.
    cpu_ns: f64,
    /// Program runs measured.
    runs: u64,
    /// How much each `GlobalStats` counter grew, in the order of [`fields`].
    grew: [u64; 19],
    /// How much the flow's backend's packet counter grew.
    backend_grew: u64,
}

fn main() -> ExitCode {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "datapath bench: must run as root: it loads BPF programs and runs them with \
             BPF_PROG_TEST_RUN (try `sudo -E cargo bench -p lb-tests --bench datapath`)"
        );
        return ExitCode::from(2);
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("datapath bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let started = Instant::now();
    let loadavg_start = loadavg();
    let config = Config::parse(CONFIG).context("bench config")?;
    let desired = Desired::from_config(&config).context("planning the bench config")?;
    let mut dp = match Dataplane::load() {
        Ok(dp) => dp,
        Err(e @ DataplaneError::NotBuilt) => bail!("{e}"),
        Err(e) => return Err(e).context("loading the XDP program"),
    };
    dp.apply_and_wait(&desired).context("writing the maps")?;
    // Load the side programs before anything is timed.
    for side in [
        Program::Pass,
        Program::RefInsert,
        Program::RefLookup,
        Program::RefForwardOnly,
    ] {
        dp.side_program(side.name())
            .with_context(|| format!("loading {}", side.name()))?;
    }

    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let frame = |src: &str, dst: &str, sport: u16, dport: u16, flags: u8| {
        tcp_frame(
            LB_MAC,
            CLIENT_MAC,
            ip(src),
            ip(dst),
            sport,
            dport,
            flags,
            b"",
        )
    };
    let est4 = ("198.18.0.1", "198.18.1.1", 40001, 80);
    let syn4 = ("198.18.0.1", "198.18.1.1", 40002, 80);
    let est6 = ("fd00:18::1", "fd00:18:1::1", 40001, 80);
    let encap4 = ("198.18.0.1", "198.18.1.2", 40001, 443);
    let ack4 = frame(est4.0, est4.1, est4.2, est4.3, TCP_ACK);
    let ack6 = frame(est6.0, est6.1, est6.2, est6.3, TCP_ACK);
    let ack_encap = frame(encap4.0, encap4.1, encap4.2, encap4.3, TCP_ACK);

    // Open the established flows with a SYN and the handshake's ACK each, as a
    // client would (the ACK moves the flow from the young table into the connection
    // table, see lb-ebpf/src/conntrack.rs), and find the backend the connection
    // table now holds for each. The SYN flow gets its SYN only: every SYN the bench
    // sends then takes the path of a handshake in progress (connection-table miss,
    // young-table write), as a new connection's does.
    let mut backend_of =
        |flow: (&str, &str, u16, u16), established: bool| -> Result<(u32, [u8; 6], IpAddr)> {
            let flags: &[u8] = if established {
                &[TCP_SYN, TCP_ACK]
            } else {
                &[TCP_SYN]
            };
            for &flag in flags {
                let packet = frame(flow.0, flow.1, flow.2, flow.3, flag);
                let mut out = vec![0u8; packet.len() + 256];
                let r = dp
                    .program()?
                    .test_run(TestRunOptions {
                        data_in: Some(&packet),
                        data_out: Some(&mut out),
                        ..TestRunOptions::default()
                    })
                    .context("opening a flow")?;
                ensure!(
                    r.return_value == XDP_TX,
                    "opening {flow:?}: verdict {}",
                    r.return_value
                );
            }
            let key = flow_key(flow);
            let table = if established {
                dp.connections()?
            } else {
                dp.young_flows()?
            };
            let id = table
                .into_iter()
                .find(|(k, _)| *k == key)
                .map(|(_, e)| e.backend_id)
                .with_context(|| format!("opening {flow:?} left no entry"))?;
            let b = desired
                .backends
                .get(&id)
                .with_context(|| format!("connection entry names unknown backend {id}"))?;
            Ok((id, b.entry.mac, b.address))
        };
    let (id4, mac4, _) = backend_of(est4, true)?;
    let (id6, mac6, _) = backend_of(est6, true)?;
    let (id_encap, mac_encap, addr_encap) = backend_of(encap4, true)?;
    let IpAddr::V4(addr_encap) = addr_encap else {
        bail!("the encapsulation VIP's backend should be IPv4");
    };
    // The SYN flow's backend: from the first SYN; every later one must pick it again.
    let (id_syn, mac_syn, _) = backend_of(syn4, false)?;
    // Full NAT: an established flow (its client's packets and its backend's
    // replies), and a SYN that takes the path of a handshake in progress (a port
    // claim that finds its own entry, then the young write).
    let nat4 = ("198.18.0.1", "198.18.1.3", 40001, 80);
    let nat_syn4 = ("198.18.0.1", "198.18.1.3", 40002, 80);
    let (id_nat, _, addr_nat) = backend_of(nat4, true)?;
    let (id_nat_syn, _, addr_nat_syn) = backend_of(nat_syn4, false)?;
    let (IpAddr::V4(addr_nat), IpAddr::V4(addr_nat_syn)) = (addr_nat, addr_nat_syn) else {
        bail!("the NAT VIP's backends should be IPv4");
    };
    let nat_ack4 = frame(nat4.0, nat4.1, nat4.2, nat4.3, TCP_ACK);
    // The established flow's reply: from its backend to the NAT address and port
    // its entry holds.
    let (nat_reply_key, _) = dp
        .nat_flows()?
        .into_iter()
        .find(|(_, e)| e.client_port_be == nat4.2.to_be())
        .context("the NAT flow left no NAT entry")?;
    let nat_reply4 = tcp_frame(
        LB_MAC,
        [0x02, 0, 0, 0, 0, 0xfe],
        IpAddr::from(<[u8; 4]>::try_from(&nat_reply_key.src[..4]).unwrap()),
        IpAddr::from(<[u8; 4]>::try_from(&nat_reply_key.dst[..4]).unwrap()),
        u16::from_be(nat_reply_key.src_port_be),
        u16::from_be(nat_reply_key.dst_port_be),
        TCP_ACK,
        b"",
    );
    let client4 = [198, 18, 0, 1];

    let cases = vec![
        Case::reference("floor", "floor: lb_pass (XDP_PASS)", Program::Pass, &ack4),
        Case {
            key: "established_v4",
            title: "IPv4 established (conn hit, DSR)",
            program: Program::Balancer,
            method: Method::Repeat,
            frame: ack4.clone(),
            verdict: XDP_TX,
            counters: &["rx_frames", "conn_hit", "tx"],
            output: Output::Dsr { backend_mac: mac4 },
            backend_id: Some(id4),
            floor: "floor",
            target: Some(4.2),
        },
        Case {
            key: "syn_v4",
            title: "IPv4 SYN (table pick + young write)",
            program: Program::Balancer,
            method: Method::Repeat,
            frame: frame(syn4.0, syn4.1, syn4.2, syn4.3, TCP_SYN),
            verdict: XDP_TX,
            counters: &["rx_frames", "conn_miss_syn", "tx"],
            output: Output::Dsr {
                backend_mac: mac_syn,
            },
            backend_id: Some(id_syn),
            floor: "floor",
            target: Some(10.0),
        },
        Case {
            key: "non_vip_v4",
            title: "IPv4 TCP to a non-VIP (XDP_PASS)",
            program: Program::Balancer,
            method: Method::Repeat,
            frame: frame("198.18.0.1", "198.18.0.2", 40001, 80, TCP_ACK),
            verdict: XDP_PASS,
            counters: &["rx_frames", "pass_not_vip"],
            output: Output::Same,
            backend_id: None,
            floor: "floor",
            target: Some(2.4),
        },
        // The references run in this order: the write leaves the entry the lookup
        // must find (a miss would return XDP_DROP and fail the verdict check).
        Case::reference(
            "ref_conn_insert",
            "reference: conn-table write alone",
            Program::RefInsert,
            &ack4,
        ),
        Case::reference(
            "ref_conn_lookup",
            "reference: conn-table lookup alone",
            Program::RefLookup,
            &ack4,
        ),
        Case {
            key: "ref_forward_only",
            title: "reference: established, bare path",
            program: Program::RefForwardOnly,
            method: Method::Repeat,
            frame: ack4.clone(),
            verdict: XDP_TX,
            counters: &[],
            output: Output::Dsr { backend_mac: mac4 },
            backend_id: None,
            floor: "floor",
            target: None,
        },
        Case {
            key: "established_v6",
            title: "IPv6 established (conn hit, DSR)",
            program: Program::Balancer,
            method: Method::Repeat,
            frame: ack6,
            verdict: XDP_TX,
            counters: &["rx_frames", "conn_hit", "tx"],
            output: Output::Dsr { backend_mac: mac6 },
            backend_id: Some(id6),
            floor: "floor",
            target: None,
        },
        Case {
            key: "floor_single",
            title: "floor, single runs: lb_pass",
            program: Program::Pass,
            method: Method::Single,
            frame: ack4.clone(),
            verdict: XDP_PASS,
            counters: &[],
            output: Output::Same,
            backend_id: None,
            floor: "floor_single",
            target: None,
        },
        Case {
            key: "established_v4_single",
            title: "IPv4 established, single runs",
            program: Program::Balancer,
            method: Method::Single,
            frame: ack4,
            verdict: XDP_TX,
            counters: &["rx_frames", "conn_hit", "tx"],
            output: Output::Dsr { backend_mac: mac4 },
            backend_id: Some(id4),
            floor: "floor_single",
            target: None,
        },
        Case {
            key: "encap_v4",
            title: "IPv4 established, IPIP encap",
            program: Program::Balancer,
            method: Method::Single,
            frame: ack_encap,
            verdict: XDP_TX,
            counters: &["rx_frames", "conn_hit", "tx", "tx_encap"],
            output: Output::Ipip {
                next_hop: mac_encap,
                backend: addr_encap.octets(),
            },
            backend_id: Some(id_encap),
            floor: "floor_single",
            target: None,
        },
        Case {
            key: "nat_established_v4",
            title: "IPv4 NAT established, to backend",
            program: Program::Balancer,
            method: Method::Single,
            frame: nat_ack4,
            verdict: XDP_TX,
            counters: &["rx_frames", "conn_hit", "tx"],
            output: Output::Nat {
                mac: [0x02, 0, 0, 0, 0, 0xfe],
                dst: addr_nat.octets(),
            },
            backend_id: Some(id_nat),
            floor: "floor_single",
            target: None,
        },
        Case {
            key: "nat_reply_v4",
            title: "IPv4 NAT reply, to client",
            program: Program::Balancer,
            method: Method::Single,
            frame: nat_reply4,
            verdict: XDP_TX,
            counters: &["rx_frames"],
            output: Output::Nat {
                mac: CLIENT_MAC,
                dst: client4,
            },
            backend_id: None,
            floor: "floor_single",
            target: None,
        },
        Case {
            key: "nat_syn_v4",
            title: "IPv4 NAT SYN (pick, port claim, young)",
            program: Program::Balancer,
            method: Method::Single,
            frame: frame(nat_syn4.0, nat_syn4.1, nat_syn4.2, nat_syn4.3, TCP_SYN),
            verdict: XDP_TX,
            counters: &["rx_frames", "conn_miss_syn", "tx"],
            output: Output::Nat {
                mac: [0x02, 0, 0, 0, 0, 0xfe],
                dst: addr_nat_syn.octets(),
            },
            backend_id: Some(id_nat_syn),
            floor: "floor_single",
            target: None,
        },
    ];

    pin_to_one_cpu();
    // Warm-up: caches, branch predictors, the XDP dispatcher, the CPU's clock.
    for case in &cases {
        measure(&mut dp, case, REPEAT / 10, CALLS / 10)
            .with_context(|| format!("warming up {}", case.key))?;
    }
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); cases.len()];
    for _ in 0..ROUNDS {
        for (case, s) in cases.iter().zip(&mut samples) {
            s.push(
                measure(&mut dp, case, REPEAT, CALLS)
                    .with_context(|| format!("measuring {}", case.key))?,
            );
        }
    }

    let info = [
        (programs::PASS, dp.side_program(programs::PASS)?.info()),
        (programs::BALANCER, dp.program()?.info()),
    ]
    .map(|(name, info)| {
        let info = info.ok();
        (
            name,
            info.as_ref()
                .and_then(|i| i.size_translated())
                .map(|b| b / 8),
            info.as_ref().map(|i| i.size_jitted()),
            info.as_ref().and_then(|i| i.verified_instruction_count()),
        )
    });
    let elapsed = started.elapsed();
    let loadavg_end = loadavg();
    report(
        &cases,
        &samples,
        &info,
        elapsed,
        (&loadavg_start, &loadavg_end),
    )
}

fn flow_key(flow: (&str, &str, u16, u16)) -> FlowKey {
    let (src, family) = addr_bytes(flow.0.parse().unwrap());
    let (dst, _) = addr_bytes(flow.1.parse().unwrap());
    FlowKey {
        src,
        dst,
        src_port_be: flow.2.to_be(),
        dst_port_be: flow.3.to_be(),
        proto: 6,
        family,
        _pad: [0; 2],
    }
}

fn program(dp: &mut Dataplane, which: Program) -> Result<&mut Xdp> {
    Ok(match which {
        Program::Balancer => dp.program()?,
        side => dp.side_program(side.name())?,
    })
}

/// Runs `case` once by its method and checks the counters, the verdict and the output.
fn measure(dp: &mut Dataplane, case: &Case, repeat: u32, calls: u32) -> Result<Sample> {
    let before = dp.global_stats()?;
    let backend_before = match case.backend_id {
        Some(id) => dp.backend_stats(id)?.packets,
        None => 0,
    };
    let mut out = vec![0u8; case.frame.len() + 256];
    let (runs, mut sample) = match case.method {
        Method::Repeat => {
            let prog = program(dp, case.program)?;
            let start = thread_cpu_ns();
            let r = prog
                .test_run(TestRunOptions {
                    data_in: Some(&case.frame),
                    data_out: Some(&mut out),
                    repeat,
                    ..TestRunOptions::default()
                })
                .context("BPF_PROG_TEST_RUN")?;
            let cpu = thread_cpu_ns() - start;
            ensure!(
                r.return_value == case.verdict,
                "verdict {} instead of {}",
                r.return_value,
                case.verdict
            );
            out.truncate(r.data_size_out as usize);
            check_output(case, &out, repeat)?;
            let sample = Sample {
                ns: r.duration.as_nanos() as f64,
                cpu_ns: cpu as f64 / f64::from(repeat),
                runs: u64::from(repeat),
                grew: [0; 19],
                backend_grew: 0,
            };
            (u64::from(repeat), sample)
        }
        Method::Single => {
            let prog = program(dp, case.program)?;
            let mut total = Duration::ZERO;
            let start = thread_cpu_ns();
            for i in 0..calls {
                let r = prog
                    .test_run(TestRunOptions {
                        data_in: Some(&case.frame),
                        data_out: Some(&mut out),
                        ..TestRunOptions::default()
                    })
                    .context("BPF_PROG_TEST_RUN")?;
                ensure!(
                    r.return_value == case.verdict,
                    "run {i}: verdict {} instead of {}",
                    r.return_value,
                    case.verdict
                );
                if i == 0 || i + 1 == calls {
                    check_output(case, &out[..r.data_size_out as usize], 1)?;
                }
                total += r.duration;
            }
            let cpu = thread_cpu_ns() - start;
            let sample = Sample {
                ns: total.as_nanos() as f64 / f64::from(calls),
                cpu_ns: cpu as f64 / f64::from(calls),
                runs: u64::from(calls),
                grew: [0; 19],
                backend_grew: 0,
            };
            (u64::from(calls), sample)
        }
    };
    let after = dp.global_stats()?;
    for (i, ((name, b), (_, a))) in fields(&before).into_iter().zip(fields(&after)).enumerate() {
        let grew = a - b;
        sample.grew[i] = grew;
        let expected = if case.counters.contains(&name) {
            runs
        } else {
            0
        };
        ensure!(
            grew == expected,
            "counter {name} grew by {grew} over {runs} runs, expected {expected}: \
             the runs did not all take the path measured"
        );
    }
    if let Some(id) = case.backend_id {
        let grew = dp.backend_stats(id)?.packets - backend_before;
        ensure!(
            grew == runs,
            "backend {id} counted {grew} packets over {runs} runs"
        );
        sample.backend_grew = grew;
    }
    Ok(sample)
}

fn check_output(case: &Case, out: &[u8], runs: u32) -> Result<()> {
    let input = &case.frame;
    match case.output {
        Output::Same => ensure!(out == &input[..], "the frame changed"),
        Output::Dsr { backend_mac } => {
            let src = if runs == 1 { LB_MAC } else { backend_mac };
            ensure!(
                out.len() == input.len()
                    && out[..6] == backend_mac
                    && out[6..12] == src
                    && out[12..] == input[12..],
                "not the DSR output to {backend_mac:02x?}: {out:02x?}"
            );
        }
        Output::Nat { mac, dst } => {
            ensure!(
                out.len() == input.len()
                    && out[..6] == mac
                    && out[6..12] == LB_MAC
                    && out[30..34] == dst
                    && verify_checksums(out).is_ok(),
                "not the NAT output to {dst:?}: {out:02x?}"
            );
        }
        Output::Ipip { next_hop, backend } => {
            ensure!(
                out.len() == input.len() + 20
                    && out[..6] == next_hop
                    && out[6..12] == LB_MAC
                    && out[12..14] == [0x08, 0x00]
                    && out[14] == 0x45
                    && out[23] == 4
                    && out[30..34] == backend
                    && out[34..] == input[14..],
                "not the IPIP output to {backend:?}: {out:02x?}"
            );
        }
    }
    Ok(())
}

/// Every counter of `GlobalStats`, by name.
fn fields(s: &GlobalStats) -> [(&'static str, u64); 19] {
    [
        ("rx_frames", s.rx_frames),
        ("pass_not_ip", s.pass_not_ip),
        ("pass_not_vip", s.pass_not_vip),
        ("pass_fragment", s.pass_fragment),
        ("ipv4_options", s.ipv4_options),
        ("pass_truncated", s.pass_truncated),
        ("pass_malformed", s.pass_malformed),
        ("pass_ipv6_extension", s.pass_ipv6_extension),
        ("drop_no_backend", s.drop_no_backend),
        ("conn_hit", s.conn_hit),
        ("conn_miss_syn", s.conn_miss_syn),
        ("conn_miss_non_syn", s.conn_miss_non_syn),
        ("conn_insert_failed", s.conn_insert_failed),
        ("tx", s.tx),
        ("tx_encap", s.tx_encap),
        ("icmp_echo_reply", s.icmp_echo_reply),
        ("icmp_error_forwarded", s.icmp_error_forwarded),
        ("pass_icmp_other", s.pass_icmp_other),
        ("drop_encap_failed", s.drop_encap_failed),
    ]
}

/// Keeps this thread on one CPU, so that all runs see the same caches. The test run
/// itself already runs with migration disabled; this only avoids moving between runs.
fn pin_to_one_cpu() {
    // SAFETY: a zeroed cpu_set_t is an empty set; the calls only read and write it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let cpu = libc::sched_getcpu();
        if cpu < 0 {
            return;
        }
        libc::CPU_SET(cpu as usize, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// CPU time this thread has used, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Median, minimum and maximum.
#[derive(Clone, Copy)]
struct Summary {
    median: f64,
    min: f64,
    max: f64,
}

fn summarize(values: impl IntoIterator<Item = f64>) -> Summary {
    let mut v: Vec<f64> = values.into_iter().collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Summary {
        median,
        min: v[0],
        max: v[n - 1],
    }
}

fn summary_json(s: &Summary) -> String {
    format!(
        "{{\"median\": {:.3}, \"min\": {:.3}, \"max\": {:.3}}}",
        s.median, s.min, s.max
    )
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a time since the epoch (civil-from-days, proleptic
/// Gregorian).
fn utc(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// What the counters of `case` did over all its timed rounds, for the table.
fn verified(case: &Case, samples: &[Sample]) -> String {
    let runs: u64 = samples.iter().map(|s| s.runs).sum();
    let names = fields(&GlobalStats::default());
    let mut grown: Vec<String> = (0..names.len())
        .filter_map(|f| {
            let g: u64 = samples.iter().map(|s| s.grew[f]).sum();
            (g != 0).then(|| format!("{} +{g}", names[f].0))
        })
        .collect();
    if let Some(id) = case.backend_id {
        let g: u64 = samples.iter().map(|s| s.backend_grew).sum();
        grown.push(format!("backend {id} packets +{g}"));
    }
    if grown.is_empty() {
        format!("{runs} runs: no counter moved")
    } else {
        format!("{runs} runs: {}", grown.join(", "))
    }
}

fn verification_json(case: &Case, samples: &[Sample]) -> String {
    let runs: u64 = samples.iter().map(|s| s.runs).sum();
    let names = fields(&GlobalStats::default());
    let grown: Vec<String> = (0..names.len())
        .map(|f| {
            let g: u64 = samples.iter().map(|s| s.grew[f]).sum();
            format!("{}: {g}", json_str(names[f].0))
        })
        .collect();
    format!(
        "{{\"runs\": {runs}, \"counters_grown\": {{{}}}, \"backend_packets_grown\": {}}}",
        grown.join(", "),
        case.backend_id.map_or("null".into(), |_| samples
            .iter()
            .map(|s| s.backend_grew)
            .sum::<u64>()
            .to_string()),
    )
}

type ProgInfo = (&'static str, Option<u32>, Option<u32>, Option<u32>);

fn report(
    cases: &[Case],
    samples: &[Vec<Sample>],
    info: &[ProgInfo],
    elapsed: Duration,
    loadavg: (&str, &str),
) -> Result<()> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let date = utc(SystemTime::now());
    let index = |key: &str| cases.iter().position(|c| c.key == key).unwrap();
    let ns = |i: usize| summarize(samples[i].iter().map(|s| s.ns));
    let cpu = |i: usize| summarize(samples[i].iter().map(|s| s.cpu_ns));
    // Ratio of medians, and the spread of the per-round ratios (each case against the
    // floor measured in the same round).
    let ratio = |i: usize, f: usize, by: &dyn Fn(&Sample) -> f64| -> Summary {
        let mut s = summarize(
            samples[i]
                .iter()
                .zip(&samples[f])
                .map(|(a, b)| by(a) / by(b)),
        );
        s.median = summarize(samples[i].iter().map(by)).median
            / summarize(samples[f].iter().map(by)).median;
        s
    };
    let by_ns = |s: &Sample| s.ns;
    let by_cpu = |s: &Sample| s.cpu_ns;

    // Encapsulation's extra cost over DSR, both measured in single runs (the fixed
    // per-run cost cancels), added to the established DSR figure of the repeated loop:
    // an estimate of encapsulation on the repeated scale. The fixed cost itself, from
    // the established case and from the floor measured both ways, is shown as a check
    // (the two should agree).
    let (fl, fl1) = (index("floor"), index("floor_single"));
    let (est, est1, enc) = (
        index("established_v4"),
        index("established_v4_single"),
        index("encap_v4"),
    );
    let overhead = ns(est1).median - ns(est).median;
    let enc_extra = ns(enc).median - ns(est1).median;
    let enc_est = ns(est).median + enc_extra;
    let enc_est_ratio = enc_est / ns(fl).median;
    let floor_overhead = ns(fl1).median - ns(fl).median;
    // The same estimate for the full-NAT paths (single runs, as their rewrites do
    // not repeat).
    let nat_estimates: Vec<(&str, f64, f64)> = ["nat_established_v4", "nat_reply_v4", "nat_syn_v4"]
        .into_iter()
        .map(|key| {
            let extra = ns(index(key)).median - ns(est1).median;
            let estimate = ns(est).median + extra;
            (key, extra, estimate / ns(fl).median)
        })
        .collect();

    println!(
        "\nXDP datapath per packet, BPF_PROG_TEST_RUN, kernel {kernel}, {date}\n\
         repeated cases: repeat={REPEAT}; single-run cases: {CALLS} runs of repeat=1; \
         {ROUNDS} rounds, median [min..max]\n"
    );
    println!(
        "{:<36} {:>8} {:>16} {:>7} {:>15} {:>9} {:>8} {:>8}",
        "case", "ns", "[min..max]", "ratio", "[min..max]", "cpu ns", "cpu x", "target"
    );
    for (i, case) in cases.iter().enumerate() {
        let f = index(case.floor);
        let (n, r) = (ns(i), ratio(i, f, &by_ns));
        let (w, wr) = (cpu(i), ratio(i, f, &by_cpu));
        let target = match case.target {
            Some(t) if r.median <= t => format!("<={t} ok"),
            Some(t) => format!("<={t} MISS"),
            None => String::new(),
        };
        let (w, wr) = if case.method == Method::Repeat {
            (format!("{:.2}", w.median), format!("{:.2}", wr.median))
        } else {
            ("-".into(), "-".into())
        };
        println!(
            "{:<36} {:>8.2} {:>16} {:>6.2}x {:>15} {:>9} {:>8} {:>8}",
            case.title,
            n.median,
            format!("[{:.1}..{:.1}]", n.min, n.max),
            r.median,
            format!("[{:.2}..{:.2}]", r.min, r.max),
            w,
            wr,
            target
        );
    }
    println!(
        "\nratio: to lb_pass measured the same way (repeated cases to `floor`, single-run \
         cases to `floor, single runs`).\n\
         ns: kernel-reported; for repeated cases an integer (the kernel drops the fraction \
         of its average), so `cpu ns` (this thread's CPU time over the syscall / repeat) is shown beside it.\n\
         fixed cost of a single run (single - repeated): {overhead:.1} ns on the established \
         path, {floor_overhead:.1} ns on the floor\n\
         encapsulation, extra over DSR (single runs): {enc_extra:.1} ns; estimate on the \
         repeated scale (established + that): {enc_est:.1} ns, {enc_est_ratio:.2}x the floor"
    );
    for (key, extra, estimate) in &nat_estimates {
        println!(
            "{key}, extra over established DSR (single runs): {extra:.1} ns; on the repeated \
             scale: {estimate:.2}x the floor"
        );
    }
    for (name, insns, jited, verified) in info {
        println!(
            "{name}: {} instructions after verification (xlated), {} bytes JIT-compiled, \
             {} instructions processed by the verifier",
            insns.map_or("?".into(), |v| v.to_string()),
            jited.map_or("?".into(), |v| v.to_string()),
            verified.map_or("?".into(), |v| v.to_string()),
        );
    }
    println!(
        "\nverification, summed over the {ROUNDS} timed rounds (every GlobalStats counter not \
         named here grew by 0; checked after each measurement):"
    );
    for (i, case) in cases.iter().enumerate() {
        println!("  {:<36} {}", case.title, verified(case, &samples[i]));
    }
    println!(
        "run time {:.1} s; load average {} at start, {} at end",
        elapsed.as_secs_f64(),
        loadavg.0,
        loadavg.1
    );

    let mut json = String::new();
    let _ = write!(
        json,
        "{{\n  \"benchmark\": \"datapath\",\n  \"date\": {},\n  \"kernel\": {},\n  \
         \"cpus\": {},\n  \"repeat\": {REPEAT},\n  \"single_run_calls\": {CALLS},\n  \
         \"rounds\": {ROUNDS},\n  \"run_time_s\": {:.2},\n  \"loadavg_start\": {},\n  \
         \"loadavg_end\": {},\n  \"cases\": [",
        json_str(&date),
        json_str(&kernel),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        elapsed.as_secs_f64(),
        json_str(loadavg.0),
        json_str(loadavg.1),
    );
    for (i, case) in cases.iter().enumerate() {
        let f = index(case.floor);
        let rounds: Vec<String> = samples[i].iter().map(|s| format!("{:.3}", s.ns)).collect();
        let cpu_rounds: Vec<String> = samples[i]
            .iter()
            .map(|s| format!("{:.3}", s.cpu_ns))
            .collect();
        let r = ratio(i, f, &by_ns);
        let _ = write!(
            json,
            "{}\n    {{\"case\": {}, \"title\": {}, \"program\": {}, \"method\": {}, \
             \"method_detail\": {}, \"repeat\": {}, \"calls\": {}, \"floor\": {}, \
             \"ns\": {}, \"ns_rounds\": [{}], \"ratio\": {}, \"cpu_ns\": {}, \
             \"cpu_ns_rounds\": [{}], \"cpu_ratio\": {}, \"target_ratio\": {}, \
             \"target_met\": {}, \"verified_counters\": [{}], \"verified_backend_id\": {}, \
             \"verification\": {}}}",
            if i == 0 { "" } else { "," },
            json_str(case.key),
            json_str(case.title),
            json_str(case.program.name()),
            json_str(case.method.name()),
            json_str(&case.method.describe()),
            if case.method == Method::Repeat {
                REPEAT
            } else {
                1
            },
            if case.method == Method::Repeat {
                1
            } else {
                CALLS
            },
            json_str(case.floor),
            summary_json(&ns(i)),
            rounds.join(", "),
            summary_json(&r),
            summary_json(&cpu(i)),
            cpu_rounds.join(", "),
            summary_json(&ratio(i, f, &by_cpu)),
            case.target.map_or("null".into(), |t| t.to_string()),
            case.target
                .map_or("null".into(), |t| (r.median <= t).to_string()),
            case.counters
                .iter()
                .map(|c| json_str(c))
                .collect::<Vec<_>>()
                .join(", "),
            case.backend_id.map_or("null".into(), |id| id.to_string()),
            verification_json(case, &samples[i]),
        );
    }
    let _ = write!(
        json,
        "\n  ],\n  \"single_run_fixed_cost_ns\": {overhead:.3},\n  \
         \"floor_single_run_fixed_cost_ns\": {floor_overhead:.3},\n  \
         \"encap_v4_extra_over_dsr_single_runs_ns\": {enc_extra:.3},\n  \
         \"nat_repeated_scale_estimates\": {{{}}},\n  \
         \"encap_v4_repeated_scale_estimate\": {{\"ns\": {enc_est:.3}, \"ratio\": {enc_est_ratio:.3}, \
         \"how\": \"established_v4 median + (encap_v4 - established_v4_single) medians\"}},\n  \
         \"programs\": [",
        nat_estimates
            .iter()
            .map(|(key, extra, ratio)| format!(
                "{}: {{\"extra_over_established_v4_single_ns\": {extra:.3}, \"ratio\": {ratio:.3}}}",
                json_str(key)
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (i, (name, insns, jited, verified)) in info.iter().enumerate() {
        let opt = |v: &Option<u32>| v.map_or("null".into(), |v| v.to_string());
        let _ = write!(
            json,
            "{}\n    {{\"name\": {}, \"xlated_insns\": {}, \"jited_bytes\": {}, \"verified_insns\": {}}}",
            if i == 0 { "" } else { "," },
            json_str(name),
            opt(insns),
            opt(jited),
            opt(verified)
        );
    }
    json.push_str("\n  ]\n}\n");
    let path = std::env::var_os("LB_BENCH_JSON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench/datapath.json")
        });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
    println!("figures written to {}", path.display());
    Ok(())
}
