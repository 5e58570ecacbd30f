//! The kernel side, seen from userspace: loads the XDP object (with the level of its
//! log), writes the desired state into its maps, attaches it to an interface, reads
//! its counters and hands its log records (aya-log) to a reader. Used by the agent,
//! and by the tests (packet fixtures through `BPF_PROG_TEST_RUN`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, MapInfo, PerCpuArray, RingBuf},
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use aya_log::EbpfLogger;
use lb_common::{
    hash::vip_filter_slot,
    maps::{
        FLOOD_GUARD_GLOBAL, MAX_RING_SIZE, MAX_VIPS, RING_CHUNK, SHARE_FLOWS_GLOBAL,
        VIP_FILTER_SLOTS, names, programs, ring_base, rings_entries,
    },
    types::{
        BackendStats, ConnEntry, ConnKeyV4, ConnKeyV6, FAMILY_V4, FlowKey, GlobalStats, GuardStats,
        NatEntry, NatSettings, NatStats, RingChunk, Settings, ShareStats, VIP_F_ECHO, VipIdEntry,
        VipKey, VipMeta, addr_words,
    },
};
use log::LevelFilter;

use crate::config::DatapathSizes;
use crate::desired::{Desired, DesiredBackend, DesiredVip};

/// The XDP object built by `build.rs` from `lb-ebpf` (empty when built without it).
#[cfg(not(lb_no_ebpf))]
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));
#[cfg(lb_no_ebpf)]
pub static EBPF_OBJECT: &[u8] = &[];

/// A failure to load, fill, attach or read the datapath.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "this `lb` binary was built without its XDP program (bpf-linker was missing); \
         run `cargo xtask setup` and rebuild"
    )]
    NotBuilt,
    #[error("cannot load the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the XDP object has no program `{0}`")]
    MissingProgram(&'static str),
    #[error("the XDP object has no map `{0}`")]
    MissingMap(&'static str),
    #[error("XDP program `{name}`: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cannot attach XDP to interface {iface} ({mode:?} mode): {source}{hint}")]
    Attach {
        iface: String,
        mode: XdpMode,
        #[source]
        source: Box<ProgramError>,
        /// What to do about it, when the errno says (see `attach_hint`).
        hint: String,
    },
    #[error("pin directory {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pinned link {path}: {message}")]
    Link { path: PathBuf, message: String },
    #[error("cannot map the lookup tables into memory: {0}")]
    Mmap(#[source] std::io::Error),
    #[error(
        "the lookup tables (RINGS) have {value_size}-byte elements; this lb writes \
         {}-byte ones",
        std::mem::size_of::<RingChunk>()
    )]
    RingsLayout { value_size: u32 },
    #[error(
        "VIP id {vip_id} is beyond the lookup tables' room for {room} VIPs \
         ([datapath] max_vips when the datapath was created; nothing was changed)"
    )]
    VipRoom { vip_id: u32, room: u32 },
    #[error("map `{map}`: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the datapath's log (aya-log): {0}")]
    Log(#[source] aya_log::Error),
}

/// A failed attach, with what to do about it.
fn attach_error(iface: &str, mode: XdpMode, source: ProgramError) -> DataplaneError {
    DataplaneError::Attach {
        iface: iface.to_owned(),
        mode,
        hint: attach_hint(iface, mode, &source),
        source: Box::new(source),
    }
}

/// What to do about a failed attach, from the errno behind it: a driver without
/// native XDP, or an interface that already has an XDP program (named, when
/// `ip` can tell which).
fn attach_hint(iface: &str, mode: XdpMode, source: &ProgramError) -> String {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source);
    let mut errno = None;
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            errno = io.raw_os_error();
            break;
        }
        cause = e.source();
    }
    match errno {
        Some(libc::EOPNOTSUPP) if matches!(mode, XdpMode::Driver) => {
            format!(" (the driver of {iface} has no native XDP: start with `--xdp-mode generic`)")
        }
        Some(libc::EBUSY | libc::EEXIST) => {
            let holder = attached_program(iface)
                .map_or_else(String::new, |(id, name)| format!(" ({name}, id {id})"));
            format!(
                " (interface {iface} already has an XDP program{holder}: if it is another \
                 lb instance's, `lb detach --instance NAME`; else `ip link set dev {iface} \
                 xdp off` removes it)"
            )
        }
        _ => String::new(),
    }
}

/// The id and name of the XDP program attached to `iface`, as `ip -details -json link
/// show` reports it; `None` if `ip` cannot tell.
fn attached_program(iface: &str) -> Option<(u64, String)> {
    let out = std::process::Command::new("ip")
        .args(["-details", "-json", "link", "show", "dev", iface])
        .output()
        .ok()?;
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let xdp = &links.get(0)?["xdp"];
    let prog = xdp.get("prog").or_else(|| xdp.get("attached")?.get(0))?;
    let prog = prog.get("prog").unwrap_or(prog);
    let id = prog.get("id")?.as_u64()?;
    let name = prog
        .get("name")
        .and_then(|n| n.as_str())
        .unwrap_or("unnamed");
    Some((id, name.to_owned()))
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

/// What a walk of the NAT tables found ([`Dataplane::nat_sweep`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatUsage {
    /// Flows (entries) left in both tables.
    pub flows: u64,
    /// Ports each source address holds.
    pub by_source: BTreeMap<IpAddr, u64>,
    /// Entries the walk removed as idle.
    pub expired: u64,
}

/// How long a NAT entry may stay idle, in units of `lb_common::types::nat_clock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatTimeouts {
    pub tcp: u32,
    pub tcp_closing: u32,
    pub udp: u32,
}

impl NatTimeouts {
    /// The timeouts of `[nat]`, rounded up to whole clock units.
    pub fn of_config(nat: &crate::config::Nat) -> NatTimeouts {
        let units = |s: u32| (u64::from(s) * 1_000_000_000).div_ceil(1 << 30) as u32;
        NatTimeouts {
            tcp: units(nat.timeout_tcp_s),
            tcp_closing: units(nat.timeout_tcp_closing_s),
            udp: units(nat.timeout_udp_s),
        }
    }

    /// The timeout of an entry of protocol `proto` with `NAT_F_*` `flags`.
    pub fn of(&self, proto: u8, flags: u8) -> u32 {
        if proto != lb_common::types::PROTO_TCP {
            self.udp
        } else if flags & lb_common::types::NAT_F_CLOSING != 0 {
            self.tcp_closing
        } else {
            self.tcp
        }
    }
}

/// Now on the NAT entries' clock (`CLOCK_MONOTONIC`, as the datapath reads it).
pub fn nat_now() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    lb_common::types::nat_clock(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// How long a table copy stays untouched after it stopped being the active one, so
/// that a packet which read the old `VipMeta` just before the flip has finished with
/// it (an XDP run takes microseconds; this is a wide margin).
pub const COPY_GRACE: Duration = Duration::from_millis(20);

/// What one [`Dataplane::apply`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyReport {
    /// Lookup-table slots written.
    pub slots_written: u64,
    /// VIPs that switched to a new table copy.
    pub tables_switched: u32,
    /// VIP, echo and backend entries written or removed.
    pub entries_changed: u32,
    /// Some VIP's new table waits this long for its inactive copy's grace
    /// ([`COPY_GRACE`]) to end: that switch (and the removal of backends, which the old
    /// table may still name) is left for an `apply` of the same desired state then
    /// ([`Dataplane::retry_at`]). Nothing blocks meanwhile.
    pub deferred: Option<Duration>,
}

