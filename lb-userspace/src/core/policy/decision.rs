//! Why a backend got its weight: the [`Reason`] of the stage that decided it and the
//! [`Note`]s of the stages that changed it after, as data. `lb explain` renders them
//! as text (their `Display`); tests and the simulator match on the variants.

use std::fmt;

use super::PolicyKind;
use super::shed::DRAIN_S;
use crate::core::BackendId;

/// Why a backend got its weight in an update: everything `lb explain` shows.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Decision {
    pub backend: BackendId,
    pub policy: PolicyKind,
    /// What it held when the update started (policy units).
    pub before: u32,
    /// Its unnormalized target (only ratios among free backends matter).
    pub target: f64,
    /// What it holds now (policy units).
    pub after: u32,
    pub predicted_s: Option<f64>,
    pub predictor: String,
    pub reason: Reason,
    /// What later stages did to the weight the reason gave, in the order they did it.
    pub notes: Vec<Note>,
}

impl Decision {
    /// Cut at once, outside smoothing and the move budget.
    pub fn shed(&self) -> bool {
        matches!(self.reason, Reason::Shed { .. })
    }

    /// Its step was scaled down to keep the move budget (on shares or on slots).
    pub fn budget_limited(&self) -> bool {
        self.notes
            .iter()
            .any(|n| matches!(n, Note::MoveBudget { .. } | Note::SlotBudget { .. }))
    }

    /// Ejected for its error rate: 0, no new flows.
    pub fn ejected(&self) -> bool {
        matches!(self.reason, Reason::Ejected { .. })
    }

    /// Raised to the floor share.
    pub fn floored(&self) -> bool {
        self.notes.iter().any(|n| matches!(n, Note::Floor { .. }))
    }
}

/// The stage that decided a backend's weight, with the figures it decided on
/// (weights and targets in policy units, shares as fractions).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reason {
    /// An operator's `weight set`, `weight pin` or `drain`.
    Hold { weight: u32 },
    /// Its probes fail: 0 at once.
    Unhealthy,
    /// Its error rate over an interval, `error_rate`, was clearly above the pool's,
    /// `reference`: 0 at once, for `left_s` more seconds, then a probe; `times`
    /// counts the consecutive ejections (the n-th lasts n ejection times).
    Ejected {
        error_rate: f64,
        reference: f64,
        times: u32,
        left_s: f64,
    },
    /// The `static` policy: the configured weight.
    Static { configured: u32 },
    /// The `equal` policy.
    Equal,
    /// Strained, with its shown capacity and target below the shed ratio of what it
    /// held: cut at once to `kept` (before any deeper cut, see [`Note::DeepCut`]).
    Shed {
        policy: PolicyKind,
        shown: f64,
        target: f64,
        /// The fraction of its shown capacity that drains its backlog in time.
        drain: f64,
        shed_ratio: f64,
        current: f64,
        kept: f64,
    },
    /// Its backlog called for a cut that no other backend had spare for: kept.
    BacklogWithoutSpare { policy: PolicyKind, kept: f64 },
    /// The filtered target is within the hysteresis band or its noise: kept.
    Steady {
        policy: PolicyKind,
        target: f64,
        noise: f64,
        hysteresis: f64,
    },
    /// Smoothed toward the filtered target.
    Smoothed {
        policy: PolicyKind,
        target: f64,
        noise: f64,
        smoothed: f64,
    },
}

