//! Frames built field by field for the packet fixtures, and checksum checks that do
//! not trust the builder. Used by the datapath tests (`tests/tests/datapath.rs`), and
//! [`send_raw`] to put such frames on a test network (`tests/tests/datapath_log.rs`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// The one's-complement sum of RFC 1071 over `chunks`, folded, not yet inverted.
fn sum(chunks: &[&[u8]]) -> u32 {
    let mut acc = 0u32;
    for chunk in chunks {
        let mut words = chunk.chunks_exact(2);
        for w in &mut words {
            acc += u16::from_be_bytes([w[0], w[1]]) as u32;
        }
        if let [last] = words.remainder() {
            acc += (*last as u32) << 8;
        }
    }
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

/// The Internet checksum of RFC 1071 over the concatenation of `chunks` (each of
/// even length except the last).
pub fn checksum(chunks: &[&[u8]]) -> u16 {
    !(sum(chunks) as u16)
}

/// An Ethernet II frame.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// IPv4 header fields that fixtures vary.
#[derive(Clone, Debug)]
pub struct Ipv4Opts {
    pub ttl: u8,
    pub id: u16,
    /// Flags and fragment offset, as on the wire (0x4000 = don't fragment).
    pub frag: u16,
    /// Options, a multiple of 4 bytes.
    pub options: Vec<u8>,
}

impl Default for Ipv4Opts {
    fn default() -> Self {
        Ipv4Opts {
            ttl: 64,
            id: 0x1234,
            frag: 0x4000,
            options: Vec::new(),
        }
    }
}

/// An IPv4 packet with a correct header checksum.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, opts: &Ipv4Opts, payload: &[u8]) -> Vec<u8> {
    assert_eq!(
        opts.options.len() % 4,
        0,
        "IPv4 options must fill 32-bit words"
    );
    let header_len = 20 + opts.options.len();
    let total = (header_len + payload.len()) as u16;
    let mut h = Vec::with_capacity(total as usize);
    h.push(0x40 | (header_len / 4) as u8);
    h.push(0);
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&opts.id.to_be_bytes());
    h.extend_from_slice(&opts.frag.to_be_bytes());
    h.push(opts.ttl);
    h.push(proto);
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&opts.options);
    let c = checksum(&[&h]);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// An IPv6 packet.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, hop_limit: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(40 + payload.len());
    h.extend_from_slice(&[0x60, 0, 0, 0]);
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.push(next);
    h.push(hop_limit);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

fn pseudo_header(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => panic!("pseudo header of mixed families"),
    }
    p
}

/// A TCP segment (20-byte header, no options) with a correct checksum.
pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut s = Vec::with_capacity(20 + payload.len());
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // sequence number
    let ack = if flags & TCP_ACK != 0 {
        0x0a0b_0c0du32
    } else {
        0
    };
    s.extend_from_slice(&ack.to_be_bytes());
    s.push(5 << 4); // data offset: 5 words
    s.push(flags);
    s.extend_from_slice(&64240u16.to_be_bytes()); // window
    s.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    s.extend_from_slice(payload);
    let c = checksum(&[&pseudo_header(src, dst, 6, s.len()), &s]);
    s[16..18].copy_from_slice(&c.to_be_bytes());
    s
}

/// A UDP datagram with a correct checksum.
pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut d = Vec::with_capacity(len);
    d.extend_from_slice(&sport.to_be_bytes());
    d.extend_from_slice(&dport.to_be_bytes());
    d.extend_from_slice(&(len as u16).to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    let mut c = checksum(&[&pseudo_header(src, dst, 17, len), &d]);
    if c == 0 {
        c = 0xffff;
    }
    d[6..8].copy_from_slice(&c.to_be_bytes());
    d
}

/// A whole Ethernet + IPv4/IPv6 + TCP frame. Every header field a fixture varies is
/// an argument, in wire order, so a fixture reads like the frame it builds.
#[allow(clippy::too_many_arguments)]
pub fn tcp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let seg = tcp(src, dst, sport, dport, flags, payload);
    ip_frame(dst_mac, src_mac, src, dst, 6, &seg)
}

/// A whole Ethernet + IPv4/IPv6 + UDP frame.
pub fn udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let dgram = udp(src, dst, sport, dport, payload);
    ip_frame(dst_mac, src_mac, src, dst, 17, &dgram)
}

/// Ethernet + IPv4/IPv6 (default header fields) around a built transport payload.
pub fn ip_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    l4: &[u8],
) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ethernet(
            dst_mac,
            src_mac,
            ETH_P_IP,
            &ipv4(s, d, proto, &Ipv4Opts::default(), l4),
        ),
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            ethernet(dst_mac, src_mac, ETH_P_IPV6, &ipv6(s, d, proto, 64, l4))
        }
        _ => panic!("frame of mixed families"),
    }
}

