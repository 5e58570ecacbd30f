//! `cargo xtask setup`: makes this machine able to build and run the XDP program, and
//! says what it checked. Idempotent and quick when everything is already there.
//!
//! 1. `rust-src` for the nightly toolchain (`-Z build-std=core` needs it): rustup
//!    downloads it; when that fails, a matching tarball in `../shared/toolchain/`
//!    (next to the repository) is unpacked into the nightly's sysroot instead.
//! 2. `bpf-linker` built from crates.io against the nightly's own LLVM (the same LLVM
//!    major as the bitcode rustc emits) into `.tools/bin/`, reused by later runs.
//! 3. bpffs mounted on /sys/fs/bpf (needed to pin maps and links).
//! 4. Checks: root, the BPF syscall (loads a two-instruction XDP program), kernel BTF.
//! 5. The Debian packages of [`TEST_PACKAGES`], installed when missing (as root):
//!    `prometheus-node-exporter` (the collector tests scrape a real one),
//!    `etcd-server` (the fleet tests start `/usr/bin/etcd` inside their namespaces)
//!    and `protobuf-compiler`: `protoc` is needed at build time, by the build script
//!    of the `etcd-client` crate, which compiles etcd's gRPC protocol, with
//!    `libprotobuf-dev` for the well-known types its files import
//!    (`google/protobuf/descriptor.proto`; only recommended by `protobuf-compiler`,
//!    and recommends are not installed here). etcd is a
//!    daemon package whose maintainer scripts would start it as a service on
//!    127.0.0.1:2379; it is installed with service starts refused and its service
//!    disabled afterwards (see [`install_without_starting`]), so that only the tests
//!    ever run it. An etcd found running outside any namespace is reported, not
//!    touched.
//!
//! [`ensure_versus_packages`] is not part of it: only `cargo xtask bench versus` needs
//! haproxy and nginx, and installs them itself, the same way.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";

/// How much `run` prints.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// Every check, as `cargo xtask setup` shows them.
    Verbose,
    /// Only what it installs or what fails.
    Quiet,
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn run(root: &Path, report: Report) -> anyhow::Result<()> {
    let say = |line: String| {
        if report == Report::Verbose {
            println!("{line}");
        }
    };
    let sysroot = nightly_sysroot()?;
    say(format!("ok   nightly toolchain at {}", sysroot.display()));

    ensure_rust_src(root, &sysroot)?;
    say("ok   rust-src for the nightly toolchain".into());

    let linker = ensure_bpf_linker(root, &sysroot)?;
    say(format!(
        "ok   bpf-linker {BPF_LINKER_VERSION} at {}",
        linker.display()
    ));

    if is_root() {
        say("ok   running as root".into());
        ensure_bpffs()?;
        say("ok   bpffs mounted on /sys/fs/bpf".into());
        check_bpf_xdp_load()?;
        say("ok   BPF syscall: an XDP program loads".into());
    } else {
        say("warn not root: skipped bpffs and the BPF syscall check (tests, demo and run need root)".into());
    }
    let missing = install_without_starting(&TEST_PACKAGES, &TEST_DAEMONS)?;
    if missing.is_empty() {
        say(format!(
            "ok   Debian packages: {}",
            TEST_PACKAGES.join(", ")
        ));
    } else {
        say(format!(
            "warn Debian packages missing: {} (run `cargo xtask setup` as root; the tests \
             need them, and building the etcd client needs protoc)",
            missing.join(", ")
        ));
    }
    let outside = daemon_pids(&["etcd"])
        .into_iter()
        .filter(|&pid| in_own_netns(pid))
        .collect::<Vec<_>>();
    if !outside.is_empty() {
        // Not started by this setup (the install refuses service starts), so not
        // stopped either; the tests run their own etcd in their namespaces.
        say(format!(
            "warn etcd is running outside the tests' namespaces (pids {outside:?}); the tests \
             do not need it"
        ));
    }
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        say("ok   kernel BTF at /sys/kernel/btf/vmlinux".into());
    } else {
        say("warn no kernel BTF (/sys/kernel/btf/vmlinux); the datapath does not need it".into());
    }
    Ok(())
}

