//! The kernel side, seen from userspace: loads the XDP object, writes the desired
//! state into its maps, attaches it to an interface and reads its counters. Used by
//! the agent, and by the tests (packet fixtures through `BPF_PROG_TEST_RUN`).

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{ProgramError, Xdp, XdpMode, xdp::XdpLinkId},
};
use lb_common::{
    maps::{names, programs, ring_base},
    types::{BackendStats, GlobalStats, VipKey, VipMeta},
};

use crate::desired::Desired;

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
    #[error("cannot attach XDP to interface {iface} ({mode:?} mode): {source}")]
    Attach {
        iface: String,
        mode: XdpMode,
        #[source]
        source: ProgramError,
    },
    #[error("map `{map}`: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

/// The loaded load-balancing program and its maps.
pub struct Dataplane {
    /// Owns the program and the maps; dropping it detaches and unloads them.
    ebpf: Ebpf,
    /// The attachment, while attached.
    link: Option<XdpLinkId>,
}

impl Dataplane {
    /// Loads the object and verifies the balancer program, without attaching it.
    pub fn load() -> Result<Dataplane, DataplaneError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DataplaneError::NotBuilt);
        }
        let mut ebpf = EbpfLoader::new().load(EBPF_OBJECT)?;
        xdp_program(&mut ebpf, programs::BALANCER)?
            .load()
            .map_err(|source| DataplaneError::Program {
                name: programs::BALANCER,
                source,
            })?;
        Ok(Dataplane { ebpf, link: None })
    }

    /// Writes `desired` into the maps: backends first, then each VIP's table into its
    /// copy 0, then the VIP entries that make them reachable. Called before attaching.
    pub fn write(&mut self, desired: &Desired) -> Result<(), DataplaneError> {
        {
            let mut backends: Array<&mut MapData, lb_common::types::Backend> =
                Array::try_from(self.map_mut(names::BACKENDS)?)
                    .map_err(map_err(names::BACKENDS))?;
            for (id, backend) in desired.backends.iter().enumerate() {
                backends
                    .set(id as u32, backend, 0)
                    .map_err(map_err(names::BACKENDS))?;
            }
        }
        {
            let mut rings: Array<&mut MapData, u32> =
                Array::try_from(self.map_mut(names::RINGS)?).map_err(map_err(names::RINGS))?;
            for vip in &desired.vips {
                let base = ring_base(vip.meta.vip_id, vip.meta.active);
                for (slot, backend_id) in vip.table.iter().enumerate() {
                    rings
                        .set(base + slot as u32, backend_id, 0)
                        .map_err(map_err(names::RINGS))?;
                }
            }
        }
        let mut vips: HashMap<&mut MapData, VipKey, VipMeta> =
            HashMap::try_from(self.map_mut(names::VIPS)?).map_err(map_err(names::VIPS))?;
        for vip in &desired.vips {
            vips.insert(vip.key, vip.meta, 0)
                .map_err(map_err(names::VIPS))?;
        }
        Ok(())
    }

    /// Attaches the balancer to `iface`.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<(), DataplaneError> {
        let program = xdp_program(&mut self.ebpf, programs::BALANCER)?;
        let link = program
            .attach(iface, mode)
            .map_err(|source| DataplaneError::Attach {
                iface: iface.to_owned(),
                mode,
                source,
            })?;
        self.link = Some(link);
        Ok(())
    }

    /// Detaches the balancer; frames then reach the kernel untouched.
    pub fn detach(&mut self) -> Result<(), DataplaneError> {
        if let Some(link) = self.link.take() {
            xdp_program(&mut self.ebpf, programs::BALANCER)?
                .detach(link)
                .map_err(|source| DataplaneError::Program {
                    name: programs::BALANCER,
                    source,
                })?;
        }
        Ok(())
    }

    /// The balancer program, for `BPF_PROG_TEST_RUN`.
    pub fn program(&mut self) -> Result<&mut Xdp, DataplaneError> {
        xdp_program(&mut self.ebpf, programs::BALANCER)
    }

    /// Datapath-wide counters summed over CPUs.
    pub fn global_stats(&self) -> Result<GlobalStats, DataplaneError> {
        let map: PerCpuArray<&MapData, GlobalStats> =
            PerCpuArray::try_from(self.map(names::STATS)?).map_err(map_err(names::STATS))?;
        let per_cpu = map.get(&0, 0).map_err(map_err(names::STATS))?;
        Ok(per_cpu
            .iter()
            .fold(GlobalStats::default(), |acc, s| sum_global(&acc, s)))
    }

    /// One backend's counters summed over CPUs.
    pub fn backend_stats(&self, backend_id: u32) -> Result<BackendStats, DataplaneError> {
        let map: PerCpuArray<&MapData, BackendStats> =
            PerCpuArray::try_from(self.map(names::BACKEND_STATS)?)
                .map_err(map_err(names::BACKEND_STATS))?;
        let per_cpu = map
            .get(&backend_id, 0)
            .map_err(map_err(names::BACKEND_STATS))?;
        Ok(per_cpu
            .iter()
            .fold(BackendStats::default(), |acc, s| BackendStats {
                packets: acc.packets + s.packets,
                bytes: acc.bytes + s.bytes,
                new_flows: acc.new_flows + s.new_flows,
            }))
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

fn sum_global(a: &GlobalStats, b: &GlobalStats) -> GlobalStats {
    GlobalStats {
        rx_frames: a.rx_frames + b.rx_frames,
        pass_not_ip: a.pass_not_ip + b.pass_not_ip,
        pass_not_vip: a.pass_not_vip + b.pass_not_vip,
        pass_fragment: a.pass_fragment + b.pass_fragment,
        ipv4_options: a.ipv4_options + b.ipv4_options,
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
            .map_err(|source| DataplaneError::Attach {
                iface: iface.to_owned(),
                mode: XdpMode::Driver,
                source,
            })?;
        Ok(PassThrough { _ebpf: ebpf })
    }
}
