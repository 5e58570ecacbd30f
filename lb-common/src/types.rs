//! Keys and values of the datapath's maps. Every struct is `#[repr(C)]` with its
//! padding spelled out, so the kernel and the agent see the same bytes.
//!
//! Addresses are stored as 16 bytes in network order; an IPv4 address fills the first
//! four and leaves the rest zero. Ports are stored in network byte order (`*_be`).

/// Address family tag stored in keys.
pub const FAMILY_V4: u8 = 4;
/// Address family tag stored in keys.
pub const FAMILY_V6: u8 = 6;

/// IP protocol numbers the datapath balances.
pub const PROTO_TCP: u8 = 6;
/// IP protocol numbers the datapath balances.
pub const PROTO_UDP: u8 = 17;
/// ICMP for IPv4: echo to a VIP address, and errors about VIP flows.
pub const PROTO_ICMP: u8 = 1;
/// ICMP for IPv6.
pub const PROTO_ICMPV6: u8 = 58;
/// IPv4-in-IP encapsulation (outer protocol / next header).
pub const PROTO_IPIP: u8 = 4;
/// IPv6-in-IP encapsulation (outer protocol / next header).
pub const PROTO_IPV6: u8 = 41;

/// Key of the `VIPS` map: the virtual service a packet is addressed to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VipKey {
    /// Destination address, network order.
    pub addr: [u8; 16],
    /// Destination port, network byte order.
    pub port_be: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
}

/// [`VipMeta::flags`]: hash only the source address, so that every flow of one client
/// reaches the same backend (client stickiness). Default is the 5-tuple.
pub const VIP_F_HASH_SRC_ONLY: u32 = 1 << 0;
/// [`VipMeta::flags`]: forward by IP-in-IP encapsulation to the backend's address
/// (IPIP or IPv6-in-IPv6 by family) instead of L2 direct server return.
pub const VIP_F_ENCAP: u32 = 1 << 1;
/// [`VipMeta::flags`]: this entry only says "answer ICMP echo for this address". Its
/// key has port 0 and protocol [`PROTO_ICMP`] or [`PROTO_ICMPV6`]; it has no table.
pub const VIP_F_ECHO: u32 = 1 << 2;

/// Value of the `VIPS` map: where the VIP's lookup table lives and how to use it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipMeta {
    /// Index of this VIP's tables in `RINGS` and of its counters in `VIP_STATS`.
    pub vip_id: u32,
    /// Slots in the lookup table (a prime ≤ [`crate::maps::MAX_RING_SIZE`]).
    pub ring_size: u32,
    /// Which of the two table copies the datapath reads (0 or 1).
    pub active: u32,
    /// `VIP_F_*` bits.
    pub flags: u32,
}

/// Value of the `BACKENDS` array, indexed by backend id. The datapath reads the
/// address, MAC and family; the rest is the agent's own record, kept in the pinned
/// map so that a restarted agent finds the weights and operator overrides in force.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    /// Backend address, network order.
    pub addr: [u8; 16],
    /// Destination MAC of frames sent to this backend: its own MAC in L2 DSR mode,
    /// the next hop's MAC towards its address in encapsulation mode.
    pub mac: [u8; 6],
    /// [`FAMILY_V4`] or [`FAMILY_V6`]; 0 marks an unused id.
    pub family: u8,
    /// `BACKEND_F_*` bits (agent only).
    pub flags: u8,
    /// Id of the VIP this backend serves (agent only).
    pub vip_id: u32,
    /// Weight in force (agent only; the lookup table is what the datapath uses).
    pub weight: u32,
}

/// [`Backend::flags`]: the operator pinned the weight (it survives reloads).
pub const BACKEND_F_PINNED: u8 = 1 << 0;
/// [`Backend::flags`]: the operator set the weight until the next reload.
pub const BACKEND_F_SET: u8 = 1 << 1;
/// [`Backend::flags`]: the operator drained the backend.
pub const BACKEND_F_DRAINED: u8 = 1 << 2;

/// Key of the `CONNS` connection table: one flow as the client sent it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct FlowKey {
    /// Client address, network order.
    pub src: [u8; 16],
    /// VIP address, network order.
    pub dst: [u8; 16],
    /// Client port, network byte order.
    pub src_port_be: u16,
    /// VIP port, network byte order.
    pub dst_port_be: u16,
    /// IP protocol.
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Reserved, zero (the whole key is hashed by the kernel, so padding must be set).
    pub _pad: [u8; 2],
}

