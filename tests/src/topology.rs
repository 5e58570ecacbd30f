//! The layer-2 direct-server-return test world (client, load balancer and backends
//! on one bridged segment); owned by the lb-tests harness and used by the end-to-end
//! tests in `tests/tests/`.
//!
//! [`Topology::build`] creates, under one [`unique_prefix`]:
//!
//! - a switch namespace holding a Linux bridge;
//! - namespaces for the client, the load balancer and N backends, each with one veth
//!   whose peer is a port of that bridge;
//! - IPv4 198.18.0.0/24 and IPv6 fd00:18::/64 on the segment (the IPv6 suffix is
//!   always written with the same decimal digits as the IPv4 last octet, so backend 0
//!   is `fd00:18::11`):
//!
//!   | host | IPv4 | IPv6 | added by |
//!   |---|---|---|---|
//!   | client | 198.18.0.1 | fd00:18::1 | [`Topology::build`] |
//!   | load balancer 0 | 198.18.0.2 | fd00:18::2 | [`Topology::build`] |
//!   | load balancer 1 + n ([`Role::ExtraLoadBalancer`]`(n)`, n < 8) | 198.18.0.(3+n) | fd00:18::(3+n) | [`Topology::add_load_balancer`] |
//!   | backend i (i < 99) | 198.18.0.(11+i) | fd00:18::(11+i) | [`Topology::build`] |
//!   | service host k ([`Role::Service`]`(k)`, k < 50) | 198.18.0.(200+k) | fd00:18::(200+k) | [`Topology::add_service_host`] |
//!
//!   Load balancers fill .2 to .10 and backends .11 to .109; a service host (an etcd,
//!   say) is a plain host on the segment, with no VIP and no route to it. Nothing
//!   here uses .110 to .199 or .250 to .254: a test that puts a service on a
//!   secondary address of an existing host (`ip addr add 198.18.0.250/24 dev ...`)
//!   takes it from there;
//! - the VIP 198.18.1.1/32 and fd00:18:1::1/128 on `lo` of every backend, with
//!   `arp_ignore=1` and `arp_announce=2` so that only the load balancer answers for it;
//! - a host route from the client to each VIP via the load balancer, and no default
//!   route anywhere.
//!
//! TX checksum offload is off on every host veth, so that packets carry full
//! checksums as on a real wire (see [`set_tx_checksum_offload`] for why XDP needs
//! that). A native XDP program on the load balancer's veth that sends frames back
//! out with `XDP_TX` also needs an XDP program (a pass-through one will do) on the
//! peer, the bridge port [`Topology::lb_bridge_port`]: without one the kernel drops
//! those frames and counts them as TX drops of the load balancer's veth.
//!
//! Host-side MAC addresses are fixed: `02:00:00:00:00:XX` where XX is the host's last
//! IPv4 octet; bridge ports are `02:00:00:00:01:XX`. Link names are the topology's
//! prefix (at most 11 characters), `h` (the host's veth) or `p` (its bridge port), and
//! a role tag of at most 3 characters (`c`, `l`, `b0`..`b98`, `m0`..`m7` for the extra
//! load balancers, `s0`..`s49` for service hosts), so they fit the kernel's 15.
//! Namespaces are `PREFIX-client`, `PREFIX-lb`, `PREFIX-lb2`..`PREFIX-lb9`,
//! `PREFIX-backendI` and `PREFIX-svc-TAG`. Dropping the topology deletes its
//! namespaces, which deletes the veths and the bridge with them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::netns::{Netns, sweep_stale, unique_prefix};

/// The IPv4 virtual service address, on `lo` of every backend.
pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// The IPv6 virtual service address, on `lo` of every backend.
pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 1);
/// The client's address on the segment.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The client's IPv6 address on the segment.
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 1);
/// The load balancer's address on the segment.
pub const LB_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The load balancer's IPv6 address on the segment.
pub const LB_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 2);
/// The prefix length of the IPv4 segment 198.18.0.0/24.
pub const SEGMENT_V4_PREFIX_LEN: u8 = 24;
/// The prefix length of the IPv6 segment fd00:18::/64.
pub const SEGMENT_V6_PREFIX_LEN: u8 = 64;
/// The most backends a topology can have (the role tag `b98` must fit a link name).
pub const MAX_BACKENDS: usize = 99;
/// The most load balancers a topology can have besides the first (198.18.0.3 to .10).
pub const MAX_EXTRA_LOAD_BALANCERS: usize = 8;
/// The most service hosts a topology can have (198.18.0.200 to .249).
pub const MAX_SERVICE_HOSTS: usize = 50;
/// The longest tag [`Topology::add_service_host`] takes.
pub const MAX_SERVICE_TAG_LEN: usize = 16;

