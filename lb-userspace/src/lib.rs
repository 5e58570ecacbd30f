//! The load balancer's agent: turns a configuration into the contents of the XDP
//! datapath's maps and keeps them there.
//!
//! # Layout
//! - [`config`]: the TOML file, checked completely before anything else happens.
//! - [`core`]: the pure core the agent, the simulator (crate `lb-sim`) and a fleet
//!   leader share: the control step, the policy's stages, the Maglev table, the load
//!   model. No I/O, no clock, no configuration types.
//! - [`metrics`]: the Prometheus `/metrics` endpoint.
//! - [`collect`]: per-backend metrics scrapes and health probes.
//! - [`signals`]: per-backend probes, scrapes and models, for the control steps.
//! - [`desired`]: what the maps must hold for a configuration (pure).
//! - [`dataplane`]: loads, fills, attaches and reads the XDP program and its maps.
//! - [`agent`]: the lifetime and control loop of `lb run`.
//! - [`cluster`]: a fleet of LBs through etcd: records, merge, the session task.
//! - [`logging`]: the agent's log, as text or JSON, levels per module.
//! - [`api`]: the control API's requests and typed answers.
//! - [`control`]: the control socket (server side for the agent, client for the CLI).
//! - [`cli`]: the `lb` commands that talk to the agent, and their text and JSON.
pub mod agent;
pub mod api;
pub mod cli;
pub mod cluster;
pub mod collect;
pub mod config;
pub mod control;
pub mod core;
pub mod dataplane;
pub mod desired;
pub mod logging;
pub mod metrics;
pub mod share;
pub mod signals;
