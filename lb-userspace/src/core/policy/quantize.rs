//! The quantize stage: the free backends' proposals become whole multiples of the
//! quantum (fewer, larger table updates), and a VIP never ends up without weight
//! while a backend is healthy and free.

use super::{Note, Update};

/// Rounds every free backend's proposal to a whole, non-zero number of quanta.
pub(super) fn round(u: &mut Update) {
    let q = u.params.quantum.max(1) as f64;
    for k in (0..u.n()).filter(|&k| u.free[k]) {
        u.after[k] = ((u.proposal[k] / q).round() * q).max(q) as u32;
    }
}

/// Gives the first healthy free backend one quantum if every weight is 0.
pub(super) fn keep_a_backend(u: &mut Update) {
    let inputs = u.inputs;
    if u.after.iter().all(|&w| w == 0)
        && let Some(k) = (0..inputs.len()).find(|&k| inputs[k].healthy && inputs[k].hold.is_none())
    {
        u.after[k] = u.params.quantum.max(1);
        u.notes[k].push(Note::KeptForTheVip);
    }
}
