//! Full NAT (`forwarding = "nat"`): the LB stays in the path both ways, so backends
//! need no VIP, no tunnel and no L2 adjacency.
//!
//! - **To the backend** ([`to_backend`]): the destination becomes the backend's
//!   address, the source one of the `[nat]` addresses of the flow's family, and the
//!   source port one the flow claimed ([`claim`]); the destination port (the VIP's)
//!   is kept. The frame goes to the backend's configured MAC (the next hop towards
//!   it) out of the interface it came in on.
//! - **Back to the client** ([`to_client`]): a packet to a NAT address is looked up
//!   in `NAT_V4`/`NAT_V6` by its tuple as it arrives; the entry names the client's
//!   flow, whose VIP becomes the source and whose client the destination, and the
//!   frame goes back to the MAC the client's first packet came from.
//!
//! **Ports.** A new flow claims a (source address, port) towards its backend by
//! inserting its reply's tuple into the NAT table with `BPF_NOEXIST`: the insert is
//! atomic, so two CPUs never give one port to two flows. The address is chosen by
//! the flow's 5-tuple hash, the port starts at a hashed place and moves on by one
//! for each port found taken, for `NAT_PROBES` tries; a flow that finds none is
//! dropped and counted (`ports_exhausted`), never sent with a port it does not
//! hold. The binding rides in the flow's connection entry (`ConnEntry::nat`), so it
//! lives as the flow's backend does: across weight changes, agent restarts and
//! reloads.
//!
//! **A claim can be evicted** (the NAT table is an LRU, like the connection table):
//! every client packet of a NAT flow therefore checks that its claim still names
//! it ([`confirm`]). An evicted claim is made again on the same port if that is
//! still free (`reclaimed`); a port another flow has taken since is never used
//! again by this flow, which takes a new one (`lost`, see `forward_nat`) rather
//! than mix two flows on one tuple.
//!
//! **Checksums** are updated incrementally (RFC 1624, over 32-bit words): the IPv4
//! header's for the two addresses, TCP's and UDP's for the addresses of the
//! pseudo-header and the port. An IPv4 UDP datagram sent without a checksum (0)
//! keeps none. TTL and hop limit are left as they came, as in the other modes.
//!
//! **ICMP errors** about a NAT flow ("fragmentation needed", "packet too big", the
//! ones `parse` follows) are translated both ways ([`icmp_to_client`],
//! [`icmp_to_backend`]): outer header, quoted packet and every checksum.
//!
//! Not handled: replies on a second interface (replies must come back to the
//! interface the program is attached to, as they do when the NAT addresses are
//! routed to it).

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use lb_common::{
    hash::flow_hash_words,
    maps::NAT_PROBES,
    types::{
        AddrWords, Backend, ConnKeyV6, FAMILY_V4, NAT_F_CLOSING, NatBinding, NatEntry, NatSettings,
        PROTO_TCP, VIP_F_HASH_SRC_ONLY, nat_clock,
    },
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    Stop, keys,
    maps::{NAT_SCRATCH, NAT_SETTINGS, NAT_V4, NAT_V6},
    parse::{ICMP_HDR_LEN, Kind, Packet},
    ptr, stats,
};

/// Offset of the checksum in a TCP header, and in a UDP header.
const TCP_CHECK: usize = 16;
const UDP_CHECK: usize = 6;

#[inline(always)]
fn settings() -> Option<&'static NatSettings> {
    NAT_SETTINGS.get(0)
}

/// Source address `index` of a family, if that family has that many NAT sources
/// (a reload may have shrunk the prefix under a flow's binding).
#[inline(always)]
fn source(settings: &NatSettings, family: u16, index: u32) -> Option<AddrWords> {
    if family == u16::from(FAMILY_V4) {
        if index >= settings.count_v4 {
            return None;
        }
        Some([NatSettings::source_word(settings.first_v4, index), 0, 0, 0])
    } else {
        if index >= settings.count_v6 {
            return None;
        }
        let f = &settings.first_v6;
        Some([f[0], f[1], f[2], NatSettings::source_word(f[3], index)])
    }
}

