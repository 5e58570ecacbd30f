//! The XDP load balancer. Every frame goes through the stages in order, each in its
//! own module: [`parse`] (one packet description) → [`vip`] (is it for a VIP?) →
//! [`conntrack`] (a known flow keeps its backend) → [`table`] (a new flow gets a
//! backend from the VIP's lookup table) → [`forward`] (L2 DSR or encapsulation) or
//! [`nat`] (full NAT, both ways), with [`icmp`] answering echo requests to VIPs and
//! [`stats`] counting along the way.
//! A stage that ends processing returns `Err(Stop)`; [`lb_xdp`] turns that into a
//! return code and a counter in one place.
#![no_std]
#![no_main]

mod conntrack;
mod events;
mod forward;
mod icmp;
mod keys;
mod maps;
mod nat;
mod parse;
mod ptr;
mod share;
mod stats;
mod table;
mod vip;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::types::{
    BACKEND_F_DRAINED, Backend, NatBinding, PROTO_TCP, VIP_F_ECHO, VIP_F_ENCAP, VIP_F_NAT,
};
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
    /// A new full-NAT flow found every port it tried taken (see `nat`).
    NatPortsExhausted,
    /// A full-NAT flow's port now belongs to another flow (its claim was evicted).
    NatLost,
    /// Addressed to a NAT source address, but no flow holds that port.
    NatUnknown,
}