/// Whether a Debian package is installed: dpkg's status is "install ok installed"
/// (a removed package whose configuration files remain still answers `dpkg -s`).
fn installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", name])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout == b"install ok installed")
}

/// Makes sure Debian packages the tests need are installed (`dpkg -s`), installing
/// the missing ones with `apt-get update` and `apt-get install -y` when running as
/// root. Returns the names still missing (not root, or no apt-get): builds do not
/// need them, so that only warns. A failing apt-get is an error.
fn ensure_debian_packages(names: &[&str]) -> anyhow::Result<Vec<String>> {
    let missing: Vec<&str> = names.iter().copied().filter(|n| !installed(n)).collect();
    let have_apt = Command::new("apt-get")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !missing.is_empty() && is_root() && have_apt {
        eprintln!("setup: installing Debian packages: {}", missing.join(" "));
        let status = Command::new("apt-get")
            .arg("update")
            .stdout(Stdio::null())
            .status()
            .context("running apt-get update")?;
        if !status.success() {
            bail!("apt-get update failed ({status})");
        }
        let status = Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .context("running apt-get install")?;
        if !status.success() {
            bail!("apt-get install {} failed ({status})", missing.join(" "));
        }
    }
    Ok(names
        .iter()
        .filter(|n| !installed(n))
        .map(|n| (*n).to_owned())
        .collect())
}

/// The Debian packages the tests need (see the module documentation): protoc is
/// also needed to build the etcd client.
pub const TEST_PACKAGES: [&str; 4] = [
    "prometheus-node-exporter",
    "etcd-server",
    "protobuf-compiler",
    "libprotobuf-dev",
];

/// The daemons among [`TEST_PACKAGES`] that the tests start themselves, in their
/// namespaces, and that must not run as services.
const TEST_DAEMONS: [Daemon; 1] = [Daemon {
    package: "etcd-server",
    process: "etcd",
    service: "etcd",
}];

/// The Debian packages of `cargo xtask bench versus`, which runs them beside the XDP
/// balancer (never needed by the tests).
pub const VERSUS_PACKAGES: [&str; 3] = ["haproxy", "nginx", "libnginx-mod-stream"];

/// The daemons of [`VERSUS_PACKAGES`], which only the benchmark starts.
const VERSUS_DAEMONS: [Daemon; 2] = [
    Daemon {
        package: "haproxy",
        process: "haproxy",
        service: "haproxy",
    },
    Daemon {
        package: "nginx",
        process: "nginx",
        service: "nginx",
    },
];

/// A daemon that a Debian package installs as a service, which the harness starts
/// itself instead.
struct Daemon {
    /// The package that installs it.
    package: &'static str,
    /// Its process's command name (`/proc/PID/comm`).
    process: &'static str,
    /// Its systemd unit (without `.service`) and its sysvinit script.
    service: &'static str,
}

/// Installs [`VERSUS_PACKAGES`] when missing (as root), without starting their
/// services: see [`install_without_starting`].
pub fn ensure_versus_packages() -> anyhow::Result<()> {
    if VERSUS_PACKAGES.iter().all(|p| installed(p)) {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages among {} (run as root to install them)",
            VERSUS_PACKAGES.join(", ")
        );
    }
    let missing = install_without_starting(&VERSUS_PACKAGES, &VERSUS_DAEMONS)?;
    if !missing.is_empty() {
        bail!("Debian packages still missing: {}", missing.join(", "));
    }
    Ok(())
}

