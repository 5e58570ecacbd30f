//! The agent's Prometheus endpoint: [`render`] turns a [`MetricsSnapshot`] into the
//! OpenMetrics text format with the `prometheus-client` encoder, and [`serve()`] answers
//! `GET /metrics` with it over a minimal HTTP/1.1 responder on tokio.
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
//! Per VIP (`vip` label) and per backend (`vip` and `backend` labels):
//! - `lb_vip_packets_total`, `lb_vip_bytes_total`, `lb_vip_new_flows_total`
//! - `lb_backend_packets_total`, `lb_backend_bytes_total`, `lb_backend_new_flows_total`
//! - gauges `lb_backend_weight`, `lb_backend_configured_weight`, `lb_backend_pinned`
//!   and `lb_backend_healthy` (the last two are 0 or 1)
//! - gauges `lb_backend_predicted_latency_seconds` and
//!   `lb_backend_baseline_predicted_latency_seconds`, only for backends that have them.
//!
//! The model:
//! - `lb_model_info{source} 1`: what drives the weights (`model`, `baseline:ewma`, ...).
//! - `lb_model_fit_failures_total`: fits of the model that failed.
//! - `lb_model_last_fit_duration_seconds`: how long the last fit took.
//! - `lb_model_rolling_error_seconds{predictor}`: rolling mean absolute error of the
//!   model (`predictor="model"`) and of the best baseline (`predictor="baseline"`).
//!
//! Optional values (and any value that is NaN or infinite) are left out rather than
//! shown as zero. A family with no sample at all is left out entirely.
//!
//! # The HTTP side
//! One tokio task per connection, each with its own deadline, so a slow or silent client
//! never holds up another. The request head is read up to a bound (8 KiB for the request
//! line, 16 KiB in all) and within 5 s; the response is written within another 5 s;
//! every response carries `Connection: close`. Bad input gets a 4xx answer or a closed
//! connection, never a panic.

mod encode;
mod serve;

pub use encode::{BackendMetrics, MetricsSnapshot, ModelMetrics, VipMetrics, render};
pub use serve::serve;