/// How long [`Topology::build`] waits for links and addresses to become usable.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The IPv4 address of backend `index` on the segment: 198.18.0.(11 + index).
pub fn backend_v4(index: usize) -> Ipv4Addr {
    assert!(index < MAX_BACKENDS, "backend index {index} out of range");
    Ipv4Addr::new(198, 18, 0, 11 + index as u8)
}

/// The IPv6 address of backend `index` on the segment: `fd00:18::` followed by the
/// decimal digits of 11 + index (so backend 0 is `fd00:18::11`).
pub fn backend_v6(index: usize) -> Ipv6Addr {
    assert!(index < MAX_BACKENDS, "backend index {index} out of range");
    decimal_v6(11 + index)
}

/// The IPv4 address of extra load balancer `n` (the load balancer number `1 + n` of
/// [`Topology::load_balancers`]): 198.18.0.(3 + n).
pub fn extra_lb_v4(n: usize) -> Ipv4Addr {
    assert!(
        n < MAX_EXTRA_LOAD_BALANCERS,
        "extra load balancer {n} out of range"
    );
    Ipv4Addr::new(198, 18, 0, 3 + n as u8)
}

/// The IPv6 address of extra load balancer `n`: `fd00:18::` followed by the decimal
/// digits of 3 + n (so extra load balancer 7 is `fd00:18::10`).
pub fn extra_lb_v6(n: usize) -> Ipv6Addr {
    assert!(
        n < MAX_EXTRA_LOAD_BALANCERS,
        "extra load balancer {n} out of range"
    );
    decimal_v6(3 + n)
}

/// The IPv4 address of service host `k`: 198.18.0.(200 + k).
pub fn service_v4(k: usize) -> Ipv4Addr {
    assert!(k < MAX_SERVICE_HOSTS, "service host {k} out of range");
    Ipv4Addr::new(198, 18, 0, 200 + k as u8)
}

/// The IPv6 address of service host `k`: `fd00:18::` followed by the decimal digits
/// of 200 + k.
pub fn service_v6(k: usize) -> Ipv6Addr {
    assert!(k < MAX_SERVICE_HOSTS, "service host {k} out of range");
    decimal_v6(200 + k)
}

/// `fd00:18::N` with N's decimal digits read as hex, as every host's IPv6 suffix is.
fn decimal_v6(n: usize) -> Ipv6Addr {
    let group = u16::from_str_radix(&n.to_string(), 16).expect("decimal digits parse as hex");
    Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, group)
}

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// A locally administered unicast address `02:00:00:00:HI:LO`.
    pub const fn local(hi: u8, lo: u8) -> Mac {
        Mac([0x02, 0, 0, 0, hi, lo])
    }

    /// The six bytes in wire order.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// What part a host plays in the topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The host that opens connections to the VIP.
    Client,
    /// The host where the load balancer attaches its XDP program.
    LoadBalancer,
    /// Backend number `.0`, which serves the VIP from its `lo`.
    Backend(usize),
    /// Another load balancer for scale-out tests, number `.0` of those added with
    /// [`Topology::add_load_balancer`] (at 198.18.0.(3 + n)); `ExtraLoadBalancer(0)`
    /// is the second load balancer of [`Topology::lb2`].
    ExtraLoadBalancer(usize),
    /// Service host number `.0` (at 198.18.0.(200 + k)): a plain host on the segment
    /// for something the load balancers talk to, such as etcd.
    Service(usize),
}

impl Role {
    /// The short tag used in link names: `c`, `l`, `b<index>`, `m<n>` or `s<k>`.
    fn tag(self) -> String {
        match self {
            Role::Client => "c".into(),
            Role::LoadBalancer => "l".into(),
            Role::Backend(i) => format!("b{i}"),
            Role::ExtraLoadBalancer(n) => format!("m{n}"),
            Role::Service(k) => format!("s{k}"),
        }
    }

    /// The suffix used in namespace names: `client`, `lb`, `backend<index>` or
    /// `lb<2 + n>` (a service host's namespace is named after its tag instead).
    fn ns_suffix(self) -> String {
        match self {
            Role::Client => "client".into(),
            Role::LoadBalancer => "lb".into(),
            Role::Backend(i) => format!("backend{i}"),
            Role::ExtraLoadBalancer(n) => format!("lb{}", 2 + n),
            Role::Service(k) => format!("svc{k}"),
        }
    }

