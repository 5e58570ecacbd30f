//! `cargo xtask check-deploy`: checks each file under `deploy/` with the tool that
//! reads it in production, and says which tool, at which version, did:
//!
//! - `deploy/systemd/lb@.service`: `systemd-analyze verify` on the instance
//!   `lb@eth0.service`, from a copy in `target/check-deploy/` whose `/usr/local/bin/lb`
//!   is a stub script (verify insists that every command it runs exists). Any remark
//!   verify makes about the unit fails the check, not only the ones it exits non-zero
//!   for (an unknown key is only a warning to systemd).
//! - `deploy/kubernetes/*.yaml`: `kubernetes-validate --strict` (the JSON schemas of
//!   the Kubernetes API, shipped in the PyPI package and used offline) against every
//!   version in [`KUBERNETES_VERSIONS`]. It lives in a Python venv in
//!   `.tools/kubernetes-validate/`, at the pinned [`KUBERNETES_VALIDATE_VERSION`].
//! - `deploy/bird/bird.conf`: `bird -p -c`, BIRD 2's own parser.
//!
//! The checks are independent: each runs even when another failed or found its tool
//! missing, and the summary names every file that failed. A missing Debian package
//! (`systemd`, `bird2`, `python3`, `python3-venv`) is installed with apt-get when
//! running as root; otherwise the check fails saying what to install.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{Context, bail};

use crate::setup::is_root;

/// The release of the `kubernetes-validate` PyPI package the manifests are checked
/// with; it ships the schemas of Kubernetes 1.32 to 1.37.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// Kubernetes versions whose schemas the manifests must pass: the oldest and the
/// newest that the pinned `kubernetes-validate` ships.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.32.0", "1.37.0"];

/// Where the systemd unit expects the agent; the verified copy points elsewhere.
const LB_BIN: &str = "/usr/local/bin/lb";

const UNIT: &str = "deploy/systemd/lb@.service";
const KUBERNETES_DIR: &str = "deploy/kubernetes";
const BIRD_CONF: &str = "deploy/bird/bird.conf";
/// The script that announces the VIPs only while the agent is ready.
const BIRD_READY: &str = "deploy/bird/lb-ready";