/// The loaded load-balancing program, its maps, and the shadow of what they hold.
pub struct Dataplane {
    /// Owns the program and the maps; dropping it detaches and unloads them.
    ebpf: Ebpf,
    /// The attachment, while attached without pinning.
    link: Option<XdpLinkId>,
    /// Where program, link and maps are pinned, when they are.
    pins: Option<PathBuf>,
    /// The pinned attachment: it outlives this process (fail-static).
    pinned_link: Option<FdLink>,
    /// `RINGS`, mapped into this process: table slots are written as memory.
    rings: RingsMapping,
    /// What the maps hold now, as last written: the truth that changes are computed
    /// against, so that only what differs is written.
    shadow: Shadow,
    /// When the last `apply` left something for later (see [`ApplyReport::deferred`]).
    retry_at: Option<Instant>,
    /// Each pinned map's geometry and memory, read once when pinned maps were
    /// loaded or adopted (see [`Dataplane::map_memory`]).
    maps: Vec<MapMemory>,
}

#[derive(Default)]
struct Shadow {
    vips: BTreeMap<VipKey, ShadowVip>,
    backends: BTreeMap<u32, lb_common::types::Backend>,
    echo: BTreeSet<VipKey>,
    settings: Settings,
    nat: NatSettings,
    /// Set slots of `VIP_FILTER`.
    filter: BTreeSet<u32>,
    /// Used entries of `VIP_IDS`.
    vip_ids: BTreeMap<u32, VipIdEntry>,
}

/// The `VIP_FILTER` slot of a `VIPS` key.
fn filter_slot(key: &VipKey) -> u32 {
    vip_filter_slot(&addr_words(&key.addr), key.port_be, key.proto)
}

struct ShadowVip {
    meta: VipMeta,
    /// What each of the two table copies holds (`None`: never written).
    copies: [Option<Arc<Vec<u32>>>; 2],
    /// When the VIP last switched copies.
    switched_at: Instant,
}

/// Flow sharing's own handles on the datapath ([`Dataplane::take_shared_flows`]).
pub struct SharedFlowMaps {
    /// New connection entries, as `lb_common::types::SharedFlow` records.
    pub ring: RingBuf<MapData>,
    pub v4: HashMap<MapData, ConnKeyV4, ConnEntry>,
    pub v6: HashMap<MapData, ConnKeyV6, ConnEntry>,
    /// Sharing's counters, per CPU (index 0).
    pub stats: PerCpuArray<MapData, ShareStats>,
}

/// A shared mapping of the `RINGS` array. The kernel stores array elements at an
/// 8-byte stride, and each element ([`RingChunk`]) is four 16-bit slots, so the
/// mapping is one flat `u16` array indexed by slot.
struct RingsMapping {
    ptr: *mut u16,
    /// Slots.
    len: usize,
}

// SAFETY: the mapping is owned by one `Dataplane`; access goes through `&mut self`.
unsafe impl Send for RingsMapping {}

impl RingsMapping {
    fn new(ebpf: &Ebpf) -> Result<RingsMapping, DataplaneError> {
        let Some(Map::Array(data)) = ebpf.map(names::RINGS) else {
            return Err(DataplaneError::MissingMap(names::RINGS));
        };
        let info = data.info().map_err(map_err(names::RINGS))?;
        if info.value_size() as usize != std::mem::size_of::<RingChunk>() {
            return Err(DataplaneError::RingsLayout {
                value_size: info.value_size(),
            });
        }
        let len = info.max_entries() as usize * RING_CHUNK as usize;
        let bytes = len * std::mem::size_of::<u16>();
        // SAFETY: maps the array's own memory (BPF_F_MMAPABLE), shared with the
        // kernel; the length is the array's size, which the kernel checks.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DataplaneError::Mmap(std::io::Error::last_os_error()));
        }
        Ok(RingsMapping {
            ptr: ptr.cast(),
            len,
        })
    }

    /// VIPs whose two table copies fit.
    fn vips(&self) -> u32 {
        lb_common::maps::rings_vips((self.len / RING_CHUNK as usize) as u32)
    }

    /// Writes `table` at `base`, only the slots that differ from `old` (everything if
    /// `old` is `None` or of another length). Returns the number of slots written.
    fn write(&mut self, base: u32, table: &[u32], old: Option<&[u32]>) -> u64 {
        assert!(
            base as usize + table.len() <= self.len,
            "table beyond the RINGS array"
        );
        // SAFETY: in bounds (checked above) of a live mapping owned by `self`. The
        // kernel reads these slots concurrently; u16 stores are atomic on every
        // architecture BPF runs on, and this copy is not the active one.
        let slots =
            unsafe { std::slice::from_raw_parts_mut(self.ptr.add(base as usize), table.len()) };
        let slot_of = |id: u32| -> u16 {
            debug_assert!(id < lb_common::maps::MAX_BACKENDS);
            id as u16
        };
        match old {
            Some(old) if old.len() == table.len() => {
                let mut written = 0;
                for ((slot, &new), &was) in slots.iter_mut().zip(table).zip(old) {
                    if new != was {
                        // SAFETY: a plain in-bounds store; volatile so the compiler
                        // neither drops nor merges stores to memory the kernel reads.
                        unsafe { std::ptr::write_volatile(slot, slot_of(new)) };
                        written += 1;
                    }
                }
                written
            }
            _ => {
                for (slot, &new) in slots.iter_mut().zip(table) {
                    // SAFETY: as above.
                    unsafe { std::ptr::write_volatile(slot, slot_of(new)) };
                }
                table.len() as u64
            }
        }
    }

    /// The active table copy a VIP entry names. A VIP id beyond the room, or a
    /// table longer than a copy (an entry this agent never wrote), is an error.
    fn table(&self, meta: &VipMeta) -> Result<Vec<u32>, DataplaneError> {
        if meta.vip_id >= self.vips() || meta.ring_size > MAX_RING_SIZE {
            return Err(DataplaneError::VipRoom {
                vip_id: meta.vip_id,
                room: self.vips(),
            });
        }
        let base = ring_base(meta.vip_id, meta.active & 1) as usize;
        // SAFETY: in bounds of a live mapping owned by `self`: the VIP's copies lie
        // within the room checked above.
        Ok(
            unsafe { std::slice::from_raw_parts(self.ptr.add(base), meta.ring_size as usize) }
                .iter()
                .map(|&v| u32::from(v))
                .collect(),
        )
    }
}

impl Drop for RingsMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len * std::mem::size_of::<u16>()) };
    }
}

/// How the program is loaded: what the verifier sees as constants in its read-only
/// data, so that whatever is off is removed from the packet path.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// The datapath's records at this level and above are made (see
    /// [`Dataplane::take_log`]); `Off` removes them all.
    pub log: LevelFilter,
    /// Report every connection entry written (flow sharing, see
    /// [`Dataplane::take_shared_flows`]).
    pub share_flows: bool,
    /// New flows wait in the young tables until their second packet (the flood
    /// guard, `lb-ebpf/src/conntrack.rs`); off, they go straight into the
    /// connection tables.
    pub flood_guard: bool,
    /// Sizes of the connection tables and of the lookup tables' room for VIPs
    /// when they are created (pinned maps are adopted at whatever size they have).
    pub sizes: DatapathSizes,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            log: LevelFilter::Off,
            share_flows: false,
            flood_guard: true,
            sizes: DatapathSizes::default(),
        }
    }
}

impl Dataplane {
    /// Loads the object and verifies the balancer program, without attaching it, its
    /// log off. Nothing is pinned: the program and maps go away with this value.
    pub fn load() -> Result<Dataplane, DataplaneError> {
        Dataplane::load_with(None, LoadOptions::default())
    }

    /// As [`Dataplane::load`], with the datapath's records at `log` and above made
    /// (see [`Dataplane::take_log`]).
    pub fn load_logging(log: LevelFilter) -> Result<Dataplane, DataplaneError> {
        Dataplane::load_options(LoadOptions {
            log,
            ..LoadOptions::default()
        })
    }