/// Whether the packet is addressed to one of the NAT source addresses: a backend's
/// reply (or a stray packet) for [`to_client`].
#[inline(always)]
pub fn is_reply(pkt: &Packet) -> bool {
    if pkt.kind == Kind::Echo {
        return false;
    }
    let Some(s) = settings() else {
        return false;
    };
    if pkt.family == FAMILY_V4 {
        NatSettings::source_index(s.first_v4, s.count_v4, pkt.dst[0]).is_some()
    } else {
        let (f, d) = (&s.first_v6, &pkt.dst);
        f[0] == d[0]
            && f[1] == d[1]
            && f[2] == d[2]
            && NatSettings::source_index(f[3], s.count_v6, d[3]).is_some()
    }
}

/// A packet's flow as full NAT's out-of-line steps take it: its tuple in the IPv6
/// key's layout whatever the family (IPv4 in word 0 of each address), then the
/// family, the transport (or ICMP) header's offset and the IP packet's length. For
/// an ICMP error the tuple is the quoted packet's, turned around (see `parse`).
#[repr(C)]
pub struct NatFlow {
    pub tuple: ConnKeyV6,
    pub family: u16,
    pub l4_offset: u16,
    pub ip_len: u16,
    /// Non-zero: a TCP FIN or RST.
    pub fin_rst: u16,
}

/// The per-CPU scratch of full NAT (`NAT_SCRATCH`): the packet's flow and the NAT
/// entry being written live here, not on the stack. The steps that use them are
/// not inlined (a single frame with them would pass BPF's 512 bytes), and calls
/// share that budget, so the caller hands over map memory instead of stack.
#[repr(C)]
pub struct Scratch {
    pub flow: NatFlow,
    pub entry: NatEntry,
    /// Between the two steps of [`icmp_to_client`]: the outer header's difference.
    pub delta: u64,
}

/// The packet's flow, written into this CPU's scratch as whole words. `None` only
/// if the scratch cannot be read (it always can: index 0 of a one-entry array).
#[inline(always)]
pub fn scratch(pkt: &Packet) -> Option<&'static mut Scratch> {
    let sc = NAT_SCRATCH.get_ptr_mut(0)?.cast::<Scratch>();
    let (s, d) = (&pkt.src, &pkt.dst);
    let pair = |low: u32, high: u32| u64::from(low) | u64::from(high) << 32;
    let words = [
        pair(s[0], s[1]),
        pair(s[2], s[3]),
        pair(d[0], d[1]),
        pair(d[2], d[3]),
        u64::from(pkt.src_port_be) | u64::from(pkt.dst_port_be) << 16 | u64::from(pkt.proto) << 32,
        u64::from(pkt.family)
            | (pkt.l4_offset as u64) << 16
            | u64::from(pkt.ip_len) << 32
            | u64::from(pkt.tcp_fin_rst) << 48,
    ];
    // SAFETY: a per-CPU map value, valid for the whole program run and used by
    // nothing else while it runs (XDP does not nest on a CPU); its first 48 bytes
    // are the `NatFlow` these words spell (little-endian, `#[repr(C)]`).
    unsafe {
        sc.cast::<[u64; 6]>().write(words);
        Some(&mut *sc)
    }
}

#[inline(always)]
fn is_v4(f: &NatFlow) -> bool {
    f.family == u16::from(FAMILY_V4)
}

/// Where a NAT flow's packet goes: what its NAT table entry names.
pub struct Dest {
    pub vip_id: u32,
    pub vip_flags: u32,
    pub backend_id: u32,
    pub backend: &'static Backend,
}

/// Writes into the scratch the NAT table entry of the client's flow: what its
/// replies are turned back into.
#[inline(always)]
fn fill_entry(ctx: &XdpContext, sc: &mut Scratch, dest: &Dest) -> Result<(), Stop> {
    let eth: *const EthHdr = ptr::at(ctx, 0)?;
    let t = &sc.flow.tuple;
    sc.entry = NatEntry {
        client: t.src,
        vip: t.dst,
        client_port_be: t.src_port_be,
        vip_port_be: t.dst_port_be,
        // SAFETY: `ptr::at` checked that the Ethernet header is inside the frame.
        client_mac: unsafe { (*eth).src_addr },
        flags: closing_flag(&sc.flow),
        _pad: 0,
        vip_id: dest.vip_id,
        backend_id: dest.backend_id,
        seen: now(),
    };
    Ok(())
}

