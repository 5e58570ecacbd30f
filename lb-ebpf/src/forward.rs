//! Sends a packet on to its backend.

use aya_ebpf::programs::XdpContext;
use lb_common::types::Backend;
use network_types::eth::EthHdr;

use crate::{Stop, ptr};

/// L2 direct server return: the frame keeps its IP header (the backend holds the VIP
/// on a loopback interface and answers the client directly); only the Ethernet
/// addresses change, to go from this host to the backend, back out of the same port.
#[inline(always)]
pub fn l2_dsr(ctx: &XdpContext, backend: &Backend) -> Result<(), Stop> {
    let eth: *mut EthHdr = ptr::at(ctx, 0)?;
    // SAFETY: `ptr::at` checked that the Ethernet header is inside the frame.
    unsafe {
        (*eth).src_addr = (*eth).dst_addr;
        (*eth).dst_addr = backend.mac;
    }
    Ok(())
}
