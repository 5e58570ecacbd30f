//! Full NAT (`forwarding = "nat"`) through the kernel's `BPF_PROG_TEST_RUN`: both
//! directions, both families, TCP and UDP, each output compared byte for byte with a
//! frame built independently (every checksum computed in full by the builder) and
//! its checksums checked again from the bytes alone; then ports running out, claims
//! evicted and taken, replies no flow holds, and flows across weight changes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{
    hash::flow_hash,
    types::{FAMILY_V4, FlowKey},
};
use lb_tests::{fixture::World, packet::*};
use lb_userspace::desired::{Desired, Tables, addr_bytes};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// The router in front of the clients: where client frames come from.
const CLIENT_SIDE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// The next hop towards the backends (the configured backend MAC).
const BACKEND_SIDE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

/// NAT VIPs of both families and protocols, one backend each, and one of two
/// backends with source hashing (its flows still spread over ports by 5-tuple).
const CONFIG: &str = r#"
[nat]
source_v4 = "198.18.200.0/30"
source_v6 = "fd00:200::/126"

[[vip]]
address = "198.18.1.10"
port = 80
protocol = "tcp"
forwarding = "nat"
table_size = 251
[[vip.backend]]
address = "198.18.3.11"
mac = "02:00:00:00:00:fe"
weight = 1

[[vip]]
address = "198.18.1.10"
port = 53
protocol = "udp"
forwarding = "nat"
table_size = 251
[[vip.backend]]
address = "198.18.3.12"
mac = "02:00:00:00:00:fe"
weight = 1

[[vip]]
address = "fd00:18:1::10"
port = 80
protocol = "tcp"
forwarding = "nat"
table_size = 251
[[vip.backend]]
address = "fd00:18:3::11"
mac = "02:00:00:00:00:fe"
weight = 1

[[vip]]
address = "fd00:18:1::10"
port = 53
protocol = "udp"
forwarding = "nat"
table_size = 251
[[vip.backend]]
address = "fd00:18:3::12"
mac = "02:00:00:00:00:fe"
weight = 1

[[vip]]
address = "198.18.1.11"
port = 80
protocol = "tcp"
forwarding = "nat"
hash = "source"
table_size = 251
[[vip.backend]]
address = "198.18.3.21"
mac = "02:00:00:00:00:fe"
weight = 1
[[vip.backend]]
address = "198.18.3.22"
mac = "02:00:00:00:00:fe"
weight = 1
"#;

/// One IPv4 source address and four ports: what runs out after four flows.
const SCARCE: &str = r#"
[nat]
source_v4 = "198.18.200.0/32"
port_min = 3000
port_max = 3003

[[vip]]
address = "198.18.1.10"
port = 80
protocol = "tcp"
forwarding = "nat"
table_size = 251
[[vip.backend]]
address = "198.18.3.11"
mac = "02:00:00:00:00:fe"
weight = 1
"#;

/// What these tests ask of the fixture world (`lb_tests::fixture::World`).
trait NatFixtures {
    fn new(text: &str) -> Self;
    fn expect_tx(&mut self, what: &str, input: &[u8], expected: &[u8]);
    fn first_probe(&self, flow: &Flow) -> (IpAddr, u16);
}

impl NatFixtures for World {
    fn new(text: &str) -> World {
        World::load(text, log::LevelFilter::Off)
    }

    /// Runs `input`, expecting `XDP_TX` and exactly `expected`, with every checksum
    /// of the output right.
    fn expect_tx(&mut self, what: &str, input: &[u8], expected: &[u8]) {
        let (verdict, out) = self.run(input);
        assert_eq!(verdict, XDP_TX, "{what}: verdict");
        assert_eq!(
            out, expected,
            "{what}: output differs\n  got      {out:02x?}\n  expected {expected:02x?}"
        );
        verify_checksums(&out).unwrap_or_else(|e| panic!("{what}: bad {e} in the output"));
    }

    /// The (source address, port) a flow's first probe gets: from the flow's hash
    /// and `[nat]`, as `lb_common::types::NatSettings::candidate` defines it.
    fn first_probe(&self, flow: &Flow) -> (IpAddr, u16) {
        let settings = self.desired.nat;
        let key = flow.key();
        let (count, first) = match flow.client {
            IpAddr::V4(_) => (
                settings.count_v4,
                self.config.nat.source_v4.unwrap().0.into(),
            ),
            IpAddr::V6(_) => (
                settings.count_v6,
                self.config.nat.source_v6.unwrap().0.into(),
            ),
        };
        let binding = settings.candidate(count, flow_hash(&key), 0);
        (nth(first, binding.source), binding.port)
    }
}