/// An ICMP (IPv4) or ICMPv6 message of `kind`/`code` with 4 bytes of rest-of-header
/// and a body, with a correct checksum (ICMPv6 needs the addresses for its pseudo
/// header).
pub fn icmp(
    kind: u8,
    code: u8,
    rest: [u8; 4],
    body: &[u8],
    v6: Option<(Ipv6Addr, Ipv6Addr)>,
) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    let c = match v6 {
        Some((s, d)) => checksum(&[
            &pseudo_header(IpAddr::V6(s), IpAddr::V6(d), 58, m.len()),
            &m,
        ]),
        None => checksum(&[&m]),
    };
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// Checks every checksum of an Ethernet frame carrying IPv4 or IPv6 and TCP, UDP or
/// ICMP, from the bytes alone, and of the inner packet of IP-in-IP. Returns a
/// description of the first wrong one.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    if frame.len() < 14 {
        return Err("shorter than an Ethernet header".into());
    }
    let ether_type = u16::from_be_bytes([frame[12], frame[13]]);
    verify_ip(ether_type, &frame[14..])
}

fn verify_ip(ether_type: u16, ip: &[u8]) -> Result<(), String> {
    let (src, dst, proto, l4) = match ether_type {
        ETH_P_IP => {
            let hl = ((ip[0] & 0x0f) as usize) * 4;
            if sum(&[&ip[..hl]]) != 0xffff {
                return Err("IPv4 header checksum".into());
            }
            let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            let src = IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
            let dst = IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
            (src, dst, ip[9], &ip[hl..total])
        }
        ETH_P_IPV6 => {
            let len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
            let src = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap()));
            let dst = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap()));
            (src, dst, ip[6], &ip[40..40 + len])
        }
        other => {
            return Err(format!(
                "ether type {other:#06x} carries no checksum to check"
            ));
        }
    };
    match proto {
        6 | 17 => {
            if sum(&[&pseudo_header(src, dst, proto, l4.len()), l4]) != 0xffff {
                return Err(format!("protocol {proto} checksum"));
            }
            Ok(())
        }
        1 => {
            if sum(&[l4]) != 0xffff {
                return Err("ICMP checksum".into());
            }
            Ok(())
        }
        58 => {
            if sum(&[&pseudo_header(src, dst, 58, l4.len()), l4]) != 0xffff {
                return Err("ICMPv6 checksum".into());
            }
            Ok(())
        }
        4 => verify_ip(ETH_P_IP, l4).map_err(|e| format!("inner {e}")),
        41 => verify_ip(ETH_P_IPV6, l4).map_err(|e| format!("inner {e}")),
        _ => Ok(()),
    }
}

/// Sends `frame` exactly as given (Ethernet header included) out of `ifname`, an
/// interface of the calling thread's network namespace (e.g. inside
/// [`crate::netns::Netns::run_in`]), through an `AF_PACKET` socket: for frames no
/// socket of the kernel's own would send, such as a malformed IP header.
pub fn send_raw(ifname: &str, frame: &[u8]) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let name = std::ffi::CString::new(ifname)?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Protocol 0: the socket sends and receives nothing.
    // SAFETY: socket(2) has no preconditions.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data, valid when zeroed.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    // The frame's own ether type, as the kernel would take it from a header it built.
    to.sll_protocol = u16::from_ne_bytes([frame[12], frame[13]]);
    to.sll_ifindex = index as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: `frame` and `to` are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const to).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if sent as usize != frame.len() {
        return Err(std::io::Error::other(format!(
            "sent {sent} of {} bytes",
            frame.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The IPv4 header example of RFC 1071 errata / common references: a known header
    /// whose checksum is 0xb861.
    #[test]
    fn ipv4_header_checksum_matches_a_known_header() {
        let header: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&[&header]), 0xb861);
    }

    #[test]
    fn built_frames_verify_and_a_flipped_byte_does_not() {
        let src: IpAddr = "198.18.0.1".parse().unwrap();
        let dst: IpAddr = "198.18.1.1".parse().unwrap();
        let mut f = tcp_frame([2; 6], [4; 6], src, dst, 40000, 80, TCP_SYN, b"hi");
        verify_checksums(&f).unwrap();
        let last = f.len() - 1;
        f[last] ^= 1;
        assert!(verify_checksums(&f).is_err());
        let src: IpAddr = "fd00:18::1".parse().unwrap();
        let dst: IpAddr = "fd00:18:1::1".parse().unwrap();
        let f = udp_frame([2; 6], [4; 6], src, dst, 5353, 53, b"abc");
        verify_checksums(&f).unwrap();
    }
}
