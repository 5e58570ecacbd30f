//! The datapath's rare events, as records for the agent's log (aya-log): a malformed
//! IP header, a failed connection-table insert, a failed encapsulation. Each is
//! called by the stage where its event is found, on that event's path only (a packet
//! on the normal path never reaches one), and the counter that the event also has
//! is bumped as before: a record adds detail, never a verdict.
//!
//! # Off costs the packet path nothing
//!
//! Each record is made by an aya-log-ebpf macro that first compares its level with
//! `AYA_LOG_LEVEL`, a one-byte global in `.rodata` that the agent sets when it loads
//! the program (`lb run --datapath-log LEVEL`, 0 for `off`; see
//! `lb_userspace::dataplane`). aya creates `.rodata` as a map the program may only
//! read (`BPF_F_RDONLY_PROG`) and freezes it before the program is loaded, so the
//! verifier knows the byte as a constant: with logging off it finds the code of
//! every record unreachable and removes it before the program is compiled to machine
//! code.
//!
//! Each record is made in a function of its own that is never inlined, and reads
//! what it prints from where the event's site already has it: the packet's header,
//! the connection key on the stack, the backend's map entry, given by pointer. So no
//! value is kept alive for a record and the packet path's stack frame stays as it
//! was (304 bytes; made inline, the records' arguments took it to 360, and a record's
//! own frame on top passed the verifier's 512 bytes for a chain of calls). The call
//! still moves some of LLVM's register choices; `cargo xtask bench datapath` finds no
//! difference beyond its noise on any path (docs/BENCHMARKS.md). What is left on an
//! event's path with logging off is that call, which returns at once; on every other
//! path, nothing.
//!
//! The levels: `error` for a packet dropped (encapsulation), `warn` for a flow that
//! may move later (its entry was not written), `debug` for what anyone can send
//! (a malformed header, passed to the kernel).
//!
//! The program is built with `allows-misaligned-mem-access`, so LLVM may write a
//! byte array on the stack in misaligned words, which the verifier refuses on the
//! stack (and only there): an `IpAddr`, whose 16 address bytes follow a one-byte
//! tag, did. Hence one record per address family. A program loaded with the log at
//! `debug` has every record verified; the tests in `tests/tests/datapath_log.rs` load
//! it so.

use core::net::{Ipv4Addr, Ipv6Addr};

use aya_log_ebpf::{debug, error, warn};
use lb_common::{
    maps::LOG_TARGET,
    types::{AddrWords, Backend, ConnKeyV4, ConnKeyV6, FAMILY_V4},
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::ptr;

/// aya-log-ebpf's macros take a program context and read nothing from it (it is
/// there for later versions); the events are found where none is at hand.
const NO_CONTEXT: () = ();

/// An IPv4 header whose version or lengths contradict each other; the frame is passed.
///
/// # Safety
/// `ip` must point at a whole fixed IPv4 header inside the frame (`ptr::at` checked).
#[inline(never)]
pub unsafe fn malformed_ipv4(ip: *const Ipv4Hdr) {
    // SAFETY: the caller vouches for the header.
    let (vihl, total_len, src, dst) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).tot_len),
            ptr::word(&(*ip).src_addr),
            ptr::word(&(*ip).dst_addr),
        )
    };
    debug!(
        &NO_CONTEXT,
        target: LOG_TARGET,
        "malformed IPv4 header from {:i} to {:i}: version and header length 0x{:x}, total length {}; passed",
        ipv4(src),
        ipv4(dst),
        vihl,
        total_len
    );
}

/// An IPv6 ether type whose header says another IP version; the frame is passed.
///
/// # Safety
/// `ip` must point at a whole IPv6 header inside the frame (`ptr::at` checked).
#[inline(never)]
pub unsafe fn malformed_ipv6(ip: *const Ipv6Hdr) {
    // SAFETY: the caller vouches for the header.
    let (version, src, dst) = unsafe {
        (
            (*ip).vcf[0] >> 4,
            ptr::words(&(*ip).src_addr),
            ptr::words(&(*ip).dst_addr),
        )
    };
    debug!(
        &NO_CONTEXT,
        target: LOG_TARGET,
        "malformed IPv6 header from {:i} to {:i}: version {}; passed",
        ipv6(src),
        ipv6(dst),
        version
    );
}

/// A new IPv4 flow's connection entry (`key`) could not be written (`error` from the
/// map update): the packet goes out, and the flow follows the lookup table until it
/// changes.
#[inline(never)]
pub fn insert_failed_v4(key: &ConnKeyV4, vip_id: u32, error: i32) {
    let (src, port) = (key.src, u16::from_be(key.src_port_be));
    warn!(
        &NO_CONTEXT,
        target: LOG_TARGET,
        "connection-table insert failed (error {}) for {:i} port {} to VIP id {}: the flow follows the lookup table",
        error,
        ipv4(src),
        port,
        vip_id
    );
}

/// [`insert_failed_v4`] for an IPv6 flow.
#[inline(never)]
pub fn insert_failed_v6(key: &ConnKeyV6, vip_id: u32, error: i32) {
    let (src, port) = (key.src, u16::from_be(key.src_port_be));
    warn!(
        &NO_CONTEXT,
        target: LOG_TARGET,
        "connection-table insert failed (error {}) for {:i} port {} to VIP id {}: the flow follows the lookup table",
        error,
        ipv6(src),
        port,
        vip_id
    );
}

/// No room for the `len`-byte outer header to `backend` (`error` from
/// `bpf_xdp_adjust_head`): the packet is dropped.
#[inline(never)]
pub fn encap_failed(backend: &Backend, len: u32, error: i64) {
    if backend.family == FAMILY_V4 {
        let [a, b, c, d, ..] = backend.addr;
        error!(
            &NO_CONTEXT,
            target: LOG_TARGET,
            "encapsulation failed (error {}): no room for a {}-byte outer header to backend {:i}; dropped",
            error,
            len,
            Ipv4Addr::new(a, b, c, d)
        );
    } else {
        let to = backend.addr;
        error!(
            &NO_CONTEXT,
            target: LOG_TARGET,
            "encapsulation failed (error {}): no room for a {}-byte outer header to backend {:i}; dropped",
            error,
            len,
            Ipv6Addr::from(to)
        );
    }
}

/// The address a word of [`AddrWords`] holds, as loaded from the packet.
#[inline(always)]
fn ipv4(word: u32) -> Ipv4Addr {
    Ipv4Addr::from(word.to_ne_bytes())
}

/// The address [`AddrWords`] hold, as loaded from the packet.
#[inline(always)]
fn ipv6(words: AddrWords) -> Ipv6Addr {
    let [a, b, c, d] = words.map(u32::to_ne_bytes);
    Ipv6Addr::from([
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ])
}
