//! Map keys and values as the datapath builds them on its stack: in whole 64-bit
//! words. The kernel reads a key in 4- and 8-byte words (to hash it, to compare it,
//! to copy it into a new entry); a key stored field by field in 1-, 2- and 4-byte
//! pieces makes each such read wait until the pieces have left the CPU's store
//! buffer (a failed store-to-load forwarding, a stall of some ten cycles per word).
//! Written as words, an IPv4 established packet went from a minimum of 44 to 36 ns
//! in `cargo xtask bench datapath`. Each builder writes exactly the bytes of the
//! `lb_common::types` layout it stands for (little-endian, like the datapath).

use lb_common::types::{AddrWords, ConnEntry, ConnKeyV4, ConnKeyV6, VipKey};

use crate::parse::Packet;

/// `N` words, 8-byte aligned, standing for one key or value of at most `8 × N` bytes.
#[repr(C, align(8))]
pub struct Words<const N: usize>([u64; N]);

impl<const N: usize> Words<N> {
    /// The words as the `T` they were built for.
    #[inline(always)]
    fn cast<T>(&self) -> &T {
        const {
            assert!(core::mem::size_of::<T>() <= N * 8);
            assert!(core::mem::align_of::<T>() <= 8);
        }
        // SAFETY: `T` fits in the words and needs no more alignment than they have;
        // every `T` here is plain data, valid for any bytes.
        unsafe { &*(self as *const Self).cast::<T>() }
    }
}

#[inline(always)]
fn pair(low: u32, high: u32) -> u64 {
    u64::from(low) | u64::from(high) << 32
}

/// Ports and protocol, the last word of both connection keys.
#[inline(always)]
fn ports_proto(pkt: &Packet) -> u64 {
    tuple_ports(pkt.src_port_be, pkt.dst_port_be, pkt.proto)
}

#[inline(always)]
fn tuple_ports(src_port_be: u16, dst_port_be: u16, proto: u8) -> u64 {
    u64::from(src_port_be) | u64::from(dst_port_be) << 16 | u64::from(proto) << 32
}

pub struct ConnV4(Words<2>);

impl ConnV4 {
    #[inline(always)]
    pub fn new(pkt: &Packet) -> Self {
        ConnV4(Words([pair(pkt.src[0], pkt.dst[0]), ports_proto(pkt)]))
    }

    /// The key of a tuple other than the packet's own (a NAT flow's reply).
    #[inline(always)]
    pub fn tuple(src: u32, dst: u32, src_port_be: u16, dst_port_be: u16, proto: u8) -> Self {
        ConnV4(Words([
            pair(src, dst),
            tuple_ports(src_port_be, dst_port_be, proto),
        ]))
    }

    /// A key given whole (the bench references' constant flow).
    #[inline(always)]
    pub fn from_key(key: ConnKeyV4) -> Self {
        // SAFETY: 16 bytes of plain data either way.
        ConnV4(Words(unsafe {
            core::mem::transmute::<ConnKeyV4, [u64; 2]>(key)
        }))
    }

    #[inline(always)]
    pub fn key(&self) -> &ConnKeyV4 {
        self.0.cast()
    }
}

pub struct ConnV6(Words<5>);

impl ConnV6 {
    #[inline(always)]
    pub fn new(pkt: &Packet) -> Self {
        Self::tuple(
            &pkt.src,
            &pkt.dst,
            pkt.src_port_be,
            pkt.dst_port_be,
            pkt.proto,
        )
    }

    /// The key of a tuple other than the packet's own (a NAT flow's reply).
    #[inline(always)]
    pub fn tuple(
        s: &AddrWords,
        d: &AddrWords,
        src_port_be: u16,
        dst_port_be: u16,
        proto: u8,
    ) -> Self {
        ConnV6(Words([
            pair(s[0], s[1]),
            pair(s[2], s[3]),
            pair(d[0], d[1]),
            pair(d[2], d[3]),
            tuple_ports(src_port_be, dst_port_be, proto),
        ]))
    }

    #[inline(always)]
    pub fn key(&self) -> &ConnKeyV6 {
        self.0.cast()
    }
}

pub struct Entry(Words<1>);

impl Entry {
    #[inline(always)]
    pub fn new(backend_id: u32, vip_id: u32) -> Self {
        Entry(Words([pair(backend_id, vip_id)]))
    }

    #[inline(always)]
    pub fn value(&self) -> &ConnEntry {
        self.0.cast()
    }
}

/// A `VipKey` (20 bytes) in three words; the last four bytes are not part of it.
pub struct Vip(Words<3>);

impl Vip {
    #[inline(always)]
    pub fn new(pkt: &Packet) -> Self {
        let d = &pkt.dst;
        Vip(Words([
            pair(d[0], d[1]),
            pair(d[2], d[3]),
            u64::from(pkt.dst_port_be) | u64::from(pkt.proto) << 16 | u64::from(pkt.family) << 24,
        ]))
    }

    #[inline(always)]
    pub fn key(&self) -> &VipKey {
        self.0.cast()
    }
}