impl Stop {
    #[inline(always)]
    fn action(self) -> u32 {
        match self {
            Stop::NoBackend
            | Stop::EncapFailed
            | Stop::NatPortsExhausted
            | Stop::NatLost
            | Stop::NatUnknown => xdp_action::XDP_DROP,
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
    if !vip::may_be_vip(&pkt) {
        return not_vip(ctx, &pkt);
    }
    if pkt.kind == Kind::Echo {
        return echo(ctx, &pkt, counters);
    }
    let to = match target(ctx, &pkt, counters) {
        Err(Stop::NotVip) => return not_vip(ctx, &pkt),
        to => to?,
    };
    forward(ctx, &pkt, &to, counters)
}

/// A packet for no VIP: a backend's reply to a full-NAT flow if it is addressed to
/// a NAT source address (one array read tells), else the host's.
#[inline(always)]
fn not_vip(ctx: &XdpContext, pkt: &parse::Packet) -> Result<(), Stop> {
    if nat::is_reply(pkt) {
        let sc = nat::scratch(pkt).ok_or(Stop::NatUnknown)?;
        if pkt.kind == Kind::IcmpError {
            nat::icmp_to_client(ctx, sc)?;
            nat::icmp_to_client_quoted(ctx, sc)
        } else {
            nat::to_client(ctx, sc)
        }
    } else {
        Err(Stop::NotVip)
    }
}

/// Where a flow's packet goes. An established flow takes the short way: connection
/// entry → its VIP by id → its backend, with no hash lookup but the connection
/// table's. Anything else, or anything that does not check out on the short way,
/// goes through the `VIPS` hash map and, for a new flow, the lookup table.
#[inline(always)]
fn target(ctx: &XdpContext, pkt: &parse::Packet, counters: stats::Global) -> Result<Target, Stop> {
    let found = conntrack::find(pkt);
    if !pkt.tcp_syn
        && let Some(found) = &found
        && let entry = found.entry
        && let Some(flags) = vip::flags_by_id(entry.vip(), pkt)
        && let Ok(backend) = table::backend(entry.backend_id)
    {
        count_known(pkt, counters);
        if pkt.tcp_fin_rst && !entry.closing() {
            conntrack::mark_closing(found);
        }
        return Ok(Target {
            vip_id: entry.vip(),
            vip_flags: flags,
            backend_id: entry.backend_id,
            backend,
            hash: None,
            new_flow: false,
            nat: Nat::of(entry.nat()),
        });
    }
    let vip = vip::lookup(pkt)?;
    // An entry made for another VIP that had this id is no entry at all.
    let found = found.filter(|f| f.entry.vip() == vip.vip_id);
    let mut known = found.map(|f| f.entry);
    if pkt.tcp_syn {
        return syn(ctx, pkt, &vip, known, counters);
    }
    if known.is_none()
        && conntrack::guard()
        && let Some(young) = conntrack::find_young(pkt).filter(|e| e.vip() == vip.vip_id)
    {
        // The flow's second packet: it is real, and enters the connection table.
        // An ICMP error follows the flow but proves nothing about it.
        known = Some(if pkt.kind == Kind::Flow {
            conntrack::promote(pkt, young, counters)
        } else {
            young
        });
    }
    // (A flow promoted just now was written closing already if this is its FIN.)
    if pkt.tcp_fin_rst
        && let Some(found) = &found
        && !found.entry.closing()
    {
        conntrack::mark_closing(found);
    }
    if known.is_some() {
        count_known(pkt, counters);
    } else if pkt.kind == Kind::IcmpError {
        stats::bump(counters, |s| &mut s.icmp_error_forwarded);
    } else if pkt.proto != PROTO_TCP {
        stats::bump(counters, |s| &mut s.conn_miss_syn);
    } else {
        // A TCP flow that began elsewhere (another LB, a lost table): it may break.
        stats::bump(counters, |s| &mut s.conn_miss_non_syn);
    }
    if let Some(entry) = known
        && let Ok(backend) = table::backend(entry.backend_id)
    {
        return Ok(Target {
            vip_id: vip.vip_id,
            vip_flags: vip.flags,
            backend_id: entry.backend_id,
            backend,
            hash: None,
            new_flow: false,
            nat: Nat::of(entry.nat()),
        });
    }
    // A new flow, or a known one whose backend was removed: it gets a backend from
    // the table (which resets a removed backend's flow, rather than its packets
    // vanishing). An ICMP error follows its flow but never creates one.
    let remember = Remember::of(known);
    by_table(ctx, pkt, &vip, table::pick(pkt, &vip)?, remember, counters)
}

/// Where the entry of a flow that takes the lookup table is written.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Remember {
    /// A flow the connection table does not hold: the young table with the flood
    /// guard on (see `conntrack`), else the connection table.
    New,
    /// A flow the connection table holds (a SYN reusing its ports, or a flow whose
    /// backend was removed): its entry is replaced there, evicting nothing.
    Replace,
}

impl Remember {
    /// Where to write, given the flow's connection-table entry (if any).
    #[inline(always)]
    fn of(known: Option<lb_common::types::ConnEntry>) -> Remember {
        if known.is_some() {
            Remember::Replace
        } else {
            Remember::New
        }
    }
}

/// The packet goes where the lookup table says (`picked`: its backend id and the
/// flow hash); a packet that opens a flow has the flow's entry written, with its
/// NAT binding when the VIP does full NAT (claimed first: a flow that gets no port
/// is dropped and leaves no entry).
#[inline(always)]
fn by_table(
    ctx: &XdpContext,
    pkt: &parse::Packet,
    vip: &lb_common::types::VipMeta,
    (backend_id, hash): (u32, u32),
    remember: Remember,
    counters: stats::Global,
) -> Result<Target, Stop> {
    let backend = table::backend(backend_id)?;
    let new_flow = pkt.kind == Kind::Flow;
    let mut nat = Nat::None;
    if new_flow {
        let mut tag = vip.vip_id;
        if vip.flags & VIP_F_NAT != 0 {
            let dest = nat::Dest {
                vip_id: vip.vip_id,
                vip_flags: vip.flags,
                backend_id,
                backend,
            };
            let sc = nat::scratch(pkt).ok_or(Stop::NatPortsExhausted)?;
            let binding = nat::claim(ctx, sc, &dest, hash)?;
            tag |= binding.bits();
            nat = Nat::Claimed(binding);
        }
        if conntrack::guard() && remember == Remember::New {
            conntrack::insert_young(pkt, backend_id, tag);
        } else {
            conntrack::insert(pkt, backend_id, tag, counters);
        }
    }
    Ok(Target {
        vip_id: vip.vip_id,
        vip_flags: vip.flags,
        backend_id,
        backend,
        hash: Some(hash),
        new_flow,
        nat,
    })
}

/// Where a TCP SYN goes: a new connection takes the lookup table and its entry is
/// written afresh (a client may reuse a port, and a drained backend must take no new
/// connection), unless the SYN retransmits the flow's own first one: its entry is
/// live (the client has sent no FIN or RST since) and names another backend than the
/// table now does, because the table changed after the first SYN. That SYN goes
/// where the first one went, which may already have answered it: sent elsewhere,
/// the other backend would reset the connection the client opens with the first
/// one's answer. Only while that backend is still of this VIP (ids are reused) and
/// in service: weight above 0, or drained by the operator (who keeps its
/// connections); one at weight 0 otherwise is down, and a retry elsewhere is the
/// connection's only chance. With the flood guard on, the first SYN's entry is in
/// the young table unless the connection table holds the flow.
#[inline(always)]
fn syn(
    ctx: &XdpContext,
    pkt: &parse::Packet,
    vip: &lb_common::types::VipMeta,
    known: Option<lb_common::types::ConnEntry>,
    counters: stats::Global,
) -> Result<Target, Stop> {
    let (backend_id, hash) = table::pick(pkt, vip)?;
    let remember = Remember::of(known);
    let known = match known {
        None if conntrack::guard() => {
            conntrack::find_young(pkt).filter(|entry| entry.vip() == vip.vip_id)
        }
        known => known,
    };
    if let Some(entry) = known
        && !entry.closing()
        && entry.backend_id != backend_id
        && let Ok(backend) = table::backend(entry.backend_id)
        && backend.vip_id == vip.vip_id
        && (backend.weight != 0 || backend.flags & BACKEND_F_DRAINED != 0)
    {
        stats::bump(counters, |s| &mut s.conn_hit);
        return Ok(Target {
            vip_id: vip.vip_id,
            vip_flags: vip.flags,
            backend_id: entry.backend_id,
            backend,
            hash: Some(hash),
            new_flow: false,
            nat: Nat::of(entry.nat()),
        });
    }
    stats::bump(counters, |s| &mut s.conn_miss_syn);
    by_table(ctx, pkt, vip, (backend_id, hash), remember, counters)
}

/// Where a packet goes, and what is known about its flow.
struct Target {
    vip_id: u32,
    vip_flags: u32,
    backend_id: u32,
    backend: &'static Backend,
    /// The flow hash, if the table was read.
    hash: Option<u32>,
    /// The packet opened a flow (its connection entry was just written).
    new_flow: bool,
    /// The flow's full-NAT binding, for a VIP that does full NAT.
    nat: Nat,
}

/// What is known of a flow's full-NAT binding when its packet is forwarded.
#[derive(Clone, Copy)]
enum Nat {
    /// None yet: a flow the connection table knew without one (an entry a fleet
    /// peer shared, or written before the VIP did NAT), or a VIP without NAT.
    None,
    /// Claimed by this very packet.
    Claimed(NatBinding),
    /// From the flow's entry: its claim is checked before use (`nat::confirm`).
    Known(NatBinding),
}

impl Nat {
    #[inline(always)]
    fn of(binding: Option<NatBinding>) -> Nat {
        binding.map_or(Nat::None, Nat::Known)
    }
}

/// Counts a packet of a flow the connection table knows.
#[inline(always)]
fn count_known(pkt: &parse::Packet, counters: stats::Global) {
    if pkt.kind == Kind::IcmpError {
        stats::bump(counters, |s| &mut s.icmp_error_forwarded);
    } else {
        stats::bump(counters, |s| &mut s.conn_hit);
    }
}

/// Counts the packet to its VIP and backend and sends it in the VIP's mode. The flow
/// hash is computed only when the table was read, or when encapsulation needs it for
/// the outer source: an established DSR flow never hashes.
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    pkt: &parse::Packet,
    to: &Target,
    counters: stats::Global,
) -> Result<(), Stop> {
    if pkt.ipv4_options {
        stats::bump(counters, |s| &mut s.ipv4_options);
    }
    if to.vip_flags & VIP_F_NAT != 0 {
        return forward_nat(ctx, pkt, to, counters);
    }
    stats::account(to.vip_id, to.backend_id, pkt.len, to.new_flow);
    if to.vip_flags & VIP_F_ENCAP != 0 {
        let hash = to.hash.unwrap_or_else(|| table::hash(pkt, to.vip_flags));
        forward::encapsulate(ctx, pkt, to.backend, hash)?;
        stats::bump(counters, |s| &mut s.tx_encap);
    } else {
        forward::l2_dsr(ctx, to.backend)?;
    }
    stats::bump(counters, |s| &mut s.tx);
    Ok(())
}

