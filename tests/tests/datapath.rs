//! The XDP program, packet by packet, through the kernel's `BPF_PROG_TEST_RUN`: each
//! fixture is an input frame built field by field, the verdict expected, and the
//! exact bytes expected out. Checksums of every output are checked independently of
//! the builder. Then: established flows across table switches, and 100,000 random,
//! mutated and truncated frames.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::{
    hash::{flow_hash, source_hash, vip_filter_slot},
    types::{BACKEND_F_DRAINED, FlowKey, SharedFlow, VipKey, addr_words},
};
use lb_tests::{fixture::World, packet::*};
use lb_userspace::{
    config::Config,
    dataplane::Dataplane,
    desired::{Desired, Tables, addr_bytes},
    share::ids::{Entry, FlowIds},
};
use log::LevelFilter;

const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}
fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}
fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

/// VIPs of every kind the datapath knows: both families, both forwarding modes (and
/// encapsulation across families), source hashing, TCP and UDP.
const CONFIG: &str = r#"
[encapsulation]
source_v4 = "198.19.0.0"
source_v6 = "fd00:19::"

[datapath]
max_vips = 12

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

[[vip]]
address = "fd00:18:1::1"
port = 53
protocol = "udp"
table_size = 251
[[vip.backend]]
address = "fd00:18::11"
mac = "02:00:00:00:00:21"
weight = 1

[[vip]]
address = "198.18.1.2"
port = 443
protocol = "tcp"
forwarding = "ipip"
table_size = 251
[[vip.backend]]
address = "198.18.2.21"
mac = "02:00:00:00:00:fe"
weight = 1

[[vip]]
address = "fd00:18:1::2"
port = 443
protocol = "tcp"
forwarding = "ipip"
table_size = 251
[[vip.backend]]
address = "fd00:18:2::21"
mac = "02:00:00:00:00:fe"
weight = 1

[[vip]]
address = "198.18.1.3"
port = 443
protocol = "udp"
forwarding = "ipip"
table_size = 251
[[vip.backend]]
address = "fd00:18:2::22"
mac = "02:00:00:00:00:fe"
weight = 1

[[vip]]
address = "fd00:18:1::3"
port = 443
protocol = "tcp"
forwarding = "ipip"
table_size = 251
[[vip.backend]]
address = "198.18.2.22"
mac = "02:00:00:00:00:fe"
weight = 1

[[vip]]
address = "198.18.1.4"
port = 80
protocol = "tcp"
hash = "source"
table_size = 251
[[vip.backend]]
address = "198.18.0.11"
mac = "02:00:00:00:00:11"
weight = 1
[[vip.backend]]
address = "198.18.0.12"
mac = "02:00:00:00:00:12"
weight = 1
[[vip.backend]]
address = "198.18.0.13"
mac = "02:00:00:00:00:13"
weight = 1
"#;

/// What these tests ask of the fixture world (`lb_tests::fixture::World`) of
/// [`CONFIG`].
trait Fixtures {
    fn new() -> Self;
    /// The world with the datapath's log at `log` (its records are left unread).
    fn logging(log: LevelFilter) -> Self;
    /// The backend the desired table gives a new flow, computed here from the
    /// desired state and the shared flow hash: (MAC, address).
    fn table_backend(&self, flow: &Flow) -> ([u8; 6], IpAddr);
}

impl Fixtures for World {
    fn new() -> World {
        World::logging(LevelFilter::Off)
    }

    fn logging(log: LevelFilter) -> World {
        World::load(CONFIG, log)
    }

    fn table_backend(&self, flow: &Flow) -> ([u8; 6], IpAddr) {
        let (vip_key, key) = flow.keys();
        let vip = &self.desired.vips[&vip_key];
        let hash = if vip.meta.flags & lb_common::types::VIP_F_HASH_SRC_ONLY != 0 {
            source_hash(&key)
        } else {
            flow_hash(&key)
        };
        let id = vip.table[(hash % vip.meta.ring_size) as usize];
        let b = &self.desired.backends[&id];
        (b.entry.mac, b.address)
    }
}

/// A client-to-VIP flow.
#[derive(Clone, Copy)]
struct Flow {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    proto: u8,
}