    fn addresses(self) -> (Ipv4Addr, Ipv6Addr) {
        match self {
            Role::Client => (CLIENT_V4, CLIENT_V6),
            Role::LoadBalancer => (LB_V4, LB_V6),
            Role::Backend(i) => (backend_v4(i), backend_v6(i)),
            Role::ExtraLoadBalancer(n) => (extra_lb_v4(n), extra_lb_v6(n)),
            Role::Service(k) => (service_v4(k), service_v6(k)),
        }
    }

    /// Whether the host is a load balancer (the first or an extra one).
    pub fn is_load_balancer(self) -> bool {
        matches!(self, Role::LoadBalancer | Role::ExtraLoadBalancer(_))
    }
}

/// One host of the segment: its namespace and its single veth.
#[derive(Debug)]
pub struct Host {
    role: Role,
    ifname: String,
    bridge_port: String,
    mac: Mac,
    bridge_port_mac: Mac,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    ns: Netns,
}

impl Host {
    /// What part the host plays.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The host's namespace.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// The name of the host's veth, inside the host's namespace.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The name of the veth's peer, a bridge port inside the switch namespace.
    pub fn bridge_port(&self) -> &str {
        &self.bridge_port
    }

    /// The MAC address of the host's veth.
    pub fn mac(&self) -> Mac {
        self.mac
    }

    /// The MAC address of the bridge port (it never appears as a frame source).
    pub fn bridge_port_mac(&self) -> Mac {
        self.bridge_port_mac
    }

    /// The host's IPv4 address on the segment.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    /// The host's IPv6 address on the segment.
    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }

    /// The host's segment address of the given family.
    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.ipv6)
        } else {
            IpAddr::V4(self.ipv4)
        }
    }

    /// Whether TX checksum offload of the host's veth is on (it is off after build).
    pub fn tx_checksum_offload(&self) -> Result<bool> {
        tx_checksum_offload(&self.ns, &self.ifname)
    }

    /// Turns TX checksum offload of the host's veth on or off.
    pub fn set_tx_checksum_offload(&self, enabled: bool) -> Result<()> {
        set_tx_checksum_offload(&self.ns, &self.ifname, enabled)
    }

    /// The interface index of the host's veth inside its namespace.
    pub fn ifindex(&self) -> Result<u32> {
        ifindex_in(&self.ns, &self.ifname)
    }
}

/// Returns the interface index of `ifname` inside `ns`.
pub fn ifindex_in(ns: &Netns, ifname: &str) -> Result<u32> {
    let c_name = std::ffi::CString::new(ifname).context("interface name contains NUL")?;
    // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
    let index = ns.run_in(|| unsafe { libc::if_nametoindex(c_name.as_ptr()) })?;
    ensure!(
        index != 0,
        "no interface {ifname} in network namespace {}",
        ns.name()
    );
    Ok(index)
}

/// The `ifreq` of `SIOCETHTOOL` (`linux/if.h`): a name and a pointer to the command.
#[repr(C)]
struct EthtoolIfreq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    // The kernel's union is 24 bytes; the rest of it is unused here.
    _pad: [u8; 16],
}

/// `struct ethtool_value` (`linux/ethtool.h`).
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `ETHTOOL_GTXCSUM` and `ETHTOOL_STXCSUM` (`linux/ethtool.h`).
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;

/// Runs one `ethtool_value` command on `ifname` inside `ns` and returns its data.
fn ethtool_value(ns: &Netns, ifname: &str, cmd: u32, data: u32) -> Result<u32> {
    ensure!(
        ifname.len() < libc::IFNAMSIZ,
        "interface name {ifname} is too long"
    );
    let result = ns.run_in(|| -> std::io::Result<u32> {
        // SAFETY: a plain datagram socket, closed below on every path.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut value = EthtoolValue { cmd, data };
        let mut request = EthtoolIfreq {
            name: [0; libc::IFNAMSIZ],
            data: (&raw mut value).cast(),
            _pad: [0; 16],
        };
        for (dst, src) in request.name.iter_mut().zip(ifname.bytes()) {
            *dst = src as libc::c_char;
        }
        // SAFETY: the request points at `value`, which outlives the call, and the
        // name is NUL-terminated because it is shorter than IFNAMSIZ.
        let rc = unsafe { libc::ioctl(fd, libc::SIOCETHTOOL, &mut request) };
        let error = std::io::Error::last_os_error();
        // SAFETY: fd is the socket opened above.
        unsafe { libc::close(fd) };
        if rc != 0 {
            return Err(error);
        }
        Ok(value.data)
    })?;
    result.with_context(|| {
        format!(
            "ethtool command {cmd:#x} on {ifname} in {} failed",
            ns.name()
        )
    })
}

