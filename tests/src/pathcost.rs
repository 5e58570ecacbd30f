//! What each path of the XDP program costs under `BPF_PROG_TEST_RUN`, measured in
//! the process that needs the figure (issue 23). `lb-bench-versus` prices the packet
//! mix a live window saw at these costs (`bench_mix_ns_per_packet`, beside the live
//! `live_ns_per_packet`), and prints the cost of a new connection's packets one by
//! one, each flow new, as a live flow's are.
//!
//! The methods:
//! - **repeated** ([`PathCosts`]): one `BPF_PROG_TEST_RUN` repeats a frame
//!   [`REPEAT`] times, so caches are warm and every repetition takes the same path:
//!   an established flow's packet, a SYN of a handshake in progress, a packet for no
//!   VIP, and the `lb_pass` floor. These are the cases and the method of `cargo
//!   xtask bench datapath` (tests/benches/datapath.rs). Each is timed twice: by the
//!   test run's loop, as that bench does, and by the kernel's BPF statistics (on
//!   for the purpose), which is how the live figure is read.
//! - **fresh flows** ([`FreshCosts`]): [`FRESH_FLOWS`] connections, each with its own
//!   addresses and ports, each sending SYN, the handshake's ACK, a data segment and
//!   a FIN, one `BPF_PROG_TEST_RUN` (repeat 1) per packet. Every SYN misses the
//!   connection table at a new place and writes a young entry; every ACK moves one
//!   into the connection table; every entry is one the caches have never held. The
//!   figures are single-run durations less the single-run floor (`lb_pass`, repeat
//!   1), which carries the fixed cost of a run alone.
//! - **cold** (also [`FreshCosts`]): the same for [`COLD_FLOWS`] more connections,
//!   with the CPU's caches and TLB flushed before every packet (and before every
//!   floor run) by writing over a buffer twice the size of the last-level cache:
//!   what each packet costs when nothing it touches is cached, the bound a live
//!   packet approaches when other work runs on its CPU between packets.
//!
//! Both run on a thread pinned to one CPU, on a program loaded for the purpose
//! (never attached, nothing pinned) with the configuration and load options given,
//! so that its maps have the sizes of the program measured live.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use aya::programs::{TestRun, TestRunOptions};
use lb_common::maps::programs;
use lb_userspace::{
    config::Config,
    dataplane::{Dataplane, LoadOptions},
    desired::Desired,
};

use crate::packet::{TCP_ACK, TCP_FIN, TCP_PSH, TCP_SYN, tcp_frame};

/// Repetitions of one repeated measurement.
pub const REPEAT: u32 = 200_000;
/// Repeated measurements per path; the median is kept.
const ROUNDS: usize = 7;
/// Connections of the fresh-flow measurement.
pub const FRESH_FLOWS: u32 = 20_000;
/// Connections of the cold measurement.
pub const COLD_FLOWS: u32 = 500;
/// Bytes written over before every cold run: twice the reference machine's 32 MiB
/// last-level cache.
const COLD_SWEEP_BYTES: usize = 64 << 20;

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// Repeated-run costs of the bench's paths, ns per packet as the kernel reports
/// them (the test-run loop included, as in `cargo xtask bench datapath`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PathCosts {
    /// `lb_pass` on the established frame: the loop alone.
    pub floor_ns: f64,
    /// An established flow's packet (connection hit, DSR).
    pub established_ns: f64,
    /// A SYN of a handshake in progress (table pick, young write).
    pub syn_ns: f64,
    /// A TCP packet for no VIP (passed).
    pub non_vip_ns: f64,
}

/// Fresh-flow costs: each of a new connection's packets, ns of the program per
/// packet (single runs less the single-run floor).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FreshCosts {
    /// The single-run floor that was subtracted (`lb_pass`, repeat 1).
    pub floor_single_ns: f64,
    /// The SYN: connection-table miss, VIP lookup, table pick, young-table write.
    pub syn_ns: f64,
    /// The handshake's ACK: connection-table miss, VIP lookup, young hit, the
    /// connection-table write and the young entry's delete.
    pub ack_ns: f64,
    /// A data segment: connection hit.
    pub data_ns: f64,
    /// The client's FIN: connection hit, the entry marked closing.
    pub fin_ns: f64,
}