/// Value of the `CONNS` connection table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnEntry {
    /// Backend id the flow was given when it was first seen.
    pub backend_id: u32,
    /// VIP id of the flow (to account established packets to their VIP).
    pub vip_id: u32,
}

/// Datapath-wide settings, the one entry of the `SETTINGS` array. Written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Settings {
    /// Outer IPv4 source of encapsulated packets: the first two bytes are kept, the
    /// last two are taken from the flow hash, so a router's ECMP hash over the outer
    /// header spreads flows (a /16 is reserved for it).
    pub encap_src_v4: [u8; 4],
    /// Outer IPv6 source: the first 12 bytes are kept, the last 4 come from the flow
    /// hash (a /96).
    pub encap_src_v6: [u8; 16],
}

/// Datapath-wide counters, one per reason, in the per-CPU `STATS` array (index 0).
/// A failed counter lookup is skipped: counting never changes a verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GlobalStats {
    /// Every frame the program saw.
    pub rx_frames: u64,
    /// Passed: not IPv4 or IPv6 (ARP, LLDP, ...).
    pub pass_not_ip: u64,
    /// Passed: IP, but not TCP or UDP to a configured VIP.
    pub pass_not_vip: u64,
    /// Passed: an IPv4 fragment (ports unknown; the datapath never balances fragments).
    pub pass_fragment: u64,
    /// Seen: a VIP packet whose IPv4 header carries options. It is balanced like any
    /// other (the transport header is found from the header length); counted only.
    pub ipv4_options: u64,
    /// Passed: frame cut short before the headers the decision needs.
    pub pass_truncated: u64,
    /// Passed: an IP header that contradicts itself (version, header length).
    pub pass_malformed: u64,
    /// Passed: IPv6 with an extension header before the transport header.
    pub pass_ipv6_extension: u64,
    /// Dropped: a VIP packet whose lookup table slot names no usable backend.
    pub drop_no_backend: u64,
    /// Connection table: the flow was known.
    pub conn_hit: u64,
    /// New flows: TCP SYNs (which always take the lookup table, like Katran, so a
    /// reused client port follows the current weights) and UDP flows not in the table.
    pub conn_miss_syn: u64,
    /// Connection table: unknown TCP flow without SYN: a flow that may break.
    pub conn_miss_non_syn: u64,
    /// Connection table insert failed (the flow is still forwarded by its hash).
    pub conn_insert_failed: u64,
    /// Sent back out by `XDP_TX` towards a backend.
    pub tx: u64,
    /// Of those, encapsulated.
    pub tx_encap: u64,
    /// ICMP echo requests to a VIP address answered by the datapath itself.
    pub icmp_echo_reply: u64,
    /// ICMP "fragmentation needed" / ICMPv6 "packet too big" about a VIP flow,
    /// forwarded to that flow's backend.
    pub icmp_error_forwarded: u64,
    /// Passed: ICMP that is neither echo to a VIP nor an error about a VIP flow.
    pub pass_icmp_other: u64,
    /// Dropped: encapsulation could not grow the frame (no headroom).
    pub drop_encap_failed: u64,
}

/// Per-VIP counters, per-CPU array `VIP_STATS` indexed by vip id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// Per-backend counters, per-CPU array `BACKEND_STATS` indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is `#[repr(C)]`, `Copy`, made only of integers and byte
    // arrays, with no implicit padding (checked by the size tests below).
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipMeta {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::ConnEntry {}
    unsafe impl aya::Pod for super::GlobalStats {}
    unsafe impl aya::Pod for super::VipStats {}
    unsafe impl aya::Pod for super::BackendStats {}
    unsafe impl aya::Pod for super::Settings {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    /// Sizes equal the sum of the fields: no implicit padding anywhere, so the
    /// kernel never hashes uninitialised bytes of a key.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<VipKey>(), 16 + 2 + 1 + 1);
        assert_eq!(size_of::<VipMeta>(), 16);
        assert_eq!(size_of::<Backend>(), 16 + 6 + 1 + 1 + 4 + 4);
        assert_eq!(size_of::<FlowKey>(), 16 + 16 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(size_of::<ConnEntry>(), 8);
        assert_eq!(size_of::<GlobalStats>(), 19 * 8);
        assert_eq!(size_of::<Settings>(), 20);
    }
}
