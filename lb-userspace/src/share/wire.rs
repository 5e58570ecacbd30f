//! What LBs send each other to share flows: frames of a length-delimited stream
//! (`tokio_util::codec::LengthDelimitedCodec`) over TCP, each a protobuf message
//! ([`Frame`], encoded by `prost`). The first frame of a connection says who sends
//! ([`Hello`]); then come the sender's whole connection tables (`dump`), a frame
//! saying the dump is complete, and from then on each new flow as the sender's
//! datapath reports it.
//!
//! A flow names its VIP and backend by address, not by the sender's ids: two LBs
//! may number them differently (ids survive reloads in the order they came). Every
//! flow received is checked ([`Flow::from_wire`]) and refused with a reason when it
//! does not make sense; the connection goes on.

use std::net::IpAddr;

use lb_common::types::{PROTO_TCP, PROTO_UDP, VipKey};

use crate::desired::{addr_bytes, ip_of};

/// The protocol's version, in [`Hello::version`]; a peer speaking another is refused.
pub const VERSION: u32 = 1;

/// Largest frame accepted (a dump is sent in frames of [`FLOWS_PER_FRAME`] flows,
/// some 40 bytes each).
pub const MAX_FRAME_BYTES: usize = 1 << 20;

/// Flows per frame, at most.
pub const FLOWS_PER_FRAME: usize = 4096;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Frame {
    /// Only in the first frame of a connection.
    #[prost(message, optional, tag = "1")]
    pub hello: Option<Hello>,
    #[prost(message, repeated, tag = "2")]
    pub flows: Vec<WireFlow>,
    /// These flows come from the sender's table dump (a receiver keeps the entry it
    /// has, if any).
    #[prost(bool, tag = "3")]
    pub dump: bool,
    /// The sender's dump is complete: the receiver now holds every flow it had.
    #[prost(bool, tag = "4")]
    pub dump_complete: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    /// The fleet's name (`[cluster] name`); another fleet's LB is refused.
    #[prost(string, tag = "1")]
    pub cluster: String,
    /// The sender's node name.
    #[prost(string, tag = "2")]
    pub node: String,
    #[prost(uint32, tag = "3")]
    pub version: u32,
}

/// One flow on the wire: addresses as 4 or 16 bytes, ports and protocol as numbers.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireFlow {
    #[prost(bytes = "vec", tag = "1")]
    pub client: Vec<u8>,
    #[prost(uint32, tag = "2")]
    pub client_port: u32,
    #[prost(bytes = "vec", tag = "3")]
    pub vip: Vec<u8>,
    #[prost(uint32, tag = "4")]
    pub vip_port: u32,
    #[prost(uint32, tag = "5")]
    pub protocol: u32,
    #[prost(bytes = "vec", tag = "6")]
    pub backend: Vec<u8>,
    /// The sender guessed the backend (it did not see the flow begin).
    #[prost(bool, tag = "7")]
    pub guessed: bool,
}

/// A flow as this side means it: which VIP, which client, which backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub vip: VipKey,
    pub client: IpAddr,
    pub client_port: u16,
    pub backend: IpAddr,
    pub guessed: bool,
}

/// Why a flow from a peer was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadFlow {
    #[error("an address of {0} bytes (4 or 16 expected)")]
    AddressLength(usize),
    #[error("client, VIP and backend of different address families")]
    MixedFamilies,
    #[error("port {0} out of range")]
    Port(u32),
    #[error("protocol {0} (TCP or UDP expected)")]
    Protocol(u32),
}

