//! Builds the XDP program (`lb-ebpf`) for the BPF target and hands its object file to
//! the agent, which embeds it. The eBPF crate needs the nightly toolchain with
//! `rust-src` and `bpf-linker`; `cargo xtask setup` installs both (bpf-linker into
//! `.tools/bin` of the workspace). Without them the host-only parts still build: the
//! agent is then compiled without a datapath and says so when asked to load it.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let object = out.join("lb-ebpf.o");
    println!("cargo:rustc-check-cfg=cfg(lb_no_ebpf)");
    println!("cargo:rerun-if-env-changed=LB_SKIP_EBPF");
    for dir in [
        "lb-ebpf/src",
        "lb-ebpf/Cargo.toml",
        "lb-ebpf/Cargo.lock",
        "lb-common/src",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    let tools_bin = root.join(".tools/bin");
    println!(
        "cargo:rerun-if-changed={}",
        tools_bin.join("bpf-linker").display()
    );

    let linker = find_bpf_linker(&tools_bin);
    let skip = env::var_os("LB_SKIP_EBPF").is_some();
    if skip || linker.is_none() {
        let why = if skip {
            "LB_SKIP_EBPF is set"
        } else {
            "bpf-linker not found (run `cargo xtask setup`)"
        };
        println!("cargo:warning={why}: building the agent without its XDP program");
        println!("cargo:rustc-cfg=lb_no_ebpf");
        std::fs::write(&object, []).unwrap();
        return;
    }
    let linker_dir = linker.unwrap().parent().unwrap().to_path_buf();
    let target_dir = root.join("target/ebpf");
    let path = env::join_paths(
        std::iter::once(linker_dir)
            .chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
    )
    .unwrap();
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--release",
        "--target",
        "bpfel-unknown-none",
    ])
    .args(["-Z", "build-std=core", "--manifest-path"])
    .arg(root.join("lb-ebpf/Cargo.toml"))
    .arg("--target-dir")
    .arg(&target_dir)
    .env("PATH", path);
    // The outer cargo's settings are for the host build; none of them fit this one.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTDOC",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(var);
    }
    // Packet headers sit at 2-byte offsets, so the datapath's 32-bit address loads
    // are unaligned. Without this feature LLVM splits each into four byte loads and
    // three shifts; with it, one load, which the verifier accepts on every
    // architecture with efficient unaligned access (x86-64, arm64). LLVM ≥ 22.
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        "-Clink-arg=--cpu-features=+allows-misaligned-mem-access",
    );
    let status = cmd
        .status()
        .expect("could not run `rustup run nightly cargo`");
    if !status.success() {
        panic!("building lb-ebpf failed ({status}); see the compiler output above");
    }
    let built = target_dir.join("bpfel-unknown-none/release/lb-ebpf");
    std::fs::copy(&built, &object).unwrap_or_else(|e| {
        panic!(
            "cannot copy {} to {}: {e}",
            built.display(),
            object.display()
        )
    });
}

fn find_bpf_linker(tools_bin: &Path) -> Option<PathBuf> {
    let local = tools_bin.join("bpf-linker");
    if local.is_file() {
        return Some(local);
    }
    env::split_paths(&env::var_os("PATH")?)
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file())
}