/// The measurements.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measured {
    /// Repeated runs timed by the test run's loop, as `cargo xtask bench datapath`
    /// times them.
    pub repeated: PathCosts,
    /// The same runs timed by the kernel's BPF statistics, the instrument of the
    /// live figure, so that its clock reads and bookkeeping are in both (how much
    /// they add: `repeated_bpf_stats_ns` against `repeated_ns` in versus.json).
    pub by_stats: PathCosts,
    /// A new connection's packets, each flow new.
    pub fresh: FreshCosts,
    /// The same with caches and TLB flushed before every packet.
    pub cold: FreshCosts,
}

/// The first VIP of `config_text`, the client address and port base of the frames.
struct Frames {
    vip: IpAddr,
    port: u16,
}

impl Frames {
    /// Flow `i`'s frame with `flags`: its own source address and port.
    fn flow(&self, i: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let src = IpAddr::from([198, 18, 240 + (i >> 16) as u8, (i >> 8) as u8]);
        let sport = 1024 + (i & 0xff) as u16 * 200 + (i >> 8) as u16 % 200;
        tcp_frame(
            LB_MAC, CLIENT_MAC, src, self.vip, sport, self.port, flags, payload,
        )
    }

    fn non_vip(&self) -> Vec<u8> {
        tcp_frame(
            LB_MAC,
            CLIENT_MAC,
            IpAddr::from([198, 18, 239, 1]),
            IpAddr::from([198, 18, 239, 2]),
            40000,
            self.port,
            TCP_ACK,
            b"",
        )
    }
}