/// Installs the missing ones of `packages` like [`ensure_debian_packages`] (only as
/// root; returns the names still missing), so that no service of `daemons` is left
/// running outside the tests' or the benchmark's namespaces.
///
/// Debian's maintainer scripts start a freshly installed daemon through `invoke-rc.d`
/// (sysvinit) or `deb-systemd-invoke` (systemd), and both ask `/usr/sbin/policy-rc.d`
/// first, so one that refuses (exit 101) is put in place for any install when there
/// is none, and removed again. Then the service of each daemon whose package was
/// just installed is disabled (systemd or sysvinit, whichever is there), so that no
/// init system starts it later either, and any process of it that appeared during
/// the install all the same in this network namespace (not inside a test's) is
/// stopped.
fn install_without_starting(packages: &[&str], daemons: &[Daemon]) -> anyhow::Result<Vec<String>> {
    const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
    let missing_before: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing_before.is_empty() || !is_root() {
        return ensure_debian_packages(packages);
    }
    let new_daemons: Vec<&Daemon> = daemons
        .iter()
        .filter(|d| missing_before.contains(&d.package))
        .collect();
    let processes: Vec<&str> = new_daemons.iter().map(|d| d.process).collect();
    let before = daemon_pids(&processes);
    let own_policy = !Path::new(POLICY_RC_D).exists();
    if own_policy {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(
            POLICY_RC_D,
            "#!/bin/sh\n# Written by `cargo xtask` for one apt-get install:\n\
             # no service may start outside the tests and benchmarks.\nexit 101\n",
        )
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
        std::fs::set_permissions(POLICY_RC_D, std::fs::Permissions::from_mode(0o755))?;
    }
    let result = ensure_debian_packages(packages);
    if own_policy {
        let _ = std::fs::remove_file(POLICY_RC_D);
    }
    let missing = result?;
    let installed_now: Vec<&Daemon> = new_daemons
        .into_iter()
        .filter(|d| installed(d.package))
        .collect();
    let systemd = Path::new("/run/systemd/system").is_dir();
    for daemon in &installed_now {
        let mut cmd = if systemd {
            let mut cmd = Command::new("systemctl");
            cmd.args(["disable", "--now", &format!("{}.service", daemon.service)]);
            cmd
        } else {
            let mut cmd = Command::new("update-rc.d");
            cmd.args([daemon.service, "disable"]);
            cmd
        };
        let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
    let processes: Vec<&str> = installed_now.iter().map(|d| d.process).collect();
    let started: Vec<u32> = daemon_pids(&processes)
        .into_iter()
        .filter(|&pid| !before.contains(&pid) && in_own_netns(pid))
        .collect();
    for &pid in &started {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    if !started.is_empty() {
        let names = processes.join("/");
        eprintln!("setup: stopped {names} processes the install started: {started:?}");
        std::thread::sleep(std::time::Duration::from_secs(1));
        let left: Vec<u32> = daemon_pids(&processes)
            .into_iter()
            .filter(|pid| started.contains(pid))
            .collect();
        if !left.is_empty() {
            bail!("{names} processes {left:?} started by the install did not stop");
        }
    }
    Ok(missing)
}

/// Whether process `pid` is in this process's network namespace (a daemon there
/// serves the machine; one inside a test's namespace belongs to that test).
fn in_own_netns(pid: u32) -> bool {
    let own = std::fs::read_link("/proc/self/ns/net");
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net"));
    matches!((own, theirs), (Ok(a), Ok(b)) if a == b)
}

/// The ids of the running processes whose command name is one of `names`.
fn daemon_pids(names: &[&str]) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| names.contains(&comm.trim()))
        })
        .collect()
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let out = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()
        .context("running `rustc +nightly` (is rustup installed?)")?;
    if !out.status.success() {
        bail!(
            "no nightly toolchain: install it with `rustup toolchain install nightly` ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

fn ensure_rust_src(root: &Path, sysroot: &Path) -> anyhow::Result<()> {
    let marker = sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if marker.exists() {
        return Ok(());
    }
    eprintln!("setup: installing rust-src for the nightly toolchain");
    let status = Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", "nightly"])
        .status()
        .context("running rustup")?;
    if status.success() && marker.exists() {
        return Ok(());
    }
    let offline = root
        .parent()
        .map(|p| p.join("shared/toolchain"))
        .filter(|p| p.is_dir());
    let tarball = offline.and_then(|dir| {
        std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("rust-src-nightly"))
            })
    });
    let Some(tarball) = tarball else {
        bail!("could not install rust-src with rustup, and no offline copy was found");
    };
    eprintln!("setup: rustup failed; unpacking {}", tarball.display());
    let status = Command::new("tar")
        .arg("-xJf")
        .arg(&tarball)
        .arg("-C")
        .arg(sysroot.join("lib/rustlib"))
        .status()
        .context("running tar")?;
    if !status.success() || !marker.exists() {
        bail!("unpacking {} did not give rust-src", tarball.display());
    }
    Ok(())
}

