//! Every map of the datapath, with what it holds and who writes it. Names and sizes
//! come from `lb_common::maps`; layouts from `lb_common::types`.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_COMMON_LRU, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    maps::{
        CONN_TABLE_SIZE_V4, CONN_TABLE_SIZE_V6, DEFAULT_MAX_VIPS, MAX_BACKENDS, MAX_VIPS,
        NAT_TABLE_SIZE_V4, NAT_TABLE_SIZE_V6, SHARED_FLOWS_BYTES, VIP_FILTER_SLOTS,
        YOUNG_TABLE_SIZE_V4, YOUNG_TABLE_SIZE_V6, rings_entries,
    },
    types::{
        Backend, BackendStats, ConnEntry, ConnKeyV4, ConnKeyV6, GlobalStats, GuardStats, NatEntry,
        NatSettings, NatStats, RingChunk, Settings, ShareStats, VipIdEntry, VipKey, VipMeta,
        VipStats,
    },
};

/// VIP (address, port, protocol) → its id, table geometry and flags. Written by the
/// agent. Not preallocated, so a replaced value is freed only after readers are done
/// (RCU), and the datapath never reads a half-written `VipMeta`.
#[map(name = "VIPS")]
pub static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(MAX_VIPS, BPF_F_NO_PREALLOC);

/// Non-zero at [`lb_common::hash::vip_filter_slot`] of every key in `VIPS`: a zero
/// proves a packet is for no VIP before the hash lookup. Written by the agent, set
/// before a key enters `VIPS` and cleared after it leaves.
#[map(name = "VIP_FILTER")]
pub static VIP_FILTER: Array<u32> = Array::with_max_entries(VIP_FILTER_SLOTS, 0);

/// VIP id → its (address, port, protocol) and flags, so that an established flow
/// finds its VIP by the id in its connection entry without a hash lookup. Written by
/// the agent before the VIP enters `VIPS`, cleared after it leaves.
#[map(name = "VIP_IDS")]
pub static VIP_IDS: Array<VipIdEntry> = Array::with_max_entries(MAX_VIPS, 0);

/// Backend id → address and next-hop MAC. Written by the agent; an all-zero entry
/// (`family == 0`) is an unused id.
#[map(name = "BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// The lookup tables: two copies per VIP of `MAX_RING_SIZE` 16-bit backend ids
/// each, four to an element (see `lb_common::maps::ring_base` and `RING_CHUNK`).
/// Sized for `[datapath] max_vips` VIPs when the agent creates it (the default
/// below). Written by the agent into the inactive copy, through a shared memory
/// mapping (`BPF_F_MMAPABLE`): no syscall per slot.
#[map(name = "RINGS")]
pub static RINGS: Array<RingChunk> =
    Array::with_max_entries(rings_entries(DEFAULT_MAX_VIPS), BPF_F_MMAPABLE);

/// Connection tables, IPv4 and IPv6: flow → backend. Written by the datapath on a
/// flow's first packet; read on every later one. Shared by all CPUs (a flow is found
/// whichever CPU its packets land on), with per-CPU LRU lists to keep eviction
/// lock-free.
#[map(name = "CONNS_V4")]
pub static CONNS_V4: LruHashMap<ConnKeyV4, ConnEntry> =
    LruHashMap::with_max_entries(CONN_TABLE_SIZE_V4, BPF_F_NO_COMMON_LRU);

#[map(name = "CONNS_V6")]
pub static CONNS_V6: LruHashMap<ConnKeyV6, ConnEntry> =
    LruHashMap::with_max_entries(CONN_TABLE_SIZE_V6, BPF_F_NO_COMMON_LRU);

