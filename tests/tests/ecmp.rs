//! Scale-out behind ECMP: two load balancers with the same configuration behind a
//! router namespace whose kernel spreads flows to the VIP over both with a multipath
//! route (L4 hash, as a real router would). Both build byte-identical tables; when one
//! LB is withdrawn, established connections that move to the other still reach their
//! backend, because both pick backends by the same consistent hash.
//!
//! The topology's "client" host on the segment acts as the router here; the real
//! client sits behind it on its own link (198.18.10.0/24), and the backends send
//! their replies to it through the router.

use std::{net::SocketAddr, time::Duration};

use lb_tests::{
    fleet,
    netns::Netns,
    spread::{Agent, PORT},
    tcp::{BackendServer, PersistentConn, run_clients},
    topology::{Topology, VIP_V4},
};
use lb_userspace::dataplane::PassThrough;

const CONNECTIONS: usize = 200;

#[test]
fn two_lbs_agree_and_flows_survive_losing_one() {
    let mut topo = Topology::build(4).unwrap();
    topo.add_second_load_balancer().unwrap();
    let lb1 = topo.lb().ipv4();
    let lb2 = topo.lb2().unwrap().ipv4();

    // The real client, behind the router, which spreads flows over both LBs.
    let client = Netns::new(format!("{}-c2", topo.prefix())).unwrap();
    fleet::route(&topo, &client).unwrap();
    fleet::set_route(&topo, &[lb1, lb2]).unwrap();

    // The same configuration for both LBs.
    let dir = std::env::temp_dir().join(format!("{}-lb", topo.prefix()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("lb.toml");
    let mut text = format!(
        "[[vip]]\naddress = \"{VIP_V4}\"\nport = {PORT}\nprotocol = \"tcp\"\npolicy = \"static\"\n"
    );
    for (i, h) in topo.backends().iter().enumerate() {
        text += &format!(
            "\n[[vip.backend]]\naddress = \"{}\"\nmac = \"{}\"\nweight = {}\n",
            h.ipv4(),
            h.mac().octets().map(|b| format!("{b:02x}")).join(":"),
            i + 1
        );
    }
    std::fs::write(&config, text).unwrap();
    let ports = [
        topo.lb_bridge_port().to_owned(),
        topo.lb2().unwrap().bridge_port().to_owned(),
    ];
    let _pass: Vec<PassThrough> = ports
        .iter()
        .map(|p| {
            let p = p.clone();
            topo.switch()
                .run_in(move || PassThrough::attach(&p))
                .unwrap()
                .unwrap()
        })
        .collect();
    let _servers: Vec<BackendServer> = topo
        .backends()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            BackendServer::start(h.ns(), topo.vip(PORT, false), &format!("backend{i}")).unwrap()
        })
        .collect();
    let first = Agent::start_on(
        topo.lb(),
        &format!("{}a", topo.prefix()),
        &config,
        &["--detach-on-exit"],
    )
    .unwrap();
    let second = Agent::start_on(
        topo.lb2().unwrap(),
        &format!("{}b", topo.prefix()),
        &config,
        &["--detach-on-exit"],
    )
    .unwrap();

    // Same config, same tables, byte for byte (compared by digest and slot counts,
    // both read back from each kernel).
    let t1: serde_json::Value =
        serde_json::from_str(&first.ctl(&["tables", "--json"]).unwrap()).unwrap();
    let t2: serde_json::Value =
        serde_json::from_str(&second.ctl(&["tables", "--json"]).unwrap()).unwrap();
    assert_eq!(t1, t2, "the two LBs built different tables");
    assert_eq!(t1[0]["size"], 65537);
    eprintln!("ecmp: both tables {}", t1[0]["digest"]);

    // Long-lived connections, spread by the router over both LBs.
    let vip = SocketAddr::new(VIP_V4.into(), PORT);
    let mut conns: Vec<(PersistentConn, String)> = (0..CONNECTIONS)
        .map(|_| PersistentConn::connect(&client, vip, Duration::from_secs(3)).unwrap())
        .collect();
    let via = |agent: &Agent| -> u64 {
        let s: serde_json::Value =
            serde_json::from_str(&agent.ctl(&["status", "--json"]).unwrap()).unwrap();
        s["datapath"]["tx"].as_u64().unwrap()
    };
    let (tx1, tx2) = (via(&first), via(&second));
    assert!(
        tx1 > 20 && tx2 > 20,
        "ECMP did not use both LBs: {tx1} and {tx2} frames forwarded"
    );

    // Withdraw the first LB, as BGP would: the router sends everything to the second.
    fleet::set_route(&topo, &[lb2]).unwrap();
    first.stop().unwrap();
    let mut survived = 0;
    let mut broken = Vec::new();
    for (i, (conn, backend)) in conns.iter_mut().enumerate() {
        match conn.request("after") {
            Ok(answer) if answer == *backend => survived += 1,
            Ok(answer) => broken.push(format!("{i}: was {backend}, now {answer}")),
            Err(e) => broken.push(format!("{i}: {e}")),
        }
    }
    let fraction = survived as f64 / CONNECTIONS as f64;
    eprintln!(
        "ecmp: {survived} of {CONNECTIONS} established connections survived losing one LB ({:.1} %)",
        fraction * 100.0
    );
    assert!(
        fraction >= 0.99,
        "only {:.1} % survived: {broken:?}",
        fraction * 100.0
    );
    // The second LB saw the moved flows without a SYN: they missed its table and were
    // sent by the consistent hash to the same backend.
    let s: serde_json::Value =
        serde_json::from_str(&second.ctl(&["status", "--json"]).unwrap()).unwrap();
    assert!(
        s["datapath"]["conn_miss_non_syn"].as_u64().unwrap() > 0,
        "no flow moved: {s}"
    );
    let fresh = run_clients(&client, vip, 100, 8, Duration::from_secs(3)).unwrap();
    assert!(fresh.all_succeeded(), "{}", fresh.summary());
    drop(conns);
    second.stop().unwrap();
}