/// Turns TX checksum offload of `ifname` inside `ns` on or off, like
/// `ethtool -K IFNAME tx on|off` (which is not installed here).
///
/// A veth with the offload on never fills in TCP and UDP checksums: it hands the
/// packet on marked "checksum partial". A native XDP program that sends such a
/// packet on with `XDP_TX` or a redirect loses the mark, and the receiver drops the
/// packet for its bad checksum. With the offload off, the sender computes full
/// checksums, as a real network card would before the wire.
pub fn set_tx_checksum_offload(ns: &Netns, ifname: &str, enabled: bool) -> Result<()> {
    ethtool_value(ns, ifname, ETHTOOL_STXCSUM, u32::from(enabled)).map(|_| ())
}

/// Has every packet that `ifname` inside `ns` receives processed on a CPU chosen by
/// its flow hash (receive packet steering over all CPUs), as a real network card's
/// receive-side scaling would, instead of on whichever CPU sent it.
///
/// A veth hands each frame to the receiving stack on the sending CPU. Without
/// steering, two segments of one TCP connection sent from different CPUs (the
/// handshake's last ACK, sent where the SYN-ACK was processed, and the first data
/// segment, sent where the client thread runs) reach the server's stack at the same
/// moment on two CPUs. Linux then has a race: while one CPU replaces the connection's
/// request socket with the full socket in the established hash, the other CPU's
/// lockless lookup can miss both and hand its segment to the listener, which answers
/// the valid ACK with a reset that kills the new connection (one in several hundred
/// thousand connections here). Steering keeps a flow's segments on one CPU, in order.
pub fn steer_each_flow_to_one_cpu(ns: &Netns, ifname: &str) -> Result<()> {
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.clamp(1, 4096) as usize;
    // The mask in the kernel's format: 32-bit hex words, most significant first.
    let mut words = vec![0u32; cpus.div_ceil(32)];
    for cpu in 0..cpus {
        words[cpu / 32] |= 1 << (cpu % 32);
    }
    let mask = words
        .iter()
        .rev()
        .map(|w| format!("{w:08x}"))
        .collect::<Vec<_>>()
        .join(",");
    ns.exec(&[
        "sh",
        "-c",
        &format!(
            "for q in /sys/class/net/{ifname}/queues/rx-*; do echo {mask} > $q/rps_cpus || exit 1; done"
        ),
    ])
    .with_context(|| format!("cannot set receive packet steering on {ifname} in {}", ns.name()))?;
    Ok(())
}

/// Whether TX checksum offload of `ifname` inside `ns` is on.
pub fn tx_checksum_offload(ns: &Netns, ifname: &str) -> Result<bool> {
    ethtool_value(ns, ifname, ETHTOOL_GTXCSUM, 0).map(|data| data != 0)
}

/// The bridged test segment; dropping it removes every namespace it created.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    bridge: String,
    client: Host,
    lb: Host,
    backends: Vec<Host>,
    /// The load balancers added after the build, for scale-out tests; number n is
    /// `Role::ExtraLoadBalancer(n)`.
    extra_lbs: Vec<Host>,
    /// The service hosts with their tags; number k is `Role::Service(k)`.
    services: Vec<(String, Host)>,
    // Declared last so that it is dropped last, after the hosts whose veths it holds
    // the peers of (any order works; this one deletes the fewest links twice).
    switch: Netns,
}