impl Flow {
    fn tcp(src: &str, dst: &str, sport: u16, dport: u16) -> Flow {
        Flow {
            src: ip(src),
            dst: ip(dst),
            sport,
            dport,
            proto: 6,
        }
    }
    fn udp(src: &str, dst: &str, sport: u16, dport: u16) -> Flow {
        Flow {
            src: ip(src),
            dst: ip(dst),
            sport,
            dport,
            proto: 17,
        }
    }
    fn keys(&self) -> (VipKey, FlowKey) {
        let (s, family) = addr_bytes(self.src);
        let (d, _) = addr_bytes(self.dst);
        let vip = VipKey {
            addr: d,
            port_be: self.dport.to_be(),
            proto: self.proto,
            family,
        };
        let key = FlowKey {
            src: s,
            dst: d,
            src_port_be: self.sport.to_be(),
            dst_port_be: self.dport.to_be(),
            proto: self.proto,
            family,
            _pad: [0; 2],
        };
        (vip, key)
    }
    fn hash(&self) -> u32 {
        flow_hash(&self.keys().1)
    }
    /// A frame of this flow from the client to the LB's MAC.
    fn frame(&self, flags: u8, payload: &[u8]) -> Vec<u8> {
        if self.proto == 6 {
            tcp_frame(
                LB_MAC, CLIENT_MAC, self.src, self.dst, self.sport, self.dport, flags, payload,
            )
        } else {
            udp_frame(
                LB_MAC, CLIENT_MAC, self.src, self.dst, self.sport, self.dport, payload,
            )
        }
    }
    /// The packet the backend sends back for this flow (VIP to client), as quoted
    /// by ICMP errors: its IP header and first 8 transport bytes.
    fn reply_quote(&self) -> Vec<u8> {
        let seg = tcp(
            self.dst,
            self.src,
            self.dport,
            self.sport,
            TCP_ACK,
            &[0u8; 1400],
        );
        let full = match (self.dst, self.src) {
            (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(s, d, 6, &Ipv4Opts::default(), &seg),
            (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s, d, 6, 64, &seg),
            _ => unreachable!(),
        };
        let header = if self.dst.is_ipv4() { 20 } else { 40 };
        full[..header + 8].to_vec()
    }
}

/// What the frame must look like after the program.
enum Expect {
    /// Unchanged (PASS) or irrelevant (DROP).
    Unchanged,
    /// Forwarded by L2 DSR to the backend with this MAC: only the Ethernet addresses change.
    Dsr([u8; 6]),
    /// Encapsulated towards `backend` via `next_hop`; the outer source is the
    /// configured prefix with the low bits from `hash`.
    Encap {
        next_hop: [u8; 6],
        backend: IpAddr,
        hash: u32,
    },
    /// Exactly these bytes.
    Bytes(Vec<u8>),
}

struct Fixture {
    name: String,
    input: Vec<u8>,
    verdict: u32,
    expect: Expect,
}

fn fx(name: impl Into<String>, input: Vec<u8>, verdict: u32, expect: Expect) -> Fixture {
    Fixture {
        name: name.into(),
        input,
        verdict,
        expect,
    }
}

fn dsr(input: &[u8], backend_mac: [u8; 6]) -> Vec<u8> {
    let mut out = input.to_vec();
    out[0..6].copy_from_slice(&backend_mac);
    out[6..12].copy_from_slice(&input[0..6]);
    out
}

/// The expected encapsulated frame, built independently of the datapath: a new
/// Ethernet header, an outer header as RFC 2003 / RFC 2473 describe, then the client's
/// IP packet unchanged.
fn encap(input: &[u8], next_hop: [u8; 6], backend: IpAddr, hash: u32) -> Vec<u8> {
    let inner_v4 = u16::from_be_bytes([input[12], input[13]]) == ETH_P_IP;
    let inner_len = if inner_v4 {
        u16::from_be_bytes([input[16], input[17]]) as usize
    } else {
        40 + u16::from_be_bytes([input[18], input[19]]) as usize
    };
    let inner = &input[14..14 + inner_len];
    let proto = if inner_v4 { 4 } else { 41 };
    let h = hash.to_be_bytes();
    match backend {
        IpAddr::V4(b) => {
            let src = Ipv4Addr::new(198, 19, h[2], h[3]);
            let opts = Ipv4Opts {
                ttl: 64,
                id: 0,
                frag: 0x4000,
                options: vec![],
            };
            ethernet(
                next_hop,
                LB_MAC,
                ETH_P_IP,
                &ipv4(src, b, proto, &opts, inner),
            )
        }
        IpAddr::V6(b) => {
            let mut src = v6("fd00:19::").octets();
            src[12..].copy_from_slice(&h);
            ethernet(
                next_hop,
                LB_MAC,
                ETH_P_IPV6,
                &ipv6(Ipv6Addr::from(src), b, proto, 64, inner),
            )
        }
    }
}

fn fixtures(world: &World) -> Vec<Fixture> {
    let mut out = Vec::new();
    let web = Flow::tcp("198.18.0.1", "198.18.1.1", 40001, 80);
    let web_mac = world.table_backend(&web).0;
    let syn = web.frame(TCP_SYN, b"");

    // TCP and UDP to VIPs, both families, L2 DSR.
    out.push(fx(
        "IPv4 TCP SYN to a VIP goes to its table's backend",
        syn.clone(),
        XDP_TX,
        Expect::Dsr(web_mac),
    ));
    out.push(fx(
        "IPv4 TCP ACK with data of the known flow follows it",
        web.frame(TCP_ACK | TCP_PSH, b"GET / HTTP/1.0\r\n\r\n"),
        XDP_TX,
        Expect::Dsr(web_mac),
    ));
    out.push(fx(
        "IPv4 TCP FIN of the known flow",
        web.frame(TCP_FIN | TCP_ACK, b""),
        XDP_TX,
        Expect::Dsr(web_mac),
    ));
    out.push(fx(
        "IPv4 TCP RST of the known flow",
        web.frame(TCP_RST, b""),
        XDP_TX,
        Expect::Dsr(web_mac),
    ));
    let stray = Flow::tcp("198.18.0.1", "198.18.1.1", 40002, 80);
    out.push(fx(
        "IPv4 TCP ACK of an unknown flow is forwarded by the table",
        stray.frame(TCP_ACK, b""),
        XDP_TX,
        Expect::Dsr(world.table_backend(&stray).0),
    ));
    for sport in [1u16, 1024, 33333, 65535] {
        let f = Flow::tcp("198.18.0.7", "198.18.1.1", sport, 80);
        out.push(fx(
            format!("IPv4 TCP SYN from port {sport}"),
            f.frame(TCP_SYN, b""),
            XDP_TX,
            Expect::Dsr(world.table_backend(&f).0),
        ));
    }
    let dns = Flow::udp("198.18.0.1", "198.18.1.1", 5353, 53);
    out.push(fx(
        "IPv4 UDP to a UDP VIP",
        dns.frame(0, b"query"),
        XDP_TX,
        Expect::Dsr([2, 0, 0, 0, 0, 0x11]),
    ));
    let web6 = Flow::tcp("fd00:18::1", "fd00:18:1::1", 40001, 80);
    let web6_mac = world.table_backend(&web6).0;
    out.push(fx(
        "IPv6 TCP SYN to a VIP",
        web6.frame(TCP_SYN, b""),
        XDP_TX,
        Expect::Dsr(web6_mac),
    ));
    out.push(fx(
        "IPv6 TCP data of the known flow",
        web6.frame(TCP_ACK, b"data"),
        XDP_TX,
        Expect::Dsr(web6_mac),
    ));
    let dns6 = Flow::udp("fd00:18::1", "fd00:18:1::1", 5353, 53);
    out.push(fx(
        "IPv6 UDP to a UDP VIP",
        dns6.frame(0, b"q"),
        XDP_TX,
        Expect::Dsr([2, 0, 0, 0, 0, 0x21]),
    ));

    // Source hashing: two flows of one client, one backend.
    let a = Flow::tcp("198.18.0.9", "198.18.1.4", 1111, 80);
    let b = Flow::tcp("198.18.0.9", "198.18.1.4", 2222, 80);
    assert_eq!(world.table_backend(&a), world.table_backend(&b));
    out.push(fx(
        "source-hash VIP, first flow",
        a.frame(TCP_SYN, b""),
        XDP_TX,
        Expect::Dsr(world.table_backend(&a).0),
    ));
    out.push(fx(
        "source-hash VIP, second flow of the same client",
        b.frame(TCP_SYN, b""),
        XDP_TX,
        Expect::Dsr(world.table_backend(&a).0),
    ));

    // Encapsulation, every family combination.
    for (name, flow) in [
        (
            "IPv4 in IPv4",
            Flow::tcp("198.18.0.1", "198.18.1.2", 40001, 443),
        ),
        (
            "IPv6 in IPv6",
            Flow::tcp("fd00:18::1", "fd00:18:1::2", 40001, 443),
        ),
        (
            "IPv4 UDP in IPv6",
            Flow::udp("198.18.0.1", "198.18.1.3", 40001, 443),
        ),
        (
            "IPv6 in IPv4",
            Flow::tcp("fd00:18::1", "fd00:18:1::3", 40001, 443),
        ),
    ] {
        let (mac, backend) = world.table_backend(&flow);
        out.push(fx(
            format!("encapsulation {name}, new flow"),
            flow.frame(TCP_SYN, b""),
            XDP_TX,
            Expect::Encap {
                next_hop: mac,
                backend,
                hash: flow.hash(),
            },
        ));
        out.push(fx(
            format!("encapsulation {name}, established flow with data"),
            flow.frame(TCP_ACK, b"0123456789"),
            XDP_TX,
            Expect::Encap {
                next_hop: mac,
                backend,
                hash: flow.hash(),
            },
        ));
    }

    // Not for a VIP.
    out.push(fx(
        "IPv4 TCP to the VIP address, another port",
        Flow::tcp("198.18.0.1", "198.18.1.1", 40001, 81).frame(TCP_SYN, b""),
        XDP_PASS,
        Expect::Unchanged,
    ));
    out.push(fx(
        "IPv4 UDP to the TCP VIP's port",
        Flow::udp("198.18.0.1", "198.18.1.1", 40001, 80).frame(0, b"x"),
        XDP_PASS,
        Expect::Unchanged,
    ));
    out.push(fx(
        "IPv4 TCP to another address",
        Flow::tcp("198.18.0.1", "198.18.0.2", 40001, 80).frame(TCP_SYN, b""),
        XDP_PASS,
        Expect::Unchanged,
    ));
    out.push(fx(
        "IPv6 TCP to another address",
        Flow::tcp("fd00:18::1", "fd00:18::2", 40001, 80).frame(TCP_SYN, b""),
        XDP_PASS,
        Expect::Unchanged,
    ));
    out.push(fx(
        "IPv4 GRE (protocol 47) to the VIP address",
        ethernet(
            LB_MAC,
            CLIENT_MAC,
            ETH_P_IP,
            &ipv4(
                v4("198.18.0.1"),
                v4("198.18.1.1"),
                47,
                &Ipv4Opts::default(),
                &[0u8; 8],
            ),
        ),
        XDP_PASS,
        Expect::Unchanged,
    ));
    out.push(fx(
        "ARP",
        ethernet([0xff; 6], CLIENT_MAC, ETH_P_ARP, &[0u8; 28]),
        XDP_PASS,
        Expect::Unchanged,
    ));
    out.push(fx(
        "VLAN-tagged frame (not parsed)",
        ethernet(LB_MAC, CLIENT_MAC, 0x8100, &{
            let mut v = vec![0, 5, 0x08, 0x00];
            v.extend_from_slice(&syn[14..]);
            v
        }),
        XDP_PASS,
        Expect::Unchanged,
    ));

    // IPv4 header shapes.
    let frag = |frag: u16| {
        ethernet(
            LB_MAC,
            CLIENT_MAC,
            ETH_P_IP,
            &ipv4(
                v4("198.18.0.1"),
                v4("198.18.1.1"),
                6,
                &Ipv4Opts {
                    frag,
                    ..Ipv4Opts::default()
                },
                &syn[34..],
            ),
        )
    };
    out.push(fx(
        "IPv4 first fragment (MF) to the VIP",
        frag(0x2000),
        XDP_PASS,
        Expect::Unchanged,
    ));
    out.push(fx(
        "IPv4 later fragment (offset) to the VIP",
        frag(0x0010),
        XDP_PASS,
        Expect::Unchanged,
    ));
    let opts = Flow::tcp("198.18.0.1", "198.18.1.1", 40004, 80);
    out.push(fx(
        "IPv4 with options (router alert) to the VIP is balanced",
        ethernet(
            LB_MAC,
            CLIENT_MAC,
            ETH_P_IP,
            &ipv4(
                v4("198.18.0.1"),
                v4("198.18.1.1"),
                6,
                &Ipv4Opts {
                    options: vec![0x94, 0x04, 0x00, 0x00],
                    ..Ipv4Opts::default()
                },
                &tcp(opts.src, opts.dst, 40004, 80, TCP_SYN, b""),
            ),
        ),
        XDP_TX,
        Expect::Dsr(world.table_backend(&opts).0),
    ));
    let mut bad_version = syn.clone();
    bad_version[14] = 0x55;
    out.push(fx(
        "IPv4 ether type with IP version 5",
        bad_version,
        XDP_PASS,
        Expect::Unchanged,
    ));
    let mut short_ihl = syn.clone();
    short_ihl[14] = 0x44;
    out.push(fx(
        "IPv4 header length 16 (below 20)",
        short_ihl,
        XDP_PASS,
        Expect::Unchanged,
    ));
    let mut short_total = syn.clone();
    short_total[16..18].copy_from_slice(&12u16.to_be_bytes());
    out.push(fx(
        "IPv4 total length below its header length",
        short_total,
        XDP_PASS,
        Expect::Unchanged,
    ));
    out.push(fx(
        "IPv6 with a hop-by-hop extension header",
        ethernet(
            LB_MAC,
            CLIENT_MAC,
            ETH_P_IPV6,
            &ipv6(
                v6("fd00:18::1"),
                v6("fd00:18:1::1"),
                0,
                64,
                &[6, 0, 1, 4, 0, 0, 0, 0],
            ),
        ),
        XDP_PASS,
        Expect::Unchanged,
    ));
    out.push(fx(
        "IPv6 with a fragment header",
        ethernet(
            LB_MAC,
            CLIENT_MAC,
            ETH_P_IPV6,
            &ipv6(
                v6("fd00:18::1"),
                v6("fd00:18:1::1"),
                44,
                64,
                &[6, 0, 0, 1, 0, 0, 0, 7],
            ),
        ),
        XDP_PASS,
        Expect::Unchanged,
    ));

    // ICMP: echo to VIP addresses is answered here.
    let echo_body = b"ping payload 0123";
    let echo4 = ethernet(
        LB_MAC,
        CLIENT_MAC,
        ETH_P_IP,
        &ipv4(
            v4("198.18.0.1"),
            v4("198.18.1.1"),
            1,
            &Ipv4Opts {
                ttl: 61,
                ..Ipv4Opts::default()
            },
            &icmp(8, 0, [0, 7, 0, 1], echo_body, None),
        ),
    );
    let reply4 = ethernet(
        CLIENT_MAC,
        LB_MAC,
        ETH_P_IP,
        &ipv4(
            v4("198.18.1.1"),
            v4("198.18.0.1"),
            1,
            &Ipv4Opts {
                ttl: 64,
                ..Ipv4Opts::default()
            },
            &icmp(0, 0, [0, 7, 0, 1], echo_body, None),
        ),
    );
    out.push(fx(
        "ICMP echo request to a VIP address is answered",
        echo4.clone(),
        XDP_TX,
        Expect::Bytes(reply4),
    ));
    let (c6, vip6) = (v6("fd00:18::1"), v6("fd00:18:1::1"));
    let echo6 = ethernet(
        LB_MAC,
        CLIENT_MAC,
        ETH_P_IPV6,
        &ipv6(
            c6,
            vip6,
            58,
            60,
            &icmp(128, 0, [0, 9, 0, 2], echo_body, Some((c6, vip6))),
        ),
    );
    let reply6 = ethernet(
        CLIENT_MAC,
        LB_MAC,
        ETH_P_IPV6,
        &ipv6(
            vip6,
            c6,
            58,
            64,
            &icmp(129, 0, [0, 9, 0, 2], echo_body, Some((vip6, c6))),
        ),
    );
    out.push(fx(
        "ICMPv6 echo request to a VIP address is answered",
        echo6,
        XDP_TX,
        Expect::Bytes(reply6),
    ));
    out.push(fx(
        "ICMP echo request to another address",
        ethernet(
            LB_MAC,
            CLIENT_MAC,
            ETH_P_IP,
            &ipv4(
                v4("198.18.0.1"),
                v4("198.18.0.2"),
                1,
                &Ipv4Opts::default(),
                &icmp(8, 0, [0, 7, 0, 1], echo_body, None),
            ),
        ),
        XDP_PASS,
        Expect::Unchanged,
    ));
    out.push(fx(
        "ICMP echo request with IPv4 options is left to the kernel",
        ethernet(
            LB_MAC,
            CLIENT_MAC,
            ETH_P_IP,
            &ipv4(
                v4("198.18.0.1"),
                v4("198.18.1.1"),
                1,
                &Ipv4Opts {
                    options: vec![1, 1, 1, 0],
                    ..Ipv4Opts::default()
                },
                &icmp(8, 0, [0, 7, 0, 1], echo_body, None),
            ),
        ),
        XDP_PASS,
        Expect::Unchanged,
    ));

    // ICMP errors about VIP flows follow the flow.
    let need_frag = |flow: &Flow, code: u8| {
        ethernet(
            LB_MAC,
            ROUTER_MAC,
            ETH_P_IP,
            &ipv4(
                v4("198.18.0.254"),
                v4("198.18.1.1"),
                1,
                &Ipv4Opts::default(),
                &icmp(3, code, [0, 0, 0x05, 0xdc], &flow.reply_quote(), None),
            ),
        )
    };
    out.push(fx(
        "ICMP fragmentation needed about a VIP flow reaches its backend",
        need_frag(&web, 4),
        XDP_TX,
        Expect::Dsr(web_mac),
    ));
    out.push(fx(
        "ICMP port unreachable is left to the kernel",
        need_frag(&web, 3),
        XDP_PASS,
        Expect::Unchanged,
    ));
    let other = Flow::tcp("198.18.0.1", "198.18.1.1", 40001, 8080);
    out.push(fx(
        "ICMP fragmentation needed about a non-VIP flow",
        need_frag(&other, 4),
        XDP_PASS,
        Expect::Unchanged,
    ));
    let mut cut_quote = need_frag(&web, 4);
    cut_quote.truncate(14 + 20 + 8 + 20 + 3);
    out.push(fx(
        "ICMP fragmentation needed whose quote ends inside the ports",
        cut_quote,
        XDP_PASS,
        Expect::Unchanged,
    ));
    let router6 = v6("fd00:18::fe");
    let ptb = ethernet(
        LB_MAC,
        ROUTER_MAC,
        ETH_P_IPV6,
        &ipv6(
            router6,
            vip6,
            58,
            64,
            &icmp(
                2,
                0,
                [0, 0, 0x05, 0x00],
                &web6.reply_quote(),
                Some((router6, vip6)),
            ),
        ),
    );
    out.push(fx(
        "ICMPv6 packet too big about a VIP flow reaches its backend",
        ptb,
        XDP_TX,
        Expect::Dsr(web6_mac),
    ));
    let tunnel = Flow::tcp("198.18.0.1", "198.18.1.2", 40001, 443);
    let (tmac, tbackend) = world.table_backend(&tunnel);
    let ne = ethernet(
        LB_MAC,
        ROUTER_MAC,
        ETH_P_IP,
        &ipv4(
            v4("198.18.0.254"),
            v4("198.18.1.2"),
            1,
            &Ipv4Opts::default(),
            &icmp(3, 4, [0, 0, 0x05, 0xdc], &tunnel.reply_quote(), None),
        ),
    );
    // Encapsulation uses the hash of the flow the error is about.
    out.push(fx(
        "ICMP fragmentation needed about an encapsulated VIP flow is encapsulated",
        ne,
        XDP_TX,
        Expect::Encap {
            next_hop: tmac,
            backend: tbackend,
            hash: tunnel.hash(),
        },
    ));

    // Cut short at every header boundary, and one byte before each header ends.
    let udp4 = dns.frame(0, b"query");
    let syn6 = web6.frame(TCP_SYN, b"");
    let udp6 = dns6.frame(0, b"q");
    for (name, frame, len) in [
        ("IPv4 TCP: Ethernet header only", &syn, 14),
        ("IPv4 TCP: inside the IPv4 header", &syn, 14 + 19),
        ("IPv4 TCP: right after the IPv4 header", &syn, 14 + 20),
        ("IPv4 TCP: inside the TCP header", &syn, 14 + 20 + 19),
        ("IPv4 UDP: inside the UDP header", &udp4, 14 + 20 + 7),
        ("IPv6 TCP: inside the IPv6 header", &syn6, 14 + 39),
        ("IPv6 TCP: right after the IPv6 header", &syn6, 14 + 40),
        ("IPv6 TCP: inside the TCP header", &syn6, 14 + 40 + 19),
        ("IPv6 UDP: inside the UDP header", &udp6, 14 + 40 + 7),
        ("ICMP echo: inside the ICMP header", &echo4, 14 + 20 + 7),
    ] {
        out.push(fx(
            format!("cut short: {name}"),
            frame[..len].to_vec(),
            XDP_PASS,
            Expect::Unchanged,
        ));
    }
    out
}

/// Every fixture, with the datapath's log off and at `debug`: a record never changes a
/// verdict or an output byte.
#[test]
fn packet_fixtures() {
    for log in [LevelFilter::Off, LevelFilter::Debug] {
        fixtures_pass(World::logging(log), log);
    }
}

fn fixtures_pass(mut world: World, log: LevelFilter) {
    let fixtures = fixtures(&world);
    assert!(fixtures.len() >= 40, "only {} fixtures", fixtures.len());
    let mut failures = Vec::new();
    for f in &fixtures {
        let (verdict, out) = world.run(&f.input);
        let expected = match &f.expect {
            Expect::Unchanged => f.input.clone(),
            Expect::Dsr(mac) => dsr(&f.input, *mac),
            Expect::Encap {
                next_hop,
                backend,
                hash,
            } => encap(&f.input, *next_hop, *backend, *hash),
            Expect::Bytes(bytes) => bytes.clone(),
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
        } else if verdict == XDP_TX
            && let Err(e) = verify_checksums(&out)
        {
            failures.push(format!("{}: bad {e} in the output", f.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed with the log {log}:\n{}",
        failures.len(),
        fixtures.len(),
        failures.join("\n")
    );
}

#[test]
fn counters_name_what_happened() {
    let mut world = World::new();
    let flow = Flow::tcp("198.18.0.1", "198.18.1.1", 41000, 80);
    let syn = flow.frame(TCP_SYN, b"");
    let ack = flow.frame(TCP_ACK, b"");
    let stray = Flow::tcp("198.18.0.1", "198.18.1.1", 41001, 80).frame(TCP_ACK, b"");
    let other = Flow::tcp("198.18.0.1", "198.18.0.2", 41000, 22).frame(TCP_SYN, b"");
    let frag = {
        let mut f = syn.clone();
        f[20] = 0x20; // more fragments
        f
    };
    for frame in [&syn, &ack, &ack, &stray, &other, &frag, &syn[..20].to_vec()] {
        world.run(frame);
    }
    let s = world.dataplane.global_stats().unwrap();
    assert_eq!(s.rx_frames, 7, "{s:?}");
    assert_eq!(s.conn_miss_syn, 1, "{s:?}");
    assert_eq!(s.conn_hit, 2, "{s:?}");
    assert_eq!(s.conn_miss_non_syn, 1, "{s:?}");
    assert_eq!(s.pass_not_vip, 1, "{s:?}");
    assert_eq!(s.pass_fragment, 1, "{s:?}");
    assert_eq!(s.pass_truncated, 1, "{s:?}");
    assert_eq!(s.tx, 4, "{s:?}");
    let mac = world.table_backend(&flow).0;
    let id = *world
        .desired
        .backends
        .iter()
        .find(|(_, b)| b.entry.mac == mac && b.vip == flow.keys().0)
        .unwrap()
        .0;
    let b = world.dataplane.backend_stats(id).unwrap();
    assert_eq!((b.packets, b.new_flows), (3, 1), "{b:?}");
}

/// Opens 300 TCP flows to the web VIP from ports `first_port`.. with one SYN each;
/// returns them and the backend MAC each went to, by source port.
fn open_flows(world: &mut World, first_port: u16) -> (Vec<Flow>, BTreeMap<u16, [u8; 6]>) {
    let flows: Vec<Flow> = (0..300)
        .map(|i| Flow::tcp("198.18.0.1", "198.18.1.1", first_port + i, 80))
        .collect();
    let mut first = BTreeMap::new();
    for f in &flows {
        let (v, out) = world.run(&f.frame(TCP_SYN, b""));
        assert_eq!(v, XDP_TX);
        first.insert(f.sport, <[u8; 6]>::try_from(&out[..6]).unwrap());
    }
    (flows, first)
}

/// Weights change twice (a new table each time, switched atomically): established
/// flows keep their backend, new flows follow the new table, a drained backend gets
/// no new flow but keeps its old ones, and a removed backend's flows move.
#[test]
fn established_flows_survive_table_switches() {
    let mut world = World::new();
    let (flows, first) = open_flows(&mut world, 20000);
    let drained: IpAddr = ip("198.18.0.13");
    let drained_mac = [2, 0, 0, 0, 0, 0x13];
    assert!(first.values().any(|m| *m == drained_mac));
    let desired = Desired::plan(
        &world.config,
        Some(&world.desired),
        &|v, b, _| {
            (
                if v.port == 80 && b.address == drained {
                    0
                } else {
                    b.weight
                },
                0,
            )
        },
        &Tables::new(),
    )
    .unwrap();
    let report = world.dataplane.apply_and_wait(&desired).unwrap();
    assert!(
        report.tables_switched >= 1 && report.slots_written > 0,
        "{report:?}"
    );
    let vip_key = flows[0].keys().0;
    assert_eq!(
        world.dataplane.active_table(&vip_key).unwrap().unwrap(),
        *desired.vips[&vip_key].table
    );
    world.desired = desired;
    for f in &flows {
        let (_, out) = world.run(&f.frame(TCP_ACK, b"more"));
        assert_eq!(
            out[..6],
            first[&f.sport],
            "established flow {} moved",
            f.sport
        );
    }
    for i in 0..300 {
        let f = Flow::tcp("198.18.0.2", "198.18.1.1", 30000 + i, 80);
        let (_, out) = world.run(&f.frame(TCP_SYN, b""));
        assert_ne!(out[..6], drained_mac, "the drained backend got a new flow");
        assert_eq!(
            out[..6],
            world.table_backend(&f).0,
            "a new flow did not follow the new table"
        );
    }
    // Remove the drained backend from the config: its flows are given new backends.
    let text = CONFIG.replacen(
        "[[vip.backend]]\naddress = \"198.18.0.13\"\nmac = \"02:00:00:00:00:13\"\nweight = 3\n",
        "",
        1,
    );
    let config = Config::parse(&text).unwrap();
    let desired = Desired::plan(
        &config,
        Some(&world.desired),
        &|_, b, _| (b.weight, 0),
        &Tables::new(),
    )
    .unwrap();
    world.dataplane.apply_and_wait(&desired).unwrap();
    for f in &flows {
        let (v, out) = world.run(&f.frame(TCP_ACK, b"more"));
        assert_eq!(v, XDP_TX);
        if first[&f.sport] == drained_mac {
            assert_ne!(
                out[..6],
                drained_mac,
                "flow {} still reaches a removed backend",
                f.sport
            );
        } else {
            assert_eq!(
                out[..6],
                first[&f.sport],
                "flow {} of a live backend moved",
                f.sport
            );
        }
    }
}

/// A SYN the client retransmits after the table changed goes where its first SYN
/// went (that backend may have answered, and another one would reset the
/// connection), as long as that backend is in service; once the client sent a FIN
/// or an RST, a SYN with the same ports is a new connection and follows the table.
#[test]
fn a_retransmitted_syn_keeps_its_backend_until_the_client_closes() {
    let mut world = World::new();
    let (flows, first) = open_flows(&mut world, 21000);
    // One backend goes to weight 0 without the operator's drain flag, as an
    // unhealthy one does, and another one's weight grows fivefold: flows of the
    // down backend and of the live ones now hash elsewhere.
    let down: IpAddr = ip("198.18.0.13");
    let down_mac = [2, 0, 0, 0, 0, 0x13];
    let grown: IpAddr = ip("198.18.0.11");
    let plan = |world: &World, flags: u8| {
        Desired::plan(
            &world.config,
            Some(&world.desired),
            &|v, b, _| match b.address {
                a if v.port == 80 && a == down => (0, flags),
                a if v.port == 80 && a == grown => (b.weight * 5, 0),
                _ => (b.weight, 0),
            },
            &Tables::new(),
        )
        .unwrap()
    };
    let desired = plan(&world, 0);
    world.dataplane.apply_and_wait(&desired).unwrap();
    world.desired = desired;
    let moved: Vec<&Flow> = flows
        .iter()
        .filter(|f| world.table_backend(f).0 != first[&f.sport])
        .collect();
    let (to_down, to_live): (Vec<&Flow>, Vec<&Flow>) =
        moved.iter().partition(|f| first[&f.sport] == down_mac);
    assert!(
        to_live.len() > 10 && to_down.len() > 10,
        "{} flows of live backends and {} of the down one hash elsewhere now",
        to_live.len(),
        to_down.len()
    );
    let before = world.dataplane.global_stats().unwrap();
    for f in &to_live {
        let (v, out) = world.run(&f.frame(TCP_SYN, b""));
        assert_eq!(v, XDP_TX);
        assert_eq!(
            out[..6],
            first[&f.sport],
            "retransmitted SYN of {} moved",
            f.sport
        );
    }
    let after = world.dataplane.global_stats().unwrap();
    assert_eq!(after.conn_hit - before.conn_hit, to_live.len() as u64);
    assert_eq!(after.conn_miss_syn, before.conn_miss_syn);
    // A backend out of service gets no retry: the table decides.
    for f in &to_down {
        let (_, out) = world.run(&f.frame(TCP_SYN, b""));
        assert_eq!(
            out[..6],
            world.table_backend(f).0,
            "retry of {} to a down backend",
            f.sport
        );
    }
    // The client closes (half of the flows with FIN, half with RST); the closing
    // packet itself still reaches the flow's backend.
    for (i, f) in to_live.iter().enumerate() {
        let flags = if i % 2 == 0 {
            TCP_FIN | TCP_ACK
        } else {
            TCP_RST
        };
        let (_, out) = world.run(&f.frame(flags, b""));
        assert_eq!(
            out[..6],
            first[&f.sport],
            "closing packet of {} moved",
            f.sport
        );
        // So does the rest of that connection (the ACK of the server's FIN).
        let (_, out) = world.run(&f.frame(TCP_ACK, b""));
        assert_eq!(out[..6], first[&f.sport], "last ACK of {} moved", f.sport);
    }
    // A SYN now opens a new connection on the same ports: the table decides.
    for f in &to_live {
        let (_, out) = world.run(&f.frame(TCP_SYN, b""));
        assert_eq!(
            out[..6],
            world.table_backend(f).0,
            "reused port {}",
            f.sport
        );
        assert_ne!(out[..6], down_mac);
    }
    // A SYN whose entry agrees with the table is written again as a new flow.
    let unmoved = flows
        .iter()
        .find(|f| world.table_backend(f).0 == first[&f.sport])
        .unwrap();
    let before = world.dataplane.global_stats().unwrap();
    world.run(&unmoved.frame(TCP_SYN, b""));
    let after = world.dataplane.global_stats().unwrap();
    assert_eq!(after.conn_miss_syn, before.conn_miss_syn + 1);

    // Drained by the operator, a backend keeps its connections, those still in
    // their handshake included: a retry to it is kept.
    let mut world = World::new();
    let (flows, first) = open_flows(&mut world, 22000);
    let desired = plan(&world, BACKEND_F_DRAINED);
    world.dataplane.apply_and_wait(&desired).unwrap();
    world.desired = desired;
    let drained: Vec<&Flow> = flows
        .iter()
        .filter(|f| first[&f.sport] == down_mac)
        .collect();
    assert!(!drained.is_empty());
    for f in drained {
        let (_, out) = world.run(&f.frame(TCP_SYN, b""));
        assert_eq!(
            out[..6],
            down_mac,
            "retry of {} left the drained backend",
            f.sport
        );
    }
}

/// The two shortcuts in front of the `VIPS` hash map are only shortcuts: a packet
/// whose destination shares a `VIP_FILTER` slot with a VIP is still judged by the
/// hash map, and an established flow whose VIP was removed, or whose VIP id went to
/// another VIP, is never forwarded by its stale connection entry.
#[test]
fn vip_shortcuts_never_decide_alone() {
    let mut world = World::new();
    let web = Flow::tcp("198.18.0.1", "198.18.1.1", 45000, 80);
    let web_key = web.keys().0;
    let slot = |addr: &[u8; 16], port: u16| vip_filter_slot(&addr_words(addr), port.to_be(), 6);
    // A destination that is no VIP but lands on the web VIP's filter slot.
    let twin = (0..=u16::MAX)
        .map(|i| Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8))
        .find(|a| slot(&addr_bytes(IpAddr::V4(*a)).0, 80) == slot(&web_key.addr, 80))
        .expect("some address shares the slot");
    let before = world.dataplane.global_stats().unwrap();
    let frame = Flow::tcp("198.18.0.1", &twin.to_string(), 45000, 80).frame(TCP_SYN, b"");
    assert_eq!(world.run(&frame), (XDP_PASS, frame.clone()), "to {twin}");
    let after = world.dataplane.global_stats().unwrap();
    assert_eq!(after.pass_not_vip, before.pass_not_vip + 1);
    assert_eq!(after.conn_miss_syn, before.conn_miss_syn);

    let ack = web.frame(TCP_ACK, b"");
    assert_eq!(world.run(&web.frame(TCP_SYN, b"")).0, XDP_TX);
    assert_eq!(world.run(&ack).0, XDP_TX);
    let web_id = world.desired.vips[&web_key].meta.vip_id;

    // The web VIP goes: its established flow is no longer balanced.
    let start = CONFIG
        .find("[[vip]]\naddress = \"198.18.1.1\"\nport = 80\n")
        .unwrap();
    let end = start + 1 + CONFIG[start + 1..].find("[[vip]]").unwrap();
    let without = format!("{}{}", &CONFIG[..start], &CONFIG[end..]);
    let apply = |world: &mut World, text: &str| {
        let config = Config::parse(text).unwrap();
        let desired = Desired::plan(
            &config,
            Some(&world.desired),
            &|_, b, _| (b.weight, 0),
            &Tables::new(),
        )
        .unwrap();
        world.dataplane.apply_and_wait(&desired).unwrap();
        world.desired = desired;
    };
    apply(&mut world, &without);
    assert_eq!(world.run(&ack), (XDP_PASS, ack.clone()), "removed VIP");

    // Another VIP takes the freed id: the stale entry names it, but the packet is
    // not addressed to it.
    let other = CONFIG[start..end].replace("198.18.1.1", "198.18.1.9");
    apply(&mut world, &format!("{without}{other}"));
    let other_flow = Flow::tcp("198.18.0.1", "198.18.1.9", 45000, 80);
    assert_eq!(
        world.desired.vips[&other_flow.keys().0].meta.vip_id,
        web_id,
        "the new VIP should reuse the freed id"
    );
    assert_eq!(
        world.run(&ack),
        (XDP_PASS, ack.clone()),
        "id taken by another VIP"
    );

    // The web VIP comes back under a new id: its old flow is a stranger to it.
    apply(
        &mut world,
        &format!("{without}{other}{}", &CONFIG[start..end]),
    );
    assert_ne!(world.desired.vips[&web_key].meta.vip_id, web_id);
    let before = world.dataplane.global_stats().unwrap();
    let (verdict, out) = world.run(&ack);
    assert_eq!(
        (verdict, out),
        (XDP_TX, dsr(&ack, world.table_backend(&web).0))
    );
    let after = world.dataplane.global_stats().unwrap();
    assert_eq!(after.conn_miss_non_syn, before.conn_miss_non_syn + 1);
    assert_eq!(after.conn_hit, before.conn_hit);
    // ... and the entry written for it now carries the new id: the next packet hits.
    assert_eq!(world.run(&ack).0, XDP_TX);
    assert_eq!(
        world.dataplane.global_stats().unwrap().conn_hit,
        after.conn_hit + 1
    );
}

/// A tiny deterministic generator (SplitMix64), so a failure can be replayed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// 100,000 frames: random bytes, valid frames with random bytes changed, and valid
/// frames cut at random lengths. Every verdict is PASS, TX or DROP, never ABORTED,
/// and the connection table gains entries only for flows addressed to a VIP.
#[test]
fn random_frames_never_abort_or_pollute_the_connection_table() {
    let mut world = World::new();
    let seeds: Vec<Vec<u8>> = fixtures(&world)
        .into_iter()
        .map(|f| f.input)
        .filter(|f| f.len() >= 14)
        .collect();
    let vips: Vec<VipKey> = world.desired.vips.keys().copied().collect();
    let mut rng = Rng(0x005e_ed0f_da7a);
    let mut verdicts = [0usize; 5];
    for i in 0..100_000 {
        let frame = match i % 4 {
            0 => {
                let len = 14 + rng.below(200);
                (0..len).map(|_| rng.next() as u8).collect::<Vec<u8>>()
            }
            1 | 2 => {
                let mut f = seeds[rng.below(seeds.len())].clone();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(f.len());
                    f[at] = rng.next() as u8;
                }
                f
            }
            _ => {
                let f = &seeds[rng.below(seeds.len())];
                f[..14 + rng.below(f.len() - 13).min(f.len() - 14)].to_vec()
            }
        };
        let (verdict, _) = world.run(&frame);
        assert_ne!(verdict, XDP_ABORTED, "frame {i} aborted: {frame:02x?}");
        assert!(
            matches!(verdict, XDP_DROP | XDP_PASS | XDP_TX),
            "frame {i}: verdict {verdict}"
        );
        verdicts[verdict as usize] += 1;
    }
    let conns = world.dataplane.connections().unwrap();
    assert!(
        !conns.is_empty(),
        "no mutated frame reached a VIP: the test exercises nothing"
    );
    for (key, _) in &conns {
        let vip = VipKey {
            addr: key.dst,
            port_be: key.dst_port_be,
            proto: key.proto,
            family: key.family,
        };
        assert!(
            vips.contains(&vip),
            "connection entry for a non-VIP flow: {key:?}"
        );
    }
    eprintln!(
        "verdicts (aborted, drop, pass, tx): {verdicts:?}; {} connection entries",
        conns.len()
    );
}

/// An agent adopting the pins of a version that had one connection table (`CONNS`)
/// removes that pin: it would otherwise hold the old table's memory until someone
/// deleted it by hand. The old pin is made here by moving a real pinned map there.
#[test]
fn adopting_pins_removes_the_old_connection_table_pin() {
    use lb_userspace::dataplane::remove_pins;
    let old = lb_userspace::agent::pin_dir(&lb_tests::netns::unique_prefix());
    let new = lb_userspace::agent::pin_dir(&lb_tests::netns::unique_prefix());
    let result = std::panic::catch_unwind(|| {
        drop(Dataplane::load_pinned(&old, LevelFilter::Off).expect("pinning a first datapath"));
        std::fs::create_dir_all(&new).unwrap();
        std::fs::rename(old.join("CONNS_V4"), new.join("CONNS")).unwrap();
        assert!(new.join("CONNS").exists());
        let (dataplane, adopted) =
            Dataplane::load_pinned(&new, LevelFilter::Off).expect("loading over it");
        assert!(!adopted, "nothing but the old table was pinned there");
        assert!(
            !new.join("CONNS").exists(),
            "the old table's pin is still there"
        );
        assert!(new.join("CONNS_V4").exists());
        drop(dataplane);
    });
    remove_pins(&old).unwrap();
    remove_pins(&new).unwrap();
    assert!(!old.exists() && !new.exists());
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// A second table switch of a VIP within the grace of its inactive copy is not
/// waited for: `apply` returns at once with the switch (and the removal of a backend
/// the old table still names) deferred, the old table stays whole in force, and an
/// `apply` of the same state once `retry_at` has come finishes it.
#[test]
fn a_table_switch_within_the_copy_grace_is_deferred_not_waited_for() {
    let mut world = World::new();
    let key = *world.desired.vips.keys().next().unwrap();
    let plan = |world: &World, text: &str, weight_13: Option<u32>| {
        Desired::plan(
            &Config::parse(text).unwrap(),
            Some(&world.desired),
            &|_, b, _| match b.address {
                a if a == ip("198.18.0.13") => (weight_13.unwrap_or(b.weight), 0),
                _ => (b.weight, 0),
            },
            &Tables::new(),
        )
        .unwrap()
    };
    // A first switch, completed: its copy's grace starts now.
    let first = plan(&world, CONFIG, Some(5));
    world.dataplane.apply_and_wait(&first).unwrap();
    let switched = std::time::Instant::now();
    world.desired = first.clone();
    // The third backend removed from the configuration: a new table, and a backend
    // entry that the table in force still names.
    let text = CONFIG.replacen(
        "[[vip.backend]]\naddress = \"198.18.0.13\"\nmac = \"02:00:00:00:00:13\"\nweight = 3\n",
        "",
        1,
    );
    let second = plan(&world, &text, None);
    let removed = first
        .backends
        .iter()
        .find(|(id, b)| b.address == ip("198.18.0.13") && !second.backends.contains_key(id))
        .map(|(&id, _)| id)
        .expect("the third backend goes");
    let report = world.dataplane.apply(&second).unwrap();
    let waited = switched.elapsed();
    let Some(deferred) = report.deferred else {
        // Only a machine too slow to call `apply` within the grace gets here.
        assert!(waited >= lb_userspace::dataplane::COPY_GRACE, "{report:?}");
        return;
    };
    assert!(
        deferred <= lb_userspace::dataplane::COPY_GRACE,
        "{deferred:?}"
    );
    assert!(
        waited < lb_userspace::dataplane::COPY_GRACE,
        "apply blocked for {waited:?}"
    );
    let retry_at = world.dataplane.retry_at().expect("a retry is due");
    assert_eq!(
        world.dataplane.active_table(&key).unwrap().as_deref(),
        Some(first.vips[&key].table.as_slice()),
        "the old table is no longer whole in force"
    );
    assert!(
        world.dataplane.current().backends.contains_key(&removed),
        "a backend the table in force names was removed"
    );
    std::thread::sleep(retry_at.saturating_duration_since(std::time::Instant::now()));
    let report = world.dataplane.apply(&second).unwrap();
    assert_eq!(report.deferred, None, "{report:?}");
    assert_eq!(world.dataplane.retry_at(), None);
    assert_eq!(
        world.dataplane.active_table(&key).unwrap().as_deref(),
        Some(second.vips[&key].table.as_slice())
    );
    assert!(!world.dataplane.current().backends.contains_key(&removed));
}

/// The flows the datapath reported for sharing since the last call.
fn reported(maps: &mut lb_userspace::dataplane::SharedFlowMaps) -> Vec<SharedFlow> {
    let mut records = Vec::new();
    while let Some(item) = maps.ring.next() {
        assert_eq!(item.len(), std::mem::size_of::<SharedFlow>());
        records.push(lb_userspace::share::read_record(&item).expect("a whole record"));
    }
    records
}

/// Flow sharing through the kernel: with sharing on, each connection entry the
/// program writes is reported once, when the flow enters the connection table on
/// its second packet (the flood guard: a first packet alone, such as a spoofed SYN,
/// is never shared): a flow begun with a SYN as seen to begin, one first seen
/// without as guessed. Established packets report nothing, and a program loaded without
/// sharing reports nothing. A peer whose own table names another backend for a flow
/// sends that flow where the first LB did once the reported entry is written into
/// its table, as the sharing thread does.
#[test]
fn new_entries_are_reported_for_sharing_and_a_peer_keeps_them() {
    let mut world = World::load_with(
        CONFIG,
        lb_userspace::dataplane::LoadOptions {
            share_flows: true,
            ..Default::default()
        },
    );
    let mut maps = world.dataplane.take_shared_flows().unwrap();
    let ids = FlowIds::of(&world.desired);

    let begun = Flow::tcp("198.18.0.1", "198.18.1.1", 41000, 80);
    let guessed = Flow::tcp("198.18.0.1", "198.18.1.1", 41001, 80);
    assert_eq!(world.run(&begun.frame(TCP_SYN, b"")).0, XDP_TX);
    assert_eq!(world.run(&begun.frame(TCP_ACK, b"x")).0, XDP_TX);
    assert_eq!(world.run(&guessed.frame(TCP_ACK, b"x")).0, XDP_TX);
    let begun_flows: Vec<_> = reported(&mut maps)
        .iter()
        .map(|r| ids.flow(r).expect("ids of the desired state"))
        .collect();
    assert_eq!(
        begun_flows.len(),
        1,
        "one flow shared on its ACK; a flow's first packet alone is not: {begun_flows:?}"
    );
    assert_eq!(
        (
            begun_flows[0].client_port,
            begun_flows[0].guessed,
            begun_flows[0].backend
        ),
        (41000, false, world.table_backend(&begun).1)
    );
    assert_eq!(world.run(&guessed.frame(TCP_ACK, b"y")).0, XDP_TX);
    let flows: Vec<_> = reported(&mut maps)
        .iter()
        .map(|r| ids.flow(r).expect("ids of the desired state"))
        .collect();
    assert_eq!(flows.len(), 1, "{flows:?}");
    assert_eq!(
        (flows[0].client_port, flows[0].guessed, flows[0].backend),
        (41001, true, world.table_backend(&guessed).1)
    );

    // The peer: its first backend weighs more, so some flows map elsewhere there.
    let peer_config = Config::parse(&CONFIG.replacen("weight = 1", "weight = 5", 1)).unwrap();
    let peer_desired = Desired::from_config(&peer_config).unwrap();
    let mut peer = World::new();
    peer.dataplane.apply_and_wait(&peer_desired).unwrap();
    peer.desired = peer_desired;
    let moved = (42000..43000)
        .map(|port| Flow::tcp("198.18.0.1", "198.18.1.1", port, 80))
        .find(|f| world.table_backend(f) != peer.table_backend(f))
        .expect("a flow the two tables send to different backends");
    assert_eq!(world.run(&moved.frame(TCP_SYN, b"")).0, XDP_TX);
    assert_eq!(world.run(&moved.frame(TCP_ACK, b"")).0, XDP_TX);
    let records = reported(&mut maps);
    assert_eq!(records.len(), 1);
    let flow = ids.flow(&records[0]).unwrap();
    let mut peer_maps = peer.dataplane.take_shared_flows().unwrap();
    match FlowIds::of(&peer.desired).entry(&flow).unwrap() {
        Entry::V4(key, entry) => peer_maps.v4.insert(key, entry, 0).unwrap(),
        Entry::V6(..) => unreachable!("an IPv4 flow"),
    }
    let (verdict, out) = peer.run(&moved.frame(TCP_ACK, b"x"));
    assert_eq!(verdict, XDP_TX);
    assert_eq!(
        out[..6],
        world.table_backend(&moved).0,
        "the first LB's backend"
    );
    assert_ne!(out[..6], peer.table_backend(&moved).0);
    // Loaded without sharing, the peer reported none of its own new flows.
    assert_eq!(
        peer.run(&Flow::tcp("198.18.0.1", "198.18.1.1", 41999, 80).frame(TCP_SYN, b""))
            .0,
        XDP_TX
    );
    assert!(reported(&mut peer_maps).is_empty());
}

/// The flows of a table, by key.
fn keys_of(flows: &[(FlowKey, lb_common::types::ConnEntry)]) -> Vec<FlowKey> {
    flows.iter().map(|(k, _)| *k).collect()
}

/// The flood guard (`lb-ebpf/src/conntrack.rs`): a new flow's first packet writes
/// only the young table; its second moves the entry into the connection table, on
/// the backend the first packet got. For TCP that is the handshake's ACK, for UDP
/// the second datagram. Loaded with the guard off, a SYN writes the connection
/// table at once, as before the guard.
#[test]
fn new_flows_enter_the_connection_table_on_their_second_packet() {
    let mut world = World::new();
    let tcp = Flow::tcp("198.18.0.1", "198.18.1.1", 43000, 80);
    let (_, tcp_key) = tcp.keys();
    assert_eq!(world.run(&tcp.frame(TCP_SYN, b"")).0, XDP_TX);
    let young = world.dataplane.young_flows().unwrap();
    assert_eq!(keys_of(&young), vec![tcp_key]);
    assert!(world.dataplane.connections().unwrap().is_empty());
    let (verdict, out) = world.run(&tcp.frame(TCP_ACK, b""));
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out[..6], world.table_backend(&tcp).0);
    let conns = world.dataplane.connections().unwrap();
    assert_eq!(keys_of(&conns), vec![tcp_key]);
    assert_eq!(conns[0].1.backend_id, young[0].1.backend_id);
    assert!(world.dataplane.young_flows().unwrap().is_empty());

    let udp = Flow::udp("198.18.0.1", "198.18.1.1", 43001, 53);
    let (_, udp_key) = udp.keys();
    assert_eq!(world.run(&udp.frame(0, b"q1")).0, XDP_TX);
    assert_eq!(
        keys_of(&world.dataplane.young_flows().unwrap()),
        vec![udp_key]
    );
    assert_eq!(world.run(&udp.frame(0, b"q2")).0, XDP_TX);
    assert!(world.dataplane.young_flows().unwrap().is_empty());
    assert_eq!(world.dataplane.connections().unwrap().len(), 2);
    let g = world.dataplane.guard_stats().unwrap();
    assert_eq!((g.young, g.promoted, g.young_failed), (2, 2, 0));

    let mut unguarded = World::load_with(
        CONFIG,
        lb_userspace::dataplane::LoadOptions {
            flood_guard: false,
            ..Default::default()
        },
    );
    assert_eq!(unguarded.run(&tcp.frame(TCP_SYN, b"")).0, XDP_TX);
    assert_eq!(
        keys_of(&unguarded.dataplane.connections().unwrap()),
        vec![tcp_key]
    );
    assert!(unguarded.dataplane.young_flows().unwrap().is_empty());
    assert_eq!(unguarded.dataplane.guard_stats().unwrap().young, 0);
}

/// A flood of spoofed SYNs (random sources and ports in 198.18.0.0/15, twice as
/// many as the young table holds) leaves every established flow's entry in the
/// connection table and adds none; the flood's entries are in the young table,
/// which it filled. A real handshake after the flood is kept as always, and one
/// begun before the flood, whose young entry the flood likely pushed out, reaches the
/// backend the lookup table gives it and is kept from its next packet.
#[test]
fn a_flood_of_spoofed_syns_never_takes_an_established_flows_entry() {
    let mut world = World::new();
    let established: Vec<Flow> = (0..64)
        .map(|i| Flow::tcp("198.18.0.1", "198.18.1.1", 44000 + i, 80))
        .collect();
    for flow in &established {
        assert_eq!(world.run(&flow.frame(TCP_SYN, b"")).0, XDP_TX);
        assert_eq!(world.run(&flow.frame(TCP_ACK, b"")).0, XDP_TX);
    }
    let before = world.dataplane.connections().unwrap();
    assert_eq!(before.len(), established.len());
    let pending = Flow::tcp("198.18.0.2", "198.18.1.1", 45000, 80);
    assert_eq!(world.run(&pending.frame(TCP_SYN, b"")).0, XDP_TX);

    let flood = 2 * lb_common::maps::YOUNG_TABLE_SIZE_V4;
    for (src, sport) in lb_tests::flood::SpoofedSources::new(0).take(flood as usize) {
        let frame = tcp_frame(
            LB_MAC,
            CLIENT_MAC,
            IpAddr::V4(src),
            ip("198.18.1.1"),
            sport,
            80,
            TCP_SYN,
            b"",
        );
        assert_eq!(world.run(&frame).0, XDP_TX);
    }
    let after = world.dataplane.connections().unwrap();
    assert_eq!(after, before, "the flood changed the connection table");
    // Each CPU's LRU list holds its share of the table (`BPF_F_NO_COMMON_LRU`):
    // the flood, sent from this thread, fills at least one CPU's share, but for the
    // few free nodes the kernel's LRU keeps in hand.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let young = world.dataplane.young_flows().unwrap().len();
    assert!(
        young * cpus * 100 >= lb_common::maps::YOUNG_TABLE_SIZE_V4 as usize * 99,
        "the flood should fill this CPU's share of the young table: {young} entries"
    );
    let g = world.dataplane.guard_stats().unwrap();
    assert_eq!(g.promoted, established.len() as u64);
    assert!(g.young >= u64::from(flood), "{g:?}");

    // The handshake the flood overtook completes where the table sends it.
    let (verdict, out) = world.run(&pending.frame(TCP_ACK, b""));
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out[..6], world.table_backend(&pending).0);
    assert_eq!(world.run(&pending.frame(TCP_ACK, b"x")).0, XDP_TX);
    let fresh = Flow::tcp("198.18.0.3", "198.18.1.1", 45001, 80);
    assert_eq!(world.run(&fresh.frame(TCP_SYN, b"")).0, XDP_TX);
    assert_eq!(world.run(&fresh.frame(TCP_ACK, b"")).0, XDP_TX);
    let kept = keys_of(&world.dataplane.connections().unwrap());
    assert_eq!(kept.len(), established.len() + 2);
    assert!(kept.contains(&pending.keys().1) && kept.contains(&fresh.keys().1));
}

/// A pinned datapath reports each map's geometry and the memory the kernel charges
/// for it (what `lb status` and `/metrics` show): every pinned map, the two largest
/// at least their arrays' size, and an unpinned datapath reports none.
#[test]
fn a_pinned_datapath_reports_each_maps_memory() {
    use lb_common::maps::{
        CONN_TABLE_SIZE_V4, DEFAULT_MAX_VIPS, NAT_TABLE_UNUSED, names, rings_entries,
    };
    // The default configuration: one VIP, every `[datapath]` size at its default,
    // as the agent creates the datapath for it.
    let config = Config::parse(
        "[[vip]]\naddress = \"198.18.1.1\"\nport = 80\nprotocol = \"tcp\"\n\
         [[vip.backend]]\naddress = \"198.18.0.11\"\nmac = \"02:00:00:00:00:11\"\nweight = 1\n",
    )
    .unwrap();
    let options = lb_userspace::dataplane::LoadOptions {
        sizes: config.datapath_sizes(),
        ..Default::default()
    };
    in_pin_dir(|dir| {
        let (dataplane, _) = Dataplane::load_pinned_with(dir, options).unwrap();
        let maps = dataplane.map_memory();
        let listed: Vec<&str> = maps.iter().map(|m| m.name).collect();
        assert_eq!(listed, names::ALL.to_vec());
        let get = |name: &str| maps.iter().find(|m| m.name == name).unwrap().clone();
        let rings = get(names::RINGS);
        assert_eq!(rings.max_entries, rings_entries(DEFAULT_MAX_VIPS));
        assert_eq!(rings.value_size, 8, "four 16-bit slots per element");
        assert!(rings.bytes >= u64::from(rings.max_entries) * 8, "{rings:?}");
        let conns = get(names::CONNS_V4);
        assert_eq!(conns.max_entries, CONN_TABLE_SIZE_V4);
        assert_eq!((conns.key_size, conns.value_size), (16, 8));
        assert!(
            conns.bytes >= u64::from(conns.max_entries) * 24,
            "{conns:?}"
        );
        let total: u64 = maps.iter().map(|m| m.bytes).sum();
        eprintln!(
            "maps: {} MiB in all; {:?}",
            total >> 20,
            maps.iter()
                .map(|m| (m.name, m.bytes >> 10))
                .collect::<Vec<_>>()
        );
        assert!(maps.iter().all(|m| m.bytes > 0), "{maps:?}");
        // The sized maps at their defaults: a tenth of the 188 MiB they took before
        // they were sized (docs/BENCHMARKS.md, issue 23), whatever the CPU count.
        let sized: u64 = [
            names::CONNS_V4,
            names::CONNS_V6,
            names::YOUNG_V4,
            names::YOUNG_V6,
            names::RINGS,
            names::NAT_V4,
            names::NAT_V6,
        ]
        .iter()
        .map(|n| get(n).bytes)
        .sum();
        assert!(sized * 10 < 188 << 20, "{sized} bytes");
        // Without a NAT VIP the NAT tables are all but empty.
        assert_eq!(get(names::NAT_V4).max_entries, NAT_TABLE_UNUSED);
        assert!(
            get(names::NAT_V4).bytes < 1 << 20,
            "{:?}",
            get(names::NAT_V4)
        );
        drop(dataplane);
        assert!(World::new().dataplane.map_memory().is_empty());
    });
}

/// `[datapath]` sizes the connection tables when they are created; a datapath that
/// adopts pinned tables keeps them at the size they have, with their flows.
#[test]
fn connection_tables_are_sized_at_creation_and_kept_when_adopted() {
    use lb_common::maps::{names, rings_entries};
    use lb_userspace::{config::DatapathSizes, dataplane::LoadOptions};
    let entries = |dp: &Dataplane, name: &str| {
        let m = dp.map_memory().iter().find(|m| m.name == name).unwrap();
        (m.max_entries, m.bytes)
    };
    in_pin_dir(|dir| {
        let small = LoadOptions {
            sizes: DatapathSizes {
                connection_table_v4: 65_536,
                connection_table_v6: 8_192,
                nat_table_v4: 16_384,
                nat_table_v6: 4_096,
                max_vips: 3,
            },
            ..LoadOptions::default()
        };
        let (first, adopted) = Dataplane::load_pinned_with(dir, small).unwrap();
        assert!(!adopted);
        let (v4, v4_bytes) = entries(&first, names::CONNS_V4);
        assert_eq!(v4, 65_536);
        assert_eq!(entries(&first, names::CONNS_V6).0, 8_192);
        assert_eq!(entries(&first, names::RINGS).0, rings_entries(3));
        assert_eq!(entries(&first, names::NAT_V4).0, 16_384);
        assert_eq!(entries(&first, names::NAT_V6).0, 4_096);
        // The NAT tables' cost per entry, as docs/CONFIG.md gives it ("Table sizes").
        let per_entry = |name: &str| {
            let (n, bytes) = entries(&first, name);
            bytes / u64::from(n)
        };
        eprintln!(
            "NAT tables: {} bytes per IPv4 entry, {} per IPv6 entry",
            per_entry(names::NAT_V4),
            per_entry(names::NAT_V6)
        );
        assert!(v4_bytes < 10 << 20, "{v4_bytes} bytes for 65,536 entries");
        drop(first);
        let (second, adopted) = Dataplane::load_pinned_with(dir, LoadOptions::default()).unwrap();
        assert!(adopted);
        assert_eq!(entries(&second, names::CONNS_V4).0, 65_536, "kept as found");
        assert_eq!(entries(&second, names::RINGS).0, rings_entries(3));
        assert_eq!(entries(&second, names::NAT_V4).0, 16_384);
    });
}

/// The lookup tables have room for `[datapath] max_vips` VIPs: a desired state with
/// a VIP id beyond it is refused before anything is written, and the maps keep
/// what they held.
#[test]
fn a_vip_beyond_the_lookup_tables_room_is_refused_whole() {
    use lb_userspace::{
        config::DatapathSizes,
        dataplane::{DataplaneError, LoadOptions},
    };
    let config = Config::parse(CONFIG).unwrap();
    let desired = Desired::from_config(&config).unwrap();
    let top = desired.vips.values().map(|v| v.meta.vip_id).max().unwrap();
    assert!(top >= 1, "the fixture has two VIPs or more");
    let mut dp = Dataplane::load_options(LoadOptions {
        sizes: DatapathSizes {
            max_vips: top,
            ..DatapathSizes::default()
        },
        ..LoadOptions::default()
    })
    .unwrap();
    let err = dp.apply(&desired).unwrap_err();
    assert!(
        matches!(err, DataplaneError::VipRoom { vip_id, room } if vip_id == top && room == top),
        "{err}"
    );
    assert!(err.to_string().contains("max_vips"), "{err}");
    assert!(dp.current().vips.is_empty() && dp.current().backends.is_empty());
}

/// A datapath pinned by an lb before the packed lookup tables (one 32-bit slot per
/// element, room for 64 VIPs) is adopted: its `RINGS` is replaced by the packed
/// one with every VIP's active table carried over, and the rest (the connection
/// tables with their flows) is kept.
#[test]
fn a_pinned_unpacked_lookup_table_is_replaced_with_its_tables() {
    use aya::maps::{Array, MapData};
    use lb_common::maps::{MAX_RING_SIZE, MAX_VIPS, RING_COPIES, names, ring_base};
    in_pin_dir(|dir| {
        let config = Config::parse(CONFIG).unwrap();
        let desired = Desired::from_config(&config).unwrap();
        let options = lb_userspace::dataplane::LoadOptions {
            sizes: config.datapath_sizes(),
            ..Default::default()
        };
        let (mut dp, _) = Dataplane::load_pinned_with(dir, options).unwrap();
        dp.apply_and_wait(&desired).unwrap();
        let flow = Flow::tcp("198.18.0.1", "198.18.1.1", 40001, 80);
        for flags in [TCP_SYN, TCP_ACK] {
            let mut out = vec![0u8; 256];
            let r = dp
                .program()
                .unwrap()
                .test_run(TestRunOptions {
                    data_in: Some(&flow.frame(flags, b"")),
                    data_out: Some(&mut out),
                    ..TestRunOptions::default()
                })
                .unwrap();
            assert_eq!(r.return_value, XDP_TX);
        }
        let tables: Vec<(VipKey, Vec<u32>)> = desired
            .vips
            .keys()
            .map(|k| (*k, dp.active_table(k).unwrap().unwrap()))
            .collect();
        let metas: Vec<_> = desired
            .vips
            .keys()
            .map(|k| dp.current().vips[k].meta)
            .collect();
        let flows = dp.connections().unwrap();
        assert_eq!(flows.len(), 1);
        drop(dp);

        // What an earlier lb left: the same tables in 32-bit slots.
        std::fs::remove_file(dir.join(names::RINGS)).unwrap();
        let mut old: Array<MapData, u32> = Array::create(
            MAX_VIPS * RING_COPIES * MAX_RING_SIZE,
            aya_obj::generated::BPF_F_MMAPABLE,
        )
        .unwrap();
        for (meta, (_, table)) in metas.iter().zip(&tables) {
            let base = ring_base(meta.vip_id, meta.active);
            for (slot, &id) in (base..).zip(table) {
                old.set(slot, id, 0).unwrap();
            }
        }
        old.pin(dir.join(names::RINGS)).unwrap();

        let (dp, adopted) = Dataplane::load_pinned_with(dir, options).unwrap();
        assert!(adopted);
        let rings = dp
            .map_memory()
            .iter()
            .find(|m| m.name == names::RINGS)
            .unwrap()
            .clone();
        assert_eq!(rings.value_size, 8, "replaced by the packed layout");
        for (key, table) in &tables {
            assert_eq!(&dp.active_table(key).unwrap().unwrap(), table, "{key:?}");
        }
        assert_eq!(dp.connections().unwrap(), flows, "the flows are kept");
    });
}

/// Runs `test` with a fresh pin directory, and removes the pins whatever happens.
fn in_pin_dir(test: impl FnOnce(&std::path::Path) + std::panic::UnwindSafe) {
    let dir = lb_userspace::agent::pin_dir(&lb_tests::netns::unique_prefix());
    let result = std::panic::catch_unwind(|| test(&dir));
    lb_userspace::dataplane::remove_pins(&dir).unwrap();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
