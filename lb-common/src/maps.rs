//! Names and capacities of the BPF maps. The datapath declares its maps with these
//! sizes and the agent opens them by these names, so the two never drift apart.

/// Most VIPs one datapath serves: the bound of VIP ids, of `VIP_IDS` and of
/// `VIP_STATS`. How many VIPs the lookup tables have room for is configured below
/// that (`[datapath] max_vips`, default [`DEFAULT_MAX_VIPS`]).
pub const MAX_VIPS: u32 = 64;
/// Default VIPs the lookup tables (`RINGS`) have room for: 8 × 256 KiB = 2 MiB.
pub const DEFAULT_MAX_VIPS: u32 = 8;
/// Most backends over all VIPs. Backend ids index the backend array directly.
pub const MAX_BACKENDS: u32 = 4096;
/// Largest lookup table per VIP, in slots. Also the default size; it is prime, as
/// Maglev requires, so every backend's permutation visits every slot.
pub const MAX_RING_SIZE: u32 = 65537;
/// Default lookup table size.
pub const DEFAULT_RING_SIZE: u32 = MAX_RING_SIZE;
/// Each VIP owns two table copies: the datapath reads the active one while the agent
/// writes the other, then flips [`crate::types::VipMeta::active`].
pub const RING_COPIES: u32 = 2;
/// Slots in one `RINGS` element ([`crate::types::RingChunk`]): a slot is a 16-bit
/// backend id (ids stay below [`MAX_BACKENDS`]), and the kernel stores array
/// elements at an 8-byte stride, so four slots fill one element. A VIP's two copies
/// cost 2 × 65,537 × 2 bytes = 256 KiB.
pub const RING_CHUNK: u32 = 4;

/// Elements of `RINGS` for lookup tables of `max_vips` VIPs.
pub const fn rings_entries(max_vips: u32) -> u32 {
    (max_vips * RING_COPIES * MAX_RING_SIZE).div_ceil(RING_CHUNK)
}

/// VIPs whose two table copies fit in a `RINGS` of `entries` elements (the inverse
/// of [`rings_entries`]).
pub const fn rings_vips(entries: u32) -> u32 {
    (entries as u64 * RING_CHUNK as u64 / (RING_COPIES * MAX_RING_SIZE) as u64) as u32
}

