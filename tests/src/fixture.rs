//! The datapath loaded for a configuration and run frame by frame through
//! `BPF_PROG_TEST_RUN`: the world of the packet fixture tests (`tests/tests/datapath.rs`,
//! `tests/tests/nat.rs`).

use aya::programs::{TestRun, TestRunOptions};
use lb_userspace::{
    config::Config,
    dataplane::{Dataplane, LoadOptions},
    desired::Desired,
};
use log::LevelFilter;

/// A datapath (not attached, not pinned) holding what a configuration asks for.
pub struct World {
    pub dataplane: Dataplane,
    pub desired: Desired,
    pub config: Config,
}

impl World {
    /// Loads the program with the sizes the agent would give `text` and writes its
    /// desired state; the datapath's log at `log` (its records are left unread).
    pub fn load(text: &str, log: LevelFilter) -> World {
        World::load_with(
            text,
            LoadOptions {
                log,
                ..LoadOptions::default()
            },
        )
    }

    /// As [`World::load`], with `options` (their sizes replaced by the
    /// configuration's).
    pub fn load_with(text: &str, options: LoadOptions) -> World {
        let config = Config::parse(text).expect("the fixture's configuration");
        let desired = Desired::from_config(&config).expect("planning the configuration");
        let mut dataplane = Dataplane::load_options(LoadOptions {
            sizes: config.datapath_sizes(),
            ..options
        })
        .expect("loading the XDP program");
        dataplane
            .apply_and_wait(&desired)
            .expect("writing the maps");
        World {
            dataplane,
            desired,
            config,
        }
    }

    /// Runs the balancer once on `input`: its verdict and the frame it left.
    pub fn run(&mut self, input: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; input.len() + 256];
        let result = self
            .dataplane
            .program()
            .expect("the balancer program")
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }
}