fn ensure_bpf_linker(root: &Path, sysroot: &Path) -> anyhow::Result<PathBuf> {
    let tools = root.join(".tools");
    let linker = tools.join("bin/bpf-linker");
    let works = |linker: &Path| {
        Command::new(linker)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if linker.is_file() && works(&linker) {
        return Ok(linker);
    }
    // bpf-linker must use the LLVM of the rustc that emits the bitcode. The nightly
    // ships it as a shared library; a prefix whose lib/libLLVM.so points at it is
    // what bpf-linker's build needs. It keeps an rpath there, so the prefix stays.
    let version = Command::new("rustc").args(["+nightly", "-vV"]).output()?;
    let version = String::from_utf8(version.stdout)?;
    let llvm_major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("`rustc +nightly -vV` names no LLVM version")?
        .to_owned();
    let libdir = sysroot.join("lib");
    let libllvm = std::fs::read_dir(&libdir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&format!("libLLVM.so.{llvm_major}"))
                    || n.starts_with(&format!("libLLVM-{llvm_major}"))
            })
        })
        .with_context(|| format!("no libLLVM of LLVM {llvm_major} in {}", libdir.display()))?;
    let prefix = tools.join("llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    // The build links against lib/libLLVM.so; at run time the loader looks for the
    // library's own file name (its soname) in the same rpath directory.
    for name in [
        std::ffi::OsStr::new("libLLVM.so"),
        libllvm.file_name().unwrap(),
    ] {
        let link = prefix.join("lib").join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)?;
    }
    if linker.is_file() && works(&linker) {
        return Ok(linker);
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm_major} (about a minute)"
    );
    let status = Command::new("cargo")
        .args(["+nightly", "install", "bpf-linker", "--force", "--locked"])
        .args(["--version", BPF_LINKER_VERSION])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major}"),
        ])
        .arg("--root")
        .arg(&tools)
        .env("LLVM_PREFIX", &prefix)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() || !linker.is_file() {
        bail!("building bpf-linker failed ({status})");
    }
    Ok(linker)
}

fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf").ok();
    let status = Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()?;
    if !status.success() {
        bail!("mounting bpffs on /sys/fs/bpf failed");
    }
    eprintln!("setup: mounted bpffs on /sys/fs/bpf");
    Ok(())
}

/// Loads `r0 = XDP_PASS; exit` as an XDP program through the raw BPF syscall: proves
/// the syscall works and XDP programs are allowed, with nothing attached.
fn check_bpf_xdp_load() -> anyhow::Result<()> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_XDP: u32 = 6;
    let insns: [u64; 2] = [
        // BPF_MOV64_IMM(BPF_REG_0, XDP_PASS = 2)
        u64::from_le_bytes([0xb7, 0x00, 0, 0, 2, 0, 0, 0]),
        // BPF_EXIT_INSN()
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = b"GPL\0";
    // union bpf_attr, BPF_PROG_LOAD: prog_type, insn_cnt, insns, license; rest zero.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_XDP.to_ne_bytes());
    attr[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    // SAFETY: attr is a valid bpf_attr for BPF_PROG_LOAD whose pointers outlive the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, attr.as_ptr(), attr.len()) };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        bail!("the kernel refused to load a minimal XDP program: {err}");
    }
    // SAFETY: fd is a file descriptor we own.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemons_belong_to_their_package_lists() {
        for daemon in &TEST_DAEMONS {
            assert!(
                TEST_PACKAGES.contains(&daemon.package),
                "{}",
                daemon.package
            );
        }
        for daemon in &VERSUS_DAEMONS {
            assert!(
                VERSUS_PACKAGES.contains(&daemon.package),
                "{}",
                daemon.package
            );
        }
        assert!(TEST_PACKAGES.contains(&"protobuf-compiler"));
    }

    #[test]
    fn this_process_is_in_its_own_network_namespace() {
        assert!(in_own_netns(std::process::id()));
        assert!(!in_own_netns(u32::MAX));
    }
}
