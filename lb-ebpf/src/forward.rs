//! Sends a packet on to its backend, in the VIP's forwarding mode.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::types::{Backend, FAMILY_V4, PROTO_IPIP, PROTO_IPV6, Settings};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{Stop, events, icmp::ipv4_header_checksum, maps::SETTINGS, parse::Packet, ptr};

const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
const OUTER_TTL: u8 = 64;
/// Don't-fragment: the outer packet is never fragmented on the way; a router that
/// cannot carry it says so with ICMP, which the datapath routes back to the flow.
const IPV4_DF: [u8; 2] = 0x4000u16.to_be_bytes();

/// L2 direct server return: the frame keeps its IP header (the backend holds the VIP
/// on a loopback interface and answers the client directly); only the Ethernet
/// addresses change, to go from this host to the backend, back out of the same port.
#[inline(always)]
pub fn l2_dsr(ctx: &XdpContext, backend: &Backend) -> Result<(), Stop> {
    let eth: *mut EthHdr = ptr::at(ctx, 0)?;
    // Each MAC moves as a 4-byte and a 2-byte word, not byte by byte (what a plain
    // `[u8; 6]` assignment compiles to).
    // SAFETY: `ptr::at` checked that the Ethernet header is inside the frame.
    unsafe {
        ptr::copy_mac(&raw mut (*eth).src_addr, &raw const (*eth).dst_addr);
        ptr::copy_mac(&raw mut (*eth).dst_addr, &backend.mac);
    }
    Ok(())
}

/// IP-in-IP: a new outer IPv4 or IPv6 header (by the backend's family) to the
/// backend's address, in front of the packet as the client sent it; protocol 4
/// (IPIP) for an IPv4 packet, 41 for IPv6. The outer source is the configured prefix
/// with the low bits taken from the flow hash, so routers' ECMP spreads flows while
/// every packet of one flow takes one path. The frame goes to the next hop's MAC.
#[inline(always)]
pub fn encapsulate(
    ctx: &XdpContext,
    pkt: &Packet,
    backend: &Backend,
    hash: u32,
) -> Result<(), Stop> {
    let settings = SETTINGS.get(0).copied().unwrap_or(Settings::default());
    // Our own MAC: the frame was addressed to it.
    let eth: *const EthHdr = ptr::at(ctx, 0)?;
    // SAFETY: `ptr::at` checked that the Ethernet header is inside the frame.
    let our_mac = unsafe { (*eth).dst_addr };
    let inner_proto = if pkt.family == FAMILY_V4 {
        PROTO_IPIP
    } else {
        PROTO_IPV6
    };
    let hash_bytes = hash.to_be_bytes();
    if backend.family == FAMILY_V4 {
        grow(ctx, Ipv4Hdr::LEN, backend)?;
        let eth: *mut EthHdr = ptr::at(ctx, 0)?;
        let ip: *mut Ipv4Hdr = ptr::at(ctx, EthHdr::LEN)?;
        let mut src = settings.encap_src_v4;
        src[2] = hash_bytes[2];
        src[3] = hash_bytes[3];
        // SAFETY: `ptr::at` checked both headers after the frame grew.
        unsafe {
            (*eth).dst_addr = backend.mac;
            (*eth).src_addr = our_mac;
            (*eth).ether_type = ETH_P_IP_BE;
            (*ip).vihl = 0x45;
            (*ip).tos = 0;
            (*ip).tot_len = (pkt.ip_len.saturating_add(Ipv4Hdr::LEN as u16)).to_be_bytes();
            (*ip).id = [0, 0];
            (*ip).frags = IPV4_DF;
            (*ip).ttl = OUTER_TTL;
            (*ip).proto = inner_proto;
            (*ip).check = [0, 0];
            (*ip).src_addr = src;
            (*ip).dst_addr = [
                backend.addr[0],
                backend.addr[1],
                backend.addr[2],
                backend.addr[3],
            ];
            (*ip).check = ipv4_header_checksum(ip as *const [u8; Ipv4Hdr::LEN]).to_ne_bytes();
        }
    } else {
        grow(ctx, Ipv6Hdr::LEN, backend)?;
        let eth: *mut EthHdr = ptr::at(ctx, 0)?;
        let ip: *mut Ipv6Hdr = ptr::at(ctx, EthHdr::LEN)?;
        let mut src = settings.encap_src_v6;
        src[12..].copy_from_slice(&hash_bytes);
        // SAFETY: `ptr::at` checked both headers after the frame grew.
        unsafe {
            (*eth).dst_addr = backend.mac;
            (*eth).src_addr = our_mac;
            (*eth).ether_type = ETH_P_IPV6_BE;
            (*ip).vcf = [0x60, 0, 0, 0];
            (*ip).payload_len = pkt.ip_len.to_be_bytes();
            (*ip).next_hdr = inner_proto;
            (*ip).hop_limit = OUTER_TTL;
            (*ip).src_addr = src;
            (*ip).dst_addr = backend.addr;
        }
    }
    Ok(())
}

/// Makes room for `len` more bytes in front of the packet (the Ethernet header is
/// rewritten in full afterwards, so it need not be moved), for the outer header to
/// `backend`.
#[inline(always)]
fn grow(ctx: &XdpContext, len: usize, backend: &Backend) -> Result<(), Stop> {
    // SAFETY: the helper only moves `data` within the frame's headroom, or fails.
    let error = unsafe { bpf_xdp_adjust_head(ctx.ctx, -(len as i32)) };
    if error != 0 {
        events::encap_failed(backend, len as u32, error);
        return Err(Stop::EncapFailed);
    }
    Ok(())
}
