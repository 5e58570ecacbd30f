//! The one bounds-checked way to read packet memory.

use aya_ebpf::programs::XdpContext;

use crate::Stop;

/// A pointer to a `T` at `offset` bytes into the frame, or `Stop::Truncated` when the
/// frame ends before the whole `T`. The comparison against `data_end` is what lets the
/// verifier accept every later access through the returned pointer.
#[inline(always)]
pub fn at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Stop> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(Stop::Truncated);
    }
    Ok((start + offset) as *mut T)
}