    /// As [`Dataplane::load`], with every load option given.
    pub fn load_options(options: LoadOptions) -> Result<Dataplane, DataplaneError> {
        Dataplane::load_with(None, options)
    }

    /// Loads with every map pinned under `dir` (created if missing): maps already
    /// pinned there by an earlier agent are adopted with their contents, and the
    /// shadow state is read back from them, so that the next [`Dataplane::apply`]
    /// writes only real changes. The datapath's records at `log` and above are made
    /// (see [`Dataplane::take_log`]). Returns whether an earlier agent's state was
    /// found.
    pub fn load_pinned(dir: &Path, log: LevelFilter) -> Result<(Dataplane, bool), DataplaneError> {
        Dataplane::load_pinned_with(
            dir,
            LoadOptions {
                log,
                ..LoadOptions::default()
            },
        )
    }

    /// As [`Dataplane::load_pinned`], with every load option given.
    pub fn load_pinned_with(
        dir: &Path,
        mut options: LoadOptions,
    ) -> Result<(Dataplane, bool), DataplaneError> {
        std::fs::create_dir_all(dir).map_err(|source| DataplaneError::Pin {
            path: dir.to_owned(),
            source,
        })?;
        let adopted = is_pinned(dir);
        let carried = if adopted {
            unpin_unpacked_rings(dir)?
        } else {
            Vec::new()
        };
        if let Some(top) = carried.iter().map(|t| t.vip_id).max() {
            options.sizes.max_vips = options.sizes.max_vips.max(top + 1);
        }
        let mut dataplane = Dataplane::load_with(Some(dir.to_owned()), options)?;
        for t in &carried {
            dataplane.rings.write(t.base, &t.table, None);
        }
        // The old program keeps its own references until the new one replaces it.
        remove_legacy_pins(dir)?;
        // Every map but `VIPS` (a few hundred bytes per VIP) is preallocated: what
        // the kernel charges for them is fixed from now on.
        dataplane.maps = read_map_memory(dir).unwrap_or_else(|e| {
            tracing::warn!("cannot read the maps' memory: {e}");
            Vec::new()
        });
        if adopted {
            dataplane.read_back()?;
        }
        Ok((dataplane, adopted))
    }

