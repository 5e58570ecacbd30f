//! The XDP load balancer. Every frame goes through the stages in order, each in its
//! own module: [`parse`] (one packet description) → [`vip`] (is it for a VIP?) →
//! [`conntrack`] (a known flow keeps its backend) → [`table`] (a new flow gets a
//! backend from the VIP's lookup table) → [`forward`] (rewrite and transmit), with
//! [`stats`] counting along the way. A stage that ends processing returns
//! `Err(Stop)`; [`lb_xdp`] turns that into a return code and a counter in one place.
#![no_std]
#![no_main]

mod conntrack;
mod forward;
mod maps;
mod parse;
mod ptr;
mod stats;
mod table;
mod vip;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

/// Why processing stopped before a frame was forwarded, and so what the kernel does
/// with it. Each reason has its own counter in `GlobalStats`.
#[derive(Clone, Copy)]
pub enum Stop {
    /// Not IPv4 or IPv6: the host's business (ARP, LLDP, ...).
    NotIp,
    /// IP, but not TCP or UDP addressed to a configured VIP.
    NotVip,
    /// An IPv4 fragment: its transport ports are unknown (see docs/DATAPATH.md).
    Fragment,
    /// Cut short before the headers the decision needs.
    Truncated,
    /// An IP header that contradicts itself (wrong version, header length below 20).
    Malformed,
    /// IPv6 with an extension header before the transport header.
    Ipv6Extension,
    /// For a VIP, but its table names no usable backend.
    NoBackend,
}

impl Stop {
    #[inline(always)]
    fn action(self) -> u32 {
        match self {
            Stop::NoBackend => xdp_action::XDP_DROP,
            Stop::NotIp
            | Stop::NotVip
            | Stop::Fragment
            | Stop::Truncated
            | Stop::Malformed
            | Stop::Ipv6Extension => xdp_action::XDP_PASS,
        }
    }
}

/// The load balancer's entry point.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let counters = stats::global();
    stats::bump(counters, |s| &mut s.rx_frames);
    match balance(&ctx, counters) {
        Ok(action) => action,
        Err(stop) => {
            stats::count_stop(counters, stop);
            stop.action()
        }
    }
}

#[inline(always)]
fn balance(ctx: &XdpContext, counters: stats::Global) -> Result<u32, Stop> {
    let pkt = parse::parse(ctx)?;
    let vip = vip::lookup(&pkt)?;
    if pkt.ipv4_options {
        stats::bump(counters, |s| &mut s.ipv4_options);
    }
    let (backend_id, new_flow) = match conntrack::lookup(&pkt, counters) {
        Some(backend_id) => (backend_id, false),
        None => {
            let backend_id = table::pick(&pkt, &vip)?;
            conntrack::insert(&pkt, backend_id, vip.vip_id, counters);
            (backend_id, true)
        }
    };
    let backend = table::backend(backend_id)?;
    stats::account(vip.vip_id, backend_id, pkt.len, new_flow);
    forward::l2_dsr(ctx, &backend)?;
    stats::bump(counters, |s| &mut s.tx);
    Ok(xdp_action::XDP_TX)
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