impl Topology {
    /// Builds the segment with `backends` backends (at most [`MAX_BACKENDS`]) and
    /// waits until every link is up and no IPv6 address is tentative.
    ///
    /// Stale namespaces of killed runs are swept first. On error, everything created
    /// so far is removed again.
    pub fn build(backends: usize) -> Result<Topology> {
        ensure!(
            backends <= MAX_BACKENDS,
            "at most {MAX_BACKENDS} backends, not {backends}"
        );
        match sweep_stale() {
            Ok(removed) if !removed.is_empty() => {
                eprintln!("lb-tests: removed stale namespaces {removed:?}");
            }
            Ok(_) => {}
            Err(e) => eprintln!("lb-tests: cannot sweep stale namespaces: {e:#}"),
        }
        let prefix = unique_prefix();
        let switch = Netns::new(format!("{prefix}-sw"))?;
        let bridge = format!("{prefix}br");
        setup_switch(&switch, &bridge).context("cannot set up the switch namespace")?;

        let add = |role: Role| add_host(&switch, &bridge, &prefix, role, &role.ns_suffix());
        let client = add(Role::Client)?;
        let lb = add(Role::LoadBalancer)?;
        let backends = (0..backends)
            .map(|i| add(Role::Backend(i)))
            .collect::<Result<Vec<_>>>()?;

        let topology = Topology {
            prefix,
            bridge,
            client,
            lb,
            backends,
            extra_lbs: Vec::new(),
            services: Vec::new(),
            switch,
        };
        topology
            .wait_ready(READY_TIMEOUT)
            .context("the topology did not become ready")?;
        Ok(topology)
    }

    /// Adds another load balancer host to the segment, for scale-out tests, and
    /// waits until its link is ready; returns its index in
    /// [`Topology::load_balancers`] (1 for the first one added, at 198.18.0.3; at
    /// most [`MAX_EXTRA_LOAD_BALANCERS`] can be added, the last at 198.18.0.10). Its
    /// namespace goes with the topology.
    pub fn add_load_balancer(&mut self) -> Result<usize> {
        let n = self.extra_lbs.len();
        ensure!(
            n < MAX_EXTRA_LOAD_BALANCERS,
            "at most {MAX_EXTRA_LOAD_BALANCERS} load balancers besides the first"
        );
        let role = Role::ExtraLoadBalancer(n);
        let host = add_host(
            &self.switch,
            &self.bridge,
            &self.prefix,
            role,
            &role.ns_suffix(),
        )?;
        self.extra_lbs.push(host);
        self.wait_ready(READY_TIMEOUT)?;
        Ok(1 + n)
    }

    /// Every load balancer, in order: the first ([`Topology::lb`]) and then those
    /// added with [`Topology::add_load_balancer`].
    pub fn load_balancers(&self) -> Vec<&Host> {
        std::iter::once(&self.lb)
            .chain(self.extra_lbs.iter())
            .collect()
    }

    /// Load balancer number `index` of [`Topology::load_balancers`]; panics if there
    /// is no such load balancer.
    pub fn load_balancer(&self, index: usize) -> &Host {
        match index {
            0 => &self.lb,
            i => &self.extra_lbs[i - 1],
        }
    }

    /// The load balancers added after the build, in order.
    pub fn extra_load_balancers(&self) -> &[Host] {
        &self.extra_lbs
    }

    /// Adds the second load balancer host (198.18.0.3), for scale-out tests;
    /// [`Topology::lb2`] returns it. Fails if a load balancer was added already.
    pub fn add_second_load_balancer(&mut self) -> Result<()> {
        ensure!(
            self.extra_lbs.is_empty(),
            "the second load balancer exists already"
        );
        self.add_load_balancer().map(|_| ())
    }

    /// The second load balancer (the first extra one), once added.
    pub fn lb2(&self) -> Option<&Host> {
        self.extra_lbs.first()
    }

    /// Adds a service host, a plain host on the segment for a service the load
    /// balancers use (etcd, say), and waits until its link is ready. Service host k
    /// (counting from 0 in the order they are added) is at 198.18.0.(200 + k) and
    /// fd00:18::(200 + k), in the namespace `PREFIX-svc-TAG`; it has no VIP and no
    /// route beyond the segment.
    ///
    /// `tag` names the host: 1 to [`MAX_SERVICE_TAG_LEN`] lowercase ASCII letters,
    /// digits or dashes, unique within the topology.
    pub fn add_service_host(&mut self, tag: &str) -> Result<&Host> {
        ensure!(
            !tag.is_empty()
                && tag.len() <= MAX_SERVICE_TAG_LEN
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "a service host tag is 1 to {MAX_SERVICE_TAG_LEN} lowercase letters, digits or \
             dashes, not {tag:?}"
        );
        ensure!(
            self.service_host(tag).is_none(),
            "service host {tag:?} exists already"
        );
        let k = self.services.len();
        ensure!(
            k < MAX_SERVICE_HOSTS,
            "at most {MAX_SERVICE_HOSTS} service hosts"
        );
        let host = add_host(
            &self.switch,
            &self.bridge,
            &self.prefix,
            Role::Service(k),
            &format!("svc-{tag}"),
        )?;
        self.services.push((tag.to_owned(), host));
        self.wait_ready(READY_TIMEOUT)?;
        Ok(&self.services[k].1)
    }

