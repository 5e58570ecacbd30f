//! Parses a frame once into a [`Packet`] that every later stage reads; no other
//! stage parses headers. What is and is not balanced, on purpose:
//! - Ethernet II only; anything but IPv4/IPv6 is passed (`Stop::NotIp`).
//! - IPv4 with options is balanced (the transport header is found from the header
//!   length) and counted; IPv4 fragments are passed, since only the first one carries
//!   ports and the rest could not follow it (`Stop::Fragment`).
//! - IPv6 whose next header is an extension header is passed and counted
//!   (`Stop::Ipv6Extension`); the datapath does not walk extension chains.
//! - ICMP/ICMPv6: an echo request becomes [`Kind::Echo`] (answered if the address is a
//!   VIP's); "fragmentation needed" and "packet too big" become [`Kind::IcmpError`]
//!   with the flow they quote, turned around to the client's direction, so they reach
//!   that flow's backend. Any other ICMP is passed (`Stop::IcmpOther`).
//! - A frame cut short inside any header the decision needs is passed (`Stop::Truncated`).

use aya_ebpf::programs::XdpContext;
use lb_common::types::{
    AddrWords, FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{Stop, events, ptr};

const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
/// More-fragments flag and fragment offset bits of the IPv4 `frags` field.
const IPV4_MF_OR_OFFSET: u16 = 0x3fff;
/// ICMP header: type, code, checksum, and 4 bytes of rest-of-header.
pub const ICMP_HDR_LEN: usize = 8;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_ECHO_REQUEST: u8 = 128;

/// What the packet is, for the stages after parsing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A TCP segment or UDP datagram.
    Flow,
    /// An ICMP or ICMPv6 echo request; `dst` is the address pinged.
    Echo,
    /// "Fragmentation needed" or "packet too big" quoting a packet of a flow (turned
    /// around: the packet's flow fields are the quoted flow, client-to-VIP direction).
    IcmpError,
}

