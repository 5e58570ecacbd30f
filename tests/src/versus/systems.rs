//! The four ways the client's traffic reaches the backends, brought up and torn down
//! one at a time on the same topology; used by [`super::run`].
//!
//! - [`System::Xdp`]: the real `lb` agent attaches the XDP program to the load
//!   balancer's veth (L2 direct server return: backends hold the VIP on `lo` and
//!   answer the client directly), with the pass-through program on the bridge port
//!   that veth's `XDP_TX` frames need (docs/ARCHITECTURE.md) and the kernel's BPF
//!   statistics on. `--detach-on-exit`: nothing stays attached afterwards.
//! - [`System::XdpNat`]: the same agent with every VIP in full NAT: the backends
//!   see the load balancer's NAT address as the client and answer it (their route to
//!   [`NAT_PREFIX`] goes via the load balancer, [`route_nat_replies`]), and the
//!   program turns the answers back: in the path both ways, like the proxies.
//! - [`System::Haproxy`], [`System::Nginx`]: the proxy runs in the load balancer's
//!   namespace with a configuration generated into the run's directory, listens on
//!   the VIP, which is put on the load balancer's `lo` for the time (the client's
//!   route to the VIP already leads to the load balancer), and connects to the
//!   backends' own addresses, round robin. Stopped with SIGTERM, then SIGKILL, and
//!   every process left in the namespace is killed; the VIP is removed again.
//! - [`System::Direct`]: no balancer; the client connects to the backends' own
//!   addresses in turn. The ceiling.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use lb_userspace::dataplane::PassThrough;

use super::cpu::BpfStats;
use super::traffic::{APP_PORT, DOWN_PORT, UP_PORT};
use crate::netns::Netns;
use crate::spread::{Agent, attach_pass};
use crate::topology::{Topology, VIP_V4};

/// HAProxy's executable.
pub const HAPROXY: &str = "/usr/sbin/haproxy";
/// nginx's executable.
pub const NGINX: &str = "/usr/sbin/nginx";
/// nginx's stream module (Debian's `libnginx-mod-stream`).
pub const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
/// How long a system may take to start answering.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a proxy may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// One way to the backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum System {
    /// This project's XDP balancer, L2 direct server return.
    Xdp,
    /// This project's XDP balancer, full NAT (in the path both ways).
    XdpNat,
    /// HAProxy in TCP mode.
    Haproxy,
    /// nginx's `stream` proxy.
    Nginx,
    /// No balancer: the client connects to the backends round robin.
    Direct,
    /// A diagnostic, not run by default: the XDP balancer attached in generic (skb)
    /// mode, which on veth skips native XDP's conversion of every frame and the
    /// peer's NAPI round (and needs no pass-through program).
    XdpGeneric,
}

impl System {
    /// The systems of a default round, in order.
    pub const DEFAULT: [System; 5] = [
        System::Xdp,
        System::XdpNat,
        System::Haproxy,
        System::Nginx,
        System::Direct,
    ];
    /// Every system.
    pub const ALL: [System; 6] = [
        System::Xdp,
        System::XdpNat,
        System::Haproxy,
        System::Nginx,
        System::Direct,
        System::XdpGeneric,
    ];

