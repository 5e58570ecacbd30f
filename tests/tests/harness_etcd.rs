//! Checks the fleet harness itself, without a load balancer program: a topology with
//! three load balancers and an etcd service host, a real etcd (Debian's
//! `etcd-server`) reachable from every load balancer's namespace, served again after
//! SIGKILL and a restart on the same data, and the same over TLS with client
//! certificates (generated with `lb_tests::certs`).
//!
//! Needs root, `ip` (iproute2) and `/usr/bin/etcd` (`cargo xtask setup` installs it).
//! When `curl` is installed too, the TLS part also proves that a client certificate
//! from the right CA is served and one from an unrelated CA is refused.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

use lb_tests::certs::{self, TlsFiles};
use lb_tests::etcd::{self, EtcdServer};
use lb_tests::netns::{self, Netns};
use lb_tests::scratch::ScratchDir;
use lb_tests::topology::{Host, Role, Topology};

/// Every load balancer of `topo` opens a TCP connection to `addr`.
fn every_lb_connects(topo: &Topology, addr: SocketAddr) {
    for lb in topo.load_balancers() {
        let connected = lb.ns().run_in(|| etcd::accepts(addr)).unwrap();
        assert!(
            connected,
            "{:?} ({}) cannot connect to etcd at {addr}",
            lb.role(),
            lb.ipv4()
        );
    }
}