/// Default entries of the IPv4 connection table (an LRU hash: the least recently
/// used flow is evicted when it is full; `[datapath] connection_table_v4` sets
/// another size). The kernel preallocates LRU maps; memory as it accounts it
/// (`lb status`, "maps"; `cargo xtask test -- --test datapath maps_memory
/// --nocapture`, 2 CPUs): 88 bytes per entry, 11 MiB at this size. An evicted
/// flow's next packet takes the lookup table again, which sends it to the same
/// backend unless its slot moved since (docs/CONFIG.md, "Table sizes").
pub const CONN_TABLE_SIZE_V4: u32 = 1 << 17;
/// Default entries of the IPv6 connection table (112 bytes per entry, 1.75 MiB).
pub const CONN_TABLE_SIZE_V6: u32 = 1 << 14;
/// Entries in the IPv4 young table (an LRU hash like the connection table, 1.4 MiB
/// measured as above): a flow's first packet's choice of backend waits there
/// until the client's second packet shows the flow is real (for TCP, that the
/// handshake completed), and only then enters `CONNS_V4` (see
/// `lb-ebpf/src/conntrack.rs`). A flood of spoofed SYNs churns this table, never the
/// connection table. Its size only bounds how many handshakes can be in flight
/// before a flood pushes them out, and one pushed out still completes when the
/// lookup table has not moved in its round trip.
pub const YOUNG_TABLE_SIZE_V4: u32 = 1 << 14;
/// Entries in the IPv6 young table (0.4 MiB, measured as above).
pub const YOUNG_TABLE_SIZE_V6: u32 = 1 << 12;
/// Default entries of the IPv4 NAT table `NAT_V4` (an LRU hash, one entry per
/// full-NAT flow: the reply's tuple → the client's flow; `[datapath] nat_table_v4`).
/// 136 bytes per entry as the kernel accounts it (2 CPUs; `cargo xtask test --
/// --test datapath connection_tables_are_sized --nocapture`), 8.5 MiB at this size;
/// 256 entries ([`NAT_TABLE_UNUSED`]) when no VIP forwards by `nat`.
pub const NAT_TABLE_SIZE_V4: u32 = 1 << 16;
/// Default entries of the IPv6 NAT table `NAT_V6` (`[datapath] nat_table_v6`).
pub const NAT_TABLE_SIZE_V6: u32 = 1 << 13;
/// Entries of each NAT table of a datapath created for a configuration in which no
/// VIP forwards by `nat`: the tables then cost next to nothing (a VIP with
/// `forwarding = "nat"` added later by reload is refused; see docs/CONFIG.md).
pub const NAT_TABLE_UNUSED: u32 = 256;
/// Most source addresses of one family full NAT uses (`[nat] source_v4` and
/// `source_v6` are prefixes of at most this many addresses): an index fits the 6
/// bits [`crate::types::CONN_NAT_MASK`] keeps for it.
pub const MAX_NAT_SOURCES: u32 = 64;
/// Ports a new full-NAT flow tries before it is refused (`ports_exhausted`): one
/// from its hash, then the next ones.
pub const NAT_PROBES: u32 = 8;
/// log2 of [`VIP_FILTER_SLOTS`].
pub const VIP_FILTER_BITS: u32 = 12;
/// Slots of the `VIP_FILTER` array (see [`crate::hash::vip_filter_slot`]): with at
/// most 2 × [`MAX_VIPS`] keys (each VIP and its echo entry), at most 3% of slots are
/// set, so nearly every packet for no VIP stops after one array read.
pub const VIP_FILTER_SLOTS: u32 = 1 << VIP_FILTER_BITS;

/// Slot where copy `copy` of VIP `vip_id`'s table starts, counted in slots (element
/// `slot / RING_CHUNK` of `RINGS`, lane `slot % RING_CHUNK`).
#[inline(always)]
pub const fn ring_base(vip_id: u32, copy: u32) -> u32 {
    (vip_id * RING_COPIES + copy) * MAX_RING_SIZE
}

/// The target the datapath's records (aya-log, see `lb-ebpf/src/events.rs`) carry
/// in the agent's log. Their ring buffer is aya-log's own map, `AYA_LOGS`, and is
/// never pinned: every agent reads the one of the program it loaded.
pub const LOG_TARGET: &str = "lb::datapath";

/// Bytes of the `SHARED_FLOWS` ring buffer (a power of two): 2 MiB hold 32,768
/// records of 64 bytes (a [`crate::types::SharedFlow`] and the ring's 8-byte
/// header), 1.6 s of new flows at 20,000 per second for an agent that stalls.
pub const SHARED_FLOWS_BYTES: u32 = 1 << 21;

/// The one-byte global in the program's read-only data that turns flow sharing on
/// (non-zero). The agent sets it when it loads the program; the verifier, which sees
/// it as a constant, removes the reporting code when it is zero.
pub const SHARE_FLOWS_GLOBAL: &str = "SHARE_FLOWS";

/// The one-byte global in the program's read-only data that turns the flood guard
/// on (non-zero, the default): new flows wait in the young tables until their
/// second packet. Zero writes every new flow straight into the connection table, as
/// before the guard existed (`lb run --no-flood-guard`, and the `without` half of
/// `cargo xtask bench flood`); the verifier then removes the young tables' code.
pub const FLOOD_GUARD_GLOBAL: &str = "FLOOD_GUARD";

