//! The agent's Prometheus endpoint, started by the agent (`lb run`): [`render`] turns a
//! [`MetricsSnapshot`] into the OpenMetrics text format with the `prometheus-client`
//! encoder (in `encode`), and [`serve()`] answers `GET /metrics` with it through axum
//! on hyper's HTTP/1.1 server on tokio (in `serve`).
//!
//! The agent owns the numbers: once per control interval it builds a new snapshot
//! (datapath counters summed over CPUs, per-VIP and per-backend counters, weights,
//! predictions, the model's state) and sends it into a `tokio::sync::watch` channel.
//! Every scrape renders the latest value, so nothing here keeps state between scrapes.
//!
//! # Metrics
//! Datapath-wide (from [`GlobalStats`](lb_common::types::GlobalStats)):
//! - `lb_datapath_frames_total`: every frame the XDP program saw.
//! - `lb_datapath_passed_total{reason}`: frames handed to the kernel stack; `reason` is
//!   `not_ip`, `not_vip`, `fragment`, `truncated`, `malformed`, `ipv6_extension` or
//!   `icmp_other`.
//! - `lb_datapath_ipv4_options_total`: VIP packets with IPv4 options (balanced as usual).
//! - `lb_datapath_dropped_total{reason}`: `no_backend` or `encap_failed`.
//! - `lb_conntrack_total{result}`: `hit`, `miss_syn`, `miss_non_syn` or `insert_failed`.
//! - `lb_tx_total{mode}`: frames sent back out towards a backend, `dsr` or `encap`.
//! - `lb_icmp_total{kind}`: `echo_reply` or `error_forwarded`.
//!
//! The flood guard (see `core::flood` and docs/RELIABILITY.md):
//! - `lb_flood_guard_flows_total{event}`: `young`, `promoted`, `young_failed`.
//! - gauges `lb_flood_guard_enabled` and `lb_flood_active` (0 or 1),
//!   `lb_flood_new_flows_per_second{flows}` (`all`, `unanswered`) and
//!   `lb_flood_threshold_per_second`; counter `lb_flood_episodes_total`.
//!
//! Full NAT, when a VIP forwards by `nat` (see docs/CONFIG.md):
//! - `lb_nat_packets_total{direction}`: `to_backend`, `to_client`.
//! - `lb_nat_ports_total{event}`: `claimed`, `collision`, `exhausted`, `reclaimed`,
//!   `lost`, `unknown_reply`, `expired`.
//! - gauges `lb_nat_flows`, `lb_nat_ports_in_use{source}` (from a walk of the NAT
//!   tables every 10 s) and `lb_nat_ports_per_source`.
//!
//! The datapath's maps (`map` label, each pinned map):
//! - gauges `lb_datapath_map_memory_bytes` (the kernel's `memlock`) and
//!   `lb_datapath_map_max_entries`.
//!
//! Per VIP (`vip` label) and per backend (`vip` and `backend` labels):
//! - `lb_vip_packets_total`, `lb_vip_bytes_total`, `lb_vip_new_flows_total`
//! - `lb_backend_packets_total`, `lb_backend_bytes_total`, `lb_backend_new_flows_total`
//! - gauges `lb_backend_weight`, `lb_backend_configured_weight`, `lb_backend_pinned`
//!   and `lb_backend_healthy` (the last two are 0 or 1)
//! - gauges `lb_backend_predicted_latency_seconds` and
//!   `lb_backend_baseline_predicted_latency_seconds`, only for backends that have them.
//! - `lb_backend_predictor{vip,backend,predictor} 1`: which predictor drives the
//!   backend's weight (`model`, `last_value`, `ewma`).
//! - `lb_backend_prediction_error_seconds{vip,backend,predictor}`: the rolling mean
//!   absolute error on that backend of the model (`predictor="model"`) and of the best
//!   baseline (`predictor="baseline"`).
//!
//! The model:
//! - `lb_model_info{source} 1`: what drives most backends' weights (`model`,
//!   `baseline:ewma`, ...).
//! - `lb_model_fit_failures_total{kind}`: fits of the model that failed, by kind
//!   (`too_few_samples`, `fit`, `non_finite`, ...; every kind shown, 0 included).
//! - `lb_model_last_fit_duration_seconds`: how long the last fit took, and
//!   `lb_model_last_fit_timestamp_seconds`: when it was installed.
//! - `lb_model_rolling_error_seconds{predictor}`: the mean over backends of the
//!   rolling mean absolute error of the model (`predictor="model"`) and of the best
//!   baseline (`predictor="baseline"`).
//!
//! Optional values (and any value that is NaN or infinite) are left out rather than
//! shown as zero. A family with no sample at all is left out entirely.
//!
//! # The HTTP side
//! axum routes, hyper speaks HTTP/1.1, one tokio task per connection, each with its own
//! deadline, so a slow or silent client never holds up another; at most 256 connections
//! are served at once. `GET /metrics` (and `HEAD`) is answered with the OpenMetrics
//! content type, any other path with 404, any other method on `/metrics` with 405 and
//! `Allow: GET, HEAD`. hyper bounds the request: a head over 16 KiB gets 431, a
//! malformed request 400, and a request target over 8 KiB gets 414. A client that has
//! not sent its request head within 5 s is disconnected, and so is every connection
//! still open 10 s after its accept. Each connection serves one request; an HTTP/1.1
//! answer carries `Connection: close`, and an HTTP/1.0 request is answered in HTTP/1.0.
//! When the shutdown future resolves, the listener is closed, connections that have sent
//! nothing are closed at once, and the others (an answer under way, a request head still
//! coming in) get 1 s to finish before they are closed too. Bad input gets a 4xx answer
//! or a closed connection, never a panic.

mod encode;
mod serve;

pub use encode::{
    BackendMetrics, ClusterMetrics, MetricsSnapshot, ModelMetrics, VipMetrics, render,
};
pub use serve::{ServeError, serve};
