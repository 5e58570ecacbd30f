//! Answers ICMP and ICMPv6 echo requests addressed to a VIP, from the datapath: the
//! VIP answers pings wherever its backends are, as operators expect of a service
//! address, and no backend sees them. The reply is the request turned around: MACs
//! and addresses swapped, type changed, TTL/hop limit reset, checksums updated.

use aya_ebpf::programs::XdpContext;
use lb_common::types::FAMILY_V4;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{Stop, parse::Packet, ptr};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO_REPLY: u8 = 129;
const REPLY_TTL: u8 = 64;

#[inline(always)]
pub fn echo_reply(ctx: &XdpContext, pkt: &Packet) -> Result<(), Stop> {
    let eth: *mut EthHdr = ptr::at(ctx, 0)?;
    // The reply to an echo request with IPv4 options would have to echo some of them
    // back (RFC 1122 3.2.2.6); such requests are left to the kernel.
    if pkt.family == FAMILY_V4 && pkt.ipv4_options {
        return Err(Stop::IcmpOther);
    }
    let icmp: *mut [u8; 4] = ptr::at(ctx, pkt.l4_offset)?;
    // SAFETY: `ptr::at` checked every header written below; `parse` already read
    // them, so their layout is known.
    unsafe {
        let mac = (*eth).dst_addr;
        (*eth).dst_addr = (*eth).src_addr;
        (*eth).src_addr = mac;
        let old = u16::from_ne_bytes([(*icmp)[0], (*icmp)[1]]);
        (*icmp)[0] = if pkt.family == FAMILY_V4 {
            ICMP_ECHO_REPLY
        } else {
            ICMPV6_ECHO_REPLY
        };
        let new = u16::from_ne_bytes([(*icmp)[0], (*icmp)[1]]);
        // Swapping source and destination leaves the ICMPv6 pseudo-header sum as it
        // was, so only the type word changes the checksum (RFC 1624 eqn. 3).
        let sum = u16::from_ne_bytes([(*icmp)[2], (*icmp)[3]]);
        let updated = csum_replace(sum, old, new).to_ne_bytes();
        (*icmp)[2] = updated[0];
        (*icmp)[3] = updated[1];
    }
    if pkt.family == FAMILY_V4 {
        let ip: *mut Ipv4Hdr = ptr::at(ctx, EthHdr::LEN)?;
        // SAFETY: as above.
        unsafe {
            let src = (*ip).src_addr;
            (*ip).src_addr = (*ip).dst_addr;
            (*ip).dst_addr = src;
            (*ip).ttl = REPLY_TTL;
            (*ip).check = [0, 0];
            (*ip).check = ipv4_header_checksum(ip as *const [u8; Ipv4Hdr::LEN]).to_ne_bytes();
        }
    } else {
        let ip: *mut Ipv6Hdr = ptr::at(ctx, EthHdr::LEN)?;
        // SAFETY: as above.
        unsafe {
            let src = (*ip).src_addr;
            (*ip).src_addr = (*ip).dst_addr;
            (*ip).dst_addr = src;
            (*ip).hop_limit = REPLY_TTL;
        }
    }
    Ok(())
}

/// RFC 1624 eqn. 3: the checksum after one 16-bit word of the data went from `old`
/// to `new`. All three in the same (native) reading of the wire bytes.
#[inline(always)]
pub fn csum_replace(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!check as u32) + (!old as u32) + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The checksum of a 20-byte IPv4 header whose checksum field is zero, in the native
/// reading of the wire bytes (store it with `to_ne_bytes`).
///
/// # Safety
/// `header` must point at 20 readable bytes.
#[inline(always)]
pub unsafe fn ipv4_header_checksum(header: *const [u8; Ipv4Hdr::LEN]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < Ipv4Hdr::LEN {
        // SAFETY: i + 1 < 20, inside the header the caller vouched for.
        sum += unsafe { u16::from_ne_bytes([(*header)[i], (*header)[i + 1]]) } as u32;
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