/// Address `n` after `first`.
fn nth(first: IpAddr, n: u32) -> IpAddr {
    match first {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) + n)),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) + u128::from(n))),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A client's flow to a NAT VIP.
#[derive(Clone, Copy)]
struct Flow {
    client: IpAddr,
    vip: IpAddr,
    client_port: u16,
    vip_port: u16,
    tcp: bool,
}

impl Flow {
    fn tcp(client: &str, vip: &str, client_port: u16, vip_port: u16) -> Flow {
        Flow {
            client: ip(client),
            vip: ip(vip),
            client_port,
            vip_port,
            tcp: true,
        }
    }

    fn udp(client: &str, vip: &str, client_port: u16, vip_port: u16) -> Flow {
        Flow {
            tcp: false,
            ..Flow::tcp(client, vip, client_port, vip_port)
        }
    }

    fn key(&self) -> FlowKey {
        let (src, family) = addr_bytes(self.client);
        FlowKey {
            src,
            dst: addr_bytes(self.vip).0,
            src_port_be: self.client_port.to_be(),
            dst_port_be: self.vip_port.to_be(),
            proto: if self.tcp { 6 } else { 17 },
            family,
            _pad: [0; 2],
        }
    }

    /// A frame between two endpoints of this flow's protocol.
    #[allow(clippy::too_many_arguments)]
    fn frame(
        &self,
        macs: ([u8; 6], [u8; 6]),
        src: IpAddr,
        dst: IpAddr,
        sport: u16,
        dport: u16,
        flags: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        if self.tcp {
            tcp_frame(macs.0, macs.1, src, dst, sport, dport, flags, payload)
        } else {
            udp_frame(macs.0, macs.1, src, dst, sport, dport, payload)
        }
    }

    /// The client's packet as it reaches the LB.
    fn client_sends(&self, flags: u8, payload: &[u8]) -> Vec<u8> {
        self.frame(
            (LB_MAC, CLIENT_SIDE_MAC),
            self.client,
            self.vip,
            self.client_port,
            self.vip_port,
            flags,
            payload,
        )
    }

    /// The same packet as it must leave for `backend` with source `(nat, port)`.
    fn out_to_backend(
        &self,
        backend: IpAddr,
        (nat, port): (IpAddr, u16),
        flags: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        self.frame(
            (BACKEND_SIDE_MAC, LB_MAC),
            nat,
            backend,
            port,
            self.vip_port,
            flags,
            payload,
        )
    }

    /// The backend's reply as it reaches the LB.
    fn backend_sends(
        &self,
        backend: IpAddr,
        (nat, port): (IpAddr, u16),
        flags: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        self.frame(
            (LB_MAC, BACKEND_SIDE_MAC),
            backend,
            nat,
            self.vip_port,
            port,
            flags,
            payload,
        )
    }

    /// The reply as it must leave for the client: from the VIP.
    fn out_to_client(&self, flags: u8, payload: &[u8]) -> Vec<u8> {
        self.frame(
            (CLIENT_SIDE_MAC, LB_MAC),
            self.vip,
            self.client,
            self.vip_port,
            self.client_port,
            flags,
            payload,
        )
    }
}

