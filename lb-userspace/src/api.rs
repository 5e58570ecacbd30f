//! The control API: versioned JSON requests and responses over the agent's Unix
//! socket, one line each way per connection. Used by the agent (`control`) and by
//! the `lb` command line; every request is validated by the agent before it acts.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks. A request of another version is refused.
pub const VERSION: u32 = 1;

/// Largest request the agent reads, in bytes.
pub const MAX_REQUEST: usize = 64 * 1024;

/// A request, as sent on the socket: `{"version":1,"request":"status"}` or
/// `{"version":1,"request":{"weight_set":{"backend":"198.18.0.11","weight":5}}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub version: u32,
    pub request: Request,
}

/// What the caller asks for. A backend is named by its address, and by its VIP
/// (`198.18.1.1:80/tcp`, `[fd00::1]:80/tcp`) when the address serves more than one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The agent's state: instance, interface, VIPs, counters, last reload.
    Status,
    /// Configured VIPs.
    VipList,
    /// Every backend with its weights and counters.
    BackendList,
    /// Counters, with the agent's clock, for rates.
    Stats,
    /// Hold `weight` until `auto` or the next reload.
    WeightSet {
        backend: IpAddr,
        #[serde(default)]
        vip: Option<String>,
        weight: u32,
    },
    /// Hold `weight` across reloads until `auto`.
    WeightPin {
        backend: IpAddr,
        #[serde(default)]
        vip: Option<String>,
        weight: u32,
    },
    /// Give the weight back to the policy (drops a pin, a set or a drain).
    WeightAuto {
        backend: IpAddr,
        #[serde(default)]
        vip: Option<String>,
    },
    /// No new flows to the backend; established flows continue.
    Drain {
        backend: IpAddr,
        #[serde(default)]
        vip: Option<String>,
    },
    /// Undo `drain`.
    Undrain {
        backend: IpAddr,
        #[serde(default)]
        vip: Option<String>,
    },
    /// Which inputs produced each backend's weight.
    Explain,
    /// Each VIP's lookup table as the datapath reads it now: size, backend slot
    /// counts and a digest of its bytes (two LBs with one config must agree).
    Tables,
    /// Re-read the configuration file; apply it completely or not at all.
    Reload,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Response {
    Ok { ok: bool, result: serde_json::Value },
    Error { ok: bool, error: String },
}

impl Response {
    pub fn ok(result: serde_json::Value) -> Response {
        Response::Ok { ok: true, result }
    }
    pub fn error(message: impl Into<String>) -> Response {
        Response::Error {
            ok: false,
            error: message.into(),
        }
    }
}

/// One backend, as `backend list` and `status` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendView {
    pub vip: String,
    pub backend: IpAddr,
    pub mac: String,
    pub configured_weight: u32,
    /// The weight in force, in the same units as the configured weight.
    pub weight: f64,
    /// `pinned`, `set`, `drained`, or `policy`.
    pub control: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Health by the probes (true when the VIP has no `[vip.health]`).
    #[serde(default = "yes")]
    pub healthy: bool,
    /// The latency a new flow suffers there now (scraped, else probed), ms.
    #[serde(default)]
    pub latency_ms: Option<f64>,
    /// That latency one control interval ahead, as predicted, ms.
    #[serde(default)]
    pub predicted_ms: Option<f64>,
    /// Which predictor made the prediction (the model, or the baseline that beats it).
    #[serde(default)]
    pub predictor: Option<String>,
}

fn yes() -> bool {
    true
}

/// The text of an error and its causes, each said once: `a: b: c`, leaving out a
/// cause whose text is already part of what was said (many errors include their
/// source in their own message, and `{:#}` would repeat it). What `lb` prints after
/// `lb: error:` and what the agent answers with.
pub fn error_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_read_as_documented() {
        let text = r#"{"version":1,"request":{"weight_set":{"backend":"198.18.0.11","vip":"198.18.1.1:80/tcp","weight":5}}}"#;
        let env: Envelope = serde_json::from_str(text).unwrap();
        assert_eq!(env.version, 1);
        assert_eq!(
            env.request,
            Request::WeightSet {
                backend: "198.18.0.11".parse().unwrap(),
                vip: Some("198.18.1.1:80/tcp".into()),
                weight: 5
            }
        );
        let back = serde_json::to_string(&env).unwrap();
        assert_eq!(serde_json::from_str::<Envelope>(&back).unwrap(), env);
        let status: Envelope = serde_json::from_str(r#"{"version":1,"request":"status"}"#).unwrap();
        assert_eq!(status.request, Request::Status);
    }

    #[test]
    fn bad_requests_are_refused_by_the_decoder() {
        for bad in [
            r#"{"version":1,"request":"format_disk"}"#,
            r#"{"version":1,"request":{"weight_set":{"backend":"not-an-ip","weight":1}}}"#,
            r#"{"version":1,"request":{"weight_set":{"backend":"198.18.0.11","weight":-1}}}"#,
            r#"{"version":1,"request":{"weight_set":{"backend":"198.18.0.11","weight":1,"x":2}}}"#,
            r#"{"version":1,"request":"status","extra":1}"#,
            r#"{"request":"status"}"#,
            "not json",
        ] {
            assert!(
                serde_json::from_str::<Envelope>(bad).is_err(),
                "accepted {bad}"
            );
        }
    }

    /// An error whose message already says its source, as many library errors do.
    #[derive(Debug)]
    struct Says(String, Option<Box<Says>>);

    impl std::fmt::Display for Says {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for Says {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|s| s as _)
        }
    }

    fn chain(messages: &[&str]) -> Says {
        let mut error: Option<Box<Says>> = None;
        for m in messages.iter().rev() {
            error = Some(Box::new(Says(m.to_string(), error)));
        }
        *error.unwrap()
    }

    #[test]
    fn an_error_chain_says_each_message_once() {
        let e = chain(&[
            "reading /etc/lb.toml",
            "No such file or directory (os error 2)",
            "No such file or directory (os error 2)",
        ]);
        assert_eq!(
            error_text(&e),
            "reading /etc/lb.toml: No such file or directory (os error 2)"
        );
        let e = chain(&[
            "`bpf_link_create` failed: Invalid argument (os error 22)",
            "`bpf_link_create` failed",
            "Invalid argument (os error 22)",
        ]);
        assert_eq!(
            error_text(&e),
            "`bpf_link_create` failed: Invalid argument (os error 22)"
        );
        let e = chain(&["attaching to eth0", "`bpf_link_create` failed", "EINVAL"]);
        assert_eq!(
            error_text(&e),
            "attaching to eth0: `bpf_link_create` failed: EINVAL"
        );
        assert_eq!(error_text(&chain(&["alone"])), "alone");
    }

    #[test]
    fn error_text_dedups_an_anyhow_context_too() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = anyhow::Error::new(io)
            .context(format!(
                "{}",
                std::io::Error::from(std::io::ErrorKind::NotFound)
            ))
            .context("reading lb.toml");
        assert_eq!(error_text(e.as_ref()), "reading lb.toml: entity not found");
    }
}