    /// The service host added with `tag`, if any.
    pub fn service_host(&self, tag: &str) -> Option<&Host> {
        self.services
            .iter()
            .find(|(t, _)| t == tag)
            .map(|(_, host)| host)
    }

    /// The service hosts with their tags, in the order they were added.
    pub fn service_hosts(&self) -> impl Iterator<Item = (&str, &Host)> {
        self.services.iter().map(|(tag, host)| (tag.as_str(), host))
    }

    /// The unique prefix of every namespace and link name of this topology.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The switch namespace, which holds the bridge and its ports.
    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// The name of the bridge inside the switch namespace.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The client host.
    pub fn client(&self) -> &Host {
        &self.client
    }

    /// The load balancer host.
    pub fn lb(&self) -> &Host {
        &self.lb
    }

    /// The backend hosts, in index order.
    pub fn backends(&self) -> &[Host] {
        &self.backends
    }

    /// Backend number `index`; panics if there is no such backend.
    pub fn backend(&self, index: usize) -> &Host {
        &self.backends[index]
    }

    /// The load balancer's veth inside its namespace: where the XDP program goes.
    pub fn lb_ifname(&self) -> &str {
        self.lb.ifname()
    }

    /// The bridge port peering the load balancer's veth, inside the switch namespace:
    /// where the pass-through XDP program goes.
    pub fn lb_bridge_port(&self) -> &str {
        self.lb.bridge_port()
    }

    /// Every host: client, load balancer, the backends, the extra load balancers,
    /// then the service hosts.
    pub fn hosts(&self) -> impl Iterator<Item = &Host> {
        [&self.client, &self.lb]
            .into_iter()
            .chain(self.backends.iter())
            .chain(self.extra_lbs.iter())
            .chain(self.services.iter().map(|(_, host)| host))
    }

    /// Every namespace of the topology, the switch first.
    pub fn namespaces(&self) -> impl Iterator<Item = &Netns> {
        std::iter::once(&self.switch).chain(self.hosts().map(Host::ns))
    }

    /// The names of every namespace of the topology.
    pub fn namespace_names(&self) -> Vec<String> {
        self.namespaces().map(|ns| ns.name().to_owned()).collect()
    }

    /// The VIP as a socket address with `port`, of the given family.
    pub fn vip(&self, port: u16, v6: bool) -> SocketAddr {
        if v6 {
            SocketAddr::new(IpAddr::V6(VIP_V6), port)
        } else {
            SocketAddr::new(IpAddr::V4(VIP_V4), port)
        }
    }