/// A whole exchange, both ways, for each family and protocol: every output exactly
/// the frame the builder makes for the rewritten addresses and ports.
#[test]
fn both_directions_are_rewritten_exactly_with_checksums_verified() {
    let mut world = World::new(CONFIG);
    let cases = [
        (
            Flow::tcp("198.18.0.1", "198.18.1.10", 40001, 80),
            "198.18.3.11",
        ),
        (
            Flow::udp("198.18.0.1", "198.18.1.10", 40002, 53),
            "198.18.3.12",
        ),
        (
            Flow::tcp("fd00:18::1", "fd00:18:1::10", 40003, 80),
            "fd00:18:3::11",
        ),
        (
            Flow::udp("fd00:18::1", "fd00:18:1::10", 40004, 53),
            "fd00:18:3::12",
        ),
    ];
    for (flow, backend) in cases {
        let backend = ip(backend);
        let bound = world.first_probe(&flow);
        let name = format!(
            "{} {} {}",
            flow.client,
            if flow.tcp { "tcp" } else { "udp" },
            flow.client_port
        );
        let (first, reply) = if flow.tcp {
            (TCP_SYN, TCP_SYN | TCP_ACK)
        } else {
            (0, 0)
        };
        world.expect_tx(
            &format!("{name}: first packet to the backend"),
            &flow.client_sends(first, b""),
            &flow.out_to_backend(backend, bound, first, b""),
        );
        world.expect_tx(
            &format!("{name}: the backend's answer to the client"),
            &flow.backend_sends(backend, bound, reply, b""),
            &flow.out_to_client(reply, b""),
        );
        let request = b"GET / HTTP/1.1\r\nHost: nat\r\n\r\n";
        world.expect_tx(
            &format!("{name}: data to the backend"),
            &flow.client_sends(TCP_ACK | TCP_PSH, request),
            &flow.out_to_backend(backend, bound, TCP_ACK | TCP_PSH, request),
        );
        let answer = vec![0x5a; 1200];
        world.expect_tx(
            &format!("{name}: data to the client"),
            &flow.backend_sends(backend, bound, TCP_ACK | TCP_PSH, &answer),
            &flow.out_to_client(TCP_ACK | TCP_PSH, &answer),
        );
        if flow.tcp {
            world.expect_tx(
                &format!("{name}: the client's FIN"),
                &flow.client_sends(TCP_FIN | TCP_ACK, b""),
                &flow.out_to_backend(backend, bound, TCP_FIN | TCP_ACK, b""),
            );
            world.expect_tx(
                &format!("{name}: the backend's FIN"),
                &flow.backend_sends(backend, bound, TCP_FIN | TCP_ACK, b""),
                &flow.out_to_client(TCP_FIN | TCP_ACK, b""),
            );
        }
    }
    let stats = world.dataplane.nat_stats().unwrap();
    assert_eq!(stats.claimed, 4, "{stats:?}");
    assert_eq!(stats.to_backend, 2 * 4 + 2, "{stats:?}");
    assert_eq!(stats.to_client, 2 * 4 + 2, "{stats:?}");
    assert_eq!(stats.lost + stats.ports_exhausted + stats.reply_unknown, 0);
    // Each flow's entry names it, keyed by its reply's tuple.
    let flows = world.dataplane.nat_flows().unwrap();
    assert_eq!(flows.len(), 4);
    for (flow, _) in cases {
        let key = flow.key();
        let (nat, port) = world.first_probe(&flow);
        let (reply, entry) = flows
            .iter()
            .find(|(_, e)| e.client_port_be == key.src_port_be)
            .unwrap();
        assert_eq!(IpAddr::from(reply.dst).to_canonical(), to16(nat));
        assert_eq!(u16::from_be(reply.dst_port_be), port);
        assert_eq!(entry.vip_port_be, key.dst_port_be);
    }
}

/// An address as `IpAddr::from([u8; 16])` gives it back, for comparing.
fn to16(addr: IpAddr) -> IpAddr {
    IpAddr::from(addr_bytes(addr).0).to_canonical()
}