/// The NAT entries' clock now (`lb_common::types::nat_clock`).
#[inline(always)]
fn now() -> u32 {
    // SAFETY: a helper without arguments or side effects.
    nat_clock(unsafe { bpf_ktime_get_coarse_ns() })
}

/// [`NAT_F_CLOSING`] if the flow's packet is a TCP FIN or RST.
#[inline(always)]
fn closing_flag(f: &NatFlow) -> u8 {
    if f.fin_rst != 0 { NAT_F_CLOSING } else { 0 }
}

/// A packet of the flow of `entry` passed: its idle clock restarts (written once a
/// clock unit at most) and a FIN or RST marks it closing.
#[inline(always)]
fn touch(entry: *mut NatEntry, f: &NatFlow) {
    let now = now();
    let closing = closing_flag(f);
    // SAFETY: a map value, valid for the program run (RCU); racing writers store
    // the same kind of value, and a torn read of `seen` only delays an expiry.
    unsafe {
        if (*entry).seen != now {
            (*entry).seen = now;
        }
        if closing != 0 && (*entry).flags & closing == 0 {
            (*entry).flags |= closing;
        }
    }
}

/// Whether a NAT table entry stands for the client's flow `f` (same client, VIP).
#[inline(always)]
fn same_flow(entry: &NatEntry, f: &NatFlow) -> bool {
    entry.client == f.tuple.src
        && entry.vip == f.tuple.dst
        && entry.client_port_be == f.tuple.src_port_be
        && entry.vip_port_be == f.tuple.dst_port_be
}

/// What one attempt to hold a port found.
enum Hold {
    /// The port is the flow's now (it was free, or already the flow's own).
    Held,
    /// Another live flow holds it.
    Taken,
}

/// Tries to hold `port` on source `src` towards `backend` for the client's flow
/// `f`: inserts the reply's tuple if free (`BPF_NOEXIST`, atomic), or takes it over
/// if the entry there is this very flow's (a client reopening its ports, a
/// retransmitted SYN).
#[inline(always)]
fn hold(f: &NatFlow, backend: &AddrWords, src: &AddrWords, port: u16, value: &NatEntry) -> Hold {
    let (vip_port, port_be, proto) = (f.tuple.dst_port_be, port.to_be(), f.tuple.proto as u8);
    let flags = BPF_NOEXIST as u64;
    if is_v4(f) {
        let key = keys::ConnV4::tuple(backend[0], src[0], vip_port, port_be, proto);
        if NAT_V4.insert(key.key(), value, flags).is_ok() {
            return Hold::Held;
        }
        // SAFETY: the value is only compared.
        match unsafe { NAT_V4.get(key.key()) } {
            Some(e) if same_flow(e, f) => {
                let _ = NAT_V4.insert(key.key(), value, 0);
                Hold::Held
            }
            _ => Hold::Taken,
        }
    } else {
        let key = keys::ConnV6::tuple(backend, src, vip_port, port_be, proto);
        if NAT_V6.insert(key.key(), value, flags).is_ok() {
            return Hold::Held;
        }
        // SAFETY: as above.
        match unsafe { NAT_V6.get(key.key()) } {
            Some(e) if same_flow(e, f) => {
                let _ = NAT_V6.insert(key.key(), value, 0);
                Hold::Held
            }
            _ => Hold::Taken,
        }
    }
}

/// The backend's address as words, refusing a backend of the other family (full
/// NAT does not translate between families).
#[inline(always)]
fn backend_words(f: &NatFlow, backend: &Backend) -> Result<AddrWords, Stop> {
    if u16::from(backend.family) != f.family {
        return Err(Stop::NoBackend);
    }
    // SAFETY: a map value of 16 address bytes, valid for the program run.
    Ok(unsafe { ptr::words(&backend.addr) })
}