    /// The name used on the command line, in tables and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            System::XdpGeneric => "xdp-generic",
            System::Xdp => "xdp",
            System::XdpNat => "xdp-nat",
            System::Haproxy => "haproxy",
            System::Nginx => "nginx",
            System::Direct => "direct",
        }
    }

    /// The system called `name`.
    pub fn from_name(name: &str) -> Option<System> {
        System::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// Fails with an installation hint when the proxies' programs are missing.
pub fn check_programs(systems: &[System]) -> Result<()> {
    let need = |path: &str, package: &str| {
        ensure!(
            Path::new(path).exists(),
            "{path} is missing: install {package} (`cargo xtask bench versus` does)"
        );
        Ok(())
    };
    if systems.contains(&System::Haproxy) {
        need(HAPROXY, "the Debian package haproxy")?;
    }
    if systems.contains(&System::Nginx) {
        need(NGINX, "the Debian package nginx")?;
        need(
            NGINX_STREAM_MODULE,
            "the Debian package libnginx-mod-stream",
        )?;
    }
    Ok(())
}

/// The NAT sources of [`System::XdpNat`].
pub const NAT_PREFIX: &str = "198.18.200.0/30";

/// Every backend's route to [`NAT_PREFIX`]: via the load balancer, where full NAT's
/// answers must go. Harmless to the other systems, which never use those addresses.
pub fn route_nat_replies(topo: &Topology) -> Result<()> {
    let via = topo.lb().ipv4().to_string();
    for b in topo.backends() {
        b.ns().ip(&["route", "add", NAT_PREFIX, "via", &via])?;
    }
    Ok(())
}

/// The agent configuration of the XDP runs: one TCP VIP per port, each over all
/// backends with equal weights, L2 direct server return, or full NAT from
/// [`NAT_PREFIX`] when `nat`.
pub fn agent_config(topo: &Topology, nat: bool) -> String {
    let (forwarding, mut text) = if nat {
        ("nat", format!("[nat]\nsource_v4 = \"{NAT_PREFIX}\"\n\n"))
    } else {
        ("dsr", String::new())
    };
    for port in [APP_PORT, DOWN_PORT, UP_PORT] {
        text += &format!(
            "[[vip]]\naddress = \"{VIP_V4}\"\nport = {port}\nprotocol = \"tcp\"\n\
             forwarding = \"{forwarding}\"\n"
        );
        for host in topo.backends() {
            text += &format!(
                "\n[[vip.backend]]\naddress = \"{}\"\nmac = \"{}\"\nweight = 1\n",
                host.ipv4(),
                host.mac()
            );
        }
        text += "\n";
    }
    text
}

/// The hard limit of open files, which the proxies' connection limits must fit.
pub fn fd_limit() -> u64 {
    // SAFETY: getrlimit writes the one struct it is given.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_max
        } else {
            1024
        }
    }
}

/// HAProxy's configuration: TCP mode, one `listen` section per port, round robin
/// over the backends' own addresses, the defaults of Debian's package otherwise
/// (threads: one per CPU). `max_files` is the open-file limit it may raise itself
/// to; a proxied connection takes two descriptors.
pub fn haproxy_config(topo: &Topology, max_files: u64) -> String {
    let maxconn = (max_files.saturating_sub(256) / 2).clamp(256, 100_000);
    let mut text = format!(
        "global\n    maxconn {maxconn}\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    \
         timeout client 60s\n    timeout server 60s\n",
    );
    for port in [APP_PORT, DOWN_PORT, UP_PORT] {
        text += &format!("\nlisten port{port}\n    bind {VIP_V4}:{port}\n    balance roundrobin\n");
        for (i, host) in topo.backends().iter().enumerate() {
            text += &format!("    server backend{i} {}:{port}\n", host.ipv4());
        }
    }
    text
}

/// nginx's configuration: the stream module, one worker per CPU, one `server` per
/// port proxying to an upstream of the backends' own addresses (round robin, the
/// default, shared by the workers through a zone). Every path is under `dir`;
/// `max_files` is the open-file limit of each worker (a proxied connection takes
/// two of its `worker_connections`).
pub fn nginx_config(topo: &Topology, dir: &Path, max_files: u64) -> String {
    let connections = (max_files.saturating_sub(256)).clamp(512, 65_536);
    let mut text = format!(
        "load_module {NGINX_STREAM_MODULE};\nworker_processes auto;\n\
         worker_rlimit_nofile {max_files};\npid {pid};\nerror_log {log} warn;\n\n\
         events {{\n    worker_connections {connections};\n}}\n\nstream {{\n",
        pid = dir.join("nginx.pid").display(),
        log = dir.join("nginx-error.log").display(),
    );
    for port in [APP_PORT, DOWN_PORT, UP_PORT] {
        text += &format!("    upstream port{port} {{\n        zone port{port} 64k;\n");
        for host in topo.backends() {
            text += &format!("        server {}:{port};\n", host.ipv4());
        }
        text += &format!(
            "    }}\n    server {{\n        listen {VIP_V4}:{port} backlog=4096;\n        \
             proxy_pass port{port};\n    }}\n"
        );
    }
    text += "}\n";
    text
}

/// A proxy process (and its workers) inside the load balancer's namespace; killed
/// with everything else in that namespace on drop.
struct Proxy {
    child: Child,
    ns: Netns,
    log: PathBuf,
}

impl Proxy {
    fn start(ns: &Netns, program: &str, args: &[&str], log: PathBuf) -> Result<Proxy> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = ns.net_command(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = ns
            .spawn_command(&mut cmd)
            .with_context(|| format!("starting {program}"))?;
        Ok(Proxy {
            child,
            ns: ns.borrowed(),
            log,
        })
    }

