//! Names and capacities of the BPF maps. The datapath declares its maps with these
//! sizes and the agent opens them by these names, so the two never drift apart.

/// Most VIPs one datapath serves.
pub const MAX_VIPS: u32 = 64;
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
/// Entries in the connection table (an LRU hash: the least recently used flow is
/// evicted when it is full).
pub const CONN_TABLE_SIZE: u32 = 1 << 20;

/// Slot in the `RINGS` array where copy `copy` of VIP `vip_id`'s table starts.
#[inline(always)]
pub const fn ring_base(vip_id: u32, copy: u32) -> u32 {
    (vip_id * RING_COPIES + copy) * MAX_RING_SIZE
}

/// Map names, as declared in `lb-ebpf/src/maps.rs`.
pub mod names {
    pub const VIPS: &str = "VIPS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const RINGS: &str = "RINGS";
    pub const CONNS: &str = "CONNS";
    pub const STATS: &str = "STATS";
    pub const VIP_STATS: &str = "VIP_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const SETTINGS: &str = "SETTINGS";
    /// Every map, for pinning.
    pub const ALL: [&str; 8] = [
        VIPS,
        BACKENDS,
        RINGS,
        CONNS,
        STATS,
        VIP_STATS,
        BACKEND_STATS,
        SETTINGS,
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
}
