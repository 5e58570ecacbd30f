//! `lb`: the load balancer's agent and command line. Thin: parses arguments and hands
//! over to the agent (`lb run`) or to the command line's client side (everything
//! else); see the crate docs in `lib.rs`.

use std::process::ExitCode;

use clap::Parser;
use lb_userspace::{
    agent,
    cli::{
        self, CliError,
        args::{Args, Command, RunArgs},
    },
};

fn main() -> ExitCode {
    let args = Args::parse();
    // The datapath's records are chosen by `--datapath-log` when the program is
    // loaded; the agent shows every one it gets (unless RUST_LOG names their target).
    let datapath = match &args.command {
        Command::Run(run) => run.datapath_log,
        Command::Client(_) => log::LevelFilter::Off,
    };
    lb_userspace::logging::init(args.log_format, datapath);
    let socket = args.socket();
    let result = match args.command {
        Command::Run(run) => run_agent(run, args.instance, socket),
        Command::Client(command) => cli::run(command, &args.instance, &socket),
    };
    cli::finish(result)
}

/// `lb run`: the agent, on a single-threaded runtime.
fn run_agent(run: RunArgs, instance: String, socket: std::path::PathBuf) -> Result<(), CliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    runtime.block_on(agent::run(agent::RunOptions {
        iface: run.iface,
        config: run.config,
        mode: run.xdp_mode.into(),
        instance,
        socket,
        detach_on_exit: run.detach_on_exit,
        metrics: run.metrics_address.0,
        datapath_log: run.datapath_log,
        flood_guard: !run.no_flood_guard,
        flood_threshold: run.flood_threshold,
    }))?;
    Ok(())
}