/// Young tables, IPv4 and IPv6: a new flow's backend until the client's second
/// packet moves it into `CONNS_V4`/`CONNS_V6` (the flood guard, see
/// `crate::conntrack`). Written by the datapath; same layout and LRU as the
/// connection tables, an eighth or less of their size.
#[map(name = "YOUNG_V4")]
pub static YOUNG_V4: LruHashMap<ConnKeyV4, ConnEntry> =
    LruHashMap::with_max_entries(YOUNG_TABLE_SIZE_V4, BPF_F_NO_COMMON_LRU);

#[map(name = "YOUNG_V6")]
pub static YOUNG_V6: LruHashMap<ConnKeyV6, ConnEntry> =
    LruHashMap::with_max_entries(YOUNG_TABLE_SIZE_V6, BPF_F_NO_COMMON_LRU);

/// The flood guard's counters (index 0), per CPU. Written by the datapath.
#[map(name = "GUARD_STATS")]
pub static GUARD_STATS: PerCpuArray<GuardStats> = PerCpuArray::with_max_entries(1, 0);

/// Datapath-wide counters (index 0), per CPU. Written by the datapath.
#[map(name = "STATS")]
pub static STATS: PerCpuArray<GlobalStats> = PerCpuArray::with_max_entries(1, 0);

/// Per-VIP counters indexed by vip id, per CPU. Written by the datapath.
#[map(name = "VIP_STATS")]
pub static VIP_STATS: PerCpuArray<VipStats> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

/// Per-backend counters indexed by backend id, per CPU. Written by the datapath.
#[map(name = "BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<BackendStats> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Datapath-wide settings (index 0): the encapsulation source prefixes. Written by
/// the agent.
#[map(name = "SETTINGS")]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Full NAT's tables, IPv4 and IPv6: a reply's tuple as it arrives from the backend
/// (backend address and port → NAT source address and port) → the client's flow.
/// Written by the datapath when a new NAT flow claims its port (`BPF_NOEXIST`: an
/// entry is the claim); read by every reply, and by the client's packets to check
/// that their claim still stands (see `crate::nat`). LRU like the connection tables.
#[map(name = "NAT_V4")]
pub static NAT_V4: LruHashMap<ConnKeyV4, NatEntry> =
    LruHashMap::with_max_entries(NAT_TABLE_SIZE_V4, BPF_F_NO_COMMON_LRU);

#[map(name = "NAT_V6")]
pub static NAT_V6: LruHashMap<ConnKeyV6, NatEntry> =
    LruHashMap::with_max_entries(NAT_TABLE_SIZE_V6, BPF_F_NO_COMMON_LRU);

/// Full NAT's source addresses and ports (index 0). Written by the agent.
#[map(name = "NAT_SETTINGS")]
pub static NAT_SETTINGS: Array<NatSettings> = Array::with_max_entries(1, 0);

/// Full NAT's scratch (index 0), per CPU: the packet's flow and the entry being
/// written, handed to NAT's out-of-line steps as map memory rather than stack
/// (`crate::nat::Scratch`). Not pinned: nothing in it outlives a packet.
#[map(name = "NAT_SCRATCH")]
pub static NAT_SCRATCH: PerCpuArray<[u64; 14]> = PerCpuArray::with_max_entries(1, 0);

/// Full NAT's counters (index 0), per CPU. Written by the datapath.
#[map(name = "NAT_STATS")]
pub static NAT_STATS: PerCpuArray<NatStats> = PerCpuArray::with_max_entries(1, 0);

/// New connection entries for flow sharing (`lb_common::types::SharedFlow`), written
/// by the datapath when sharing is on, read by the agent. A full ring refuses the
/// record at once (counted in `SHARE_STATS`): the datapath never waits on the agent.
#[map(name = "SHARED_FLOWS")]
pub static SHARED_FLOWS: RingBuf = RingBuf::with_byte_size(SHARED_FLOWS_BYTES, 0);

/// Flow sharing's counters (index 0), per CPU. Written by the datapath.
#[map(name = "SHARE_STATS")]
pub static SHARE_STATS: PerCpuArray<ShareStats> = PerCpuArray::with_max_entries(1, 0);
