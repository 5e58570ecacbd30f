//! Writes docs/OPERATING.md (or the file named as the first argument) from a real
//! run of every `lb` command against an agent in network namespaces (see
//! `lb_tests::operating`). Needs root and the `lb` binary (`$LB_BIN`):
//!
//! sudo LB_BIN=target/debug/lb cargo run -p lb-tests --bin lb-operating-doc

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let path = std::env::args_os().nth(1).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/OPERATING.md"),
        PathBuf::from,
    );
    lb_tests::spread::lb_binary()?;
    let text = lb_tests::operating::capture()?;
    std::fs::write(&path, text)?;
    println!("wrote {}", path.display());
    Ok(())
}
