//! A SYN flood of ten times the connection table's size (and at least 8 Mi SYNs, so
//! that it lasts long enough for the weights to move several times), through the agent's own
//! XDP program, while long-lived TCP connections sit idle after a weight change and
//! the weights go on moving every second (see `lb_tests::flood`): every one of them
//! keeps its connection-table entry and its backend, and new connections made
//! during the flood succeed. The agent's flood watch (`lb status`) declares the flood
//! and, once it is over, says so.

use lb_tests::flood::{FloodOptions, run};

#[test]
fn a_syn_flood_never_costs_an_established_flow_its_backend() {
    let table = u64::from(lb_common::maps::CONN_TABLE_SIZE_V4);
    let report = run(FloodOptions {
        connections: 100,
        syns: (10 * table).max(1 << 23),
        guard: true,
    })
    .unwrap();
    eprintln!("flood: {report:?}");
    assert!(report.flood_syns >= 10 * table, "{report:?}");
    // Every SYN went to the young table: held there, or its write failed and was
    // counted (the kernel's LRU can refuse a write under two CPUs' concurrent
    // floods; the SYN then follows the lookup table, as any flow without an entry).
    assert!(
        report.young + report.young_failed >= report.flood_syns,
        "every SYN held as young or counted: {report:?}"
    );
    assert_eq!(report.entries_lost, 0, "{report:?}");
    assert_eq!(report.established_broken, 0, "{report:?}");
    assert!(
        report.weight_changes >= 5,
        "the weights should move: {report:?}"
    );
    assert!(report.legit_attempts >= 10, "{report:?}");
    assert!(report.legit_connect_success() >= 0.99, "{report:?}");
}