/// A new flow's binding: the first free (source, port) of its probes, claimed.
/// `hash` is the flow hash the table was read with (the 5-tuple's, unless the VIP
/// hashes sources only: ports are spread by the 5-tuple whatever the VIP does).
/// Not inlined, like the other steps that take a [`NatFlow`]: their keys and
/// entries get stack frames of their own (one frame would pass BPF's 512 bytes).
#[inline(never)]
pub fn claim(
    ctx: &XdpContext,
    sc: &mut Scratch,
    dest: &Dest,
    hash: u32,
) -> Result<NatBinding, Stop> {
    fill_entry(ctx, sc, dest)?;
    let (f, value) = (&sc.flow, &sc.entry);
    let settings = settings().ok_or(Stop::NatPortsExhausted)?;
    let backend = backend_words(f, dest.backend)?;
    let count = if is_v4(f) {
        settings.count_v4
    } else {
        settings.count_v6
    };
    let t = &f.tuple;
    let hash = if dest.vip_flags & VIP_F_HASH_SRC_ONLY != 0 {
        flow_hash_words(
            f.family as u8,
            t.proto as u8,
            &t.src,
            &t.dst,
            t.src_port_be,
            t.dst_port_be,
        )
    } else {
        hash
    };
    for probe in 0..NAT_PROBES {
        let binding = settings.candidate(count, hash, probe);
        let src = source(settings, f.family, binding.source).ok_or(Stop::NatPortsExhausted)?;
        match hold(f, &backend, &src, binding.port, value) {
            Hold::Held => {
                stats::nat(|n| &mut n.claimed);
                return Ok(binding);
            }
            Hold::Taken => stats::nat(|n| &mut n.port_collisions),
        }
    }
    Err(Stop::NatPortsExhausted)
}

/// Checks that a known flow's claim on its port still stands, before its packet is
/// sent with that port: an evicted claim is made again if the port is still free;
/// a port another flow took since stops the packet (`Stop::NatLost`).
#[inline(never)]
pub fn confirm(
    ctx: &XdpContext,
    sc: &mut Scratch,
    dest: &Dest,
    binding: &NatBinding,
) -> Result<(), Stop> {
    let f = &sc.flow;
    let settings = settings().ok_or(Stop::NatLost)?;
    let backend = backend_words(f, dest.backend)?;
    let src = source(settings, f.family, binding.source).ok_or(Stop::NatLost)?;
    let (vip_port, port_be, proto) = (
        f.tuple.dst_port_be,
        binding.port.to_be(),
        f.tuple.proto as u8,
    );
    let found = if is_v4(f) {
        let key = keys::ConnV4::tuple(backend[0], src[0], vip_port, port_be, proto);
        NAT_V4.get_ptr_mut(key.key())
    } else {
        let key = keys::ConnV6::tuple(&backend, &src, vip_port, port_be, proto);
        NAT_V6.get_ptr_mut(key.key())
    };
    // SAFETY: a map value, valid for the program run; only compared here.
    match found.map(|e| (e, same_flow(unsafe { &*e }, f))) {
        Some((entry, true)) => {
            touch(entry, f);
            Ok(())
        }
        Some((_, false)) => Err(Stop::NatLost),
        None => {
            fill_entry(ctx, sc, dest)?;
            match hold(&sc.flow, &backend, &src, binding.port, &sc.entry) {
                Hold::Held => {
                    stats::nat(|n| &mut n.reclaimed);
                    Ok(())
                }
                Hold::Taken => Err(Stop::NatLost),
            }
        }
    }
}

/// Rewrites a client's packet for its backend: destination the backend, source the
/// flow's NAT address and port; MACs from this host to the backend's next hop.
#[inline(never)]
pub fn to_backend(
    ctx: &XdpContext,
    sc: &Scratch,
    backend: &Backend,
    binding: &NatBinding,
) -> Result<(), Stop> {
    let f = &sc.flow;
    let settings = settings().ok_or(Stop::NatLost)?;
    let src = source(settings, f.family, binding.source).ok_or(Stop::NatLost)?;
    let dst = backend_words(f, backend)?;
    rewrite(ctx, f, &src, &dst, Port::Source(binding.port.to_be()))?;
    send_to(ctx, &backend.mac)
}

/// A backend's reply `f` to a NAT address: turned back into the client's flow
/// (source the VIP, destination the client and its port) and sent to the client's
/// MAC. A packet to a NAT address that no flow holds is dropped
/// (`Stop::NatUnknown`).
#[inline(never)]
pub fn to_client(ctx: &XdpContext, sc: &Scratch) -> Result<(), Stop> {
    let f = &sc.flow;
    let entry = reply_entry(f).ok_or(Stop::NatUnknown)?;
    touch(entry, f);
    // SAFETY: a map value, valid for the program run (see `reply_entry`).
    let entry = unsafe { &*entry };
    rewrite(
        ctx,
        f,
        &entry.vip,
        &entry.client,
        Port::Destination(entry.client_port_be),
    )?;
    send_to(ctx, &entry.client_mac)?;
    stats::nat(|n| &mut n.to_client);
    Ok(())
}