/// What a stage after the deciding one did to a backend's weight.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Note {
    /// A shed backend cut `cut` further, for its latency and its backlog; `taken` is
    /// the fraction of the wanted cut the others' spare allowed.
    DeepCut { cut: f64, taken: f64 },
    /// Shed on a foreseen fall of its capacity, to `shown` requests per second, the
    /// least its predictor expects over the next intervals; `strained`: whether it
    /// already was.
    Foreseen { shown: f64, strained: bool },
    /// Took `weight` of what shed backends gave up, within its room.
    TookWithinRoom { weight: f64 },
    /// Took `weight` of what shed backends gave up beyond the others' room.
    TookBeyondRoom { weight: f64 },
    /// Back from an ejection, held at a probe weight until enough of its requests
    /// say whether it still fails.
    Probe { weight: f64 },
    /// Back from an ejection and judged clean: at most `cap`, twice what it held.
    Returning { cap: f64 },
    /// Raised to the floor.
    Floor { floor: f64 },
    /// The move budget on ideal shares let `fraction` of the step through.
    MoveBudget { fraction: f64 },
    /// Kept above 0 so that the VIP has a backend.
    KeptForTheVip,
    /// The move budget on the real table: the step would move `share` of the slots;
    /// `fraction` of it was taken, moving `now` (`None`: none of it).
    SlotBudget {
        share: f64,
        fraction: f64,
        now: Option<f64>,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Reason::Hold { weight } => write!(f, "operator hold at {weight}"),
            Reason::Unhealthy => f.write_str("unhealthy: 0 until its probes pass again"),
            Reason::Ejected {
                error_rate,
                reference,
                times,
                left_s,
            } => write!(
                f,
                "ejected: {:.0} % errors against the pool's {:.0} % (ejection {times} in a \
                 row): no new flows for {left_s:.1} s more, then a probe",
                error_rate * 100.0,
                reference * 100.0
            ),
            Reason::Static { configured } => write!(f, "static: configured weight {configured}"),
            Reason::Equal => f.write_str("equal: the same weight as every healthy backend"),
            Reason::Shed {
                policy,
                shown,
                target,
                drain,
                shed_ratio,
                current,
                kept,
            } => write!(
                f,
                "{policy}: shown capacity {shown:.0} and target {target:.0} (× {drain:.2} for \
                 its backlog) are below {:.0} % of its weight {current:.0}: shed at once to \
                 {kept:.0}, outside smoothing and the move budget",
                shed_ratio * 100.0
            ),
            Reason::BacklogWithoutSpare { policy, kept } => write!(
                f,
                "{policy}: its backlog or a foreseen fall of its capacity calls for a cut, but \
                 the other backends have no spare below the strain line to take it: kept at \
                 {kept:.0}"
            ),
            Reason::Steady {
                policy,
                target,
                noise,
                hysteresis,
            } => write!(
                f,
                "{policy}: target {target:.0} (filtered, noise {noise:.0}) within the {:.0} % \
                 hysteresis band or its noise",
                hysteresis * 100.0
            ),
            Reason::Smoothed {
                policy,
                target,
                noise,
                smoothed,
            } => write!(
                f,
                "{policy}: target {target:.0} (filtered, noise {noise:.0}), smoothed to \
                 {smoothed:.0}"
            ),
        }
    }
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Note::DeepCut { cut, taken } => write!(
                f,
                ", and {cut:.0} further for its latency and so that its backlog drains \
                 within {DRAIN_S} s ({:.0} % of that cut: the spare the others have)",
                taken * 100.0
            ),
            Note::Foreseen { shown, strained } => write!(
                f,
                ", its capacity foreseen to fall to {shown:.0} req/s within the forecast's \
                 horizon{}",
                if strained {
                    ""
                } else {
                    " (before it is strained: cut only into the others' spare)"
                }
            ),
            Note::TookWithinRoom { weight } => write!(
                f,
                "; takes {weight:.0} of what the shed backends gave up at once, within the \
                 room its shown capacity and target leave"
            ),
            Note::TookBeyondRoom { weight } => write!(
                f,
                "; takes {weight:.0} of what the shed backends gave up beyond the others' \
                 room, as a backend below the strain line"
            ),
            Note::Probe { weight } => write!(
                f,
                "; back from an ejection: a probe at {weight:.0} until enough of its requests \
                 show whether it still fails"
            ),
            Note::Returning { cap } => write!(
                f,
                "; back from an ejection, its errors low: at most {cap:.0}, twice what it \
                 held"
            ),
            Note::Floor { floor } => write!(f, "; raised to the floor {floor:.0}"),
            Note::MoveBudget { fraction } => {
                write!(f, "; move budget: {:.0} % of the step", fraction * 100.0)
            }
            Note::KeptForTheVip => f.write_str("; kept above 0 so the VIP has a backend"),
            Note::SlotBudget {
                share,
                fraction,
                now,
            } => {
                write!(
                    f,
                    "; slot budget: the table would move {:.2} % of its slots, {:.0} % of the \
                     step taken",
                    share * 100.0,
                    fraction * 100.0
                )?;
                match now {
                    Some(s) => write!(f, ", {:.2} %", s * 100.0),
                    None => Ok(()),
                }
            }
        }
    }
}

impl fmt::Display for Decision {
    /// The reason, then every note: what `lb explain` prints as "why".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.reason)?;
        for note in &self.notes {
            write!(f, "{note}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_reads_as_its_reason_then_its_notes() {
        let d = Decision {
            backend: BackendId(3),
            policy: PolicyKind::Ai,
            before: 100,
            target: 80.0,
            after: 90,
            predicted_s: None,
            predictor: String::new(),
            reason: Reason::Smoothed {
                policy: PolicyKind::Ai,
                target: 80.0,
                noise: 1.0,
                smoothed: 90.0,
            },
            notes: vec![
                Note::Floor { floor: 95.0 },
                Note::MoveBudget { fraction: 0.5 },
            ],
        };
        assert_eq!(
            d.to_string(),
            "ai: target 80 (filtered, noise 1), smoothed to 90; raised to the floor 95; \
             move budget: 50 % of the step"
        );
        assert!(d.floored() && d.budget_limited() && !d.shed());
    }

    #[test]
    fn an_ejection_says_how_far_above_the_pool_and_for_how_long() {
        let reason = Reason::Ejected {
            error_rate: 0.34,
            reference: 0.01,
            times: 2,
            left_s: 17.5,
        };
        assert_eq!(
            reason.to_string(),
            "ejected: 34 % errors against the pool's 1 % (ejection 2 in a row): no new \
             flows for 17.5 s more, then a probe"
        );
    }
}
