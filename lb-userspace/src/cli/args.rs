//! The command line's arguments (clap derive): every command and argument has its
//! doc, so `lb --help` and `lb <command> --help` are the manual. Parsed by `main`.

use std::{net::IpAddr, path::PathBuf};

use crate::logging::LogFormat;
use aya::programs::XdpMode;
use clap::{Parser, Subcommand, ValueEnum};

/// A Layer-4 load balancer: an XDP program spreads new flows over weighted backends
/// and keeps established flows on theirs. `lb run` starts the agent; every other
/// command talks to a running agent over its control socket (root only).
#[derive(Parser)]
#[command(name = "lb", version)]
pub struct Args {
    /// Which agent: names its pin directory (/sys/fs/bpf/lb/INSTANCE) and its
    /// control socket (/run/lb/INSTANCE.sock).
    #[arg(long, global = true, default_value = "default", env = "LB_INSTANCE")]
    pub instance: String,
    /// Control socket path, instead of the instance's default.
    #[arg(long, global = true, env = "LB_SOCKET")]
    pub socket: Option<PathBuf>,
    /// How the agent's log (standard error) is written: `text` for people, `json`
    /// (one object per line, the event's fields at the top level) for log
    /// shippers. Levels, per module, come from RUST_LOG (default `info`; e.g.
    /// `RUST_LOG=info,lb_userspace::signals=debug`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "LB_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

impl Args {
    /// The control socket: `--socket`, else the instance's default.
    pub fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| crate::control::default_socket(&self.instance))
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Attach the balancer to an interface and serve the configured VIPs until
    /// SIGINT or SIGTERM. Needs root (CAP_BPF, CAP_NET_ADMIN).
    ///
    /// Nothing is attached unless the configuration, the interface and the XDP
    /// program are all valid; a bad configuration exits with status 2 and a message
    /// naming the field. A datapath left pinned by an earlier agent of the same
    /// instance is adopted without changing how any packet is forwarded. On exit
    /// the datapath stays attached with the last weights (fail-static) unless
    /// --detach-on-exit is given. SIGHUP reloads the configuration.
    Run(RunArgs),
    #[command(flatten)]
    Client(ClientCommand),
}

/// `lb run`'s arguments.
#[derive(clap::Args)]
pub struct RunArgs {
    /// Network interface to attach to, e.g. eth0.
    #[arg(long, short)]
    pub iface: String,
    /// TOML configuration file (see docs/CONFIG.md).
    #[arg(long, short)]
    pub config: PathBuf,
    /// XDP attach mode: `native` runs in the driver (fastest; the NIC driver
    /// must support it), `generic` runs in the kernel stack (any interface),
    /// `auto` lets the kernel choose.
    #[arg(long, value_enum, default_value_t = Mode::Native)]
    pub xdp_mode: Mode,
    /// Detach and remove the pins when the agent exits.
    #[arg(long)]
    pub detach_on_exit: bool,
    /// Address of the Prometheus endpoint (`/metrics`); localhost unless told
    /// otherwise. `off` turns it off.
    #[arg(long, default_value = "127.0.0.1:9432", value_parser = parse_metrics)]
    pub metrics_address: MetricsAddress,
    /// Log the datapath's rare events at LEVEL and above (target `lb::datapath`):
    /// `error` a failed encapsulation, `warn` a failed connection-table insert,
    /// `debug` a malformed IP header; `info` adds nothing yet. `off` removes them
    /// from the program when it is loaded: they cost the packet path nothing.
    #[arg(long, value_name = "LEVEL", default_value = "off", value_parser = parse_datapath_log)]
    pub datapath_log: log::LevelFilter,
    /// Write every new flow straight into the connection table, as versions
    /// before the flood guard did. By default a new flow's backend waits in a small
    /// young table until the client's second packet (for TCP, the handshake's
    /// ACK), so a flood of spoofed SYNs cannot evict established flows' entries
    /// (docs/RELIABILITY.md). Off saves two young-table lookups and a delete per flow and
    /// leaves those flows exposed; `cargo xtask bench flood` measures both.
    #[arg(long)]
    pub no_flood_guard: bool,
    /// New flows per second that never send a second packet (spoofed SYNs,
    /// refused connections, one-datagram UDP flows) from which `lb status`,
    /// `/metrics` and the log report a flood. Reporting only: the guard acts
    /// whatever the rate. Raise it for a UDP service whose clients send one
    /// datagram per flow.
    #[arg(long, value_name = "PER_SECOND", default_value_t = crate::core::flood::DEFAULT_THRESHOLD_PER_S, value_parser = parse_flood_threshold)]
    pub flood_threshold: f64,
}