/// An IPv4 header with options moves the transport header; an IPv4 UDP datagram
/// without a checksum keeps none, both ways.
#[test]
fn ipv4_options_and_udp_without_a_checksum_are_rewritten_too() {
    let mut world = World::new(CONFIG);
    let backend = ip("198.18.3.11");
    let flow = Flow::tcp("198.18.0.2", "198.18.1.10", 40100, 80);
    let bound = world.first_probe(&flow);
    let opts = Ipv4Opts {
        options: vec![1, 1, 1, 0], // NOP, NOP, NOP, end of options
        ..Ipv4Opts::default()
    };
    let v4 = |a: IpAddr| match a {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => unreachable!(),
    };
    let with_options = |macs: ([u8; 6], [u8; 6]), s: IpAddr, d: IpAddr, sp: u16, dp: u16| {
        let seg = tcp(s, d, sp, dp, TCP_SYN, b"");
        ethernet(
            macs.0,
            macs.1,
            ETH_P_IP,
            &ipv4(v4(s), v4(d), 6, &opts, &seg),
        )
    };
    world.expect_tx(
        "a SYN with IPv4 options",
        &with_options((LB_MAC, CLIENT_SIDE_MAC), flow.client, flow.vip, 40100, 80),
        &with_options((BACKEND_SIDE_MAC, LB_MAC), bound.0, backend, bound.1, 80),
    );

    let dns = Flow::udp("198.18.0.2", "198.18.1.10", 40101, 53);
    let backend = ip("198.18.3.12");
    let bound = world.first_probe(&dns);
    let zero_sum = |mut frame: Vec<u8>| {
        frame[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
        frame
    };
    for (what, input, expected) in [
        (
            "to the backend",
            zero_sum(dns.client_sends(0, b"query")),
            zero_sum(dns.out_to_backend(backend, bound, 0, b"query")),
        ),
        (
            "to the client",
            zero_sum(dns.backend_sends(backend, bound, 0, b"answer")),
            zero_sum(dns.out_to_client(0, b"answer")),
        ),
    ] {
        let (verdict, out) = world.run(&input);
        assert_eq!(verdict, XDP_TX, "{what}");
        assert_eq!(out, expected, "UDP without a checksum {what}");
    }
}

/// A packet to a NAT address that no flow holds is dropped and counted; one to
/// an address just outside the NAT prefix is the host's.
#[test]
fn a_packet_to_a_nat_address_that_no_flow_holds_is_dropped() {
    let mut world = World::new(CONFIG);
    let flow = Flow::tcp("198.18.0.3", "198.18.1.10", 40200, 80);
    let stray = flow.backend_sends(ip("198.18.3.11"), (ip("198.18.200.1"), 5555), TCP_ACK, b"");
    assert_eq!(world.run(&stray).0, XDP_DROP);
    let outside = flow.backend_sends(ip("198.18.3.11"), (ip("198.18.200.4"), 5555), TCP_ACK, b"");
    assert_eq!(world.run(&outside).0, XDP_PASS);
    let stats = world.dataplane.nat_stats().unwrap();
    assert_eq!(stats.reply_unknown, 1, "{stats:?}");
    assert_eq!(world.dataplane.global_stats().unwrap().pass_not_vip, 1);
}

/// Four ports: four flows get one each, never the same; the next ones are refused
/// and counted; a retransmitted SYN keeps its flow's port; a port freed by an
/// evicted claim goes to a new flow, and the flow that lost it is dropped, never
/// sent out on the other flow's port; an evicted claim whose port is still free is
/// made again.
#[test]
fn ports_run_out_cleanly_and_are_never_shared() {
    let mut world = World::new(SCARCE);
    let backend = ip("198.18.3.11");
    let flows: Vec<Flow> = (0..6)
        .map(|i| Flow::tcp("198.18.0.4", "198.18.1.10", 41000 + i, 80))
        .collect();
    let mut ports = Vec::new();
    let mut refused = Vec::new();
    for f in &flows {
        let (verdict, out) = world.run(&f.client_sends(TCP_SYN, b""));
        match verdict {
            XDP_TX => {
                verify_checksums(&out).unwrap();
                ports.push(u16::from_be_bytes([out[34], out[35]]));
            }
            XDP_DROP => refused.push(f.client_port),
            other => panic!("verdict {other}"),
        }
    }
    let stats = world.dataplane.nat_stats().unwrap();
    assert_eq!((ports.len(), refused.len()), (4, 2), "{stats:?}");
    assert_eq!(stats.ports_exhausted, 2, "{stats:?}");
    assert_eq!(stats.claimed, 4, "{stats:?}");
    let mut distinct = ports.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct, vec![3000, 3001, 3002, 3003], "ports {ports:?}");
    // The refused flows left no entry behind.
    assert_eq!(world.dataplane.connections().unwrap().len(), 0);
    assert_eq!(world.dataplane.young_flows().unwrap().len(), 4);

    // A retransmitted SYN keeps its port.
    let a = flows[0];
    let (verdict, out) = world.run(&a.client_sends(TCP_SYN, b""));
    assert_eq!(verdict, XDP_TX);
    assert_eq!(u16::from_be_bytes([out[34], out[35]]), ports[0]);
    // The handshake completes (the flow enters the connection table).
    let nat = ip("198.18.200.0");
    let bound_a = (nat, ports[0]);
    world.expect_tx(
        "flow A's handshake ACK",
        &a.client_sends(TCP_ACK, b""),
        &a.out_to_backend(backend, bound_a, TCP_ACK, b""),
    );

    // A's claim is evicted while its port is free: its next packet makes it again.
    let reply_of = |port: u16| FlowKey {
        src: addr_bytes(backend).0,
        dst: addr_bytes(nat).0,
        src_port_be: 80u16.to_be(),
        dst_port_be: port.to_be(),
        proto: 6,
        family: FAMILY_V4,
        _pad: [0; 2],
    };
    world
        .dataplane
        .forget_nat_flow(&reply_of(ports[0]))
        .unwrap();
    world.expect_tx(
        "flow A after its claim was evicted",
        &a.client_sends(TCP_ACK | TCP_PSH, b"still here"),
        &a.out_to_backend(backend, bound_a, TCP_ACK | TCP_PSH, b"still here"),
    );
    assert_eq!(world.dataplane.nat_stats().unwrap().reclaimed, 1);

    // Evicted again, and a new flow takes the only free port: A is dropped.
    world
        .dataplane
        .forget_nat_flow(&reply_of(ports[0]))
        .unwrap();
    let late = *flows
        .iter()
        .find(|f| refused.contains(&f.client_port))
        .unwrap();
    world.expect_tx(
        "a new flow takes the freed port",
        &late.client_sends(TCP_SYN, b""),
        &late.out_to_backend(backend, bound_a, TCP_SYN, b""),
    );
    let (verdict, _) = world.run(&a.client_sends(TCP_ACK, b"mine?"));
    assert_eq!(
        verdict, XDP_DROP,
        "flow A must not go out on the new flow's port"
    );
    let stats = world.dataplane.nat_stats().unwrap();
    assert_eq!(stats.lost, 1, "{stats:?}");
    // A took a new port instead, and found none: every port is held.
    assert_eq!(stats.ports_exhausted, 3, "{stats:?}");
    // The backend's replies on that port go to the new flow's client.
    world.expect_tx(
        "the port's replies go to its new flow",
        &late.backend_sends(backend, bound_a, TCP_SYN | TCP_ACK, b""),
        &late.out_to_client(TCP_SYN | TCP_ACK, b""),
    );
    // Once a port is free again, A takes it: a new port, never the one it lost.
    let freed = ports[1];
    world.dataplane.forget_nat_flow(&reply_of(freed)).unwrap();
    let (verdict, out) = world.run(&a.client_sends(TCP_ACK, b"new port"));
    assert_eq!(verdict, XDP_TX);
    verify_checksums(&out).unwrap();
    assert_eq!(u16::from_be_bytes([out[34], out[35]]), freed);
    assert_eq!(world.dataplane.nat_stats().unwrap().lost, 2);
}

