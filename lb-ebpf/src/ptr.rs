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

/// The four bytes at `bytes` as one word, the way [`lb_common::types::AddrWords`]
/// holds addresses (packet headers sit at 2-byte offsets, so the read is unaligned).
///
/// # Safety
/// `bytes` must point at 4 readable bytes (inside a header `at` checked).
#[inline(always)]
pub unsafe fn word(bytes: *const [u8; 4]) -> u32 {
    // SAFETY: the caller vouches for 4 readable bytes; the read is unaligned.
    unsafe { core::ptr::read_unaligned(bytes as *const u32) }
}

/// The 16 bytes at `bytes` as four words (see [`word`]).
///
/// # Safety
/// `bytes` must point at 16 readable bytes.
#[inline(always)]
pub unsafe fn words(bytes: *const [u8; 16]) -> [u32; 4] {
    let p = bytes as *const u32;
    // SAFETY: the caller vouches for 16 readable bytes; each read is unaligned.
    unsafe {
        [
            core::ptr::read_unaligned(p),
            core::ptr::read_unaligned(p.add(1)),
            core::ptr::read_unaligned(p.add(2)),
            core::ptr::read_unaligned(p.add(3)),
        ]
    }
}

/// Copies a MAC address as one 4-byte and one 2-byte unaligned word.
///
/// # Safety
/// `to` and `from` must each point at 6 bytes, readable and writable respectively,
/// that do not overlap.
#[inline(always)]
pub unsafe fn copy_mac(to: *mut [u8; 6], from: *const [u8; 6]) {
    let (to, from) = (to as *mut u8, from as *const u8);
    // SAFETY: the caller vouches for both 6-byte ranges; the accesses are unaligned.
    unsafe {
        let head = core::ptr::read_unaligned(from as *const u32);
        let tail = core::ptr::read_unaligned(from.add(4) as *const u16);
        core::ptr::write_unaligned(to as *mut u32, head);
        core::ptr::write_unaligned(to.add(4) as *mut u16, tail);
    }
}
