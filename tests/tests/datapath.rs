//! The XDP program, packet by packet, through the kernel's `BPF_PROG_TEST_RUN`: each
//! fixture is an input frame built field by field, the verdict expected, and the
//! exact bytes expected out. Checksums of every output are checked independently.

use std::net::IpAddr;

use aya::programs::{TestRun, TestRunOptions};
use lb_common::{
    hash::flow_hash,
    types::{FAMILY_V4, FAMILY_V6, FlowKey},
};
use lb_tests::packet::*;
use lb_userspace::{
    config::Config,
    dataplane::Dataplane,
    desired::{Desired, addr_bytes},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const TABLE_SIZE: u32 = 251;

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
[[vip.backend]]
address = "198.18.0.12"
mac = "02:00:00:00:00:12"
weight = 2
[[vip.backend]]
address = "198.18.0.13"
mac = "02:00:00:00:00:13"
weight = 3

[[vip]]
address = "198.18.1.1"
port = 53
protocol = "udp"
table_size = 251
[[vip.backend]]
address = "198.18.0.11"
mac = "02:00:00:00:00:11"
weight = 1

[[vip]]
address = "fd00:18:1::1"
port = 80
protocol = "tcp"
table_size = 251
[[vip.backend]]
address = "fd00:18::11"
mac = "02:00:00:00:00:21"
weight = 1
[[vip.backend]]
address = "fd00:18::12"
mac = "02:00:00:00:00:22"
weight = 1
"#;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

struct World {
    dataplane: Dataplane,
    desired: Desired,
}

impl World {
    fn new() -> World {
        let config = Config::parse(CONFIG).unwrap();
        let desired = Desired::from_config(&config).unwrap();
        let mut dataplane = Dataplane::load().expect("loading the XDP program");
        dataplane.write(&desired).unwrap();
        World { dataplane, desired }
    }

    fn run(&mut self, input: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; input.len() + 256];
        let result = self
            .dataplane
            .program()
            .unwrap()
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// The backend MAC the table gives a flow of VIP `vip_index`, computed here from
    /// the desired table and the shared flow hash.
    fn expected_mac(
        &self,
        vip_index: usize,
        src: IpAddr,
        dst: IpAddr,
        sport: u16,
        dport: u16,
        proto: u8,
    ) -> [u8; 6] {
        let (s, family) = addr_bytes(src);
        let (d, _) = addr_bytes(dst);
        let key = FlowKey {
            src: s,
            dst: d,
            src_port_be: sport.to_be(),
            dst_port_be: dport.to_be(),
            proto,
            family,
            _pad: [0; 2],
        };
        let vip = &self.desired.vips[vip_index];
        let id = vip.table[(flow_hash(&key) % TABLE_SIZE) as usize];
        self.desired.backends[id as usize].mac
    }
}

/// What the frame must look like after the program.
enum Expect {
    Unchanged,
    /// Forwarded by L2 DSR to the backend with this MAC: only the Ethernet addresses change.
    Dsr([u8; 6]),
}

struct Fixture {
    name: &'static str,
    input: Vec<u8>,
    verdict: u32,
    expect: Expect,
}

fn dsr(input: &[u8], backend_mac: [u8; 6]) -> Vec<u8> {
    let mut out = input.to_vec();
    out[0..6].copy_from_slice(&backend_mac);
    out[6..12].copy_from_slice(&input[0..6]);
    out
}

fn fixtures(world: &World) -> Vec<Fixture> {
    let client = ip("198.18.0.1");
    let vip = ip("198.18.1.1");
    let client6 = ip("fd00:18::1");
    let vip6 = ip("fd00:18:1::1");
    let syn = tcp_frame(LB_MAC, CLIENT_MAC, client, vip, 40001, 80, TCP_SYN, b"");
    let mut out = vec![
        Fixture {
            name: "IPv4 TCP SYN to the VIP goes to its table's backend",
            verdict: XDP_TX,
            expect: Expect::Dsr(world.expected_mac(0, client, vip, 40001, 80, 6)),
            input: syn.clone(),
        },
        Fixture {
            name: "IPv4 TCP ACK with data of a known flow follows it",
            input: tcp_frame(
                LB_MAC,
                CLIENT_MAC,
                client,
                vip,
                40001,
                80,
                TCP_ACK | TCP_PSH,
                b"GET / HTTP/1.0\r\n\r\n",
            ),
            verdict: XDP_TX,
            expect: Expect::Dsr(world.expected_mac(0, client, vip, 40001, 80, 6)),
        },
        Fixture {
            name: "IPv4 TCP ACK of an unknown flow is still forwarded by the table",
            input: tcp_frame(LB_MAC, CLIENT_MAC, client, vip, 40002, 80, TCP_ACK, b""),
            verdict: XDP_TX,
            expect: Expect::Dsr(world.expected_mac(0, client, vip, 40002, 80, 6)),
        },
        Fixture {
            name: "IPv4 UDP to the UDP VIP",
            input: udp_frame(LB_MAC, CLIENT_MAC, client, vip, 5353, 53, b"query"),
            verdict: XDP_TX,
            expect: Expect::Dsr([0x02, 0, 0, 0, 0, 0x11]),
        },
        Fixture {
            name: "IPv4 TCP to the VIP address on a port that is not a VIP",
            input: tcp_frame(LB_MAC, CLIENT_MAC, client, vip, 40001, 81, TCP_SYN, b""),
            verdict: XDP_PASS,
            expect: Expect::Unchanged,
        },
        Fixture {
            name: "IPv4 UDP to the TCP VIP's port",
            input: udp_frame(LB_MAC, CLIENT_MAC, client, vip, 40001, 80, b"x"),
            verdict: XDP_PASS,
            expect: Expect::Unchanged,
        },
        Fixture {
            name: "IPv4 TCP to another address",
            input: tcp_frame(
                LB_MAC,
                CLIENT_MAC,
                client,
                ip("198.18.0.2"),
                40001,
                80,
                TCP_SYN,
                b"",
            ),
            verdict: XDP_PASS,
            expect: Expect::Unchanged,
        },
        Fixture {
            name: "ARP",
            input: ethernet([0xff; 6], CLIENT_MAC, ETH_P_ARP, &[0u8; 28]),
            verdict: XDP_PASS,
            expect: Expect::Unchanged,
        },
        Fixture {
            name: "IPv4 first fragment to the VIP",
            input: ethernet(
                LB_MAC,
                CLIENT_MAC,
                ETH_P_IP,
                &ipv4(
                    "198.18.0.1".parse().unwrap(),
                    "198.18.1.1".parse().unwrap(),
                    6,
                    &Ipv4Opts {
                        frag: 0x2000,
                        ..Ipv4Opts::default()
                    },
                    &tcp(client, vip, 40003, 80, TCP_SYN, b""),
                ),
            ),
            verdict: XDP_PASS,
            expect: Expect::Unchanged,
        },
        Fixture {
            name: "IPv4 with options to the VIP is balanced",
            input: ethernet(
                LB_MAC,
                CLIENT_MAC,
                ETH_P_IP,
                &ipv4(
                    "198.18.0.1".parse().unwrap(),
                    "198.18.1.1".parse().unwrap(),
                    6,
                    // Router alert option (RFC 2113), padded to a word.
                    &Ipv4Opts {
                        options: vec![0x94, 0x04, 0x00, 0x00],
                        ..Ipv4Opts::default()
                    },
                    &tcp(client, vip, 40004, 80, TCP_SYN, b""),
                ),
            ),
            verdict: XDP_TX,
            expect: Expect::Dsr(world.expected_mac(0, client, vip, 40004, 80, 6)),
        },
        Fixture {
            name: "IPv6 TCP SYN to the IPv6 VIP",
            input: tcp_frame(LB_MAC, CLIENT_MAC, client6, vip6, 40001, 80, TCP_SYN, b""),
            verdict: XDP_TX,
            expect: Expect::Dsr(world.expected_mac(2, client6, vip6, 40001, 80, 6)),
        },
        Fixture {
            name: "IPv6 with a hop-by-hop extension header",
            input: ethernet(
                LB_MAC,
                CLIENT_MAC,
                ETH_P_IPV6,
                &ipv6(
                    "fd00:18::1".parse().unwrap(),
                    "fd00:18:1::1".parse().unwrap(),
                    0,
                    64,
                    &[6, 0, 1, 4, 0, 0, 0, 0],
                ),
            ),
            verdict: XDP_PASS,
            expect: Expect::Unchanged,
        },
    ];
    // Cut short at every header boundary, one byte before the header would end.
    for (name, len) in [
        ("IPv4 SYN cut inside the IPv4 header", 14 + 19),
        ("IPv4 SYN cut inside the TCP header", 14 + 20 + 19),
        ("IPv4 SYN cut right after the IPv4 header", 14 + 20),
    ] {
        out.push(Fixture {
            name,
            input: syn[..len].to_vec(),
            verdict: XDP_PASS,
            expect: Expect::Unchanged,
        });
    }
    out
}

#[test]
fn packet_fixtures() {
    let mut world = World::new();
    let fixtures = fixtures(&world);
    let mut failures = Vec::new();
    for f in &fixtures {
        let (verdict, out) = world.run(&f.input);
        let expected = match f.expect {
            Expect::Unchanged => f.input.clone(),
            Expect::Dsr(mac) => dsr(&f.input, mac),
        };
        if verdict != f.verdict {
            failures.push(format!(
                "{}: verdict {verdict}, expected {}",
                f.name, f.verdict
            ));
        } else if out != expected {
            failures.push(format!(
                "{}: output differs\n  got      {out:02x?}\n  expected {expected:02x?}",
                f.name
            ));
        } else if verdict == XDP_TX {
            if let Err(e) = verify_checksums(&out) {
                failures.push(format!("{}: bad {e} in the output", f.name));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n{}",
        failures.len(),
        fixtures.len(),
        failures.join("\n")
    );
}

#[test]
fn counters_name_what_happened() {
    let mut world = World::new();
    let client = ip("198.18.0.1");
    let vip = ip("198.18.1.1");
    let syn = tcp_frame(LB_MAC, CLIENT_MAC, client, vip, 41000, 80, TCP_SYN, b"");
    let ack = tcp_frame(LB_MAC, CLIENT_MAC, client, vip, 41000, 80, TCP_ACK, b"");
    let stray = tcp_frame(LB_MAC, CLIENT_MAC, client, vip, 41001, 80, TCP_ACK, b"");
    let other = tcp_frame(
        LB_MAC,
        CLIENT_MAC,
        client,
        ip("198.18.0.2"),
        41000,
        22,
        TCP_SYN,
        b"",
    );
    for frame in [&syn, &ack, &ack, &stray, &other] {
        world.run(frame);
    }
    let s = world.dataplane.global_stats().unwrap();
    assert_eq!(s.rx_frames, 5);
    assert_eq!(s.conn_miss_syn, 1, "{s:?}");
    assert_eq!(s.conn_hit, 2, "{s:?}");
    assert_eq!(s.conn_miss_non_syn, 1, "{s:?}");
    assert_eq!(s.pass_not_vip, 1, "{s:?}");
    assert_eq!(s.tx, 4, "{s:?}");
    let mac = world.expected_mac(0, client, vip, 41000, 80, 6);
    let id = world
        .desired
        .backends
        .iter()
        .position(|b| b.mac == mac)
        .unwrap() as u32;
    let b = world.dataplane.backend_stats(id).unwrap();
    assert!(b.packets >= 3 && b.new_flows >= 1, "{b:?}");
    assert_eq!(FAMILY_V4, 4);
    assert_eq!(FAMILY_V6, 6);
}