    /// Waits until every veth and bridge port is operationally up, every bridge port
    /// forwards and no IPv6 address anywhere is tentative.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let problem = self.readiness_problem()?;
            let Some(problem) = problem else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                bail!("still not ready after {timeout:?}: {problem}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Returns what is not ready yet, or `None` when everything is.
    fn readiness_problem(&self) -> Result<Option<String>> {
        for host in self.hosts() {
            let link = host.ns.ip(&["-o", "link", "show", "dev", &host.ifname])?;
            if !link.contains("state UP") {
                return Ok(Some(format!("{} is not up: {}", host.ifname, link.trim())));
            }
            let tentative = host.ns.ip(&["-o", "-6", "addr", "show", "tentative"])?;
            if !tentative.trim().is_empty() {
                return Ok(Some(format!(
                    "tentative addresses in {}: {}",
                    host.ns.name(),
                    tentative.trim()
                )));
            }
            let port = self
                .switch
                .ip(&["-o", "-d", "link", "show", "dev", &host.bridge_port])?;
            if !port.contains("state UP") || !port.contains("state forwarding") {
                return Ok(Some(format!(
                    "bridge port {} is not forwarding: {}",
                    host.bridge_port,
                    port.trim()
                )));
            }
        }
        Ok(None)
    }
}

/// Creates the bridge in the switch namespace, with IPv6 off so that the bridge and
/// its ports send nothing of their own onto the segment.
fn setup_switch(switch: &Netns, bridge: &str) -> Result<()> {
    switch.sysctl(&[
        ("net/ipv6/conf/all/disable_ipv6", "1"),
        ("net/ipv6/conf/default/disable_ipv6", "1"),
        ("net/ipv4/conf/all/rp_filter", "0"),
        ("net/ipv4/conf/default/rp_filter", "0"),
    ])?;
    switch.ip(&["link", "set", "lo", "up"])?;
    // No STP (ports forward at once) and no multicast snooping (IPv6 neighbour
    // discovery is flooded like broadcast, with no querier needed).
    switch.ip(&[
        "link",
        "add",
        bridge,
        "address",
        &Mac::local(0x01, 0xff).to_string(),
        "type",
        "bridge",
        "stp_state",
        "0",
        "mcast_snooping",
        "0",
    ])?;
    switch.ip(&["link", "set", bridge, "up"])?;
    Ok(())
}

/// Creates one host namespace, `PREFIX-NS_SUFFIX`, and its veth, and plugs the veth
/// into the bridge.
fn add_host(
    switch: &Netns,
    bridge: &str,
    prefix: &str,
    role: Role,
    ns_suffix: &str,
) -> Result<Host> {
    let (ipv4, ipv6) = role.addresses();
    let tag = role.tag();
    let ifname = format!("{prefix}h{tag}");
    let bridge_port = format!("{prefix}p{tag}");
    ensure!(
        ifname.len() <= 15 && bridge_port.len() <= 15,
        "link name {ifname} or {bridge_port} is longer than 15 characters"
    );
    let last_octet = ipv4.octets()[3];
    let mac = Mac::local(0x00, last_octet);
    let bridge_port_mac = Mac::local(0x01, last_octet);
    let ns = Netns::new(format!("{prefix}-{ns_suffix}"))?;
    let context = || format!("cannot set up {:?} in namespace {}", role, ns.name());

    // The defaults apply to the veth when it appears, so they are set first: no
    // duplicate address detection, so no address is ever tentative, and no reverse
    // path filter, which would drop direct-server-return traffic.
    let mut settings = vec![
        ("net/ipv4/conf/all/rp_filter".to_owned(), "0"),
        ("net/ipv4/conf/default/rp_filter".to_owned(), "0"),
        ("net/ipv6/conf/all/accept_dad".to_owned(), "0"),
        ("net/ipv6/conf/default/accept_dad".to_owned(), "0"),
        ("net/ipv6/conf/all/disable_ipv6".to_owned(), "0"),
        ("net/ipv6/conf/default/disable_ipv6".to_owned(), "0"),
    ];
    if matches!(role, Role::Backend(_)) {
        // Only the load balancer may answer ARP for the VIP that every backend holds.
        settings.extend([
            ("net/ipv4/conf/all/arp_ignore".to_owned(), "1"),
            ("net/ipv4/conf/all/arp_announce".to_owned(), "2"),
        ]);
    }
    sysctl_owned(&ns, &settings).with_context(context)?;

    switch
        .ip(&[
            "link",
            "add",
            &bridge_port,
            "address",
            &bridge_port_mac.to_string(),
            "type",
            "veth",
            "peer",
            "name",
            &ifname,
            "address",
            &mac.to_string(),
            "netns",
            ns.name(),
        ])
        .with_context(context)?;
    switch
        .ip(&["link", "set", &bridge_port, "master", bridge, "up"])
        .with_context(context)?;

    let mut iface_settings = vec![
        ("net/ipv4/conf/lo/rp_filter".to_owned(), "0"),
        (format!("net/ipv4/conf/{ifname}/rp_filter"), "0"),
        (format!("net/ipv6/conf/{ifname}/accept_dad"), "0"),
    ];
    if matches!(role, Role::Backend(_)) {
        iface_settings.extend([
            (format!("net/ipv4/conf/{ifname}/arp_ignore"), "1"),
            (format!("net/ipv4/conf/{ifname}/arp_announce"), "2"),
        ]);
    }
    sysctl_owned(&ns, &iface_settings).with_context(context)?;

    let v4 = format!("{ipv4}/{SEGMENT_V4_PREFIX_LEN}");
    let v6 = format!("{ipv6}/{SEGMENT_V6_PREFIX_LEN}");
    let mut commands: Vec<Vec<String>> = vec![
        strings(&["link", "set", "lo", "up"]),
        strings(&["addr", "add", &v4, "dev", &ifname]),
        strings(&["-6", "addr", "add", &v6, "dev", &ifname, "nodad"]),
        strings(&["link", "set", &ifname, "up"]),
    ];
    match role {
        Role::Backend(_) => {
            commands.push(strings(&[
                "addr",
                "add",
                &format!("{VIP_V4}/32"),
                "dev",
                "lo",
            ]));
            commands.push(strings(&[
                "-6",
                "addr",
                "add",
                &format!("{VIP_V6}/128"),
                "dev",
                "lo",
                "nodad",
            ]));
        }
        Role::Client => {
            let (lb4, lb6) = Role::LoadBalancer.addresses();
            commands.push(strings(&[
                "route",
                "add",
                &format!("{VIP_V4}/32"),
                "via",
                &lb4.to_string(),
                "dev",
                &ifname,
            ]));
            commands.push(strings(&[
                "-6",
                "route",
                "add",
                &format!("{VIP_V6}/128"),
                "via",
                &lb6.to_string(),
                "dev",
                &ifname,
            ]));
        }
        Role::LoadBalancer | Role::ExtraLoadBalancer(_) | Role::Service(_) => {}
    }
    for command in &commands {
        let args: Vec<&str> = command.iter().map(String::as_str).collect();
        ns.ip(&args).with_context(context)?;
    }
    // Full checksums on the wire, so that frames the load balancer sends on with
    // XDP_TX are still valid at the backend (see set_tx_checksum_offload).
    set_tx_checksum_offload(&ns, &ifname, false).with_context(context)?;
    if matches!(role, Role::Backend(_)) {
        steer_each_flow_to_one_cpu(&ns, &ifname).with_context(context)?;
    }

    Ok(Host {
        role,
        ifname,
        bridge_port,
        mac,
        bridge_port_mac,
        ipv4,
        ipv6,
        ns,
    })
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

fn sysctl_owned(ns: &Netns, settings: &[(String, &str)]) -> Result<()> {
    let borrowed: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    ns.sysctl(&borrowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_macs_follow_the_plan() {
        assert_eq!(backend_v4(0), Ipv4Addr::new(198, 18, 0, 11));
        assert_eq!(backend_v4(2), Ipv4Addr::new(198, 18, 0, 13));
        assert_eq!(backend_v6(0).to_string(), "fd00:18::11");
        assert_eq!(backend_v6(2).to_string(), "fd00:18::13");
        assert_eq!(VIP_V6.to_string(), "fd00:18:1::1");
        assert_eq!(Mac::local(0, 11).to_string(), "02:00:00:00:00:0b");
        assert_eq!(Role::Backend(98).tag(), "b98");
    }

    #[test]
    fn extra_load_balancers_and_service_hosts_fit_the_plan() {
        let last_lb = MAX_EXTRA_LOAD_BALANCERS - 1;
        assert_eq!(extra_lb_v4(0), Ipv4Addr::new(198, 18, 0, 3));
        assert_eq!(extra_lb_v4(last_lb), Ipv4Addr::new(198, 18, 0, 10));
        assert_eq!(extra_lb_v6(0).to_string(), "fd00:18::3");
        assert_eq!(extra_lb_v6(last_lb).to_string(), "fd00:18::10");
        assert_eq!(service_v4(0), Ipv4Addr::new(198, 18, 0, 200));
        assert_eq!(
            service_v6(MAX_SERVICE_HOSTS - 1).to_string(),
            "fd00:18::249"
        );
        assert_eq!(Role::ExtraLoadBalancer(0).ns_suffix(), "lb2");

        // Every address (so every MAC) is distinct, and no role tag is longer than
        // the 3 characters a link name leaves after the longest prefix and `h`/`p`.
        let roles = [Role::Client, Role::LoadBalancer]
            .into_iter()
            .chain((0..MAX_BACKENDS).map(Role::Backend))
            .chain((0..MAX_EXTRA_LOAD_BALANCERS).map(Role::ExtraLoadBalancer))
            .chain((0..MAX_SERVICE_HOSTS).map(Role::Service))
            .collect::<Vec<_>>();
        let mut v4 = std::collections::BTreeSet::new();
        let mut v6 = std::collections::BTreeSet::new();
        let mut tags = std::collections::BTreeSet::new();
        for role in &roles {
            let (a4, a6) = role.addresses();
            assert!(v4.insert(a4), "{role:?} repeats {a4}");
            assert!(v6.insert(a6), "{role:?} repeats {a6}");
            let tag = role.tag();
            assert!(tag.len() <= 3, "{role:?} has a long tag {tag}");
            assert!(tags.insert(tag), "{role:?} repeats a tag");
        }
        let longest_prefix = format!("{}zzzzz-zz", crate::netns::NAME_PREFIX);
        assert!(format!("{longest_prefix}hs49").len() <= 15);
    }
}