/// A full-NAT VIP's packet: its binding checked (or made, for a known flow that
/// has none), then rewritten for the backend; an ICMP error about the flow is
/// translated for the backend (one about a flow with no binding goes to the host).
/// A flow whose port went to another flow (its claim expired or was evicted, and
/// the port was claimed again) is counted `lost` and takes a new port: a UDP flow
/// goes on, a TCP one is reset by its backend, which does not know the new tuple;
/// either is better than its packets vanishing until the other flow ends.
#[inline(always)]
fn forward_nat(
    ctx: &XdpContext,
    pkt: &parse::Packet,
    to: &Target,
    counters: stats::Global,
) -> Result<(), Stop> {
    let icmp = pkt.kind == Kind::IcmpError;
    let dest = nat::Dest {
        vip_id: to.vip_id,
        vip_flags: to.vip_flags,
        backend_id: to.backend_id,
        backend: to.backend,
    };
    let sc = nat::scratch(pkt).ok_or(Stop::NatLost)?;
    let binding = match to.nat {
        Nat::Claimed(binding) => binding,
        Nat::Known(binding) => match nat::confirm(ctx, sc, &dest, &binding) {
            Ok(()) => binding,
            Err(Stop::NatLost) if !icmp => {
                stats::nat(|n| &mut n.lost);
                let hash = to.hash.unwrap_or_else(|| table::hash(pkt, to.vip_flags));
                let binding = nat::claim(ctx, sc, &dest, hash)?;
                conntrack::insert(pkt, to.backend_id, to.vip_id | binding.bits(), counters);
                binding
            }
            Err(stop) => return Err(stop),
        },
        Nat::None if icmp => return Err(Stop::IcmpOther),
        Nat::None => {
            let hash = to.hash.unwrap_or_else(|| table::hash(pkt, to.vip_flags));
            let binding = nat::claim(ctx, sc, &dest, hash)?;
            conntrack::insert(pkt, to.backend_id, to.vip_id | binding.bits(), counters);
            binding
        }
    };
    stats::account(to.vip_id, to.backend_id, pkt.len, to.new_flow);
    if icmp {
        nat::icmp_to_backend(ctx, sc, to.backend, &binding)?;
    } else {
        nat::to_backend(ctx, sc, to.backend, &binding)?;
    }
    stats::nat(|n| &mut n.to_backend);
    stats::bump(counters, |s| &mut s.tx);
    Ok(())
}