/// A NAT flow keeps its backend and its port when the table moves under it; a new
/// flow from the same client follows the new table. Source hashing does not put
/// one client's flows on one port.
#[test]
fn a_nat_flow_keeps_backend_and_port_across_weight_changes() {
    let mut world = World::new(CONFIG);
    let flows: Vec<Flow> = (0..32)
        .map(|i| Flow::tcp("198.18.0.5", "198.18.1.11", 42000 + i, 80))
        .collect();
    let mut before = Vec::new();
    for f in &flows {
        let (verdict, out) = world.run(&f.client_sends(TCP_SYN, b""));
        assert_eq!(verdict, XDP_TX);
        let (verdict, out_ack) = world.run(&f.client_sends(TCP_ACK, b""));
        assert_eq!(verdict, XDP_TX);
        // One client, one backend (source hashing), one port per flow.
        assert_eq!(out[30..34], out_ack[30..34]);
        before.push(out_ack);
    }
    let chosen: IpAddr =
        Ipv4Addr::new(before[0][30], before[0][31], before[0][32], before[0][33]).into();
    let mut ports: Vec<u16> = before
        .iter()
        .map(|o| u16::from_be_bytes([o[34], o[35]]))
        .collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), flows.len(), "flows of one client share a port");
    // Drain the chosen backend: the table moves every slot to the other one.
    let desired = Desired::plan(
        &world.config,
        Some(&world.desired),
        &|v, b, _| {
            (
                if v.port == 80 && b.address == chosen {
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
    world.dataplane.apply_and_wait(&desired).unwrap();
    world.desired = desired;
    for (f, old) in flows.iter().zip(&before) {
        let (verdict, out) = world.run(&f.client_sends(TCP_ACK, b""));
        assert_eq!(verdict, XDP_TX);
        assert_eq!(&out, old, "an established NAT flow moved");
    }
    let fresh = Flow::tcp("198.18.0.5", "198.18.1.11", 43000, 80);
    let (_, out) = world.run(&fresh.client_sends(TCP_SYN, b""));
    assert_ne!(
        out[30..34],
        before[0][30..34],
        "a new flow must follow the new table"
    );
}

/// An IP packet of `proto` from `src` to `dst` around `l4`, cut to its header and
/// `keep` bytes of `l4`: what an ICMP error quotes.
fn quote(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8], keep: usize) -> Vec<u8> {
    let (packet, header) = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (ipv4(s, d, proto, &Ipv4Opts::default(), l4), 20),
        (IpAddr::V6(s), IpAddr::V6(d)) => (ipv6(s, d, proto, 64, l4), 40),
        _ => unreachable!(),
    };
    packet[..header + keep].to_vec()
}

/// "Fragmentation needed" (IPv4) or "packet too big" (IPv6) from `from` to `to`,
/// quoting `quoted`, in a frame between `macs`.
fn too_big(macs: ([u8; 6], [u8; 6]), from: IpAddr, to: IpAddr, quoted: &[u8]) -> Vec<u8> {
    match (from, to) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let m = icmp(3, 4, [0, 0, 0x05, 0x78], quoted, None);
            ethernet(
                macs.0,
                macs.1,
                ETH_P_IP,
                &ipv4(s, d, 1, &Ipv4Opts::default(), &m),
            )
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let m = icmp(2, 0, [0, 0, 0x05, 0x00], quoted, Some((s, d)));
            ethernet(macs.0, macs.1, ETH_P_IPV6, &ipv6(s, d, 58, 64, &m))
        }
        _ => unreachable!(),
    }
}

