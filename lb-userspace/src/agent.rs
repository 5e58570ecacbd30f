//! The agent's lifetime: check everything, load and fill the datapath, attach it, run
//! until told to stop, detach. Called by `lb run`.

use std::{ffi::CString, path::PathBuf};

use anyhow::{Context, bail};
use aya::programs::XdpMode;
use log::info;
use tokio::signal::unix::{SignalKind, signal};

use crate::{config::Config, dataplane::Dataplane, desired::Desired};

/// What `lb run` was asked to do.
pub struct RunOptions {
    /// Interface the balancer attaches to.
    pub iface: String,
    /// The configuration file.
    pub config: PathBuf,
    /// How XDP is attached.
    pub mode: XdpMode,
}

/// Runs the agent until SIGINT or SIGTERM. Nothing is attached unless the config,
/// the interface and the program are all good.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let config = Config::load(&opts.config)?;
    check_interface(&opts.iface)?;
    let desired = Desired::from_config(&config)?;

    let mut dataplane = Dataplane::load()?;
    dataplane
        .apply(&desired)
        .context("filling the datapath's maps")?;
    // Subscribe before attaching, so that a signal arriving right after the attach
    // is not lost and the program is always detached.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    dataplane.attach(&opts.iface, opts.mode)?;
    for vip in &config.vips {
        let weights: Vec<String> = vip
            .backends
            .iter()
            .map(|b| format!("{}={}", b.address, b.weight))
            .collect();
        info!("VIP {vip}: backends {}", weights.join(" "));
    }
    info!(
        "attached to {} in {:?} mode; serving {} VIP(s)",
        opts.iface,
        opts.mode,
        config.vips.len()
    );
    println!("lb: ready on {}", opts.iface);

    let why = tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    };
    info!("{why}: detaching from {}", opts.iface);
    let stats = dataplane.global_stats()?;
    info!(
        "frames {} forwarded {} passed-not-vip {} conn hits {} new {} non-SYN misses {}",
        stats.rx_frames,
        stats.tx,
        stats.pass_not_vip,
        stats.conn_hit,
        stats.conn_miss_syn,
        stats.conn_miss_non_syn
    );
    dataplane.detach()?;
    Ok(())
}

/// Fails unless `iface` names an interface of this network namespace.
fn check_interface(iface: &str) -> anyhow::Result<u32> {
    let name = CString::new(iface).with_context(|| format!("interface name {iface:?}"))?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("interface {iface:?} does not exist (see `ip link`)");
    }
    Ok(index)
}