/// An ICMP echo request to a VIP address that answers pings.
#[inline(always)]
fn echo(ctx: &XdpContext, pkt: &parse::Packet, counters: stats::Global) -> Result<(), Stop> {
    let vip = vip::lookup(pkt)?;
    if vip.flags & VIP_F_ECHO == 0 {
        return Err(Stop::NotVip);
    }
    icmp::echo_reply(ctx, pkt)?;
    stats::bump(counters, |s| &mut s.icmp_echo_reply);
    Ok(())
}

/// Passes every frame to the kernel. Attached to the peer of a veth so that frames
/// sent there with `XDP_TX` are received, and the floor of `cargo xtask bench datapath`.
#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Bench reference: one connection-table write, nothing else (see
/// `lb_common::maps::programs::REF_CONN_INSERT`).
#[xdp]
pub fn lb_ref_conn_insert(_ctx: XdpContext) -> u32 {
    pass_if(conntrack::reference_insert())
}

/// Bench reference: one connection-table lookup, nothing else (see
/// `lb_common::maps::programs::REF_CONN_LOOKUP`).
#[xdp]
pub fn lb_ref_conn_lookup(_ctx: XdpContext) -> u32 {
    pass_if(conntrack::reference_lookup())
}

/// A reference program's verdict: `XDP_PASS` when its operation succeeded.
#[inline(always)]
fn pass_if(ok: bool) -> u32 {
    if ok {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// Bench reference: an established IPv4 or IPv6 packet's path with nothing but
/// what forwarding it needs (parse, VIP filter, connection lookup, backend, MAC
/// rewrite): no VIP check by id, no counters. `XDP_TX` when it forwarded, else
/// `XDP_PASS` (see `lb_common::maps::programs::REF_FORWARD_ONLY`).
#[xdp]
pub fn lb_ref_forward_only(ctx: XdpContext) -> u32 {
    match forward_only(&ctx) {
        Ok(()) => xdp_action::XDP_TX,
        Err(_) => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn forward_only(ctx: &XdpContext) -> Result<(), Stop> {
    let pkt = parse::parse(ctx)?;
    if !vip::may_be_vip(&pkt) {
        return Err(Stop::NotVip);
    }
    let entry = conntrack::find(&pkt).ok_or(Stop::NoBackend)?.entry;
    forward::l2_dsr(ctx, table::backend(entry.backend_id)?)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
