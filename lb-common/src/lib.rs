//! Everything the XDP datapath (`lb-ebpf`) and the userspace agent (`lb-userspace`)
//! must agree on: map names and sizes, the `#[repr(C)]` layouts stored in those maps,
//! and the flow hash. Both sides compile this crate; nothing here allocates.
//!
//! # Layout
//! - [`hash`]: the flow hash that picks a slot in a VIP's lookup table.
//! - [`maps`]: map names, capacities and table geometry.
//! - [`types`]: keys and values of every map, and the counter structs.
#![no_std]

pub mod hash;
pub mod maps;
pub mod types;