/// ICMP errors about NAT flows, both ways, both families: an error about a packet
/// sent to the backend reaches the client from the VIP, quoting the client's own
/// packet; one about a reply sent to the client reaches the backend from the NAT
/// address, quoting the backend's own packet. Every checksum, the quoted ones
/// included, is the builder's.
#[test]
fn icmp_errors_about_nat_flows_are_translated_both_ways() {
    let mut world = World::new(CONFIG);
    let cases = [
        (
            Flow::tcp("198.18.0.6", "198.18.1.10", 40300, 80),
            "198.18.3.11",
            "198.18.3.1",
            "198.18.0.254",
        ),
        (
            Flow::udp("198.18.0.6", "198.18.1.10", 40301, 53),
            "198.18.3.12",
            "198.18.3.1",
            "198.18.0.254",
        ),
        (
            Flow::tcp("fd00:18::6", "fd00:18:1::10", 40302, 80),
            "fd00:18:3::11",
            "fd00:18:3::1",
            "fd00:18::fe",
        ),
    ];
    for (flow, backend, near_backend, near_client) in cases {
        let (backend, near_backend, near_client) = (ip(backend), ip(near_backend), ip(near_client));
        let name = format!("{} {}", flow.client, if flow.tcp { "tcp" } else { "udp" });
        let bound = world.first_probe(&flow);
        let (verdict, _) = world.run(&flow.client_sends(TCP_SYN, b""));
        assert_eq!(verdict, XDP_TX, "{name}");
        let (proto, keep) = if flow.tcp { (6, 20) } else { (17, 8) };
        let data = vec![0x42; 1400];
        let segment = |src: IpAddr, dst: IpAddr, sport: u16, dport: u16| {
            if flow.tcp {
                tcp(src, dst, sport, dport, TCP_ACK | TCP_PSH, &data)
            } else {
                udp(src, dst, sport, dport, &data)
            }
        };
        // About the packet the LB sent the backend (a router near the backend).
        let sent = segment(bound.0, backend, bound.1, flow.vip_port);
        let input = too_big(
            (LB_MAC, BACKEND_SIDE_MAC),
            near_backend,
            bound.0,
            &quote(bound.0, backend, proto, &sent, keep),
        );
        let original = segment(flow.client, flow.vip, flow.client_port, flow.vip_port);
        let expected = too_big(
            (CLIENT_SIDE_MAC, LB_MAC),
            flow.vip,
            flow.client,
            &quote(flow.client, flow.vip, proto, &original, keep),
        );
        world.expect_tx(
            &format!("{name}: error about a packet to the backend"),
            &input,
            &expected,
        );

        // About the reply the LB sent the client (a router near the client).
        let reply = segment(flow.vip, flow.client, flow.vip_port, flow.client_port);
        let input = too_big(
            (LB_MAC, CLIENT_SIDE_MAC),
            near_client,
            flow.vip,
            &quote(flow.vip, flow.client, proto, &reply, keep),
        );
        let backends_own = segment(backend, bound.0, flow.vip_port, bound.1);
        let expected = too_big(
            (BACKEND_SIDE_MAC, LB_MAC),
            bound.0,
            backend,
            &quote(backend, bound.0, proto, &backends_own, keep),
        );
        world.expect_tx(
            &format!("{name}: error about a reply to the client"),
            &input,
            &expected,
        );
    }
    // An error about a port no flow holds is dropped like any stray packet there.
    let stray = too_big(
        (LB_MAC, BACKEND_SIDE_MAC),
        ip("198.18.3.1"),
        ip("198.18.200.1"),
        &quote(
            ip("198.18.200.1"),
            ip("198.18.3.11"),
            6,
            &tcp(
                ip("198.18.200.1"),
                ip("198.18.3.11"),
                4444,
                80,
                TCP_ACK,
                b"",
            ),
            20,
        ),
    );
    assert_eq!(world.run(&stray).0, XDP_DROP);
    let stats = world.dataplane.nat_stats().unwrap();
    assert_eq!(stats.reply_unknown, 1, "{stats:?}");
}

