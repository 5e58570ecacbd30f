//! `cargo xtask demo`: the load balancer's main job on a built-in default. Builds a
//! client, the load balancer and three backends (weights 1, 2, 3) in network
//! namespaces, starts the real agent, sends real TCP connections to the VIP through
//! the XDP program and prints how they spread. Everything is removed at the end, and
//! on Ctrl-C.

use anyhow::{Result, ensure};
use lb_tests::spread;

const WEIGHTS: [u32; 3] = [1, 2, 3];
const CONNECTIONS: usize = 600;

fn main() -> Result<()> {
    println!(
        "demo: client -> XDP load balancer (L2 DSR) -> 3 backends weighted {WEIGHTS:?}, \
         {CONNECTIONS} TCP connections to {}:{}",
        lb_tests::topology::VIP_V4,
        spread::PORT
    );
    let report = spread::run(&WEIGHTS, CONNECTIONS)?;
    for line in report
        .agent_log
        .iter()
        .filter(|l| l.contains("VIP") || l.contains("frames"))
    {
        println!("agent: {line}");
    }
    println!();
    print!("{}", report.table());
    println!(
        "\n{} of {} connections answered; latency p50 {:?}, p99 {:?}; chi-square against the \
         weights {:.2} (2 degrees of freedom; above 27.6 would mean p < 1e-6)",
        report.clients.succeeded(),
        report.clients.attempted,
        report.clients.latency_quantile(0.5).unwrap_or_default(),
        report.clients.latency_quantile(0.99).unwrap_or_default(),
        report.chi_square()
    );
    ensure!(
        report.clients.all_succeeded(),
        "failed connections: {}",
        report.clients.summary()
    );
    Ok(())
}