/// `curl` against etcd's `/health` from `host`'s namespace with the given client
/// certificate; `None` when curl is not installed.
fn curl_health(host: &Host, url: &str, ca: &Path, cert: &Path, key: &Path) -> Option<String> {
    Command::new("curl").arg("--version").output().ok()?;
    let out = host
        .ns()
        .command("curl")
        .args(["--silent", "--show-error", "--max-time", "5", "--cacert"])
        .arg(ca)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg(format!("{url}/health"))
        .output()
        .expect("running curl");
    Some(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

#[test]
fn etcd_serves_every_load_balancer_plain_and_tls() {
    let mut topo = Topology::build(1).expect("build the topology");
    assert_eq!(topo.add_load_balancer().unwrap(), 1);
    assert_eq!(topo.add_load_balancer().unwrap(), 2);
    let lbs = topo.load_balancers();
    assert_eq!(
        lbs.iter().map(|h| h.role()).collect::<Vec<_>>(),
        [
            Role::LoadBalancer,
            Role::ExtraLoadBalancer(0),
            Role::ExtraLoadBalancer(1)
        ]
    );
    assert_eq!(
        lbs.iter().map(|h| h.ipv4().to_string()).collect::<Vec<_>>(),
        ["198.18.0.2", "198.18.0.3", "198.18.0.4"]
    );
    assert_eq!(topo.lb2().unwrap().ipv4(), lbs[1].ipv4());
    assert!(topo.add_second_load_balancer().is_err());

    let host_ns = topo
        .add_service_host("etcd")
        .unwrap()
        .ns()
        .name()
        .to_owned();
    let etcd_host = topo.service_host("etcd").unwrap();
    assert_eq!(etcd_host.role(), Role::Service(0));
    assert_eq!(etcd_host.ipv4().to_string(), "198.18.0.200");
    assert!(host_ns.ends_with("-svc-etcd"), "{host_ns}");
    let names = topo.namespace_names();
    assert_eq!(names.len(), 1 + 1 + 3 + 1 + 1, "{names:?}");

    // Plain: served to every load balancer, again after a crash and a restart on the
    // same data directory.
    let mut server = EtcdServer::start(etcd_host.ns(), etcd_host.ipv4(), None).unwrap();
    assert_eq!(server.endpoint(), "http://198.18.0.200:2379");
    assert!(server.is_running());
    every_lb_connects(&topo, server.client_addr());
    let addr = server.client_addr();
    assert!(topo.lb().ns().run_in(|| etcd::healthy(addr)).unwrap());
    let data = server.data_dir();
    assert!(
        data.join("member").is_dir(),
        "no data in {}",
        data.display()
    );

    let pid = server.pid().unwrap();
    server.kill().unwrap();
    assert!(!server.is_running());
    assert!(!topo.lb().ns().run_in(|| etcd::accepts(addr)).unwrap());
    server.restart().unwrap();
    assert_ne!(server.pid().unwrap(), pid);
    assert_eq!(server.data_dir(), data);
    every_lb_connects(&topo, server.client_addr());
    assert!(topo.lb().ns().run_in(|| etcd::healthy(addr)).unwrap());
    assert!(
        server
            .log_tail(200)
            .matches("--- lb-tests: starting")
            .count()
            == 2,
        "{}",
        server.log_tail(200)
    );
    // etcd shuts down cleanly on SIGTERM and then re-raises it, so it ends by it.
    let status = server.stop().unwrap().expect("etcd was running");
    assert!(
        status.success() || status.signal() == Some(libc::SIGTERM),
        "etcd exited with {status} on SIGTERM:\n{}",
        server.log_tail(20)
    );
    assert_eq!(server.stop().unwrap(), None);
    let scratch = data.parent().unwrap().to_owned();
    drop(server);
    assert!(!scratch.exists(), "{} is left", scratch.display());

    // TLS with client certificates, on a second address of the client namespace (the
    // other way a test can place etcd on the segment).
    let certs_dir = ScratchDir::new("certs").unwrap();
    let tls_ip = "198.18.0.250".parse().unwrap();
    topo.client()
        .ns()
        .ip(&[
            "addr",
            "add",
            &format!("{tls_ip}/24"),
            "dev",
            topo.client().ifname(),
        ])
        .unwrap();
    let tls: TlsFiles = certs::generate(certs_dir.path(), &[IpAddr::V4(tls_ip)]).unwrap();
    let untrusted = certs::generate_untrusted_client(certs_dir.path()).unwrap();
    let mut server = EtcdServer::start(topo.client().ns(), tls_ip, Some(&tls)).unwrap();
    assert_eq!(server.endpoint(), "https://198.18.0.250:2379");
    every_lb_connects(&topo, server.client_addr());
    server.kill().unwrap();
    server.restart().unwrap();
    every_lb_connects(&topo, server.client_addr());
    let url = server.endpoint();
    match curl_health(topo.lb(), &url, &tls.ca, &tls.client_cert, &tls.client_key) {
        Some(answer) => {
            assert!(answer.contains(r#""health":"true""#), "{answer}");
            let refused = curl_health(
                topo.lb(),
                &url,
                &tls.ca,
                &untrusted.client_cert,
                &untrusted.client_key,
            )
            .unwrap();
            assert!(
                !refused.contains(r#""health""#),
                "a client of an unrelated CA was served: {refused}"
            );
            let distrusting = curl_health(
                topo.lb(),
                &url,
                &untrusted.ca,
                &tls.client_cert,
                &tls.client_key,
            )
            .unwrap();
            assert!(
                !distrusting.contains(r#""health""#),
                "a client trusting only an unrelated CA accepted the server: {distrusting}"
            );
        }
        None => eprintln!("curl not found: the TLS handshake itself is not checked"),
    }
    drop(server);

    drop(topo);
    let listed = netns::ip(&["netns", "list"]).unwrap();
    for name in &names {
        assert!(
            !listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name.as_str())),
            "namespace {name} is left"
        );
    }
}

/// A failed start says why, with etcd's own words, and leaves nothing running.
#[test]
fn a_failed_start_quotes_the_log() {
    let ns = Netns::new(format!("{}-etcdfail", netns::unique_prefix())).unwrap();
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    // 198.18.0.250 is not an address of this namespace: etcd cannot listen on it.
    let err = EtcdServer::start(&ns, "198.18.0.250".parse().unwrap(), None)
        .expect_err("etcd started on an address it does not have");
    let text = format!("{err:#}");
    assert!(text.contains("exited"), "{text}");
    assert!(text.contains("cannot assign requested address"), "{text}");
}