fn address(bytes: &[u8]) -> Result<IpAddr, BadFlow> {
    match bytes.len() {
        4 => Ok(IpAddr::from(<[u8; 4]>::try_from(bytes).expect("4 bytes"))),
        16 => Ok(IpAddr::from(<[u8; 16]>::try_from(bytes).expect("16 bytes"))),
        n => Err(BadFlow::AddressLength(n)),
    }
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn port(p: u32) -> Result<u16, BadFlow> {
    u16::try_from(p).map_err(|_| BadFlow::Port(p))
}

impl Flow {
    /// The flow a peer sent, checked.
    pub fn from_wire(w: &WireFlow) -> Result<Flow, BadFlow> {
        let client = address(&w.client)?;
        let vip_addr = address(&w.vip)?;
        let backend = address(&w.backend)?;
        if client.is_ipv4() != vip_addr.is_ipv4() || vip_addr.is_ipv4() != backend.is_ipv4() {
            return Err(BadFlow::MixedFamilies);
        }
        let proto = match u8::try_from(w.protocol) {
            Ok(p @ (PROTO_TCP | PROTO_UDP)) => p,
            _ => return Err(BadFlow::Protocol(w.protocol)),
        };
        let (addr, family) = addr_bytes(vip_addr);
        Ok(Flow {
            vip: VipKey {
                addr,
                port_be: port(w.vip_port)?.to_be(),
                proto,
                family,
            },
            client,
            client_port: port(w.client_port)?,
            backend,
            guessed: w.guessed,
        })
    }

    /// The flow as it goes on the wire.
    pub fn to_wire(&self) -> WireFlow {
        WireFlow {
            client: octets(self.client),
            client_port: u32::from(self.client_port),
            vip: octets(ip_of(&self.vip.addr, self.vip.family)),
            vip_port: u32::from(u16::from_be(self.vip.port_be)),
            protocol: u32::from(self.vip.proto),
            backend: octets(self.backend),
            guessed: self.guessed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::types::{FAMILY_V4, FAMILY_V6};
    use prost::Message;

    fn flow_v4() -> Flow {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[198, 18, 0, 10]);
        Flow {
            vip: VipKey {
                addr,
                port_be: 80u16.to_be(),
                proto: PROTO_TCP,
                family: FAMILY_V4,
            },
            client: "198.18.10.1".parse().unwrap(),
            client_port: 40000,
            backend: "198.18.0.20".parse().unwrap(),
            guessed: false,
        }
    }

    #[test]
    fn a_flow_goes_through_the_wire_unchanged() {
        let v4 = flow_v4();
        let mut addr = [0u8; 16];
        addr[..2].copy_from_slice(&[0xfd, 0]);
        addr[15] = 10;
        let v6 = Flow {
            vip: VipKey {
                addr,
                port_be: 53u16.to_be(),
                proto: PROTO_UDP,
                family: FAMILY_V6,
            },
            client: "fd00::1".parse().unwrap(),
            client_port: 5353,
            backend: "fd00::20".parse().unwrap(),
            guessed: true,
        };
        let frame = Frame {
            flows: vec![v4.to_wire(), v6.to_wire()],
            ..Default::default()
        };
        let decoded = Frame::decode(frame.encode_to_vec().as_slice()).unwrap();
        let flows: Vec<Flow> = decoded
            .flows
            .iter()
            .map(|w| Flow::from_wire(w).unwrap())
            .collect();
        assert_eq!(flows, vec![v4, v6]);
        // What `sync_bytes_per_flow` reports starts here: an IPv4 flow is small.
        assert!(
            v4.to_wire().encoded_len() <= 32,
            "{}",
            v4.to_wire().encoded_len()
        );
    }

    #[test]
    fn a_bad_flow_is_refused_with_its_reason() {
        let good = flow_v4().to_wire();
        let cases = [
            (
                WireFlow {
                    client: vec![1, 2, 3],
                    ..good.clone()
                },
                BadFlow::AddressLength(3),
            ),
            (
                WireFlow {
                    backend: vec![0; 16],
                    ..good.clone()
                },
                BadFlow::MixedFamilies,
            ),
            (
                WireFlow {
                    client_port: 70000,
                    ..good.clone()
                },
                BadFlow::Port(70000),
            ),
            (
                WireFlow {
                    protocol: 1,
                    ..good.clone()
                },
                BadFlow::Protocol(1),
            ),
        ];
        for (wire, why) in cases {
            assert_eq!(Flow::from_wire(&wire), Err(why));
        }
    }
}