/// Measures all four, for the program the agent would load with `config_text` (its
/// VIPs and `[datapath]` sizes, the flood guard on; the first VIP must be TCP). Runs
/// on its own thread pinned to CPU 0.
pub fn measure(config_text: &str) -> Result<Measured> {
    let config = Config::parse(config_text).context("path-cost configuration")?;
    std::thread::spawn(move || {
        crate::pin_to_cpu(0)?;
        measure_here(&config)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the path-cost thread panicked"))?
}

fn measure_here(config: &Config) -> Result<Measured> {
    let options = LoadOptions {
        sizes: config.datapath_sizes(),
        ..LoadOptions::default()
    };
    let desired = Desired::from_config(config).context("planning the path-cost maps")?;
    let vip = config
        .vips
        .first()
        .context("the configuration has no VIP")?;
    let frames = Frames {
        vip: vip.address,
        port: vip.port,
    };
    let mut dp = Dataplane::load_options(options).context("loading the XDP program")?;
    dp.apply_and_wait(&desired).context("writing the maps")?;
    dp.side_program(programs::PASS)?;

    // The repeated cases: the established flow opened by its SYN and ACK, the SYN
    // flow by its SYN only (a handshake in progress), as the bench does.
    let established = FRESH_FLOWS;
    let syn = FRESH_FLOWS + 1;
    for flags in [TCP_SYN, TCP_ACK] {
        run(
            &mut dp,
            false,
            &frames.flow(established, flags, b""),
            1,
            XDP_TX,
        )?;
    }
    run(&mut dp, false, &frames.flow(syn, TCP_SYN, b""), 1, XDP_TX)?;
    let cases: [(bool, Vec<u8>, u32); 4] = [
        (true, frames.flow(established, TCP_ACK, b""), XDP_PASS),
        (false, frames.flow(established, TCP_ACK, b""), XDP_TX),
        (false, frames.flow(syn, TCP_SYN, b""), XDP_TX),
        (false, frames.non_vip(), XDP_PASS),
    ];
    let repeated = repeated_costs(&mut dp, &cases, Clock::TestRun)?;
    let by_stats = {
        let _on = crate::versus::cpu::BpfStats::enable()?;
        repeated_costs(&mut dp, &cases, Clock::BpfStats)?
    };

    let floor_frame = frames.flow(established, TCP_ACK, b"");
    let fresh = connections(&mut dp, &frames, &floor_frame, 0..FRESH_FLOWS, None)?;
    let first_cold = FRESH_FLOWS + 2;
    let mut sweep = vec![0u8; COLD_SWEEP_BYTES];
    let cold = connections(
        &mut dp,
        &frames,
        &floor_frame,
        first_cold..first_cold + COLD_FLOWS,
        Some(&mut sweep),
    )?;
    Ok(Measured {
        repeated,
        by_stats,
        fresh,
        cold,
    })
}

/// Which clock times a repeated run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Clock {
    /// The test run's own: the loop's time over its repetitions.
    TestRun,
    /// The kernel's BPF statistics of the program (on while measuring): the
    /// instrument of the live figure.
    BpfStats,
}

/// The repeated cases (floor, established, SYN, non-VIP), [`ROUNDS`] rounds, the
/// median of each, timed by `clock`.
fn repeated_costs(
    dp: &mut Dataplane,
    cases: &[(bool, Vec<u8>, u32); 4],
    clock: Clock,
) -> Result<PathCosts> {
    let mut samples = [const { Vec::new() }; 4];
    for _ in 0..ROUNDS {
        for ((pass, frame, verdict), s) in cases.iter().zip(&mut samples) {
            let stats = |dp: &mut Dataplane| -> Result<(u128, u64)> {
                let info = program(dp, *pass)?
                    .info()
                    .context("reading the program's statistics")?;
                Ok((info.run_time().as_nanos(), info.run_count()))
            };
            let before = stats(dp)?;
            let loop_ns = run(dp, *pass, frame, REPEAT, *verdict)?;
            s.push(match clock {
                Clock::TestRun => loop_ns,
                Clock::BpfStats => {
                    let after = stats(dp)?;
                    let runs = after.1 - before.1;
                    ensure!(runs > 0, "BPF statistics counted no run");
                    (after.0 - before.0) as f64 / runs as f64
                }
            });
        }
    }
    let [floor_ns, established_ns, syn_ns, non_vip_ns] = samples.map(median);
    Ok(PathCosts {
        floor_ns,
        established_ns,
        syn_ns,
        non_vip_ns,
    })
}

/// Connections `flows`, each sending SYN, the handshake's ACK, a data segment and a
/// FIN, one run per packet, with a floor run per connection; with `sweep`, the
/// caches are flushed before every run by writing over it.
fn connections(
    dp: &mut Dataplane,
    frames: &Frames,
    floor_frame: &[u8],
    flows: std::ops::Range<u32>,
    mut sweep: Option<&mut Vec<u8>>,
) -> Result<FreshCosts> {
    let before = dp.guard_stats()?.promoted;
    let mut floor = Duration::ZERO;
    let mut totals = [Duration::ZERO; 4];
    let packets = [
        (TCP_SYN, &b""[..]),
        (TCP_ACK, &b""[..]),
        (TCP_ACK | TCP_PSH, &b"GET / HTTP/1.0\r\n\r\n"[..]),
        (TCP_FIN | TCP_ACK, &b""[..]),
    ];
    let flush = |sweep: &mut Option<&mut Vec<u8>>| {
        if let Some(buffer) = sweep {
            // One write per cache line: every line of the buffer is fetched and
            // dirtied, which evicts whatever the caches held.
            for byte in buffer.iter_mut().step_by(64) {
                *byte = byte.wrapping_add(1);
            }
            std::hint::black_box(&buffer);
        }
    };
    let count = flows.len() as u32;
    for i in flows {
        flush(&mut sweep);
        floor += once(dp, true, floor_frame, XDP_PASS)?;
        for ((flags, payload), total) in packets.iter().zip(&mut totals) {
            let frame = frames.flow(i, *flags, payload);
            flush(&mut sweep);
            *total += once(dp, false, &frame, XDP_TX)?;
        }
    }
    let promoted = dp.guard_stats()?.promoted - before;
    ensure!(
        promoted == u64::from(count),
        "{promoted} of {count} new flows entered the connection table"
    );
    let per = |d: Duration| d.as_nanos() as f64 / f64::from(count);
    let floor_single_ns = per(floor);
    let [syn, ack, data, fin] = totals.map(|d| (per(d) - floor_single_ns).max(0.0));
    Ok(FreshCosts {
        floor_single_ns,
        syn_ns: syn,
        ack_ns: ack,
        data_ns: data,
        fin_ns: fin,
    })
}

/// One `BPF_PROG_TEST_RUN` of `frame`, `repeat` times, on the balancer (or on
/// `lb_pass` if `pass`); checks the verdict and returns ns per repetition.
fn run(dp: &mut Dataplane, pass: bool, frame: &[u8], repeat: u32, verdict: u32) -> Result<f64> {
    let prog = program(dp, pass)?;
    let mut out = vec![0u8; frame.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    ensure!(
        r.return_value == verdict,
        "verdict {} instead of {verdict}",
        r.return_value
    );
    Ok(r.duration.as_nanos() as f64)
}

/// The balancer, or `lb_pass` if `pass`.
fn program(dp: &mut Dataplane, pass: bool) -> Result<&mut aya::programs::Xdp> {
    Ok(if pass {
        dp.side_program(programs::PASS)?
    } else {
        dp.program()?
    })
}

/// One run of `frame`, its duration as the kernel measured it.
fn once(dp: &mut Dataplane, pass: bool, frame: &[u8], verdict: u32) -> Result<Duration> {
    run(dp, pass, frame, 1, verdict).map(|ns| Duration::from_nanos(ns as u64))
}

fn median(v: Vec<f64>) -> f64 {
    crate::testbed::median(&v).unwrap_or(f64::NAN)
}

/// What a window's packets were, by the datapath's counters: how many took each of
/// the bench's paths.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketMix {
    /// New flows (`conn_miss_syn`): the SYN path.
    pub syn: u64,
    /// Passed without a VIP (`pass_*`): the non-VIP path.
    pub non_vip: u64,
    /// Every other frame: a flow's later packets (`conn_hit`, the handshake's ACK,
    /// FINs), priced as established packets.
    pub established: u64,
}

impl PacketMix {
    /// The mix of a window, from the deltas of the datapath's counters (named as in
    /// `lb status --json`).
    pub fn of(deltas: &std::collections::BTreeMap<String, u64>) -> Option<PacketMix> {
        let total = *deltas.get("rx_frames")?;
        let syn = deltas.get("conn_miss_syn").copied().unwrap_or(0);
        let non_vip: u64 = deltas
            .iter()
            .filter(|(k, _)| k.starts_with("pass_"))
            .map(|(_, v)| v)
            .sum();
        Some(PacketMix {
            syn,
            non_vip,
            established: total.saturating_sub(syn + non_vip),
        })
    }

    /// Frames in all.
    pub fn total(&self) -> u64 {
        self.syn + self.non_vip + self.established
    }

    /// The mix's mean cost per packet at `costs`; `None` for no packets.
    pub fn priced(&self, costs: &PathCosts) -> Option<f64> {
        let total = self.total();
        (total > 0).then(|| {
            (self.syn as f64 * costs.syn_ns
                + self.non_vip as f64 * costs.non_vip_ns
                + self.established as f64 * costs.established_ns)
                / total as f64
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mix_is_priced_by_its_paths() {
        let deltas = [
            ("rx_frames", 100),
            ("conn_miss_syn", 20),
            ("conn_hit", 70),
            ("pass_not_vip", 6),
            ("pass_not_ip", 4),
        ]
        .map(|(k, v)| (k.to_owned(), v))
        .into_iter()
        .collect();
        let mix = PacketMix::of(&deltas).unwrap();
        assert_eq!(
            mix,
            PacketMix {
                syn: 20,
                non_vip: 10,
                established: 70
            }
        );
        let costs = PathCosts {
            floor_ns: 20.0,
            established_ns: 60.0,
            syn_ns: 300.0,
            non_vip_ns: 30.0,
        };
        let priced = mix.priced(&costs).unwrap();
        assert!((priced - (20.0 * 300.0 + 10.0 * 30.0 + 70.0 * 60.0) / 100.0).abs() < 1e-9);
        assert_eq!(PacketMix::default().priced(&costs), None);
    }

    #[test]
    fn fresh_flows_have_distinct_tuples() {
        let frames = Frames {
            vip: IpAddr::from([198, 18, 1, 1]),
            port: 80,
        };
        let tuples: std::collections::BTreeSet<Vec<u8>> = (0..FRESH_FLOWS)
            .map(|i| {
                let f = frames.flow(i, TCP_SYN, b"");
                // Source address and source port (Ethernet 14 + IPv4 20 bytes).
                [&f[26..30], &f[34..36]].concat()
            })
            .collect();
        assert_eq!(tuples.len(), FRESH_FLOWS as usize);
    }
}