/// Runs the three checks, printing one line for each, and fails naming every file
/// whose check failed.
pub fn run(root: &Path) -> anyhow::Result<()> {
    type Check = fn(&Path) -> anyhow::Result<String>;
    let checks: [(&str, Check); 3] = [
        (UNIT, check_systemd_unit),
        (KUBERNETES_DIR, check_kubernetes),
        (BIRD_CONF, check_bird),
    ];
    let mut failed = Vec::new();
    for (file, check) in checks {
        match check(root) {
            Ok(what) => println!("ok   {file}: {what}"),
            Err(e) => {
                println!("FAIL {file}: {}", indent(&format!("{e:#}")));
                failed.push(file);
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of 3 deploy checks failed: {} (the tool's message is above)",
            failed.len(),
            failed.join(", ")
        );
    }
    println!("all 3 deploy checks passed");
    Ok(())
}

/// `systemd-analyze verify` on an instance of the templated unit.
fn check_systemd_unit(root: &Path) -> anyhow::Result<String> {
    let unit = root.join(UNIT);
    let text = fs::read_to_string(&unit).with_context(|| format!("reading {UNIT}"))?;
    let tool = ensure_tool("systemd-analyze", "systemd")?;
    let version = version_line(&tool, &["--version"])?;

    let dir = root.join("target/check-deploy/systemd");
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let stub = dir.join("lb");
    fs::write(&stub, "#!/bin/sh\nexit 0\n").context("writing the stub agent")?;
    set_mode(&stub, 0o755)?;
    if !text.contains(LB_BIN) {
        bail!("the unit never runs {LB_BIN}; the check expects the agent there");
    }
    let copy = dir.join("lb@.service");
    let stub_path = stub
        .to_str()
        .context("the target directory's path is not UTF-8")?;
    // Only the path changes, so verify's line numbers hold for the original too.
    fs::write(&copy, text.replace(LB_BIN, stub_path)).context("writing the unit copy")?;

    let out = captured(
        Command::new(&tool)
            .args(["verify", "--man=no"])
            .arg(dir.join("lb@eth0.service"))
            .current_dir(&dir),
    )
    .context("running systemd-analyze verify")?;
    let copy_path = copy.to_string_lossy().into_owned();
    let text = out.text.replace(&copy_path, UNIT);
    // Lines about other units (pulled in as dependencies, already on this machine) are
    // not this file's problem.
    let ours = text.lines().any(|l| l.contains("lb@"));
    if !out.success || ours {
        bail!(
            "systemd-analyze verify ({version}) of lb@eth0.service {}:\n{}",
            if out.success { "had remarks" } else { "failed" },
            text.trim_end()
        );
    }
    Ok(format!(
        "systemd-analyze verify lb@eth0.service passed ({version}; {LB_BIN} replaced by a \
         stub for the check)"
    ))
}

/// `kubernetes-validate --strict` on every manifest, for each Kubernetes version.
fn check_kubernetes(root: &Path) -> anyhow::Result<String> {
    let dir = root.join(KUBERNETES_DIR);
    let mut files: Vec<String> = fs::read_dir(&dir)
        .with_context(|| format!("listing {KUBERNETES_DIR}"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .map(|n| format!("{KUBERNETES_DIR}/{n}"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no .yaml files in {KUBERNETES_DIR}");
    }
    let tool = ensure_kubernetes_validate(root)?;
    let version = version_line(&tool, &["--version"])?;
    let mut errors = String::new();
    for k8s in KUBERNETES_VERSIONS {
        let out = captured(
            Command::new(&tool)
                .args(["--strict", "--quiet", "--kubernetes-version", k8s])
                .args(&files)
                .current_dir(root),
        )
        .context("running kubernetes-validate")?;
        if !out.success {
            let _ = writeln!(
                errors,
                "kubernetes-validate {version} --strict, Kubernetes {k8s}:\n{}",
                out.text.trim_end()
            );
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.trim_end());
    }
    Ok(format!(
        "{} passed kubernetes-validate {version} --strict against the Kubernetes {} schemas",
        files
            .iter()
            .map(|f| f.rsplit('/').next().unwrap_or(f))
            .collect::<Vec<_>>()
            .join(" and "),
        KUBERNETES_VERSIONS.join(" and ")
    ))
}

/// `bird -p -c`: BIRD parses the file and exits without starting.
fn check_bird(root: &Path) -> anyhow::Result<String> {
    if !root.join(BIRD_CONF).is_file() {
        bail!("{BIRD_CONF} is missing");
    }
    let tool = ensure_tool("bird", "bird2")?;
    let version = version_line(&tool, &["--version"])?;
    if !version.contains("version 2.") {
        bail!(
            "{} is {version}; the file is for BIRD 2 (Debian package bird2)",
            tool.display()
        );
    }
    let out = captured(
        Command::new(&tool)
            .args(["-p", "-c", BIRD_CONF])
            .current_dir(root),
    )
    .context("running bird -p")?;
    if !out.success || !out.text.trim().is_empty() {
        bail!(
            "bird -p -c ({version}) refused it:\n{}",
            out.text.trim_end()
        );
    }
    // The announcing script beside it: parsed by the shell that runs it.
    let out = captured(
        Command::new("/bin/sh")
            .args(["-n", BIRD_READY])
            .current_dir(root),
    )
    .context("running sh -n")?;
    if !out.success {
        bail!("sh -n refused {BIRD_READY}:\n{}", out.text.trim_end());
    }
    Ok(format!(
        "bird -p -c parsed it ({version}); sh -n parsed {BIRD_READY}"
    ))
}

/// The pinned `kubernetes-validate` in its venv under `.tools/`, installed there from
/// PyPI when missing or at another version.
fn ensure_kubernetes_validate(root: &Path) -> anyhow::Result<PathBuf> {
    let venv = root.join(".tools/kubernetes-validate");
    let tool = venv.join("bin/kubernetes-validate");
    if tool.is_file()
        && version_line(&tool, &["--version"]).is_ok_and(|v| v == KUBERNETES_VALIDATE_VERSION)
    {
        return Ok(tool);
    }
    let python = ensure_tool("python3", "python3")?;
    if !venv.join("bin/python").is_file() {
        eprintln!("check-deploy: creating a Python venv in {}", venv.display());
        let make_venv = || captured(Command::new(&python).args(["-m", "venv"]).arg(&venv));
        let mut out = make_venv().context("running python3 -m venv")?;
        if !out.success && is_root() && apt_get_available() {
            // Debian's python3 has venv (ensurepip) in a package of its own.
            let _ = fs::remove_dir_all(&venv);
            apt_install("python3-venv")?;
            out = make_venv().context("running python3 -m venv")?;
        }
        if !out.success {
            let _ = fs::remove_dir_all(&venv);
            bail!(
                "python3 -m venv {} failed (on Debian: apt-get install python3-venv):\n{}",
                venv.display(),
                out.text.trim_end()
            );
        }
    }
    eprintln!(
        "check-deploy: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} from PyPI"
    );
    let out = captured(
        Command::new(venv.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg(format!(
                "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
            )),
    )
    .context("running pip install")?;
    if !out.success || !tool.is_file() {
        bail!(
            "pip install kubernetes-validate=={KUBERNETES_VALIDATE_VERSION} failed:\n{}",
            out.text.trim_end()
        );
    }
    Ok(tool)
}

/// The path of `name` (searched in PATH and the sbin directories, which a normal
/// user's PATH may lack), installing Debian package `package` when it is missing and
/// this runs as root.
fn ensure_tool(name: &str, package: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = find_tool(name) {
        return Ok(path);
    }
    if !is_root() {
        bail!(
            "{name} is not installed (Debian package {package}); run this task as root to \
             install it, or `apt-get install {package}`"
        );
    }
    if !apt_get_available() {
        bail!("{name} is not installed and there is no apt-get to install {package} with");
    }
    apt_install(package)?;
    find_tool(name).with_context(|| {
        format!("{name} is still missing after installing the Debian package {package}")
    })
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn apt_get_available() -> bool {
    Command::new("apt-get")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `apt-get install -y PACKAGE`, after one `apt-get update` per run of the task.
fn apt_install(package: &str) -> anyhow::Result<()> {
    static UPDATED: AtomicBool = AtomicBool::new(false);
    if !UPDATED.swap(true, Ordering::SeqCst) {
        let out =
            captured(Command::new("apt-get").arg("update")).context("running apt-get update")?;
        if !out.success {
            bail!("apt-get update failed:\n{}", out.text.trim_end());
        }
    }
    eprintln!("check-deploy: installing the Debian package {package}");
    let out = captured(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("running apt-get install {package}"))?;
    if !out.success {
        bail!("apt-get install {package} failed:\n{}", out.text.trim_end());
    }
    Ok(())
}

/// What a finished command said on stdout and stderr together, and whether it
/// exited 0.
struct Output {
    success: bool,
    text: String,
}

fn captured(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.stdin(Stdio::null()).output()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(Output {
        success: out.status.success(),
        text,
    })
}

/// The first non-empty line a tool prints for its version (BIRD prints it on stderr).
fn version_line(tool: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = captured(Command::new(tool).args(args))
        .with_context(|| format!("running {}", tool.display()))?;
    out.text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
        .with_context(|| format!("{} printed no version", tool.display()))
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

/// Indents every line after the first, so that a tool's message sits under its
/// FAIL line.
fn indent(text: &str) -> String {
    text.lines().collect::<Vec<_>>().join("\n     ")
}