/// One frame, as every later stage sees it. The flow fields are as the client sent
/// them (for an ICMP error: the quoted flow, turned around); addresses are
/// [`AddrWords`], an IPv4 address in word 0 and the rest zero.
pub struct Packet {
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// IP protocol of the flow.
    pub proto: u8,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub src: AddrWords,
    pub dst: AddrWords,
    pub kind: Kind,
    /// Frame length in bytes, for byte counters.
    pub len: u64,
    /// Length of the IP packet (header and payload) from its own header, which
    /// encapsulation needs (the frame may carry Ethernet padding after it).
    pub ip_len: u16,
    /// Offset of the transport (or ICMP) header in the frame.
    pub l4_offset: usize,
    /// A TCP SYN without ACK: the first packet of a connection.
    pub tcp_syn: bool,
    /// A TCP FIN or RST: the client is closing or resetting the connection.
    pub tcp_fin_rst: bool,
    /// The IPv4 header carried options.
    pub ipv4_options: bool,
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Stop> {
    let eth: *const EthHdr = ptr::at(ctx, 0)?;
    // SAFETY: `ptr::at` checked that the Ethernet header is inside the frame.
    let ether_type = unsafe { (*eth).ether_type };
    let mut pkt = Packet {
        family: 0,
        proto: 0,
        src_port_be: 0,
        dst_port_be: 0,
        src: [0; 4],
        dst: [0; 4],
        kind: Kind::Flow,
        len: (ctx.data_end() - ctx.data()) as u64,
        ip_len: 0,
        l4_offset: 0,
        tcp_syn: false,
        tcp_fin_rst: false,
        ipv4_options: false,
    };
    if ether_type == ETH_P_IP_BE {
        ipv4(ctx, &mut pkt)?;
    } else if ether_type == ETH_P_IPV6_BE {
        ipv6(ctx, &mut pkt)?;
    } else {
        return Err(Stop::NotIp);
    }
    match pkt.proto {
        PROTO_TCP => {
            let tcp: *const TcpHdr = ptr::at(ctx, pkt.l4_offset)?;
            // SAFETY: `ptr::at` checked that the whole TCP header is inside the frame.
            unsafe {
                pkt.src_port_be = u16::from_ne_bytes((*tcp).source);
                pkt.dst_port_be = u16::from_ne_bytes((*tcp).dest);
                pkt.tcp_syn = (*tcp).syn() != 0 && (*tcp).ack() == 0;
                pkt.tcp_fin_rst = (*tcp).fin() != 0 || (*tcp).rst() != 0;
            }
        }
        PROTO_UDP => {
            let udp: *const UdpHdr = ptr::at(ctx, pkt.l4_offset)?;
            // SAFETY: `ptr::at` checked that the whole UDP header is inside the frame.
            unsafe {
                pkt.src_port_be = u16::from_ne_bytes((*udp).src);
                pkt.dst_port_be = u16::from_ne_bytes((*udp).dst);
            }
        }
        _ => icmp(ctx, &mut pkt)?,
    }
    Ok(pkt)
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, pkt: &mut Packet) -> Result<(), Stop> {
    let ip: *const Ipv4Hdr = ptr::at(ctx, EthHdr::LEN)?;
    // SAFETY: `ptr::at` checked that the fixed IPv4 header is inside the frame.
    let (vihl, frags, proto, tot_len, src, dst) = unsafe {
        (
            (*ip).vihl,
            (*ip).frags,
            (*ip).proto,
            (*ip).tot_len,
            ptr::word(&(*ip).src_addr),
            ptr::word(&(*ip).dst_addr),
        )
    };
    let header_len = ((vihl & 0x0f) as usize) * 4;
    let ip_len = u16::from_be_bytes(tot_len);
    if vihl >> 4 != 4 || header_len < Ipv4Hdr::LEN || (ip_len as usize) < header_len {
        // SAFETY: `ptr::at` checked the fixed header.
        unsafe { events::malformed_ipv4(ip) };
        return Err(Stop::Malformed);
    }
    if u16::from_be_bytes(frags) & IPV4_MF_OR_OFFSET != 0 {
        return Err(Stop::Fragment);
    }
    if proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_ICMP {
        return Err(Stop::NotVip);
    }
    pkt.family = FAMILY_V4;
    pkt.proto = proto;
    pkt.src[0] = src;
    pkt.dst[0] = dst;
    pkt.ip_len = ip_len;
    pkt.l4_offset = EthHdr::LEN + header_len;
    pkt.ipv4_options = header_len > Ipv4Hdr::LEN;
    Ok(())
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, pkt: &mut Packet) -> Result<(), Stop> {
    let ip: *const Ipv6Hdr = ptr::at(ctx, EthHdr::LEN)?;
    // SAFETY: `ptr::at` checked that the IPv6 header is inside the frame.
    let (vcf, payload_len, next, src, dst) = unsafe {
        (
            (*ip).vcf,
            (*ip).payload_len,
            (*ip).next_hdr,
            ptr::words(&(*ip).src_addr),
            ptr::words(&(*ip).dst_addr),
        )
    };
    if vcf[0] >> 4 != 6 {
        // SAFETY: `ptr::at` checked the header.
        unsafe { events::malformed_ipv6(ip) };
        return Err(Stop::Malformed);
    }
    if next != PROTO_TCP && next != PROTO_UDP && next != PROTO_ICMPV6 {
        return Err(if is_ipv6_extension(next) {
            Stop::Ipv6Extension
        } else {
            Stop::NotVip
        });
    }
    pkt.family = FAMILY_V6;
    pkt.proto = next;
    pkt.src = src;
    pkt.dst = dst;
    pkt.ip_len = u16::from_be_bytes(payload_len).saturating_add(Ipv6Hdr::LEN as u16);
    pkt.l4_offset = EthHdr::LEN + Ipv6Hdr::LEN;
    Ok(())
}

/// Echo requests and the two ICMP errors that matter to a load balancer.
#[inline(always)]
fn icmp(ctx: &XdpContext, pkt: &mut Packet) -> Result<(), Stop> {
    let hdr: *const [u8; ICMP_HDR_LEN] = ptr::at(ctx, pkt.l4_offset)?;
    // SAFETY: `ptr::at` checked that the ICMP header is inside the frame.
    let (icmp_type, code) = unsafe { ((*hdr)[0], (*hdr)[1]) };
    let inner = pkt.l4_offset + ICMP_HDR_LEN;
    if pkt.family == FAMILY_V4 {
        if icmp_type == ICMP_ECHO_REQUEST && code == 0 {
            pkt.kind = Kind::Echo;
            return Ok(());
        }
        if icmp_type == ICMP_DEST_UNREACH && code == ICMP_FRAG_NEEDED {
            return quoted_ipv4(ctx, inner, pkt);
        }
    } else {
        if icmp_type == ICMPV6_ECHO_REQUEST && code == 0 {
            pkt.kind = Kind::Echo;
            return Ok(());
        }
        if icmp_type == ICMPV6_PACKET_TOO_BIG {
            return quoted_ipv6(ctx, inner, pkt);
        }
    }
    Err(Stop::IcmpOther)
}

/// The IPv4 packet quoted by an ICMP error: one the backend sent from the VIP to the
/// client. `pkt.flow` becomes that flow in the client-to-VIP direction.
#[inline(always)]
fn quoted_ipv4(ctx: &XdpContext, offset: usize, pkt: &mut Packet) -> Result<(), Stop> {
    let ip: *const Ipv4Hdr = ptr::at(ctx, offset)?;
    // SAFETY: `ptr::at` checked that the quoted fixed IPv4 header is inside the frame.
    let (vihl, proto, src, dst) = unsafe {
        (
            (*ip).vihl,
            (*ip).proto,
            ptr::word(&(*ip).src_addr),
            ptr::word(&(*ip).dst_addr),
        )
    };
    let header_len = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || header_len < Ipv4Hdr::LEN || (proto != PROTO_TCP && proto != PROTO_UDP) {
        return Err(Stop::IcmpOther);
    }
    let ports: *const [u8; 4] = ptr::at(ctx, offset + header_len)?;
    if offset + header_len + 4 > EthHdr::LEN + pkt.ip_len as usize {
        // The quote's ports lie past the IP packet (in the frame's padding).
        return Err(Stop::IcmpOther);
    }
    // SAFETY: `ptr::at` checked that the quoted ports are inside the frame.
    let [s0, s1, d0, d1] = unsafe { *ports };
    let (sport, dport) = (u16::from_ne_bytes([s0, s1]), u16::from_ne_bytes([d0, d1]));
    pkt.kind = Kind::IcmpError;
    pkt.proto = proto;
    pkt.src = [dst, 0, 0, 0];
    pkt.dst = [src, 0, 0, 0];
    pkt.src_port_be = dport;
    pkt.dst_port_be = sport;
    Ok(())
}

/// The IPv6 packet quoted by "packet too big", turned around as for IPv4.
#[inline(always)]
fn quoted_ipv6(ctx: &XdpContext, offset: usize, pkt: &mut Packet) -> Result<(), Stop> {
    let ip: *const Ipv6Hdr = ptr::at(ctx, offset)?;
    // SAFETY: `ptr::at` checked that the quoted IPv6 header is inside the frame.
    let (next, src, dst) = unsafe {
        (
            (*ip).next_hdr,
            ptr::words(&(*ip).src_addr),
            ptr::words(&(*ip).dst_addr),
        )
    };
    if next != PROTO_TCP && next != PROTO_UDP {
        return Err(Stop::IcmpOther);
    }
    let ports: *const [u8; 4] = ptr::at(ctx, offset + Ipv6Hdr::LEN)?;
    if offset + Ipv6Hdr::LEN + 4 > EthHdr::LEN + pkt.ip_len as usize {
        // The quote's ports lie past the IP packet (in the frame's padding).
        return Err(Stop::IcmpOther);
    }
    // SAFETY: `ptr::at` checked that the quoted ports are inside the frame.
    let [s0, s1, d0, d1] = unsafe { *ports };
    let (sport, dport) = (u16::from_ne_bytes([s0, s1]), u16::from_ne_bytes([d0, d1]));
    pkt.kind = Kind::IcmpError;
    pkt.proto = next;
    pkt.src = dst;
    pkt.dst = src;
    pkt.src_port_be = dport;
    pkt.dst_port_be = sport;
    Ok(())
}

/// IPv6 extension headers (RFC 8200 §4, and AH/ESP), which the datapath does not walk.
#[inline(always)]
fn is_ipv6_extension(next: u8) -> bool {
    matches!(next, 0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140)
}
