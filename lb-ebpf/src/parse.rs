//! Parses a frame once into a [`Packet`] that every later stage reads; no other
//! stage touches the headers. What is and is not balanced, on purpose:
//! - Ethernet II only; anything but IPv4/IPv6 is passed (`Stop::NotIp`).
//! - IPv4 with options is balanced (the transport header is found from the header
//!   length) and counted; IPv4 fragments are passed, since only the first one carries
//!   ports and the rest could not follow it (`Stop::Fragment`).
//! - IPv6 whose next header is not TCP or UDP (extension headers included) is passed
//!   and counted (`Stop::Ipv6Extension`).
//! - A frame cut short inside any header the decision needs is passed (`Stop::Truncated`).

use aya_ebpf::programs::XdpContext;
use lb_common::types::{FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{Stop, ptr};

const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
/// More-fragments flag and fragment offset bits of the IPv4 `frags` field.
const IPV4_MF_OR_OFFSET: u16 = 0x3fff;

/// One frame, as every later stage sees it.
pub struct Packet {
    /// The flow as the client sent it; also the connection table key.
    pub flow: FlowKey,
    /// Frame length in bytes, for byte counters.
    pub len: u64,
    /// A TCP SYN without ACK: the first packet of a connection.
    pub tcp_syn: bool,
    /// The IPv4 header carried options.
    pub ipv4_options: bool,
}

/// Transport offset, protocol and the family-specific part of the packet.
struct Network {
    l4_offset: usize,
    proto: u8,
    ipv4_options: bool,
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Stop> {
    let eth: *const EthHdr = ptr::at(ctx, 0)?;
    let ether_type = unsafe { (*eth).ether_type };
    let mut flow = FlowKey::default();
    let net = if ether_type == ETH_P_IP_BE {
        ipv4(ctx, &mut flow)?
    } else if ether_type == ETH_P_IPV6_BE {
        ipv6(ctx, &mut flow)?
    } else {
        return Err(Stop::NotIp);
    };
    flow.proto = net.proto;
    let tcp_syn = if net.proto == PROTO_TCP {
        let tcp: *const TcpHdr = ptr::at(ctx, net.l4_offset)?;
        // SAFETY: `ptr::at` checked that the whole TCP header is inside the frame.
        unsafe {
            flow.src_port_be = u16::from_ne_bytes((*tcp).source);
            flow.dst_port_be = u16::from_ne_bytes((*tcp).dest);
            (*tcp).syn() != 0 && (*tcp).ack() == 0
        }
    } else {
        let udp: *const UdpHdr = ptr::at(ctx, net.l4_offset)?;
        // SAFETY: `ptr::at` checked that the whole UDP header is inside the frame.
        unsafe {
            flow.src_port_be = u16::from_ne_bytes((*udp).src);
            flow.dst_port_be = u16::from_ne_bytes((*udp).dst);
        }
        false
    };
    Ok(Packet {
        flow,
        len: (ctx.data_end() - ctx.data()) as u64,
        tcp_syn,
        ipv4_options: net.ipv4_options,
    })
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, flow: &mut FlowKey) -> Result<Network, Stop> {
    let ip: *const Ipv4Hdr = ptr::at(ctx, EthHdr::LEN)?;
    // SAFETY: `ptr::at` checked that the fixed IPv4 header is inside the frame.
    let (vihl, frags, proto, src, dst) = unsafe {
        (
            (*ip).vihl,
            (*ip).frags,
            (*ip).proto,
            (*ip).src_addr,
            (*ip).dst_addr,
        )
    };
    let header_len = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || header_len < Ipv4Hdr::LEN {
        return Err(Stop::Malformed);
    }
    if u16::from_be_bytes(frags) & IPV4_MF_OR_OFFSET != 0 {
        return Err(Stop::Fragment);
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Stop::NotVip);
    }
    flow.family = FAMILY_V4;
    flow.src[..4].copy_from_slice(&src);
    flow.dst[..4].copy_from_slice(&dst);
    Ok(Network {
        l4_offset: EthHdr::LEN + header_len,
        proto,
        ipv4_options: header_len > Ipv4Hdr::LEN,
    })
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, flow: &mut FlowKey) -> Result<Network, Stop> {
    let ip: *const Ipv6Hdr = ptr::at(ctx, EthHdr::LEN)?;
    // SAFETY: `ptr::at` checked that the IPv6 header is inside the frame.
    let (vcf, next, src, dst) =
        unsafe { ((*ip).vcf, (*ip).next_hdr, (*ip).src_addr, (*ip).dst_addr) };
    if vcf[0] >> 4 != 6 {
        return Err(Stop::Malformed);
    }
    if next != PROTO_TCP && next != PROTO_UDP {
        return Err(if is_ipv6_extension(next) {
            Stop::Ipv6Extension
        } else {
            Stop::NotVip
        });
    }
    flow.family = FAMILY_V6;
    flow.src = src;
    flow.dst = dst;
    Ok(Network {
        l4_offset: EthHdr::LEN + Ipv6Hdr::LEN,
        proto: next,
        ipv4_options: false,
    })
}

/// IPv6 extension headers (RFC 8200 §4, and AH/ESP), which the datapath does not walk.
#[inline(always)]
fn is_ipv6_extension(next: u8) -> bool {
    matches!(next, 0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140)
}