    fn load_with(pins: Option<PathBuf>, options: LoadOptions) -> Result<Dataplane, DataplaneError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DataplaneError::NotBuilt);
        }
        let level = aya_log_level(options.log);
        let mut loader = EbpfLoader::new();
        // Always set: aya-log-ebpf's own default makes every record. The global lives
        // in `.rodata`, which aya freezes before the program is verified, so the
        // verifier removes the code of every record below `level` (see
        // `lb-ebpf/src/events.rs`): with the log off, none is left.
        loader.override_global(aya_log::LEVEL, &level, true);
        // The same for flow sharing: off, the reporting code is removed.
        let share_flows = u8::from(options.share_flows);
        loader.override_global(SHARE_FLOWS_GLOBAL, &share_flows, true);
        // And for the flood guard: off, the young tables' code is removed.
        let flood_guard = u8::from(options.flood_guard);
        loader.override_global(FLOOD_GUARD_GLOBAL, &flood_guard, true);
        loader.map_max_entries(names::CONNS_V4, options.sizes.connection_table_v4);
        loader.map_max_entries(names::CONNS_V6, options.sizes.connection_table_v6);
        loader.map_max_entries(names::NAT_V4, options.sizes.nat_table_v4);
        loader.map_max_entries(names::NAT_V6, options.sizes.nat_table_v6);
        loader.map_max_entries(names::RINGS, rings_entries(options.sizes.max_vips));
        if let Some(dir) = &pins {
            for name in names::ALL {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        xdp_program(&mut ebpf, programs::BALANCER)?
            .load()
            .map_err(|source| DataplaneError::Program {
                name: programs::BALANCER,
                source,
            })?;
        let rings = RingsMapping::new(&ebpf)?;
        Ok(Dataplane {
            ebpf,
            link: None,
            pins,
            pinned_link: None,
            rings,
            shadow: Shadow::default(),
            retry_at: None,
            maps: Vec::new(),
        })
    }

    /// Rebuilds the shadow from the maps' contents (after adopting pinned maps).
    fn read_back(&mut self) -> Result<(), DataplaneError> {
        let settings: Array<&MapData, Settings> =
            Array::try_from(self.map(names::SETTINGS)?).map_err(map_err(names::SETTINGS))?;
        self.shadow.settings = settings.get(&0, 0).map_err(map_err(names::SETTINGS))?;
        let nat: Array<&MapData, NatSettings> = Array::try_from(self.map(names::NAT_SETTINGS)?)
            .map_err(map_err(names::NAT_SETTINGS))?;
        self.shadow.nat = nat.get(&0, 0).map_err(map_err(names::NAT_SETTINGS))?;
        let backends: Array<&MapData, lb_common::types::Backend> =
            Array::try_from(self.map(names::BACKENDS)?).map_err(map_err(names::BACKENDS))?;
        let entries: Vec<lb_common::types::Backend> = backends
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(names::BACKENDS))?;
        for (id, entry) in entries.into_iter().enumerate() {
            if entry.family != 0 {
                self.shadow.backends.insert(id as u32, entry);
            }
        }
        let vips: HashMap<&MapData, VipKey, VipMeta> =
            HashMap::try_from(self.map(names::VIPS)?).map_err(map_err(names::VIPS))?;
        let entries: Vec<(VipKey, VipMeta)> = vips
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(names::VIPS))?;
        for (key, meta) in entries {
            if meta.flags & VIP_F_ECHO != 0 {
                self.shadow.echo.insert(key);
                continue;
            }
            let table = Arc::new(self.rings.table(&meta)?);
            let mut copies = [None, None];
            copies[meta.active as usize & 1] = Some(table);
            self.shadow.vips.insert(
                key,
                ShadowVip {
                    meta,
                    copies,
                    // The earlier agent flipped this copy before it stopped,
                    // and loading the program since took far longer than a
                    // packet's run: its inactive copy is free to write.
                    switched_at: Instant::now()
                        .checked_sub(COPY_GRACE)
                        .unwrap_or_else(Instant::now),
                },
            );
        }
        let filter: Array<&MapData, u32> =
            Array::try_from(self.map(names::VIP_FILTER)?).map_err(map_err(names::VIP_FILTER))?;
        let slots: Vec<u32> = filter
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(names::VIP_FILTER))?;
        let ids: Array<&MapData, VipIdEntry> =
            Array::try_from(self.map(names::VIP_IDS)?).map_err(map_err(names::VIP_IDS))?;
        let ids: Vec<VipIdEntry> = ids
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(names::VIP_IDS))?;
        self.shadow.filter = (0..)
            .zip(slots)
            .filter(|&(_, v)| v != 0)
            .map(|(slot, _)| slot)
            .collect();
        self.shadow.vip_ids = (0..).zip(ids).filter(|(_, e)| e.family != 0).collect();
        Ok(())
    }

    /// What the maps hold, as a [`Desired`] (VIP names left empty): what an earlier
    /// agent left, for keeping its ids, weights and overrides.
    pub fn current(&self) -> Desired {
        let vip_by_id: BTreeMap<u32, VipKey> = self
            .shadow
            .vips
            .iter()
            .map(|(k, v)| (v.meta.vip_id, *k))
            .collect();
        let vips = self
            .shadow
            .vips
            .iter()
            .map(|(k, v)| {
                let table = v.copies[v.meta.active as usize & 1]
                    .clone()
                    .unwrap_or_default();
                (
                    *k,
                    DesiredVip {
                        name: String::new(),
                        meta: v.meta,
                        table,
                        ids: Vec::new(),
                        built: None,
                    },
                )
            })
            .collect();
        let backends = self
            .shadow
            .backends
            .iter()
            .filter_map(|(&id, e)| {
                let vip = *vip_by_id.get(&e.vip_id)?;
                let address = crate::desired::ip_of(&e.addr, e.family);
                Some((
                    id,
                    DesiredBackend {
                        vip,
                        address,
                        weight: e.weight,
                        entry: *e,
                    },
                ))
            })
            .collect();
        Desired {
            vips,
            backends,
            echo: self.shadow.echo.clone(),
            settings: self.shadow.settings,
            nat: self.shadow.nat,
        }
    }

    /// Makes the maps hold `desired`, writing only what differs from what they hold.
    ///
    /// Order matters, since the datapath reads the maps all along: settings and new
    /// backends first; then each changed table is written into the VIP's inactive
    /// copy and made active by one update of the VIP's entry (a packet sees the old
    /// table or the new one, never a mix); then echo entries; then removed VIPs go;
    /// removed backends go last, when no table names them any more.
    ///
    /// Never blocks: a table switch that would overwrite a copy packets may still be
    /// reading is left for later ([`ApplyReport::deferred`], [`Dataplane::retry_at`]).
    pub fn apply(&mut self, desired: &Desired) -> Result<ApplyReport, DataplaneError> {
        let room = self.rings.vips();
        if let Some(vip) = desired.vips.values().find(|v| v.meta.vip_id >= room) {
            return Err(DataplaneError::VipRoom {
                vip_id: vip.meta.vip_id,
                room,
            });
        }
        let mut report = ApplyReport::default();
        self.retry_at = None;
        if self.shadow.settings != desired.settings {
            let mut map: Array<&mut MapData, Settings> =
                Array::try_from(self.map_mut(names::SETTINGS)?)
                    .map_err(map_err(names::SETTINGS))?;
            map.set(0, desired.settings, 0)
                .map_err(map_err(names::SETTINGS))?;
            self.shadow.settings = desired.settings;
        }
        if self.shadow.nat != desired.nat {
            let mut map: Array<&mut MapData, NatSettings> =
                Array::try_from(self.map_mut(names::NAT_SETTINGS)?)
                    .map_err(map_err(names::NAT_SETTINGS))?;
            map.set(0, desired.nat, 0)
                .map_err(map_err(names::NAT_SETTINGS))?;
            self.shadow.nat = desired.nat;
        }
        {
            let mut map: Array<&mut MapData, lb_common::types::Backend> = Array::try_from(
                self.ebpf
                    .map_mut(names::BACKENDS)
                    .ok_or(DataplaneError::MissingMap(names::BACKENDS))?,
            )
            .map_err(map_err(names::BACKENDS))?;
            for (&id, b) in &desired.backends {
                if self.shadow.backends.get(&id) != Some(&b.entry) {
                    map.set(id, b.entry, 0).map_err(map_err(names::BACKENDS))?;
                    self.shadow.backends.insert(id, b.entry);
                    report.entries_changed += 1;
                }
            }
        }
        // Before any key enters VIPS: its VIP_IDS entry and its filter slot (the old
        // keys' slots stay set until those keys are gone).
        let ids: BTreeMap<u32, VipIdEntry> = desired
            .vips
            .iter()
            .map(|(key, vip)| (vip.meta.vip_id, VipIdEntry::new(key, vip.meta.flags)))
            .collect();
        self.write_vip_ids(&ids, false, &mut report)?;
        let filter: BTreeSet<u32> = desired
            .vips
            .keys()
            .chain(&desired.echo)
            .map(filter_slot)
            .collect();
        let during: BTreeSet<u32> = filter.union(&self.shadow.filter).copied().collect();
        self.write_filter(&during, &mut report)?;
        for (key, vip) in &desired.vips {
            self.apply_vip(*key, vip, &mut report)?;
        }
        let mut vips: HashMap<&mut MapData, VipKey, VipMeta> = HashMap::try_from(
            self.ebpf
                .map_mut(names::VIPS)
                .ok_or(DataplaneError::MissingMap(names::VIPS))?,
        )
        .map_err(map_err(names::VIPS))?;
        for key in desired.echo.difference(&self.shadow.echo) {
            vips.insert(key, Desired::echo_meta(), 0)
                .map_err(map_err(names::VIPS))?;
            report.entries_changed += 1;
        }
        for key in self.shadow.echo.difference(&desired.echo) {
            vips.remove(key).map_err(map_err(names::VIPS))?;
            report.entries_changed += 1;
        }
        self.shadow.echo = desired.echo.clone();
        let gone: Vec<VipKey> = self
            .shadow
            .vips
            .keys()
            .filter(|k| !desired.vips.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            vips.remove(&key).map_err(map_err(names::VIPS))?;
            self.shadow.vips.remove(&key);
            report.entries_changed += 1;
        }
        let gone: Vec<u32> = self
            .shadow
            .backends
            .keys()
            .filter(|id| !desired.backends.contains_key(id))
            .copied()
            .collect();
        if !gone.is_empty() && report.deferred.is_none() {
            let mut map: Array<&mut MapData, lb_common::types::Backend> = Array::try_from(
                self.ebpf
                    .map_mut(names::BACKENDS)
                    .ok_or(DataplaneError::MissingMap(names::BACKENDS))?,
            )
            .map_err(map_err(names::BACKENDS))?;
            for id in gone {
                map.set(id, lb_common::types::Backend::default(), 0)
                    .map_err(map_err(names::BACKENDS))?;
                self.shadow.backends.remove(&id);
                report.entries_changed += 1;
            }
        }
        // After the keys left VIPS: their ids and filter slots.
        self.write_vip_ids(&ids, true, &mut report)?;
        self.write_filter(&filter, &mut report)?;
        self.retry_at = report.deferred.map(|wait| Instant::now() + wait);
        Ok(report)
    }

    /// When an `apply` of the same desired state finishes what the last one left
    /// for later; `None` when nothing waits.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// [`Dataplane::apply`], waiting (blocking the thread) for any copy's grace, so
    /// that everything is written when it returns. For tests, benchmarks and tools,
    /// never on the agent's runtime.
    pub fn apply_and_wait(&mut self, desired: &Desired) -> Result<ApplyReport, DataplaneError> {
        let mut total = ApplyReport::default();
        loop {
            let r = self.apply(desired)?;
            total.slots_written += r.slots_written;
            total.tables_switched += r.tables_switched;
            total.entries_changed += r.entries_changed;
            match r.deferred {
                Some(wait) => std::thread::sleep(wait),
                None => return Ok(total),
            }
        }
    }

    /// Writes the `VIP_IDS` entries of `ids` that differ from what the map holds;
    /// with `clear_others`, also clears every other used entry.
    fn write_vip_ids(
        &mut self,
        ids: &BTreeMap<u32, VipIdEntry>,
        clear_others: bool,
        report: &mut ApplyReport,
    ) -> Result<(), DataplaneError> {
        let mut map: Array<&mut MapData, VipIdEntry> = Array::try_from(
            self.ebpf
                .map_mut(names::VIP_IDS)
                .ok_or(DataplaneError::MissingMap(names::VIP_IDS))?,
        )
        .map_err(map_err(names::VIP_IDS))?;
        for (&id, entry) in ids {
            if self.shadow.vip_ids.get(&id) != Some(entry) {
                map.set(id, *entry, 0).map_err(map_err(names::VIP_IDS))?;
                self.shadow.vip_ids.insert(id, *entry);
                report.entries_changed += 1;
            }
        }
        if clear_others {
            let gone: Vec<u32> = self
                .shadow
                .vip_ids
                .keys()
                .filter(|id| !ids.contains_key(id))
                .copied()
                .collect();
            for id in gone {
                map.set(id, VipIdEntry::default(), 0)
                    .map_err(map_err(names::VIP_IDS))?;
                self.shadow.vip_ids.remove(&id);
                report.entries_changed += 1;
            }
        }
        Ok(())
    }

    /// Makes exactly the slots in `set` the set slots of `VIP_FILTER`.
    fn write_filter(
        &mut self,
        set: &BTreeSet<u32>,
        report: &mut ApplyReport,
    ) -> Result<(), DataplaneError> {
        if *set == self.shadow.filter {
            return Ok(());
        }
        let mut map: Array<&mut MapData, u32> = Array::try_from(
            self.ebpf
                .map_mut(names::VIP_FILTER)
                .ok_or(DataplaneError::MissingMap(names::VIP_FILTER))?,
        )
        .map_err(map_err(names::VIP_FILTER))?;
        for &slot in set.difference(&self.shadow.filter) {
            debug_assert!(slot < VIP_FILTER_SLOTS);
            map.set(slot, 1, 0).map_err(map_err(names::VIP_FILTER))?;
            report.entries_changed += 1;
        }
        for &slot in self.shadow.filter.difference(set) {
            map.set(slot, 0, 0).map_err(map_err(names::VIP_FILTER))?;
            report.entries_changed += 1;
        }
        self.shadow.filter = set.clone();
        Ok(())
    }

    fn apply_vip(
        &mut self,
        key: VipKey,
        vip: &DesiredVip,
        report: &mut ApplyReport,
    ) -> Result<(), DataplaneError> {
        let (target, old) = match self.shadow.vips.get(&key) {
            None => (0, None),
            Some(shadow) => {
                let active = shadow.meta.active as usize;
                let same_table = shadow.copies[active].as_deref() == Some(&*vip.table);
                let same_meta = VipMeta {
                    active: shadow.meta.active,
                    ..vip.meta
                } == shadow.meta;
                if same_table && same_meta {
                    return Ok(());
                }
                if same_table {
                    // Flags changed only: one update of the entry, same copy.
                    let meta = VipMeta {
                        active: shadow.meta.active,
                        ..vip.meta
                    };
                    self.vips_map()?
                        .insert(key, meta, 0)
                        .map_err(map_err(names::VIPS))?;
                    self.shadow.vips.get_mut(&key).unwrap().meta = meta;
                    report.entries_changed += 1;
                    return Ok(());
                }
                let wait = COPY_GRACE.saturating_sub(shadow.switched_at.elapsed());
                if !wait.is_zero() {
                    report.deferred = Some(report.deferred.map_or(wait, |w| w.max(wait)));
                    return Ok(());
                }
                let target = 1 - active;
                (target, shadow.copies[target].clone())
            }
        };
        let base = ring_base(vip.meta.vip_id, target as u32);
        report.slots_written +=
            self.rings
                .write(base, &vip.table, old.as_deref().map(|v| v.as_slice()));
        let meta = VipMeta {
            active: target as u32,
            ..vip.meta
        };
        self.vips_map()?
            .insert(key, meta, 0)
            .map_err(map_err(names::VIPS))?;
        report.tables_switched += 1;
        report.entries_changed += 1;
        let entry = self.shadow.vips.entry(key).or_insert_with(|| ShadowVip {
            meta,
            copies: [None, None],
            switched_at: Instant::now(),
        });
        entry.meta = meta;
        entry.copies[target] = Some(vip.table.clone());
        entry.switched_at = Instant::now();
        Ok(())
    }

    /// The table the datapath reads for `key` now, read back slot by slot through
    /// the map syscall (not through the memory mapping it was written with), with
    /// the active copy taken from the kernel's own VIP entry.
    pub fn active_table(&self, key: &VipKey) -> Result<Option<Vec<u32>>, DataplaneError> {
        let Some(meta) = self.vip_entry(key)? else {
            return Ok(None);
        };
        let rings: Array<&MapData, RingChunk> =
            Array::try_from(self.map(names::RINGS)?).map_err(map_err(names::RINGS))?;
        if meta.vip_id >= MAX_VIPS || meta.ring_size > MAX_RING_SIZE {
            return Err(DataplaneError::VipRoom {
                vip_id: meta.vip_id,
                room: self.rings.vips(),
            });
        }
        // The elements that hold the table's slots, then the slots themselves.
        let first = ring_base(meta.vip_id, meta.active & 1);
        let chunks = (first / RING_CHUNK)..(first + meta.ring_size).div_ceil(RING_CHUNK);
        let slots: Vec<u16> = chunks
            .map(|index| rings.get(&index, 0))
            .collect::<Result<Vec<RingChunk>, _>>()
            .map_err(map_err(names::RINGS))?
            .concat();
        let skip = (first % RING_CHUNK) as usize;
        Ok(Some(
            slots[skip..skip + meta.ring_size as usize]
                .iter()
                .map(|&v| u32::from(v))
                .collect(),
        ))
    }

    /// The same table as [`Dataplane::active_table`] (the active copy from the
    /// kernel's own VIP entry), read through the shared mapping of `RINGS`: the very
    /// memory the datapath reads, in one copy instead of a syscall per slot. For the
    /// fleet's per-interval digest; `lb tables` keeps the syscall path.
    pub fn active_table_mapped(&self, key: &VipKey) -> Result<Option<Vec<u32>>, DataplaneError> {
        let Some(meta) = self.vip_entry(key)? else {
            return Ok(None);
        };
        self.rings.table(&meta).map(Some)
    }

    /// The kernel's own entry of the VIP `key` (`None`: not in the map).
    fn vip_entry(&self, key: &VipKey) -> Result<Option<VipMeta>, DataplaneError> {
        let vips: HashMap<&MapData, VipKey, VipMeta> =
            HashMap::try_from(self.map(names::VIPS)?).map_err(map_err(names::VIPS))?;
        match vips.get(key, 0) {
            Ok(meta) => Ok(Some(meta)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(names::VIPS)(e)),
        }
    }

    fn vips_map(&mut self) -> Result<HashMap<&mut MapData, VipKey, VipMeta>, DataplaneError> {
        HashMap::try_from(self.map_mut(names::VIPS)?).map_err(map_err(names::VIPS))
    }

    /// Attaches the balancer to `iface`. When pinned and an earlier agent's link is
    /// pinned, the running program is replaced in that link atomically (no frame
    /// sees no program, and the maps are the same), instead of attaching anew.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<(), DataplaneError> {
        let Some(dir) = self.pins.clone() else {
            let program = xdp_program(&mut self.ebpf, programs::BALANCER)?;
            let link = program
                .attach(iface, mode)
                .map_err(|source| attach_error(iface, mode, source))?;
            self.link = Some(link);
            return Ok(());
        };
        let link_path = dir.join(LINK_PIN);
        let program = xdp_program(&mut self.ebpf, programs::BALANCER)?;
        let mut replaced = false;
        if link_path.exists() {
            let pinned = PinnedLink::from_pin(&link_path).map_err(link_err(&link_path))?;
            let link = XdpLink::try_from(FdLink::from(pinned)).map_err(link_err(&link_path))?;
            match program.attach_to_link(link) {
                Ok(id) => {
                    let link = program
                        .take_link(id)
                        .map_err(|source| DataplaneError::Program {
                            name: programs::BALANCER,
                            source,
                        })?;
                    self.pinned_link = Some(FdLink::try_from(link).map_err(link_err(&link_path))?);
                    replaced = true;
                }
                // The link outlived its interface (or was detached): start afresh.
                Err(_) => {
                    let _ = std::fs::remove_file(&link_path);
                }
            }
        }
        if !replaced {
            let id = program
                .attach(iface, mode)
                .map_err(|source| attach_error(iface, mode, source))?;
            let link = program
                .take_link(id)
                .map_err(|source| DataplaneError::Program {
                    name: programs::BALANCER,
                    source,
                })?;
            let fd_link = FdLink::try_from(link).map_err(|e| DataplaneError::Link {
                path: link_path.clone(),
                message: format!(
                    "XDP links cannot be pinned here (kernel 5.9 or later needed): {e}"
                ),
            })?;
            let pinned = fd_link.pin(&link_path).map_err(link_err(&link_path))?;
            self.pinned_link = Some(FdLink::from(pinned));
        }
        let prog_path = dir.join(PROGRAM_PIN);
        let _ = std::fs::remove_file(&prog_path);
        xdp_program(&mut self.ebpf, programs::BALANCER)?
            .pin(&prog_path)
            .map_err(link_err(&prog_path))?;
        Ok(())
    }

    /// Detaches the balancer; frames then reach the kernel untouched. When pinned,
    /// also removes the pins (the maps go when the last user closes them).
    pub fn detach(&mut self) -> Result<(), DataplaneError> {
        if let Some(link) = self.link.take() {
            xdp_program(&mut self.ebpf, programs::BALANCER)?
                .detach(link)
                .map_err(|source| DataplaneError::Program {
                    name: programs::BALANCER,
                    source,
                })?;
        }
        if let Some(dir) = &self.pins {
            self.pinned_link = None;
            remove_pins(dir)?;
        }
        Ok(())
    }

    /// The datapath's records (aya-log's ring buffer), for `logger` to write as the
    /// reader calls `flush` on the value returned: the agent's reader task, or a
    /// test. Only one reader can take them.
    pub fn take_log<T: log::Log>(&mut self, logger: T) -> Result<EbpfLogger<T>, DataplaneError> {
        EbpfLogger::init_with_logger(&mut self.ebpf, logger).map_err(DataplaneError::Log)
    }

    /// What flow sharing needs of the datapath, for a thread of its own: the ring of
    /// new entries (taken: only one reader), and handles of its own on the
    /// connection tables and sharing's counters. Loaded without sharing, the ring
    /// stays empty.
    pub fn take_shared_flows(&mut self) -> Result<SharedFlowMaps, DataplaneError> {
        let ring = self
            .ebpf
            .take_map(names::SHARED_FLOWS)
            .ok_or(DataplaneError::MissingMap(names::SHARED_FLOWS))?;
        let ring = RingBuf::try_from(ring).map_err(map_err(names::SHARED_FLOWS))?;
        let v4 = HashMap::try_from(self.own_handle(names::CONNS_V4)?)
            .map_err(map_err(names::CONNS_V4))?;
        let v6 = HashMap::try_from(self.own_handle(names::CONNS_V6)?)
            .map_err(map_err(names::CONNS_V6))?;
        let stats = PerCpuArray::try_from(self.own_handle(names::SHARE_STATS)?)
            .map_err(map_err(names::SHARE_STATS))?;
        Ok(SharedFlowMaps {
            ring,
            v4,
            v6,
            stats,
        })
    }

    /// A second handle on map `name` (its descriptor duplicated), owned by the caller.
    fn own_handle(&self, name: &'static str) -> Result<Map, DataplaneError> {
        let map = self.map(name)?;
        let data = match map {
            Map::LruHashMap(d) | Map::PerCpuArray(d) => d,
            _ => return Err(DataplaneError::MissingMap(name)),
        };
        let fd = data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| DataplaneError::Map {
                map: name,
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "dup",
                    io_error: e,
                }),
            })?;
        let data = MapData::from_fd(fd).map_err(map_err(name))?;
        Ok(match map {
            Map::LruHashMap(_) => Map::LruHashMap(data),
            _ => Map::PerCpuArray(data),
        })
    }

    /// The balancer program, for `BPF_PROG_TEST_RUN`.
    pub fn program(&mut self) -> Result<&mut Xdp, DataplaneError> {
        xdp_program(&mut self.ebpf, programs::BALANCER)
    }

    /// Another program of the object that is never attached here (`lb_pass`, the
    /// floor of `cargo xtask bench datapath`, and the bench references of
    /// `lb_common::maps::programs`), loaded on first use.
    pub fn side_program(&mut self, name: &'static str) -> Result<&mut Xdp, DataplaneError> {
        let program = xdp_program(&mut self.ebpf, name)?;
        if program.fd().is_err() {
            program
                .load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        Ok(program)
    }

    /// Every flow in the connection tables, IPv4 then IPv6, with its entry (for tests
    /// and debugging; on a busy table this walks up to a million entries).
    pub fn connections(&self) -> Result<Vec<(FlowKey, ConnEntry)>, DataplaneError> {
        self.flows(names::CONNS_V4, names::CONNS_V6)
    }

    /// Every young-table entry (flows whose second packet has not come yet, with
    /// the flood guard on), IPv4 then IPv6.
    pub fn young_flows(&self) -> Result<Vec<(FlowKey, ConnEntry)>, DataplaneError> {
        self.flows(names::YOUNG_V4, names::YOUNG_V6)
    }

    /// Every entry of a pair of flow-keyed tables (IPv4 then IPv6), with its key
    /// as a [`FlowKey`].
    fn flows<V: aya::Pod>(
        &self,
        v4_name: &'static str,
        v6_name: &'static str,
    ) -> Result<Vec<(FlowKey, V)>, DataplaneError> {
        let v4: HashMap<&MapData, ConnKeyV4, V> =
            HashMap::try_from(self.map(v4_name)?).map_err(map_err(v4_name))?;
        let v6: HashMap<&MapData, ConnKeyV6, V> =
            HashMap::try_from(self.map(v6_name)?).map_err(map_err(v6_name))?;
        let mut flows = Vec::new();
        for item in v4.iter() {
            let (key, entry) = item.map_err(map_err(v4_name))?;
            flows.push((FlowKey::from(key), entry));
        }
        for item in v6.iter() {
            let (key, entry) = item.map_err(map_err(v6_name))?;
            flows.push((FlowKey::from(key), entry));
        }
        Ok(flows)
    }

    /// Datapath-wide counters summed over CPUs.
    pub fn global_stats(&self) -> Result<GlobalStats, DataplaneError> {
        Ok(self
            .per_cpu::<GlobalStats>(names::STATS, 0)?
            .iter()
            .fold(GlobalStats::default(), |acc, s| sum_global(&acc, s)))
    }

    /// One VIP's counters summed over CPUs.
    pub fn vip_stats(&self, vip_id: u32) -> Result<lb_common::types::VipStats, DataplaneError> {
        let per_cpu = self.per_cpu::<lb_common::types::VipStats>(names::VIP_STATS, vip_id)?;
        let sum = sum_flows(per_cpu.iter().map(|s| (s.packets, s.bytes, s.new_flows)));
        Ok(lb_common::types::VipStats {
            packets: sum.0,
            bytes: sum.1,
            new_flows: sum.2,
        })
    }

    /// One backend's counters, per CPU (index = CPU number).
    pub fn backend_stats_per_cpu(
        &self,
        backend_id: u32,
    ) -> Result<Vec<BackendStats>, DataplaneError> {
        self.per_cpu(names::BACKEND_STATS, backend_id)
    }

    /// One backend's counters summed over CPUs.
    pub fn backend_stats(&self, backend_id: u32) -> Result<BackendStats, DataplaneError> {
        let per_cpu = self.backend_stats_per_cpu(backend_id)?;
        let sum = sum_flows(per_cpu.iter().map(|s| (s.packets, s.bytes, s.new_flows)));
        Ok(BackendStats {
            packets: sum.0,
            bytes: sum.1,
            new_flows: sum.2,
        })
    }

    /// Each pinned map's geometry and memory, as the kernel accounts it (`memlock`
    /// in the map's fdinfo) when the datapath was loaded, in [`names::ALL`] order.
    /// Empty for a datapath that is not pinned (only tests load one).
    pub fn map_memory(&self) -> &[MapMemory] {
        &self.maps
    }

    /// The flood guard's counters summed over CPUs.
    pub fn guard_stats(&self) -> Result<GuardStats, DataplaneError> {
        let per_cpu: Vec<GuardStats> = self.per_cpu(names::GUARD_STATS, 0)?;
        Ok(per_cpu
            .iter()
            .fold(GuardStats::default(), |a, s| GuardStats {
                young: a.young + s.young,
                promoted: a.promoted + s.promoted,
                young_failed: a.young_failed + s.young_failed,
            }))
    }

    /// Full NAT's counters summed over CPUs.
    pub fn nat_stats(&self) -> Result<NatStats, DataplaneError> {
        let per_cpu: Vec<NatStats> = self.per_cpu(names::NAT_STATS, 0)?;
        Ok(per_cpu.iter().fold(NatStats::default(), |a, s| NatStats {
            to_backend: a.to_backend + s.to_backend,
            to_client: a.to_client + s.to_client,
            claimed: a.claimed + s.claimed,
            port_collisions: a.port_collisions + s.port_collisions,
            ports_exhausted: a.ports_exhausted + s.ports_exhausted,
            reclaimed: a.reclaimed + s.reclaimed,
            lost: a.lost + s.lost,
            reply_unknown: a.reply_unknown + s.reply_unknown,
        }))
    }

    /// Every full-NAT flow, IPv4 then IPv6: its reply's tuple as the backend sends
    /// it (source the backend, destination the NAT address and port) and the
    /// client's flow it turns back into. Walks the whole NAT tables.
    pub fn nat_flows(&self) -> Result<Vec<(FlowKey, NatEntry)>, DataplaneError> {
        self.flows(names::NAT_V4, names::NAT_V6)
    }

    /// One walk of the NAT tables: removes every entry idle for longer than its
    /// timeout at `now` (on `lb_common::types::nat_clock`), and counts the others,
    /// and the ports each source address holds (over all backends). An entry a
    /// packet touched after it was read is left.
    pub fn nat_sweep(
        &mut self,
        now: u32,
        timeouts: &NatTimeouts,
    ) -> Result<NatUsage, DataplaneError> {
        let mut usage = NatUsage::default();
        // Idle time on the wrapping clock, signed: a packet stamped after `now` was
        // read (the walk takes a while) makes an entry younger than now, not older.
        let idle = |seen: u32| now.wrapping_sub(seen) as i32;
        for (reply, entry) in self.nat_flows()? {
            let timeout = timeouts.of(reply.proto, entry.flags) as i32;
            if idle(entry.seen) > timeout {
                // Read again just before removing: a packet may have come since.
                let still = self.nat_entry(&reply)?;
                if still.is_some_and(|e| idle(e.seen) > timeout) {
                    self.forget_nat_flow(&reply)?;
                    usage.expired += 1;
                    continue;
                }
            }
            usage.flows += 1;
            let source = crate::desired::ip_of(&reply.dst, reply.family);
            *usage.by_source.entry(source).or_default() += 1;
        }
        Ok(usage)
    }

    /// The NAT entry of the reply tuple `reply`, if there is one.
    fn nat_entry(&self, reply: &FlowKey) -> Result<Option<NatEntry>, DataplaneError> {
        let v4 = reply.family == FAMILY_V4;
        let name = if v4 { names::NAT_V4 } else { names::NAT_V6 };
        let found = if v4 {
            let map: HashMap<&MapData, ConnKeyV4, NatEntry> =
                HashMap::try_from(self.map(name)?).map_err(map_err(name))?;
            map.get(&reply.conn_key_v4(), 0)
        } else {
            let map: HashMap<&MapData, ConnKeyV6, NatEntry> =
                HashMap::try_from(self.map(name)?).map_err(map_err(name))?;
            map.get(&reply.conn_key_v6(), 0)
        };
        match found {
            Ok(entry) => Ok(Some(entry)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(name)(e)),
        }
    }

    /// Removes the NAT entry of the reply tuple `reply` (as [`Dataplane::nat_flows`]
    /// lists it), as the LRU does when it evicts one: for tests of what the
    /// datapath does about it.
    pub fn forget_nat_flow(&mut self, reply: &FlowKey) -> Result<(), DataplaneError> {
        if reply.family == FAMILY_V4 {
            let name = names::NAT_V4;
            let mut map: HashMap<&mut MapData, ConnKeyV4, NatEntry> =
                HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
            map.remove(&reply.conn_key_v4()).map_err(map_err(name))
        } else {
            let name = names::NAT_V6;
            let mut map: HashMap<&mut MapData, ConnKeyV6, NatEntry> =
                HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
            map.remove(&reply.conn_key_v6()).map_err(map_err(name))
        }
    }

    /// Entry `index` of the per-CPU array `name`, one value per CPU.
    fn per_cpu<T: aya::Pod>(
        &self,
        name: &'static str,
        index: u32,
    ) -> Result<Vec<T>, DataplaneError> {
        let map: PerCpuArray<&MapData, T> =
            PerCpuArray::try_from(self.map(name)?).map_err(map_err(name))?;
        let values = map.get(&index, 0).map_err(map_err(name))?;
        Ok(values.iter().copied().collect())
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map, DataplaneError> {
        self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, DataplaneError> {
        self.ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap(name))
    }
}

/// One map's geometry and the memory the kernel charges for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapMemory {
    pub name: &'static str,
    pub max_entries: u32,
    pub key_size: u32,
    pub value_size: u32,
    /// Bytes, as the kernel accounts them (`memlock` in the map's fdinfo: since
    /// Linux 6.4 the map type's own estimate of what it allocated).
    pub bytes: u64,
}