/// The NAT entry of a reply's tuple (for an ICMP error, of the quoted packet's,
/// turned around: the same tuple). Read where it lies: an LRU value lives until the
/// program run ends (RCU), and a racing update gives one flow's fields or another's,
/// never a mix the agent or datapath wrote.
#[inline(always)]
fn reply_entry(f: &NatFlow) -> Option<*mut NatEntry> {
    let t = &f.tuple;
    let proto = t.proto as u8;
    if is_v4(f) {
        let key = keys::ConnV4::tuple(t.src[0], t.dst[0], t.src_port_be, t.dst_port_be, proto);
        NAT_V4.get_ptr_mut(key.key())
    } else {
        let key = keys::ConnV6::tuple(&t.src, &t.dst, t.src_port_be, t.dst_port_be, proto);
        NAT_V6.get_ptr_mut(key.key())
    }
}

/// The frame goes back out to `mac`, from this host (the MAC it was sent to).
#[inline(always)]
fn send_to(ctx: &XdpContext, mac: &[u8; 6]) -> Result<(), Stop> {
    let eth: *mut EthHdr = ptr::at(ctx, 0)?;
    // SAFETY: `ptr::at` checked that the Ethernet header is inside the frame.
    unsafe {
        ptr::copy_mac(&raw mut (*eth).src_addr, &raw const (*eth).dst_addr);
        ptr::copy_mac(&raw mut (*eth).dst_addr, mac);
    }
    Ok(())
}

/// An ICMP error (fragmentation needed, packet too big) about a packet this LB
/// sent to a backend, from the backend or a router on the way: translated as if
/// the client's own packet had drawn it. The outer header goes from the VIP to the
/// client (RFC 5508's way: the error comes from the address the client talks to),
/// the quoted packet becomes the client's (client address and port to the VIP),
/// and every checksum is updated by the difference. A NAT address no flow holds:
/// `Stop::NatUnknown`.
///
/// In two steps the caller makes one after the other (their work in one function
/// would pass the stack budget): this one finds the flow, copies its entry into the
/// scratch, rewrites the outer header and MACs; [`icmp_to_client_quoted`] the rest.
#[inline(never)]
pub fn icmp_to_client(ctx: &XdpContext, sc: &mut Scratch) -> Result<(), Stop> {
    let entry = reply_entry(&sc.flow).ok_or(Stop::NatUnknown)?;
    // SAFETY: a map value, valid for the program run (see `reply_entry`); copied.
    sc.entry = unsafe { *entry };
    let (f, entry) = (&sc.flow, &sc.entry);
    sc.delta = translate_outer(ctx, f, (&entry.vip, &entry.client))?.0;
    send_to(ctx, &entry.client_mac)
}

/// The second step of [`icmp_to_client`]: the quoted packet and the ICMP checksum.
#[inline(never)]
pub fn icmp_to_client_quoted(ctx: &XdpContext, sc: &Scratch) -> Result<(), Stop> {
    let (f, entry) = (&sc.flow, &sc.entry);
    let inner = (&entry.client, &entry.vip);
    translate_quoted(
        ctx,
        f,
        inner,
        Port::Source(entry.client_port_be),
        Delta(sc.delta),
    )?;
    stats::nat(|n| &mut n.to_client);
    Ok(())
}

/// An ICMP error about a packet this LB sent to a NAT flow's client (from a router
/// near the client): translated for the flow's backend. The outer header goes from
/// the flow's NAT address to the backend, the quoted packet becomes the backend's
/// (backend to the NAT address and port).
#[inline(never)]
pub fn icmp_to_backend(
    ctx: &XdpContext,
    sc: &Scratch,
    backend: &Backend,
    binding: &NatBinding,
) -> Result<(), Stop> {
    let f = &sc.flow;
    let settings = settings().ok_or(Stop::NatLost)?;
    let nat = source(settings, f.family, binding.source).ok_or(Stop::NatLost)?;
    let b = backend_words(f, backend)?;
    translate_icmp(
        ctx,
        f,
        (&nat, &b),
        (&b, &nat),
        Port::Destination(binding.port.to_be()),
    )?;
    send_to(ctx, &backend.mac)
}