/// Map names, as declared in `lb-ebpf/src/maps.rs`.
pub mod names {
    pub const VIPS: &str = "VIPS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const RINGS: &str = "RINGS";
    pub const VIP_FILTER: &str = "VIP_FILTER";
    pub const VIP_IDS: &str = "VIP_IDS";
    pub const CONNS_V4: &str = "CONNS_V4";
    pub const CONNS_V6: &str = "CONNS_V6";
    pub const YOUNG_V4: &str = "YOUNG_V4";
    pub const YOUNG_V6: &str = "YOUNG_V6";
    pub const GUARD_STATS: &str = "GUARD_STATS";
    pub const STATS: &str = "STATS";
    pub const VIP_STATS: &str = "VIP_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const SETTINGS: &str = "SETTINGS";
    pub const NAT_V4: &str = "NAT_V4";
    pub const NAT_V6: &str = "NAT_V6";
    pub const NAT_SETTINGS: &str = "NAT_SETTINGS";
    pub const NAT_STATS: &str = "NAT_STATS";
    /// The new connection entries the datapath reports for flow sharing (a ring
    /// buffer). Never pinned: each agent reads the ring of the program it loaded.
    pub const SHARED_FLOWS: &str = "SHARED_FLOWS";
    /// Flow sharing's counters. Not pinned either: they start at zero with each
    /// loaded program.
    pub const SHARE_STATS: &str = "SHARE_STATS";
    /// Every map that is pinned (all but [`SHARED_FLOWS`] and [`SHARE_STATS`]).
    pub const ALL: [&str; 18] = [
        VIPS,
        VIP_FILTER,
        VIP_IDS,
        BACKENDS,
        RINGS,
        CONNS_V4,
        CONNS_V6,
        YOUNG_V4,
        YOUNG_V6,
        GUARD_STATS,
        STATS,
        VIP_STATS,
        BACKEND_STATS,
        SETTINGS,
        NAT_V4,
        NAT_V6,
        NAT_SETTINGS,
        NAT_STATS,
    ];
}

/// Program names, as declared in `lb-ebpf/src/main.rs`.
pub mod programs {
    /// The load balancer.
    pub const BALANCER: &str = "lb_xdp";
    /// Returns `XDP_PASS` for every frame. Attached to the peer of a veth so that
    /// frames the balancer sends with `XDP_TX` are received there, and used as the
    /// floor in `cargo xtask bench datapath`.
    pub const PASS: &str = "lb_pass";
    /// Bench references, never attached: each does one operation on the IPv4
    /// connection table with [`REFERENCE_KEY`] and nothing else, so that `cargo xtask
    /// bench datapath` can show what the table alone costs on the paths it measures.
    /// `lb_ref_conn_insert` writes the entry (as a SYN does) and returns `XDP_PASS`,
    /// or `XDP_DROP` if the write failed; `lb_ref_conn_lookup` returns `XDP_PASS` if
    /// it found the entry (as an established packet does), `XDP_DROP` if not.
    pub const REF_CONN_INSERT: &str = "lb_ref_conn_insert";
    pub const REF_CONN_LOOKUP: &str = "lb_ref_conn_lookup";
    /// Bench reference: an established packet's path with only what forwarding
    /// needs (parse, VIP filter, connection lookup, backend, MAC rewrite), no VIP
    /// check by id and no counters; `XDP_TX` when it forwarded, else `XDP_PASS`.
    pub const REF_FORWARD_ONLY: &str = "lb_ref_forward_only";

    /// The flow the reference programs write and read: 198.18.200.1:40000 →
    /// 198.18.200.2:80, TCP (addresses as the datapath loads them, see
    /// [`crate::types::AddrWords`]).
    pub const REFERENCE_KEY: crate::types::ConnKeyV4 = crate::types::ConnKeyV4 {
        src: u32::from_ne_bytes([198, 18, 200, 1]),
        dst: u32::from_ne_bytes([198, 18, 200, 2]),
        src_port_be: 40000u16.to_be(),
        dst_port_be: 80u16.to_be(),
        proto: 6,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_entries_and_vips_are_inverse() {
        for vips in 1..=MAX_VIPS {
            assert_eq!(rings_vips(rings_entries(vips)), vips);
            // The room holds every slot of every VIP's two copies.
            assert!(rings_entries(vips) * RING_CHUNK >= vips * RING_COPIES * MAX_RING_SIZE);
        }
        assert_eq!(rings_entries(DEFAULT_MAX_VIPS), 262_148);
    }
}