/// Every command but `run`: they talk to a running agent (or, `detach` and
/// `completions`, need none).
#[derive(Subcommand)]
pub enum ClientCommand {
    /// Detach a stopped agent's datapath and remove its pins.
    Detach(Format),
    /// The agent's state: interface, VIPs, model, last reload, datapath counters.
    Status(Format),
    /// Configured VIPs (`lb vip` alone lists them).
    Vip {
        #[command(subcommand)]
        command: Option<VipCommand>,
        #[command(flatten)]
        format: Format,
    },
    /// Backends with their weights and counters (`lb backend` alone lists them).
    Backend {
        #[command(subcommand)]
        command: Option<BackendCommand>,
        #[command(flatten)]
        format: Format,
    },
    /// Rates over an interval: frames, new flows, packets and bytes per second, in
    /// total and per backend.
    Stats {
        /// Seconds between the two samples.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        #[command(flatten)]
        format: Format,
    },
    /// Show or control weights.
    Weight {
        #[command(subcommand)]
        command: WeightCommand,
    },
    /// Stop sending new flows to a backend; established flows continue. Draining a
    /// drained backend changes nothing and succeeds.
    Drain(Target),
    /// Undo `drain`. A backend that is not drained is left as it is.
    Undrain(Target),
    /// Which inputs produced each backend's weight.
    Explain(Format),
    /// Each VIP's lookup table as the datapath reads it: size, slots per backend
    /// and a digest (LBs sharing a VIP behind ECMP must show the same digest).
    Tables(Format),
    /// The fleet this LB belongs to (`[cluster]` in the configuration).
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// A live view of backends, weights and rates (packets/s, bytes/s, new
    /// flows/s), refreshed every second until Ctrl-C. When standard output is not a
    /// terminal, each refresh is printed after the last one.
    Top {
        /// Number of refreshes, then exit (0: until interrupted).
        #[arg(long, default_value_t = 0)]
        count: u32,
        /// `--json`: one JSON object per line and refresh.
        #[command(flatten)]
        format: Format,
    },
    /// Re-read the configuration file: applied completely, or refused with nothing
    /// changed and the problem named. Says what changed.
    Reload(Format),
    /// Print shell completions for `lb`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// How a command prints.
#[derive(clap::Args, Clone, Copy)]
pub struct Format {
    /// Print JSON (the control API's answer) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The backend a setting command acts on.
#[derive(clap::Args)]
pub struct Target {
    /// The backend's address.
    pub backend: IpAddr,
    /// The VIP, when the backend serves more than one (e.g. 198.18.1.1:80/tcp).
    #[arg(long)]
    pub vip: Option<String>,
    #[command(flatten)]
    pub format: Format,
}

#[derive(Subcommand)]
pub enum VipCommand {
    /// List the configured VIPs.
    List(Format),
}

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// This LB in its fleet: connected to etcd or not, the leader, the epoch
    /// applied here and the newest published (and how long it has waited), and
    /// every LB's configuration digest, epoch and table digest per VIP. An LB whose
    /// tables are not the newest epoch's is marked; one with another configuration
    /// applies no epoch of this one's leader.
    Status(Format),
}

#[derive(Subcommand)]
pub enum BackendCommand {
    /// List every backend of every VIP.
    List(Format),
}

#[derive(Subcommand)]
pub enum WeightCommand {
    /// Every backend's configured weight, weight in force and who set it.
    Show(Format),
    /// Set a weight until `weight auto` or the next reload.
    Set {
        #[command(flatten)]
        target: Target,
        /// The weight, in configured units (0 drains).
        weight: u32,
    },
    /// Hold a weight across reloads until `weight unpin` or `weight auto`.
    Pin {
        #[command(flatten)]
        target: Target,
        /// The weight, in configured units (0 drains).
        weight: u32,
    },
    /// Release a pinned weight back to the policy (same as `auto`).
    Unpin(Target),
    /// Give the weight back to the policy (drops a set, a pin or a drain).
    Auto(Target),
}

/// `--metrics-address`: a socket address, or `off`.
#[derive(Clone, Copy)]
pub struct MetricsAddress(pub Option<std::net::SocketAddr>);

fn parse_metrics(text: &str) -> Result<MetricsAddress, String> {
    if text == "off" {
        return Ok(MetricsAddress(None));
    }
    text.parse()
        .map(|a| MetricsAddress(Some(a)))
        .map_err(|_| format!("{text:?} is not an address like 127.0.0.1:9432 (or `off`)"))
}

fn parse_flood_threshold(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!(
            "`{text}` is not a rate: give new flows per second, a number above 0"
        )),
    }
}

fn parse_datapath_log(text: &str) -> Result<log::LevelFilter, String> {
    match text.parse() {
        Ok(log::LevelFilter::Trace) | Err(_) => Err(format!(
            "{text:?} is not one of off, error, warn, info, debug"
        )),
        Ok(level) => Ok(level),
    }
}

/// `--xdp-mode`.
#[derive(Clone, Copy, ValueEnum)]
pub enum Mode {
    Native,
    Generic,
    Auto,
}

impl From<Mode> for XdpMode {
    fn from(mode: Mode) -> XdpMode {
        match mode {
            Mode::Native => XdpMode::Driver,
            Mode::Generic => XdpMode::Skb,
            Mode::Auto => XdpMode::Default,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_arguments_are_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn vip_and_backend_alone_list_and_every_client_command_takes_json() {
        for line in [
            "lb vip",
            "lb vip --json",
            "lb vip list --json",
            "lb backend",
            "lb backend --json",
            "lb status --json",
            "lb stats --json --interval 0.5",
            "lb weight show --json",
            "lb weight set 198.18.0.11 5 --json",
            "lb weight pin 198.18.0.11 5 --json",
            "lb weight unpin 198.18.0.11 --json",
            "lb weight auto 198.18.0.11 --json",
            "lb drain 198.18.0.11 --json",
            "lb undrain 198.18.0.11 --vip 198.18.1.1:80/tcp --json",
            "lb explain --json",
            "lb tables --json",
            "lb top --count 1 --json",
            "lb reload --json",
            "lb detach --json",
        ] {
            let parsed = Args::try_parse_from(line.split(' '));
            assert!(parsed.is_ok(), "{line}: {}", parsed.err().unwrap());
        }
    }
}