/// Rewrites an ICMP error for the other side of a NAT flow: the outer addresses to
/// `outer` (source, destination), the quoted packet's addresses to `inner` and one of
/// its ports (`Port::Source` is the quoted source port). The quoted packet's old
/// fields are the flow tuple turned around (as `parse` turned it). Updates the
/// outer IPv4 checksum, the quoted IPv4 header's, the quoted TCP or UDP checksum
/// when the quote holds it, and the ICMP checksum (ICMPv6's covers the outer
/// addresses too).
#[inline(always)]
fn translate_icmp(
    ctx: &XdpContext,
    f: &NatFlow,
    outer: (&AddrWords, &AddrWords),
    inner: (&AddrWords, &AddrWords),
    port: Port,
) -> Result<(), Stop> {
    let outer_delta = translate_outer(ctx, f, outer)?;
    translate_quoted(ctx, f, inner, port, outer_delta)
}

/// The outer half of [`translate_icmp`]: the addresses, and the IPv4 header's
/// checksum. Returns the difference, which ICMPv6's checksum also takes.
#[inline(always)]
fn translate_outer(
    ctx: &XdpContext,
    f: &NatFlow,
    outer: (&AddrWords, &AddrWords),
) -> Result<Delta, Stop> {
    let mut outer_delta = Delta(0);
    if is_v4(f) {
        let ip: *mut Ipv4Hdr = ptr::at(ctx, EthHdr::LEN)?;
        // SAFETY: `ptr::at` checked the fixed IPv4 header; unaligned 4-byte accesses.
        unsafe {
            let s = (&raw mut (*ip).src_addr).cast::<u32>();
            let d = (&raw mut (*ip).dst_addr).cast::<u32>();
            outer_delta.word(core::ptr::read_unaligned(s), outer.0[0]);
            outer_delta.word(core::ptr::read_unaligned(d), outer.1[0]);
            core::ptr::write_unaligned(s, outer.0[0]);
            core::ptr::write_unaligned(d, outer.1[0]);
            (*ip).check = outer_delta
                .apply(u16::from_ne_bytes((*ip).check))
                .to_ne_bytes();
        }
    } else {
        let ip: *mut Ipv6Hdr = ptr::at(ctx, EthHdr::LEN)?;
        // SAFETY: `ptr::at` checked the IPv6 header; unaligned 4-byte accesses.
        unsafe {
            let s = (&raw mut (*ip).src_addr).cast::<u32>();
            let d = (&raw mut (*ip).dst_addr).cast::<u32>();
            let mut i = 0;
            while i < 4 {
                outer_delta.word(core::ptr::read_unaligned(s.add(i)), outer.0[i]);
                outer_delta.word(core::ptr::read_unaligned(d.add(i)), outer.1[i]);
                core::ptr::write_unaligned(s.add(i), outer.0[i]);
                core::ptr::write_unaligned(d.add(i), outer.1[i]);
                i += 1;
            }
        }
    }
    Ok(outer_delta)
}

