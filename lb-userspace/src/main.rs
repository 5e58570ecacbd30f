//! `lb`: the load balancer's agent and command line. Thin: parses arguments and hands
//! over to the library (see the crate docs in `lib.rs`).

use std::path::PathBuf;

use aya::programs::XdpMode;
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::agent;

/// A Layer-4 load balancer: an XDP program spreads new flows over weighted backends
/// and keeps established flows on theirs.
#[derive(Parser)]
#[command(name = "lb", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the balancer to an interface and serve the configured VIPs until
    /// SIGINT or SIGTERM, then detach. Needs root (CAP_BPF, CAP_NET_ADMIN).
    ///
    /// Nothing is attached unless the configuration, the interface and the XDP
    /// program are all valid; a bad configuration exits with status 2 and a message
    /// naming the field.
    Run {
        /// Network interface to attach to, e.g. eth0.
        #[arg(long, short)]
        iface: String,
        /// TOML configuration file (see docs/CONFIG.md).
        #[arg(long, short)]
        config: PathBuf,
        /// XDP attach mode: `native` runs in the driver (fastest; the NIC driver
        /// must support it), `generic` runs in the kernel stack (any interface),
        /// `auto` lets the kernel choose.
        #[arg(long, value_enum, default_value_t = Mode::Native)]
        xdp_mode: Mode,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
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

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lb: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Run {
            iface,
            config,
            xdp_mode,
        } => runtime.block_on(agent::run(agent::RunOptions {
            iface,
            config,
            mode: xdp_mode.into(),
        })),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: error: {e:#}");
            let config_error = e
                .downcast_ref::<lb_userspace::config::ConfigError>()
                .is_some();
            std::process::ExitCode::from(if config_error { 2 } else { 1 })
        }
    }
}
