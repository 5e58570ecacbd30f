//! A helper process for the harness's own signal tests (`tests/tests/topology.rs`):
//! builds a one-backend topology, prints its namespace names, then waits to be
//! signalled. Bounded, so a victim whose parent died still ends by itself.

use std::time::Duration;

use lb_tests::topology::Topology;

fn main() {
    let topology = Topology::build(1).expect("build the topology");
    println!("VICTIM READY {}", topology.namespace_names().join(","));
    std::thread::sleep(Duration::from_secs(60));
}