/// The quoted half of [`translate_icmp`]: the quoted packet and the ICMP checksum
/// (`outer_delta`: what [`translate_outer`] changed).
#[inline(always)]
fn translate_quoted(
    ctx: &XdpContext,
    f: &NatFlow,
    inner: (&AddrWords, &AddrWords),
    port: Port,
    outer_delta: Delta,
) -> Result<(), Stop> {
    let t = &f.tuple;
    let v4 = is_v4(f);
    // Bounded for the verifier (see `rewrite`).
    let icmp_offset = (f.l4_offset & 0x7f) as usize;
    let message_end = EthHdr::LEN + f.ip_len as usize;
    // The quoted packet: its source is the tuple's destination and the other way.
    let quoted = icmp_offset + ICMP_HDR_LEN;
    let mut addrs = Delta(0);
    let mut message = Delta(0);
    let quoted_l4 = if v4 {
        let ip: *mut Ipv4Hdr = ptr::at(ctx, quoted)?;
        addrs.word(t.dst[0], inner.0[0]);
        addrs.word(t.src[0], inner.1[0]);
        // SAFETY: `ptr::at` checked the quoted fixed IPv4 header.
        unsafe {
            core::ptr::write_unaligned((&raw mut (*ip).src_addr).cast::<u32>(), inner.0[0]);
            core::ptr::write_unaligned((&raw mut (*ip).dst_addr).cast::<u32>(), inner.1[0]);
            let old = u16::from_ne_bytes((*ip).check);
            let new = addrs.apply(old);
            (*ip).check = new.to_ne_bytes();
            message.0 = addrs.0;
            message.half(old, new);
            // `parse` checked the header length (20 to 60 bytes).
            quoted + (((*ip).vihl & 0x0f) as usize) * 4
        }
    } else {
        let ip: *mut Ipv6Hdr = ptr::at(ctx, quoted)?;
        let mut i = 0;
        while i < 4 {
            addrs.word(t.dst[i], inner.0[i]);
            addrs.word(t.src[i], inner.1[i]);
            i += 1;
        }
        // SAFETY: `ptr::at` checked the quoted IPv6 header.
        unsafe {
            let s = (&raw mut (*ip).src_addr).cast::<u32>();
            let d = (&raw mut (*ip).dst_addr).cast::<u32>();
            let mut i = 0;
            while i < 4 {
                core::ptr::write_unaligned(s.add(i), inner.0[i]);
                core::ptr::write_unaligned(d.add(i), inner.1[i]);
                i += 1;
            }
        }
        message.0 = addrs.0;
        quoted + Ipv6Hdr::LEN
    };
    let (port_offset, old_port, new_port) = match port {
        Port::Source(new) => (0, t.dst_port_be, new),
        Port::Destination(new) => (2, t.src_port_be, new),
    };
    let ports: *mut [u8; 4] = ptr::at(ctx, quoted_l4)?;
    // SAFETY: `ptr::at` checked the quoted ports.
    unsafe {
        core::ptr::write_unaligned((ports as *mut u8).add(port_offset).cast::<u16>(), new_port)
    };
    message.half(old_port, new_port);
    let mut l4 = addrs;
    l4.half(old_port, new_port);
    // The quoted transport checksum, when the quote goes that far.
    let check_at = quoted_l4
        + if t.proto == u32::from(PROTO_TCP) {
            TCP_CHECK
        } else {
            UDP_CHECK
        };
    if check_at + 2 <= message_end
        && let Ok(c) = ptr::at::<[u8; 2]>(ctx, check_at)
    {
        // SAFETY: `ptr::at` checked the two bytes.
        unsafe {
            let old = u16::from_ne_bytes(*c);
            if old != 0 || t.proto == u32::from(PROTO_TCP) {
                let mut new = l4.apply(old);
                if new == 0 && t.proto != u32::from(PROTO_TCP) {
                    new = 0xffff;
                }
                *c = new.to_ne_bytes();
                message.half(old, new);
            }
        }
    }
    if !v4 {
        // ICMPv6's checksum covers a pseudo header with the outer addresses.
        message.0 += outer_delta.0;
    }
    let icmp: *mut [u8; 4] = ptr::at(ctx, icmp_offset)?;
    // SAFETY: `ptr::at` checked the ICMP header's first four bytes.
    unsafe {
        let c = (icmp as *mut u8).add(2).cast::<u16>();
        core::ptr::write_unaligned(c, message.apply(core::ptr::read_unaligned(c)));
    }
    Ok(())
}

/// Which transport port a rewrite changes, and its new value (network order).
#[derive(Clone, Copy)]
enum Port {
    Source(u16),
    Destination(u16),
}

/// A one's-complement difference (RFC 1624 eqn. 3) gathered over the changed words,
/// applied to each checksum that covers them. Words are read as the packet's bytes
/// load natively, like the checksum field itself.
struct Delta(u64);

impl Delta {
    #[inline(always)]
    fn word(&mut self, old: u32, new: u32) {
        self.0 += u64::from(!old) + u64::from(new);
    }

    #[inline(always)]
    fn half(&mut self, old: u16, new: u16) {
        self.0 += u64::from(!old) + u64::from(new);
    }

