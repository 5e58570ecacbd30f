//! End to end through the real kernel datapath: 600 real TCP connections from a client
//! namespace to the VIP, through the XDP program that the real `lb` agent attached in
//! native mode, to three backends weighted 1:2:3.

use lb_tests::spread;

/// Every connection must succeed, and the spread must match the weights.
///
/// Tolerance: each connection's backend is a function of its (random) client port, so
/// the counts are multinomial with the table's shares, which are within 0.5 percentage
/// points of the weights. Pearson's chi-square against the weights, with 2 degrees of
/// freedom, stays under 27.6 with probability 1 - 1e-6 when the spread is right (the
/// 0.5-point table error adds under 0.2 to it at 600 connections). A balancer that
/// ignored the weights (200 each) would score about 133, so the test does catch it.
#[test]
fn connections_spread_by_weight_and_all_succeed() {
    let weights = [1, 2, 3];
    let report = spread::run(&weights, 600).expect("running the end-to-end scenario");
    let table = report.table();
    assert!(
        report.clients.all_succeeded(),
        "failed connections: {}\n{table}",
        report.clients.summary()
    );
    assert_eq!(report.clients.succeeded(), 600);
    let chi2 = report.chi_square();
    assert!(
        chi2 < 27.6,
        "spread does not follow the weights (chi-square {chi2:.1}):\n{table}"
    );
    // Each server saw exactly the connections whose responses named it: nothing
    // reached a backend twice or got lost on the way.
    for (name, &accepted) in &report.accepted {
        assert_eq!(
            accepted,
            *report.clients.responses.get(name).unwrap_or(&0),
            "backend {name} accepted a different number of connections than answered:\n{table}"
        );
    }
    assert!(
        report
            .agent_log
            .iter()
            .any(|l| l.contains("non-SYN misses 0")),
        "the agent reported flows that missed the connection table:\n{}",
        report.agent_log.join("\n")
    );
}
