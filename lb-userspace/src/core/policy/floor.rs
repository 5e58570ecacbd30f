//! The floor stage: every free backend keeps a minimum share of the scale
//! ([`Params::floor_share`](super::Params::floor_share)), at most a fifth of an equal
//! share, so that it is still observed and can win traffic back.

use super::{Note, Update};

/// Raises every free backend's proposal to the floor.
pub(super) fn raise(u: &mut Update) {
    let free_count = u.free.iter().filter(|&&f| f).count().max(1);
    let floor = u.params.floor_share.min(0.2 / free_count as f64) * u.params.scale as f64;
    for k in (0..u.n()).filter(|&k| u.free[k]) {
        if u.proposal[k] < floor {
            u.proposal[k] = floor;
            u.notes[k].push(Note::Floor { floor });
        }
    }
}
