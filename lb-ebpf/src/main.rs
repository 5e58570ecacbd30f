//! The XDP load balancer. Every frame goes through the stages in order, each in its
//! own module: [`parse`] (one packet description) → [`vip`] (is it for a VIP?) →
//! [`conntrack`] (a known flow keeps its backend) → [`table`] (a new flow gets a
//! backend from the VIP's lookup table) → [`forward`] (L2 DSR or encapsulation), with
//! [`icmp`] answering echo requests to VIPs and [`stats`] counting along the way.
//! A stage that ends processing returns `Err(Stop)`; [`lb_xdp`] turns that into a
//! return code and a counter in one place.
#![no_std]
#![no_main]

mod conntrack;
mod forward;
mod icmp;
mod maps;
mod parse;
mod ptr;
mod stats;
mod table;
mod vip;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::types::{VIP_F_ECHO, VIP_F_ENCAP};
use parse::Kind;

/// Why processing stopped before a frame was forwarded, and so what the kernel does
/// with it. Each reason has its own counter in `GlobalStats`.
#[derive(Clone, Copy)]
pub enum Stop {
    /// Not IPv4 or IPv6: the host's business (ARP, LLDP, ...).
    NotIp,
    /// IP, but not addressed to a configured VIP.
    NotVip,
    /// An IPv4 fragment: its transport ports are unknown (see `parse`).
    Fragment,
    /// Cut short before the headers the decision needs.
    Truncated,
    /// An IP header that contradicts itself (wrong version, bad lengths).
    Malformed,
    /// IPv6 with an extension header before the transport header.
    Ipv6Extension,
    /// ICMP that is neither an echo request nor an error about a VIP flow.
    IcmpOther,
    /// For a VIP, but its table names no usable backend.
    NoBackend,
    /// Encapsulation could not make room in front of the packet.
    EncapFailed,
}

impl Stop {
    #[inline(always)]
    fn action(self) -> u32 {
        match self {
            Stop::NoBackend | Stop::EncapFailed => xdp_action::XDP_DROP,
            Stop::NotIp
            | Stop::NotVip
            | Stop::Fragment
            | Stop::Truncated
            | Stop::Malformed
            | Stop::Ipv6Extension
            | Stop::IcmpOther => xdp_action::XDP_PASS,
        }
    }
}

/// The load balancer's entry point.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let counters = stats::global();
    stats::bump(counters, |s| &mut s.rx_frames);
    match balance(&ctx, counters) {
        Ok(()) => xdp_action::XDP_TX,
        Err(stop) => {
            stats::count_stop(counters, stop);
            stop.action()
        }
    }
}

/// Everything between a parsed frame and `XDP_TX`.
#[inline(always)]
fn balance(ctx: &XdpContext, counters: stats::Global) -> Result<(), Stop> {
    let pkt = parse::parse(ctx)?;
    let vip = vip::lookup(&pkt)?;
    if pkt.kind == Kind::Echo {
        if vip.flags & VIP_F_ECHO == 0 {
            return Err(Stop::NotVip);
        }
        icmp::echo_reply(ctx, &pkt)?;
        stats::bump(counters, |s| &mut s.icmp_echo_reply);
        return Ok(());
    }
    if pkt.ipv4_options {
        stats::bump(counters, |s| &mut s.ipv4_options);
    }
    // The flow hash is computed only when the table is read, or when encapsulation
    // needs it for the outer source; an established DSR flow never hashes. A known
    // flow whose backend was removed is given a new one (which resets it, rather than
    // its packets vanishing).
    let known = match pkt.kind {
        Kind::IcmpError => {
            stats::bump(counters, |s| &mut s.icmp_error_forwarded);
            conntrack::peek(&pkt)
        }
        _ => conntrack::lookup(&pkt, counters),
    };
    let (backend_id, backend, hash, new_flow) =
        match known.and_then(|id| table::backend(id).ok().map(|b| (id, b))) {
            Some((id, backend)) => (id, backend, None, false),
            None => {
                let (id, hash) = table::pick(&pkt, &vip)?;
                let backend = table::backend(id)?;
                // An ICMP error follows its flow but never creates one.
                let new_flow = pkt.kind == Kind::Flow;
                if new_flow {
                    conntrack::insert(&pkt, id, vip.vip_id, counters);
                }
                (id, backend, Some(hash), new_flow)
            }
        };
    stats::account(vip.vip_id, backend_id, pkt.len, new_flow);
    if vip.flags & VIP_F_ENCAP != 0 {
        let hash = hash.unwrap_or_else(|| table::hash(&pkt, &vip));
        forward::encapsulate(ctx, &pkt, &backend, hash)?;
        stats::bump(counters, |s| &mut s.tx_encap);
    } else {
        forward::l2_dsr(ctx, &backend)?;
    }
    stats::bump(counters, |s| &mut s.tx);
    Ok(())
}

/// Passes every frame to the kernel. Attached to the peer of a veth so that frames
/// sent there with `XDP_TX` are received, and the floor of `cargo xtask bench datapath`.
#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
