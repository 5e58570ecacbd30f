//! The test harness of the load balancer: packet fixtures, network namespaces, the
//! bridged direct-server-return topology and real TCP traffic; used by the
//! integration tests in `tests/tests/` and by the `lb-demo` binary.
//!
//! # Layout
//! - [`netns`]: named network namespaces that are removed on drop, on panic and on
//!   SIGINT/SIGTERM, and ways to run code inside them.
//! - [`topology`]: the client, load balancers, backends and service hosts on one
//!   bridged segment.
//! - [`etcd`]: a real single-member etcd inside a namespace, plain or TLS, that can
//!   be stopped, killed and restarted on its data.
//! - [`fleet`]: LBs behind an ECMP router, coordinated through etcd, with emulated
//!   backends (the fleet test and benchmark).
//! - [`flood`]: a SYN flood through the agent's own program while idle long-lived
//!   connections wait (issue 21: the flood test and benchmark).
//! - [`certs`]: a throwaway CA with server and client certificates (and an untrusted
//!   client), as PEM files.
//! - [`scratch`]: private temporary directories, removed on drop and swept after
//!   killed runs.
//! - [`tcp`]: backend servers that answer with their name, and clients that count
//!   which backend answered.
//! - [`packet`]: frames built field by field, for the datapath tests.
//! - [`fixture`]: the datapath loaded for a configuration and run frame by frame
//!   through `BPF_PROG_TEST_RUN`.
//! - [`pathcost`]: the XDP program's cost per path under `BPF_PROG_TEST_RUN`, and
//!   a live window's packet mix priced at it (issue 23).
//! - [`spread`]: the end-to-end scenario of weighted backends behind the real agent.
//! - [`survive`]: LBs leaving a fleet whose weights move, under long-lived
//!   connections of every age (issue 19: the fleet test and benchmark).
//! - [`operating`]: the `lb` command line against a real agent, and docs/OPERATING.md.
//! - [`testbed`]: the policy testbed (emulated backends, open-loop load, scenarios S1-S8).
//! - [`versus`]: the XDP balancer against HAProxy, nginx and no balancer.
//!
//! Every test network lives only in namespaces this crate creates, uses addresses from
//! 198.18.0.0/15 and fd00::/8 only, and has no default route.

pub mod certs;
pub mod etcd;
pub mod fixture;
pub mod fleet;
pub mod flood;
pub mod netns;
pub mod operating;
pub mod packet;
pub mod pathcost;
pub mod scratch;
pub mod spread;
pub mod survive;
pub mod tcp;
pub mod testbed;
pub mod topology;
pub mod versus;

/// Pins the calling thread to `cpu`: XDP runs on the CPU that sends a frame on a
/// veth, and `BPF_PROG_TEST_RUN` on the caller's, so a test chooses the CPU (and so
/// the per-CPU LRU list) its packets use.
pub fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity act on it
    // and on the calling thread only.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    anyhow::ensure!(rc == 0, "cannot pin this thread to CPU {cpu}");
    Ok(())
}