/// The agent's sweep removes entries idle past their timeout: a closing TCP flow's
/// first, then UDP's, then an open TCP flow's. A flow that comes back after its
/// entry went claims its port again; a reply before that finds no flow.
#[test]
fn idle_nat_entries_expire_by_protocol_and_state() {
    use lb_userspace::dataplane::{NatTimeouts, nat_now};
    let mut world = World::new(CONFIG);
    let backend = ip("198.18.3.11");
    let open = Flow::tcp("198.18.0.7", "198.18.1.10", 40400, 80);
    let closing = Flow::tcp("198.18.0.7", "198.18.1.10", 40401, 80);
    let dns = Flow::udp("198.18.0.7", "198.18.1.10", 40402, 53);
    for f in [&open, &closing] {
        world.run(&f.client_sends(TCP_SYN, b""));
        world.run(&f.client_sends(TCP_ACK, b""));
    }
    world.run(&closing.client_sends(TCP_FIN | TCP_ACK, b""));
    world.run(&dns.client_sends(0, b"query"));
    let timeouts = NatTimeouts {
        tcp: 1000,
        tcp_closing: 10,
        udp: 100,
    };
    let now = nat_now();
    let ports_of = |world: &World| -> Vec<u16> {
        let mut ports: Vec<u16> = world
            .dataplane
            .nat_flows()
            .unwrap()
            .iter()
            .map(|(_, e)| u16::from_be(e.client_port_be))
            .collect();
        ports.sort();
        ports
    };
    let sweep = |world: &mut World, at: u32| world.dataplane.nat_sweep(at, &timeouts).unwrap();
    let u = sweep(&mut world, now);
    assert_eq!((u.expired, u.flows), (0, 3), "{u:?}");
    let u = sweep(&mut world, now + 50);
    assert_eq!((u.expired, u.flows), (1, 2), "{u:?}");
    assert_eq!(
        ports_of(&world),
        vec![40400, 40402],
        "the closing flow goes first"
    );
    let u = sweep(&mut world, now + 500);
    assert_eq!((u.expired, u.flows), (1, 1), "{u:?}");
    assert_eq!(ports_of(&world), vec![40400]);
    assert_eq!(u.by_source.values().sum::<u64>(), 1);
    let u = sweep(&mut world, now + 5000);
    assert_eq!((u.expired, u.flows), (1, 0), "{u:?}");

    // The open flow's reply finds no flow; its client's next packet claims the
    // same port again, and then the reply goes through.
    let bound = world.first_probe(&open);
    let reply = open.backend_sends(backend, bound, TCP_ACK, b"late");
    assert_eq!(world.run(&reply).0, XDP_DROP);
    world.expect_tx(
        "the open flow after its entry expired",
        &open.client_sends(TCP_ACK, b"again"),
        &open.out_to_backend(backend, bound, TCP_ACK, b"again"),
    );
    world.expect_tx(
        "its reply once the port is claimed again",
        &reply,
        &open.out_to_client(TCP_ACK, b"late"),
    );
    assert_eq!(world.dataplane.nat_stats().unwrap().reclaimed, 1);
}
