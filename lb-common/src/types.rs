//! Keys and values of the datapath's maps. Every struct is `#[repr(C)]` with its
//! padding spelled out, so the kernel and the agent see the same bytes.
//!
//! Addresses in the agent's types are 16 bytes in network order; an IPv4 address
//! fills the first four and leaves the rest zero. Keys the datapath builds for every
//! packet hold addresses as 32-bit words instead ([`AddrWords`]): the BPF backend
//! loads and compares a word in one instruction, a byte array one byte at a time.
//! Ports are stored in network byte order (`*_be`).

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

/// [`VipMeta::flags`]: full NAT. A client's packets go to the backend with the
/// backend's address as destination and an LB address and port (`[nat]`) as
/// source; the backend's replies come back to that address and port and are turned
/// back (see `lb-ebpf/src/nat.rs`). The backend needs no VIP and no tunnel.
pub const VIP_F_NAT: u32 = 1 << 3;

/// Value of the `RINGS` array: [`crate::maps::RING_CHUNK`] consecutive lookup-table
/// slots, each a backend id. Seen as memory (the agent maps the array), `RINGS` is
/// one flat `u16` array indexed by slot.
pub type RingChunk = [u16; crate::maps::RING_CHUNK as usize];

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

/// One flow as the client sent it, with byte-array addresses: the agent's and the
/// tests' view of a flow. The datapath keys its connection tables by the word-sized
/// [`ConnKeyV4`] and [`ConnKeyV6`]; [`FlowKey::from`] and [`FlowKey::conn_key_v4`] /
/// [`FlowKey::conn_key_v6`] convert.
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
    /// Reserved, zero.
    pub _pad: [u8; 2],
}

/// An address as the datapath holds it: four 32-bit words, each the 4 address bytes
/// as one load from the packet reads them (little-endian on every BPF target this
/// runs on). An IPv4 address is word 0; the others are zero.
pub type AddrWords = [u32; 4];

/// The address words of a 16-byte network-order address.
#[inline(always)]
pub const fn addr_words(bytes: &[u8; 16]) -> AddrWords {
    let mut words = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        words[i] = u32::from_le_bytes([
            bytes[i * 4],
            bytes[i * 4 + 1],
            bytes[i * 4 + 2],
            bytes[i * 4 + 3],
        ]);
        i += 1;
    }
    words
}

/// The 16-byte network-order address of address words.
#[inline(always)]
pub const fn addr_bytes(words: &AddrWords) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        bytes[i] = words[i / 4].to_le_bytes()[i % 4];
        i += 1;
    }
    bytes
}

/// Key of the IPv4 connection table `CONNS_V4`: 16 bytes, so the kernel hashes and
/// compares a third of what an IPv6-sized key costs on every packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ConnKeyV4 {
    /// Client address (see [`AddrWords`]).
    pub src: u32,
    /// VIP address.
    pub dst: u32,
    /// Client port, network byte order.
    pub src_port_be: u16,
    /// VIP port, network byte order.
    pub dst_port_be: u16,
    /// IP protocol, in a whole word: the key then has no padding that every packet
    /// would have to zero (a 3-byte array cost the datapath a call to a byte-wise
    /// `memset` per lookup). On the little-endian datapath its bytes are the
    /// protocol and three zeros, the layout of the earlier `u8` and 3 padding bytes,
    /// so a pinned table stays valid.
    pub proto: u32,
}

/// Key of the IPv6 connection table `CONNS_V6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ConnKeyV6 {
    /// Client address (see [`AddrWords`]).
    pub src: AddrWords,
    /// VIP address.
    pub dst: AddrWords,
    /// Client port, network byte order.
    pub src_port_be: u16,
    /// VIP port, network byte order.
    pub dst_port_be: u16,
    /// IP protocol, in a whole word (see [`ConnKeyV4::proto`]).
    pub proto: u32,
}

impl FlowKey {
    /// The `CONNS_V4` key of an IPv4 flow.
    pub fn conn_key_v4(&self) -> ConnKeyV4 {
        ConnKeyV4 {
            src: addr_words(&self.src)[0],
            dst: addr_words(&self.dst)[0],
            src_port_be: self.src_port_be,
            dst_port_be: self.dst_port_be,
            proto: u32::from(self.proto),
        }
    }

    /// The `CONNS_V6` key of an IPv6 flow.
    pub fn conn_key_v6(&self) -> ConnKeyV6 {
        ConnKeyV6 {
            src: addr_words(&self.src),
            dst: addr_words(&self.dst),
            src_port_be: self.src_port_be,
            dst_port_be: self.dst_port_be,
            proto: u32::from(self.proto),
        }
    }
}

