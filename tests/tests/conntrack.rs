//! Why the connection table is shared by all CPUs and not per CPU, measured: on veth
//! (and on any NIC whose receive CPU for a flow can change), the packets of ONE TCP
//! connection are processed by XDP on whichever CPU sent them. The client thread of
//! one long-lived connection is moved between CPUs; the datapath's per-CPU counters
//! show the flow's packets on every CPU, and the shared table still finds the flow
//! every time (no non-SYN miss). A per-CPU table would have missed on every CPU but
//! the first one.

use std::time::Duration;

use aya::maps::{Map, MapData, PerCpuArray};
use lb_common::types::BackendStats;
use lb_tests::{
    spread::{Agent, PORT, attach_pass, write_config},
    tcp::{BackendServer, PersistentConn},
    topology::Topology,
};
use lb_userspace::agent::pin_dir;

#[test]
fn one_flow_is_processed_on_every_cpu_and_the_shared_table_finds_it() {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    assert!(cpus >= 2, "this machine has one CPU: nothing to measure");
    let topo = Topology::build(2).unwrap();
    let config = write_config(&topo, &[1, 1], "policy = \"static\"").unwrap();
    let _pass = attach_pass(&topo, topo.lb_bridge_port()).unwrap();
    let _servers: Vec<BackendServer> = topo
        .backends()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            BackendServer::start(h.ns(), topo.vip(PORT, false), &format!("backend{i}")).unwrap()
        })
        .collect();
    let agent = Agent::start(&topo, &config, &["--detach-on-exit"]).unwrap();

    // One connection; its thread hops over the CPUs between round trips.
    let vip = topo.vip(PORT, false);
    let (mut conn, first) =
        PersistentConn::connect(topo.client().ns(), vip, Duration::from_secs(3)).unwrap();
    // The socket lives in the client's namespace whichever thread uses it; a thread
    // of our own is moved over the CPUs, so the test harness's thread is left alone.
    let rounds = std::thread::spawn(move || {
        for round in 0..200 {
            lb_tests::pin_to_cpu(round % cpus).unwrap();
            let answer = conn.request("hop").expect("a round trip");
            assert_eq!(answer, first, "the connection moved to another backend");
        }
        first
    })
    .join()
    .unwrap();
    let backend_id: u32 = if rounds == "backend0" { 0 } else { 1 };

    // Read the per-CPU counters straight from the pinned map.
    let data = MapData::from_pin(pin_dir(topo.prefix()).join("BACKEND_STATS")).unwrap();
    let map: PerCpuArray<MapData, BackendStats> =
        PerCpuArray::try_from(Map::PerCpuArray(data)).unwrap();
    let per_cpu: Vec<BackendStats> = map.get(&backend_id, 0).unwrap().iter().copied().collect();
    let busy = per_cpu.iter().filter(|s| s.packets > 20).count();
    eprintln!(
        "conntrack: one flow's packets per CPU: {:?}",
        per_cpu.iter().map(|s| s.packets).collect::<Vec<_>>()
    );
    assert!(busy >= 2, "the flow stayed on one CPU: {per_cpu:?}");
    let status: serde_json::Value =
        serde_json::from_str(&agent.ctl(&["status", "--json"]).unwrap()).unwrap();
    assert_eq!(status["datapath"]["conn_miss_non_syn"], 0, "{status}");
    agent.stop().unwrap();
}