    /// `check` updated by the difference.
    #[inline(always)]
    fn apply(&self, check: u16) -> u16 {
        let mut sum = u64::from(!check) + self.0;
        sum = (sum & 0xffff_ffff) + (sum >> 32);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        !(sum as u16)
    }
}

/// Writes new source and destination addresses and one port over the packet of
/// `f`, and updates the IPv4 header checksum and the TCP or UDP checksum by the
/// difference.
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    f: &NatFlow,
    src: &AddrWords,
    dst: &AddrWords,
    port: Port,
) -> Result<(), Stop> {
    let t = &f.tuple;
    let mut addrs = Delta(0);
    if is_v4(f) {
        let ip: *mut Ipv4Hdr = ptr::at(ctx, EthHdr::LEN)?;
        addrs.word(t.src[0], src[0]);
        addrs.word(t.dst[0], dst[0]);
        // SAFETY: `ptr::at` checked the fixed IPv4 header; the address writes are
        // unaligned 4-byte writes inside it.
        unsafe {
            core::ptr::write_unaligned((&raw mut (*ip).src_addr).cast::<u32>(), src[0]);
            core::ptr::write_unaligned((&raw mut (*ip).dst_addr).cast::<u32>(), dst[0]);
            let check = u16::from_ne_bytes((*ip).check);
            (*ip).check = addrs.apply(check).to_ne_bytes();
        }
    } else {
        let ip: *mut Ipv6Hdr = ptr::at(ctx, EthHdr::LEN)?;
        let mut i = 0;
        while i < 4 {
            addrs.word(t.src[i], src[i]);
            addrs.word(t.dst[i], dst[i]);
            i += 1;
        }
        // SAFETY: `ptr::at` checked the IPv6 header; each write is an unaligned
        // 4-byte write inside its address.
        unsafe {
            let s = (&raw mut (*ip).src_addr).cast::<u32>();
            let d = (&raw mut (*ip).dst_addr).cast::<u32>();
            let mut i = 0;
            while i < 4 {
                core::ptr::write_unaligned(s.add(i), src[i]);
                core::ptr::write_unaligned(d.add(i), dst[i]);
                i += 1;
            }
        }
    }
    let mut l4 = addrs;
    let (port_offset, old_port, new_port) = match port {
        Port::Source(new) => (0, t.src_port_be, new),
        Port::Destination(new) => (2, t.dst_port_be, new),
    };
    l4.half(old_port, new_port);
    // Bounded for the verifier, which must know how far into the frame the
    // pointer may go: `parse` puts the transport header at most 14 + 60 bytes in.
    let l4_offset = (f.l4_offset & 0x7f) as usize;
    if t.proto == u32::from(PROTO_TCP) {
        let tcp: *mut [u8; TCP_CHECK + 2] = ptr::at(ctx, l4_offset)?;
        // SAFETY: `ptr::at` checked the 18 bytes written here (ports and checksum).
        unsafe {
            let p = (tcp as *mut u8).add(port_offset).cast::<u16>();
            core::ptr::write_unaligned(p, new_port);
            let c = (tcp as *mut u8).add(TCP_CHECK).cast::<u16>();
            core::ptr::write_unaligned(c, l4.apply(core::ptr::read_unaligned(c)));
        }
    } else {
        let udp: *mut [u8; UDP_CHECK + 2] = ptr::at(ctx, l4_offset)?;
        // SAFETY: `ptr::at` checked the UDP header written here.
        unsafe {
            let p = (udp as *mut u8).add(port_offset).cast::<u16>();
            core::ptr::write_unaligned(p, new_port);
            let c = (udp as *mut u8).add(UDP_CHECK).cast::<u16>();
            let check = core::ptr::read_unaligned(c);
            // UDP without a checksum keeps none (IPv4, and IPv6 tunnels as RFC 6935
            // allows); a computed 0 is sent as 0xffff (RFC 768), the same value in
            // one's complement.
            if check != 0 {
                let new = l4.apply(check);
                core::ptr::write_unaligned(c, if new == 0 { 0xffff } else { new });
            }
        }
    }
    Ok(())
}

// The scratch map's value (`maps::NAT_SCRATCH`) holds a `Scratch`, whose flow is the six
// words `scratch` writes.
const _: () =
    assert!(core::mem::size_of::<Scratch>() <= 14 * 8 && core::mem::size_of::<NatFlow>() == 6 * 8);