impl From<ConnKeyV4> for FlowKey {
    fn from(k: ConnKeyV4) -> FlowKey {
        FlowKey {
            src: addr_bytes(&[k.src, 0, 0, 0]),
            dst: addr_bytes(&[k.dst, 0, 0, 0]),
            src_port_be: k.src_port_be,
            dst_port_be: k.dst_port_be,
            proto: k.proto as u8,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    }
}

impl From<ConnKeyV6> for FlowKey {
    fn from(k: ConnKeyV6) -> FlowKey {
        FlowKey {
            src: addr_bytes(&k.src),
            dst: addr_bytes(&k.dst),
            src_port_be: k.src_port_be,
            dst_port_be: k.dst_port_be,
            proto: k.proto as u8,
            family: FAMILY_V6,
            _pad: [0; 2],
        }
    }
}

/// Value of the `VIP_IDS` array, indexed by vip id: which (address, port, protocol)
/// owns the id, and its flags. An established flow's packets find their VIP here,
/// by the id in their connection entry, with one array read instead of a hash
/// lookup; the key is compared with the packet, so an id that changed hands never
/// applies one VIP's settings to another's flows. `family == 0`: unused id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipIdEntry {
    /// VIP address (see [`AddrWords`]).
    pub addr: AddrWords,
    /// Port, network byte order.
    pub port_be: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`]; 0 marks an unused id.
    pub family: u8,
    /// The VIP's `VIP_F_*` bits, as in its [`VipMeta`].
    pub flags: u32,
}

impl VipIdEntry {
    /// The entry for the VIP `key` with `flags`.
    pub fn new(key: &VipKey, flags: u32) -> VipIdEntry {
        VipIdEntry {
            addr: addr_words(&key.addr),
            port_be: key.port_be,
            proto: key.proto,
            family: key.family,
            flags,
        }
    }
}

/// Value of the `CONNS_V4` and `CONNS_V6` connection tables.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnEntry {
    /// Backend id the flow was given when it was first seen.
    pub backend_id: u32,
    /// VIP id of the flow (to account established packets to their VIP) in the low
    /// bits ([`CONN_VIP_MASK`]), with [`CONN_CLOSING`] set once the client sent a FIN
    /// or RST and, for a full-NAT VIP, the flow's NAT source address and port
    /// ([`CONN_NAT_MASK`]); read it through [`ConnEntry::vip`],
    /// [`ConnEntry::closing`] and [`ConnEntry::nat`]. (Entries written before NAT
    /// existed have zeros there: the same meaning, no NAT binding.)
    pub vip_id: u32,
}

/// [`ConnEntry::vip_id`] bits of the VIP id itself (ids stay below
/// [`crate::maps::MAX_VIPS`]).
pub const CONN_VIP_MASK: u32 = 0xff;
/// [`ConnEntry::vip_id`]: where a full-NAT flow's source port sits (bits 8..24); 0
/// means the flow has no NAT binding (NAT ports are never 0).
pub const CONN_NAT_PORT_SHIFT: u32 = 8;
/// [`ConnEntry::vip_id`]: where a full-NAT flow's source address index sits (bits
/// 24..30: at most [`crate::maps::MAX_NAT_SOURCES`] addresses per family).
pub const CONN_NAT_SOURCE_SHIFT: u32 = 24;
/// [`ConnEntry::vip_id`] bits of the NAT binding (source index and port).
pub const CONN_NAT_MASK: u32 = 0x3fff_ff00;

/// A full-NAT flow's binding: which of the `[nat]` source addresses of its family
/// (an index from the prefix's first address) and which source port the backend
/// sees for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatBinding {
    pub source: u32,
    pub port: u16,
}

impl NatBinding {
    /// The binding's bits in [`ConnEntry::vip_id`].
    pub const fn bits(self) -> u32 {
        (self.source & 0x3f) << CONN_NAT_SOURCE_SHIFT | (self.port as u32) << CONN_NAT_PORT_SHIFT
    }
}

/// [`ConnEntry::vip_id`] bit: the client has sent a FIN or an RST on this flow, so a
/// SYN with the same addresses and ports opens a new connection. Until then a SYN
/// is taken for a retransmission of the flow's own SYN (see `lb-ebpf/src/conntrack.rs`).
/// VIP ids stay far below it (`maps::MAX_VIPS`).
pub const CONN_CLOSING: u32 = 1 << 31;

/// [`ConnEntry::vip_id`] bit, in the young tables only: the flow's first packet was
/// a TCP packet without SYN (a flow begun elsewhere), so its backend is the lookup
/// table's guess (see [`SHARED_F_GUESSED`]).
pub const CONN_GUESSED: u32 = 1 << 30;

impl ConnEntry {
    /// The flow's VIP id.
    pub const fn vip(&self) -> u32 {
        self.vip_id & CONN_VIP_MASK
    }

    /// The flow's NAT binding, if its VIP does full NAT and one was made.
    pub const fn nat(&self) -> Option<NatBinding> {
        let port = (self.vip_id >> CONN_NAT_PORT_SHIFT) as u16;
        if port == 0 {
            None
        } else {
            Some(NatBinding {
                source: (self.vip_id >> CONN_NAT_SOURCE_SHIFT) & 0x3f,
                port,
            })
        }
    }

    /// Whether the flow's backend was the table's guess (young entries only).
    pub const fn guessed(&self) -> bool {
        self.vip_id & CONN_GUESSED != 0
    }

    /// Whether the client has closed or reset the flow.
    pub const fn closing(&self) -> bool {
        self.vip_id & CONN_CLOSING != 0
    }
}

/// A connection-table entry the datapath just wrote, as it reports it to the agent
/// through the `SHARED_FLOWS` ring buffer when flow sharing is on (a fleet with
/// `[cluster] share_listen`): the agent sends it to the other LBs of the fleet, which
/// insert it into their own tables, so that the flow keeps its backend when ECMP
/// moves it to them. 56 bytes; IPv4 keys use word 0 of each address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SharedFlow {
    /// The flow, in the `CONNS_V6` layout whatever its family.
    pub key: ConnKeyV6,
    /// The backend the datapath gave it.
    pub backend_id: u32,
    /// Its VIP (never with [`CONN_CLOSING`]).
    pub vip_id: u32,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// `SHARED_F_*` bits.
    pub flags: u8,
    /// Reserved, zero.
    pub _pad: [u8; 6],
}

/// [`SharedFlow::flags`]: the datapath did not see the flow begin (a TCP packet
/// without SYN that missed the table): its backend is the table's guess, which a
/// peer must not let replace an entry it holds.
pub const SHARED_F_GUESSED: u8 = 1 << 0;

/// Counters of flow sharing, per CPU, in the `SHARE_STATS` array (index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ShareStats {
    /// Entries put into `SHARED_FLOWS`.
    pub reported: u64,
    /// Entries not reported because the ring was full (the agent did not keep up):
    /// these flows are not shared, and may break if their LB leaves.
    pub ring_full: u64,
}

/// Counters of the flood guard, per CPU, in the `GUARD_STATS` array (index 0): what
/// the young tables took and gave to the connection tables. `young - promoted` over
/// an interval is the flows that never showed a second packet: spoofed SYNs,
/// connections refused, one-packet UDP exchanges. A flood shows as that difference
/// rising far above its usual level.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GuardStats {
    /// New flows whose choice went into a young table: SYNs, and the first packet of
    /// UDP flows and of TCP flows begun elsewhere.
    pub young: u64,
    /// Of those, written into a connection table on the client's second packet.
    pub promoted: u64,
    /// Young-table writes that failed (the packet still went where the table said).
    pub young_failed: u64,
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

/// Value of the `NAT_V4` and `NAT_V6` tables, whose keys are a reply's tuple as it
/// arrives from the backend ([`ConnKeyV4`]/[`ConnKeyV6`] with the backend as
/// source and the NAT address and port as destination): the client's flow to turn
/// the reply back into. The entry is the claim on its NAT port: it is written only
/// if the key was free (`BPF_NOEXIST`), so no two live flows share a port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatEntry {
    /// Client address (see [`AddrWords`]).
    pub client: AddrWords,
    /// VIP address.
    pub vip: AddrWords,
    /// Client port, network byte order.
    pub client_port_be: u16,
    /// VIP port, network byte order (the backend's port too).
    pub vip_port_be: u16,
    /// Where replies go: the MAC the client's first packet came from (the client,
    /// or the router in front of it).
    pub client_mac: [u8; 6],
    /// `NAT_F_*` bits.
    pub flags: u8,
    /// Reserved, zero.
    pub _pad: u8,
    /// The flow's VIP id.
    pub vip_id: u32,
    /// The flow's backend id.
    pub backend_id: u32,
    /// When a packet of the flow last passed, either way, on the [`nat_clock`]:
    /// the agent removes entries idle for longer than `[nat]`'s timeouts.
    pub seen: u32,
}

/// [`NatEntry::flags`]: a TCP FIN or RST passed, either way: the flow is closing
/// and its entry goes after the shorter closing timeout.
pub const NAT_F_CLOSING: u8 = 1 << 0;

/// The NAT entries' clock: `CLOCK_MONOTONIC` nanoseconds (the datapath's
/// `bpf_ktime_get_coarse_ns`) in units of 2^30 ns, about 1.07 s, so that an entry's
/// [`NatEntry::seen`] fits 32 bits and is rewritten at most once a unit.
pub const fn nat_clock(monotonic_ns: u64) -> u32 {
    (monotonic_ns >> 30) as u32
}

/// Full NAT's source addresses and ports, the one entry of the `NAT_SETTINGS`
/// array. Written by the agent from `[nat]`. A family's sources are `count`
/// consecutive addresses from `first` (a prefix of at most
/// [`crate::maps::MAX_NAT_SOURCES`], aligned, so an index is the low bits of the
/// last byte); `count == 0`: that family has none.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatSettings {
    /// First IPv4 source address (see [`AddrWords`], word 0).
    pub first_v4: u32,
    /// IPv4 source addresses (a power of two, at most 64), 0 for none.
    pub count_v4: u32,
    /// First IPv6 source address.
    pub first_v6: AddrWords,
    /// IPv6 source addresses (a power of two, at most 64), 0 for none.
    pub count_v6: u32,
    /// Lowest source port handed out.
    pub port_min: u32,
    /// Source ports handed out per (source address, backend, port): `port_min` to
    /// `port_min + port_span - 1`.
    pub port_span: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

impl NatSettings {
    /// Source address `index` of a family, as the address's last word ([`AddrWords`]
    /// word 0 for IPv4, word 3 for IPv6): the index goes into the last byte.
    pub const fn source_word(last_word: u32, index: u32) -> u32 {
        last_word | (index & 0x3f) << 24
    }

    /// The index of `last_word` among `count` sources from `first_word`, if it is
    /// one of them.
    pub const fn source_index(first_word: u32, count: u32, last_word: u32) -> Option<u32> {
        if count == 0 {
            return None;
        }
        let index_bits = (count - 1) << 24;
        if (last_word ^ first_word) & !index_bits != 0 {
            return None;
        }
        Some((last_word >> 24) & (count - 1))
    }

    /// Probe `probe` of a flow whose 5-tuple hash is `hash`: the source index and
    /// port tried. The index is fixed by the hash; ports are tried one after
    /// another from a hashed start.
    pub const fn candidate(&self, count: u32, hash: u32, probe: u32) -> NatBinding {
        let span = if self.port_span == 0 {
            1
        } else {
            self.port_span
        };
        let index = if count == 0 { 0 } else { (hash >> 26) % count };
        NatBinding {
            source: index,
            port: (self.port_min + (hash.wrapping_add(probe)) % span) as u16,
        }
    }
}

/// Full NAT's counters, per CPU, in the `NAT_STATS` array (index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatStats {
    /// Client packets of NAT flows sent to their backend.
    pub to_backend: u64,
    /// Backend replies turned back and sent to their client.
    pub to_client: u64,
    /// New NAT bindings: a source port claimed for a new flow.
    pub claimed: u64,
    /// Probes that found their port taken (by another live flow).
    pub port_collisions: u64,
    /// New flows refused (dropped) because every probed port was taken: the
    /// source addresses and ports are exhausted towards that backend.
    pub ports_exhausted: u64,
    /// Known flows whose claim had been evicted from the NAT table and was made
    /// again on the same port.
    pub reclaimed: u64,
    /// Known flows whose port now belongs to another flow (their claim was evicted
    /// or expired, and taken): never rewritten onto it; they take a new port.
    pub lost: u64,
    /// Packets to a NAT source address with no flow (dropped).
    pub reply_unknown: u64,
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
    /// Connection table: the flow was known (including a retransmitted SYN sent
    /// where the flow's first SYN went, see `lb-ebpf/src/conntrack.rs`).
    pub conn_hit: u64,
    /// New flows: TCP SYNs that took the lookup table (every SYN but such a
    /// retransmission, so a reused client port follows the current weights) and UDP
    /// flows not in the table.
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
    unsafe impl aya::Pod for super::ConnKeyV4 {}
    unsafe impl aya::Pod for super::ConnKeyV6 {}
    unsafe impl aya::Pod for super::VipIdEntry {}
    unsafe impl aya::Pod for super::ConnEntry {}
    unsafe impl aya::Pod for super::GlobalStats {}
    unsafe impl aya::Pod for super::VipStats {}
    unsafe impl aya::Pod for super::BackendStats {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::SharedFlow {}
    unsafe impl aya::Pod for super::ShareStats {}
    unsafe impl aya::Pod for super::GuardStats {}
    unsafe impl aya::Pod for super::NatEntry {}
    unsafe impl aya::Pod for super::NatSettings {}
    unsafe impl aya::Pod for super::NatStats {}
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
        assert_eq!(size_of::<ConnKeyV4>(), 4 + 4 + 2 + 2 + 4);
        assert_eq!(size_of::<ConnKeyV6>(), 16 + 16 + 2 + 2 + 4);
        assert_eq!(size_of::<VipIdEntry>(), 16 + 2 + 1 + 1 + 4);
        assert_eq!(size_of::<ConnEntry>(), 8);
        assert_eq!(size_of::<GlobalStats>(), 19 * 8);
        assert_eq!(size_of::<Settings>(), 20);
        assert_eq!(size_of::<GuardStats>(), 3 * 8);
        assert_eq!(size_of::<SharedFlow>(), 40 + 4 + 4 + 1 + 1 + 6);
        assert_eq!(size_of::<ShareStats>(), 16);
        assert_eq!(
            size_of::<NatEntry>(),
            16 + 16 + 2 + 2 + 6 + 1 + 1 + 4 + 4 + 4
        );
        assert_eq!(size_of::<NatSettings>(), 4 + 4 + 16 + 4 + 4 + 4 + 4);
        assert_eq!(size_of::<NatStats>(), 8 * 8);
    }

    #[test]
    fn a_nat_binding_round_trips_through_a_connection_entry() {
        for (source, port) in [(0, 1), (63, 65535), (5, 40000)] {
            let binding = NatBinding { source, port };
            let entry = ConnEntry {
                backend_id: 7,
                vip_id: 9 | CONN_CLOSING | binding.bits(),
            };
            assert_eq!(entry.nat(), Some(binding));
            assert_eq!(entry.vip(), 9);
            assert!(entry.closing() && !entry.guessed());
        }
        let plain = ConnEntry {
            backend_id: 1,
            vip_id: 3 | CONN_GUESSED,
        };
        assert_eq!(plain.nat(), None);
        assert_eq!(plain.vip(), 3);
    }

    #[test]
    fn nat_sources_are_found_by_their_last_byte() {
        let first = u32::from_le_bytes([198, 18, 200, 8]);
        for index in 0..8 {
            let word = NatSettings::source_word(first, index);
            assert_eq!(word.to_le_bytes(), [198, 18, 200, 8 + index as u8]);
            assert_eq!(NatSettings::source_index(first, 8, word), Some(index));
        }
        let outside = u32::from_le_bytes([198, 18, 200, 16]);
        assert_eq!(NatSettings::source_index(first, 8, outside), None);
        assert_eq!(NatSettings::source_index(first, 0, first), None);
        let other_net = u32::from_le_bytes([198, 18, 201, 8]);
        assert_eq!(NatSettings::source_index(first, 8, other_net), None);
    }

    #[test]
    fn address_words_round_trip_and_match_a_packet_load() {
        let bytes = [198, 18, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
        let words = addr_words(&bytes);
        // What a 32-bit little-endian load of the first four bytes gives.
        assert_eq!(words[0], u32::from_le_bytes([198, 18, 1, 1]));
        assert_eq!(words[3], 9 << 24);
        assert_eq!(addr_bytes(&words), bytes);
    }

    #[test]
    fn connection_keys_convert_back_to_the_same_flow() {
        let mut v4 = FlowKey {
            src_port_be: 40000u16.to_be(),
            dst_port_be: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            ..Default::default()
        };
        v4.src[..4].copy_from_slice(&[198, 18, 0, 1]);
        v4.dst[..4].copy_from_slice(&[198, 18, 1, 1]);
        assert_eq!(FlowKey::from(v4.conn_key_v4()), v4);
        let mut v6 = FlowKey {
            family: FAMILY_V6,
            proto: PROTO_UDP,
            src_port_be: 5353u16.to_be(),
            ..v4
        };
        v6.src = [0xfd, 0, 0, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        v6.dst = [0xfd, 0, 0, 0x18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(FlowKey::from(v6.conn_key_v6()), v6);
    }
}