    /// What the proxy wrote so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the proxy: SIGTERM, then SIGKILL, then every process left in the
    /// namespace (nginx's workers outlive a killed master).
    fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        kill_all_in(&self.ns);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// SIGKILLs every process inside `ns` but this one, and waits until they are gone.
fn kill_all_in(ns: &Netns) {
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        let pids = super::cpu::netns_pids(ns);
        if pids.is_empty() || Instant::now() >= deadline {
            return;
        }
        for pid in pids {
            // SAFETY: kill(2) has no memory-safety preconditions; every process in a
            // namespace of this run was started by this run.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The VIP on the load balancer's `lo` while a proxy serves it; removed on drop.
struct VipOnLb {
    ns: Netns,
}

impl VipOnLb {
    fn add(ns: &Netns) -> Result<VipOnLb> {
        ns.ip(&["addr", "add", &format!("{VIP_V4}/32"), "dev", "lo"])
            .context("putting the VIP on the load balancer's lo")?;
        Ok(VipOnLb { ns: ns.borrowed() })
    }
}

impl Drop for VipOnLb {
    fn drop(&mut self) {
        let vip = format!("{VIP_V4}/32");
        if let Err(e) = self.ns.ip(&["addr", "del", &vip, "dev", "lo"]) {
            eprintln!("lb-bench-versus: cannot remove the VIP from the load balancer: {e:#}");
        }
    }
}

/// What keeps a system up; dropping it tears the system down.
enum Parts {
    Xdp {
        // Field order is drop order: the agent detaches first, then the
        // pass-through program goes, then the statistics switch.
        agent: Option<Agent>,
        _pass: Option<PassThrough>,
        stats: BpfStats,
        pin: PathBuf,
    },
    Proxy {
        proxy: Proxy,
        _vip: VipOnLb,
    },
    Direct,
}

/// A system that is up.
pub struct Running {
    system: System,
    parts: Parts,
    /// The backends' own addresses, for the direct path.
    backends: Vec<IpAddr>,
}

impl Running {
    /// Brings `system` up on `topo`; `dir` is the run's directory (configurations,
    /// logs) and `config` the agent's configuration file there.
    pub fn start(system: System, topo: &Topology, dir: &Path, config: &Path) -> Result<Running> {
        let lb = topo.lb().ns();
        let xdp_attached = || -> Result<bool> {
            let link = lb.ip(&["-o", "link", "show", "dev", topo.lb_ifname()])?;
            Ok(link.contains(" xdp"))
        };
        ensure!(
            !xdp_attached()?,
            "an XDP program is still attached to the load balancer's veth"
        );
        ensure!(
            super::cpu::netns_pids(lb).is_empty(),
            "processes are still running in the load balancer's namespace"
        );
        let parts = match system {
            System::Xdp | System::XdpGeneric | System::XdpNat => {
                // Native XDP needs a program on the bridge port to receive XDP_TX
                // frames (see docs/ARCHITECTURE.md); generic mode does not.
                let generic = system == System::XdpGeneric;
                let pass = if generic {
                    None
                } else {
                    Some(attach_pass(topo, topo.lb_bridge_port())?)
                };
                let stats = BpfStats::enable()?;
                let mut args = vec!["--detach-on-exit"];
                if generic {
                    args.extend(["--xdp-mode", "generic"]);
                }
                let nat_config = dir.join("lb-nat.toml");
                let config = if system == System::XdpNat {
                    std::fs::write(&nat_config, agent_config(topo, true))?;
                    nat_config.as_path()
                } else {
                    config
                };
                let agent = Agent::start(topo, config, &args)?;
                ensure!(
                    xdp_attached()?,
                    "the agent is ready but no XDP program is attached"
                );
                let pin = lb_userspace::agent::pin_dir(topo.prefix())
                    .join(lb_userspace::dataplane::PROGRAM_PIN);
                Parts::Xdp {
                    agent: Some(agent),
                    _pass: pass,
                    stats,
                    pin,
                }
            }
            System::Haproxy | System::Nginx => {
                let vip = VipOnLb::add(lb)?;
                let proxy = if system == System::Haproxy {
                    let cfg = dir.join("haproxy.cfg");
                    std::fs::write(&cfg, haproxy_config(topo, fd_limit()))?;
                    let cfg = cfg.to_string_lossy().into_owned();
                    let check = lb.exec(&[HAPROXY, "-c", "-q", "-f", &cfg]);
                    check.context("haproxy refused its configuration")?;
                    // -db: foreground, no daemon.
                    Proxy::start(lb, HAPROXY, &["-db", "-f", &cfg], dir.join("haproxy.log"))?
                } else {
                    let cfg = dir.join("nginx.conf");
                    std::fs::write(&cfg, nginx_config(topo, dir, fd_limit()))?;
                    let cfg = cfg.to_string_lossy().into_owned();
                    let prefix = format!("{}/", dir.display());
                    let error_log = dir.join("nginx-error.log").to_string_lossy().into_owned();
                    let args = [
                        "-p",
                        &prefix,
                        "-e",
                        &error_log,
                        "-c",
                        &cfg,
                        "-g",
                        "daemon off;",
                    ];
                    let mut test = vec!["-t", "-q"];
                    test.extend(args.iter().take(6).copied());
                    let mut cmd = lb.net_command(NGINX);
                    let out = cmd.args(&test).output().context("running nginx -t")?;
                    ensure!(
                        out.status.success(),
                        "nginx refused its configuration: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                    Proxy::start(lb, NGINX, &args, dir.join("nginx.log"))?
                };
                Parts::Proxy { proxy, _vip: vip }
            }
            System::Direct => Parts::Direct,
        };
        let running = Running {
            system,
            parts,
            backends: topo
                .backends()
                .iter()
                .map(|h| IpAddr::V4(h.ipv4()))
                .collect(),
        };
        running.wait_ready(topo)?;
        Ok(running)
    }

    /// The system.
    pub fn system(&self) -> System {
        self.system
    }

    /// Where the client connects for `port`: the VIP, or the backends in turn.
    pub fn targets(&self, port: u16) -> Vec<SocketAddr> {
        match self.parts {
            Parts::Direct => self
                .backends
                .iter()
                .map(|&ip| SocketAddr::new(ip, port))
                .collect(),
            _ => vec![SocketAddr::new(IpAddr::V4(VIP_V4), port)],
        }
    }

    /// The statistics switch and the XDP program's pin, for an XDP system.
    pub fn xdp(&self) -> Option<(&BpfStats, &Path)> {
        match &self.parts {
            Parts::Xdp { stats, pin, .. } => Some((stats, pin.as_path())),
            _ => None,
        }
    }

    /// The datapath's counters (`lb status --json`), for an XDP system.
    pub fn datapath_counters(&self) -> Option<serde_json::Value> {
        let Parts::Xdp {
            agent: Some(agent), ..
        } = &self.parts
        else {
            return None;
        };
        let status = agent.ctl(&["status", "--json"]).ok()?;
        let value: serde_json::Value = serde_json::from_str(&status).ok()?;
        Some(value["datapath"].clone())
    }

    /// Waits until a connection through the system to every port gets through.
    fn wait_ready(&self, topo: &Topology) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        for port in [APP_PORT, DOWN_PORT, UP_PORT] {
            for target in self.targets(port) {
                loop {
                    let connected = topo.client().ns().run_in(|| {
                        std::net::TcpStream::connect_timeout(&target, Duration::from_millis(500))
                    })?;
                    if connected.is_ok() {
                        break;
                    }
                    if let Parts::Proxy { proxy, .. } = &self.parts
                        && !proxy.ns.contains_process(proxy.child.id())
                    {
                        bail!("{} exited at start:\n{}", self.system.name(), proxy.log());
                    }
                    if Instant::now() >= deadline {
                        let log = match &self.parts {
                            Parts::Proxy { proxy, .. } => proxy.log(),
                            _ => String::new(),
                        };
                        bail!(
                            "{} does not accept connections to {target} after {READY_TIMEOUT:?}: \
                             {connected:?}\n{log}",
                            self.system.name()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        Ok(())
    }

    /// Tears the system down; fails if the agent did not exit cleanly. The XDP
    /// program is detached and the proxy's processes and the VIP are gone after it.
    pub fn stop(mut self) -> Result<()> {
        match &mut self.parts {
            Parts::Xdp { agent, .. } => {
                if let Some(agent) = agent.take() {
                    agent.stop().context("stopping the agent")?;
                }
            }
            Parts::Proxy { proxy, .. } => proxy.stop(),
            Parts::Direct => {}
        }
        Ok(())
    }
}