/// Each map pinned under `dir`: its geometry, and its `memlock` read from the
/// fdinfo of a descriptor opened for it.
fn read_map_memory(dir: &Path) -> Result<Vec<MapMemory>, DataplaneError> {
    names::ALL
        .iter()
        .map(|&name| {
            let info = MapInfo::from_pin(dir.join(name)).map_err(map_err(name))?;
            let fd = info.fd().map_err(map_err(name))?;
            let fdinfo = format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd());
            let text = std::fs::read_to_string(&fdinfo).map_err(|source| DataplaneError::Pin {
                path: fdinfo.into(),
                source,
            })?;
            Ok(MapMemory {
                name,
                max_entries: info.max_entries(),
                key_size: info.key_size(),
                value_size: info.value_size(),
                bytes: memlock_of(&text).unwrap_or(0),
            })
        })
        .collect()
}

/// The `memlock:` field of a map's `/proc/<pid>/fdinfo/<fd>`, in bytes.
pub fn memlock_of(fdinfo: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|line| line.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Packets, bytes and new flows summed over CPUs.
fn sum_flows(values: impl Iterator<Item = (u64, u64, u64)>) -> (u64, u64, u64) {
    values.fold((0, 0, 0), |a, v| (a.0 + v.0, a.1 + v.1, a.2 + v.2))
}

fn sum_global(a: &GlobalStats, b: &GlobalStats) -> GlobalStats {
    GlobalStats {
        rx_frames: a.rx_frames + b.rx_frames,
        pass_not_ip: a.pass_not_ip + b.pass_not_ip,
        pass_not_vip: a.pass_not_vip + b.pass_not_vip,
        pass_fragment: a.pass_fragment + b.pass_fragment,
        ipv4_options: a.ipv4_options + b.ipv4_options,
        tx_encap: a.tx_encap + b.tx_encap,
        icmp_echo_reply: a.icmp_echo_reply + b.icmp_echo_reply,
        icmp_error_forwarded: a.icmp_error_forwarded + b.icmp_error_forwarded,
        pass_icmp_other: a.pass_icmp_other + b.pass_icmp_other,
        drop_encap_failed: a.drop_encap_failed + b.drop_encap_failed,
        pass_truncated: a.pass_truncated + b.pass_truncated,
        pass_malformed: a.pass_malformed + b.pass_malformed,
        pass_ipv6_extension: a.pass_ipv6_extension + b.pass_ipv6_extension,
        drop_no_backend: a.drop_no_backend + b.drop_no_backend,
        conn_hit: a.conn_hit + b.conn_hit,
        conn_miss_syn: a.conn_miss_syn + b.conn_miss_syn,
        conn_miss_non_syn: a.conn_miss_non_syn + b.conn_miss_non_syn,
        conn_insert_failed: a.conn_insert_failed + b.conn_insert_failed,
        tx: a.tx + b.tx,
    }
}

/// A pinning or link failure at `path`, for `map_err`.
fn link_err<E: std::fmt::Display>(path: &Path) -> impl FnOnce(E) -> DataplaneError + '_ {
    move |e| DataplaneError::Link {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// File names of the pinned link and program inside an instance's pin directory.
pub const LINK_PIN: &str = "link";
pub const PROGRAM_PIN: &str = "program";

/// Removes an instance's pins: the link first (which detaches the program), then
/// Maps an earlier version pinned and this one no longer has: `CONNS`, the single
/// connection table before it was split by family.
const LEGACY_PINS: [&str; 1] = ["CONNS"];

/// A lookup table carried over from a pinned `RINGS` of the unpacked layout.
struct CarriedTable {
    vip_id: u32,
    /// Its first slot (the same in both layouts).
    base: u32,
    table: Vec<u32>,
}

/// An agent before the packed layout pinned `RINGS` with one 32-bit slot per
/// element, for 64 VIPs (64 MiB). If `dir` holds such a map, reads every VIP's
/// active table from it and removes its pin, so that the program about to be loaded
/// creates the packed one; the caller writes the tables back into it. Established
/// flows are not touched (their connection tables are adopted as they are), and
/// new flows find the same tables.
fn unpin_unpacked_rings(dir: &Path) -> Result<Vec<CarriedTable>, DataplaneError> {
    let path = dir.join(names::RINGS);
    let old = match MapData::from_pin(&path) {
        Ok(old) => old,
        Err(_) if !path.exists() => return Ok(Vec::new()),
        Err(source) => return Err(map_err(names::RINGS)(source)),
    };
    let info = old.info().map_err(map_err(names::RINGS))?;
    if info.value_size() as usize != std::mem::size_of::<u32>() {
        return Ok(Vec::new());
    }
    let old: Array<MapData, u32> =
        Array::try_from(Map::Array(old)).map_err(map_err(names::RINGS))?;
    let vips = MapData::from_pin(dir.join(names::VIPS)).map_err(map_err(names::VIPS))?;
    let vips: HashMap<MapData, VipKey, VipMeta> =
        HashMap::try_from(Map::HashMap(vips)).map_err(map_err(names::VIPS))?;
    let mut carried = Vec::new();
    for entry in vips.iter() {
        let (_, meta) = entry.map_err(map_err(names::VIPS))?;
        // Echo entries have no table; an entry no agent could have written (an id
        // or size out of range) names none either.
        if meta.flags & VIP_F_ECHO != 0 || meta.vip_id >= MAX_VIPS || meta.ring_size > MAX_RING_SIZE
        {
            continue;
        }
        let base = ring_base(meta.vip_id, meta.active & 1);
        let table = (base..base + meta.ring_size)
            .map(|slot| old.get(&slot, 0))
            .collect::<Result<Vec<u32>, _>>()
            .map_err(map_err(names::RINGS))?;
        carried.push(CarriedTable {
            vip_id: meta.vip_id,
            base,
            table,
        });
    }
    std::fs::remove_file(&path).map_err(|source| DataplaneError::Pin {
        path: path.clone(),
        source,
    })?;
    tracing::warn!(
        "the pinned lookup tables ({}) have the layout of an earlier lb (one 32-bit slot \
         per element, room for 64 VIPs, 64 MiB): replaced by the packed layout, with \
         the {} tables in use carried over; the connection tables and their flows are \
         kept",
        names::RINGS,
        carried.len()
    );
    Ok(carried)
}

/// Removes [`LEGACY_PINS`] from `dir`: an agent that adopts an older agent's pins
/// starts new connection tables, and the old one would otherwise stay pinned,
/// holding its memory, until someone removed it by hand.
fn remove_legacy_pins(dir: &Path) -> Result<(), DataplaneError> {
    for name in LEGACY_PINS {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => tracing::info!("removed the pin {name} of an earlier version"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(DataplaneError::Pin {
                    path: dir.join(name),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Whether an agent's datapath is pinned under `dir` (its maps are there).
pub fn is_pinned(dir: &Path) -> bool {
    dir.join(names::VIPS).exists()
}

/// Removes an instance's pins: the link first (which detaches the program), then
/// the program and the maps, then the directory. Missing files are fine.
pub fn remove_pins(dir: &Path) -> Result<(), DataplaneError> {
    remove_legacy_pins(dir)?;
    let pin_err = |source| DataplaneError::Pin {
        path: dir.to_owned(),
        source,
    };
    for name in [LINK_PIN, PROGRAM_PIN].iter().chain(names::ALL.iter()) {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(pin_err(e)),
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(pin_err(e)),
    }
}

/// The value of aya-log-ebpf's `AYA_LOG_LEVEL` for `filter`: a record is made when
/// its level's number is at most this (0: none).
fn aya_log_level(filter: LevelFilter) -> u8 {
    let level = match filter.to_level() {
        None => return 0,
        Some(log::Level::Error) => aya_log::Level::Error,
        Some(log::Level::Warn) => aya_log::Level::Warn,
        Some(log::Level::Info) => aya_log::Level::Info,
        Some(log::Level::Debug) => aya_log::Level::Debug,
        Some(log::Level::Trace) => aya_log::Level::Trace,
    };
    level as u8
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DataplaneError> {
    ebpf.program_mut(name)
        .ok_or(DataplaneError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}

/// The pass-through program attached to one interface; detached on drop. Needed on
/// the peer of a veth that receives `XDP_TX` frames (see docs/ARCHITECTURE.md).
pub struct PassThrough {
    _ebpf: Ebpf,
}

impl PassThrough {
    /// Loads `lb_pass` and attaches it to `iface` in native mode.
    pub fn attach(iface: &str) -> Result<PassThrough, DataplaneError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DataplaneError::NotBuilt);
        }
        let mut ebpf = EbpfLoader::new().load(EBPF_OBJECT)?;
        let program = xdp_program(&mut ebpf, programs::PASS)?;
        program.load().map_err(|source| DataplaneError::Program {
            name: programs::PASS,
            source,
        })?;
        program
            .attach(iface, XdpMode::Driver)
            .map_err(|source| attach_error(iface, XdpMode::Driver, source))?;
        Ok(PassThrough { _ebpf: ebpf })
    }
}

#[cfg(test)]
mod tests {
    use super::memlock_of;

    #[test]
    fn memlock_is_read_from_a_maps_fdinfo() {
        let fdinfo = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t2077\nmap_type:\t9\n\
                      key_size:\t16\nvalue_size:\t8\nmax_entries:\t1048576\n\
                      map_flags:\t0x2\nmap_extra:\t0x0\nmemlock:\t104955904\nmap_id:\t31\n";
        assert_eq!(memlock_of(fdinfo), Some(104_955_904));
        assert_eq!(memlock_of("pos:\t0\n"), None);
        assert_eq!(memlock_of("memlock:\tmany\n"), None);
    }
}
