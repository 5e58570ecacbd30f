//! Named network namespaces that are always removed again; owned by the lb-tests
//! harness and used by [`crate::topology`], [`crate::tcp`] and every namespace test.
//!
//! A [`Netns`] is created with `ip netns add` and deleted with `ip netns del` when it
//! is dropped, including while a panicking test unwinds. Names come from
//! [`unique_prefix`], which encodes the creating process id, so that concurrent runs
//! never collide and [`sweep_stale`] can recognise the leftovers of a run that was
//! killed with SIGKILL. The first namespace created by a process installs a
//! SIGINT/SIGTERM handler that deletes every namespace still alive and then exits
//! with 130 or 143.
//!
//! Code runs inside a namespace in three ways: [`Netns::exec`] and [`Netns::command`]
//! start a program through `ip netns exec`, and [`Netns::run_in`] and
//! [`Netns::spawn_in`] run a closure on a fresh thread that has entered the namespace
//! with `setns(2)`. Sockets created on such a thread belong to the namespace for their
//! whole life, whichever thread uses them later.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, Once, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The first characters of every namespace and link name this harness creates.
pub const NAME_PREFIX: &str = "lbt";

/// Where `ip netns` keeps the bind mounts that name namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";

/// How long [`Netns::spawn`] waits for `ip netns exec` to enter the namespace.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(10);

/// How many distinct counters [`unique_prefix`] cycles through (two base-36 digits).
const COUNTER_RANGE: u32 = 36 * 36;

/// The namespaces this process created and has not deleted yet.
struct Registry {
    live: BTreeSet<String>,
    /// Set by the signal cleanup; no namespace may be created after it.
    shutting_down: bool,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    live: BTreeSet::new(),
    shutting_down: false,
});

/// Locks the registry; a panic elsewhere never makes cleanup impossible.
fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Returns a fresh name prefix `lbt<pid>-<counter>` (both in base 36), at most 11
/// characters long, so that a role tag of up to four characters still fits an
/// interface name of 15 characters.
///
/// Every call returns a different prefix within this process (the counter wraps after
/// 1296 calls), and the process id keeps concurrent processes apart.
pub fn unique_prefix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let counter = COUNTER.fetch_add(1, Ordering::Relaxed) % COUNTER_RANGE;
    format!(
        "{NAME_PREFIX}{}-{}",
        base36(std::process::id()),
        base36(counter)
    )
}

fn base36(mut n: u32) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("base-36 digits are ASCII")
}

/// Returns the process id encoded in a name made from [`unique_prefix`], or `None` if
/// the name does not have that format.
pub fn creator_pid(name: &str) -> Option<u32> {
    let is_base36 = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    };
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let (pid, rest) = rest.split_once('-')?;
    let counter = rest.split('-').next()?;
    if !is_base36(pid) || pid.len() > 6 || !is_base36(counter) || counter.len() > 2 {
        return None;
    }
    u32::from_str_radix(pid, 36).ok()
}

/// Runs a command to completion and returns its standard output; a failure names the
/// command line and carries its standard error.
pub fn run(cmd: &mut Command) -> Result<String> {
    let shown = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip ARGS...` in the namespace of the calling process.
pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

fn describe(cmd: &Command) -> String {
    let mut shown = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        shown.push(' ');
        shown.push_str(&arg.to_string_lossy());
    }
    shown
}

/// Lists the names of all namespaces known to `ip netns`, whoever created them.
pub fn list_all() -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {NETNS_DIR}")),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {NETNS_DIR}"))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Deletes namespaces left behind by runs of this harness that died without cleaning
/// up (for example after SIGKILL), and returns their names.
///
/// A namespace is stale when its name has the [`unique_prefix`] format and the process
/// encoded in it no longer exists. Names carrying this process's own id are stale
/// when this process has not registered them, which happens when a killed run had the
/// same process id (common in fresh containers). Namespaces of live concurrent runs
/// are left alone.
pub fn sweep_stale() -> Result<Vec<String>> {
    let own_pid = std::process::id();
    // Holding the registry keeps this process from creating a namespace while the
    // sweep decides which of its own names are stale.
    let reg = registry();
    let mut removed = Vec::new();
    for name in list_all()? {
        let Some(pid) = creator_pid(&name) else {
            continue;
        };
        let stale = if pid == own_pid {
            !reg.live.contains(&name)
        } else {
            !Path::new(&format!("/proc/{pid}")).exists()
        };
        if !stale {
            continue;
        }
        kill_processes_in(&name);
        match ip(&["netns", "del", &name]) {
            Ok(_) => removed.push(name),
            // A concurrent sweep of another run may have removed it first.
            Err(_) if !netns_path(&name).exists() => {}
            Err(e) => return Err(e).context("cannot remove a stale namespace"),
        }
    }
    Ok(removed)
}

fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Kills (SIGKILL) every other process whose network namespace is the named one.
///
/// Deleting a namespace's name does not end the processes inside it, and a process
/// left running would keep the namespace and its links alive. Every process in a
/// namespace with a unique harness name was started by this harness.
fn kill_processes_in(name: &str) {
    let Some(wanted) = ns_link(name) else {
        return;
    };
    let own_pid = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own_pid {
            continue;
        }
        let Ok(link) = std::fs::read_link(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if link.as_os_str() == wanted.as_os_str() {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

/// Returns what `/proc/PID/ns/net` reads for a process inside the named namespace,
/// `net:[INODE]`.
fn ns_link(name: &str) -> Option<PathBuf> {
    let meta = std::fs::metadata(netns_path(name)).ok()?;
    Some(PathBuf::from(format!("net:[{}]", meta.ino())))
}

/// Enters the namespace behind `file` on the calling thread.
fn enter(file: &File, name: &str) -> Result<()> {
    // SAFETY: the descriptor is open for the duration of the call, and changing the
    // calling thread's network namespace affects no memory.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setns into network namespace {name} failed"));
    }
    Ok(())
}

/// A named network namespace that is deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
    deleted: bool,
}

impl Netns {
    /// Creates the namespace `name` with `ip netns add`; use a name that starts with
    /// a [`unique_prefix`] so that it is unique and [`sweep_stale`] can find it.
    pub fn new(name: impl Into<String>) -> Result<Netns> {
        let name = name.into();
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            bail!("invalid network namespace name {name:?}");
        }
        install_signal_cleanup();
        let mut reg = registry();
        if reg.shutting_down {
            bail!("cannot create network namespace {name}: the process is shutting down");
        }
        if reg.live.contains(&name) {
            bail!("network namespace {name} already exists in this process");
        }
        // Creation happens under the registry lock, so the signal cleanup either sees
        // the namespace registered or runs before it exists.
        ip(&["netns", "add", &name])
            .with_context(|| format!("cannot create network namespace {name}"))?;
        reg.live.insert(name.clone());
        Ok(Netns {
            name,
            deleted: false,
        })
    }

    /// The namespace's name as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount that names the namespace (under [`NETNS_DIR`]).
    pub fn path(&self) -> PathBuf {
        netns_path(&self.name)
    }

    /// Runs `ip -n NAME ARGS...`, that is an `ip` command acting on this namespace.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Runs `ip netns exec NAME ARGS...` to completion and returns its standard output.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let Some((program, rest)) = args.split_first() else {
            bail!("nothing to run in network namespace {}", self.name);
        };
        run(self.command(program).args(rest))
    }

    /// Returns `ip netns exec NAME PROGRAM` as a [`Command`] to complete with
    /// arguments, environment and standard streams before spawning it.
    ///
    /// `ip netns exec` also gives the program a private `/sys` that shows the
    /// namespace's interfaces.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec"]).arg(&self.name).arg(program);
        cmd
    }

    /// Starts a long-running program inside the namespace, with standard input closed
    /// and standard output and error inherited, and returns once the program is inside
    /// the namespace (or has already exited).
    ///
    /// The caller kills and waits for the child; whatever is still running in the
    /// namespace when it is dropped is killed then.
    pub fn spawn(&self, args: &[&str]) -> Result<Child> {
        let Some((program, rest)) = args.split_first() else {
            bail!("nothing to run in network namespace {}", self.name);
        };
        let mut cmd = self.command(program);
        cmd.args(rest).stdin(Stdio::null());
        self.spawn_command(&mut cmd)
    }

    /// Spawns a command made with [`Netns::command`] and returns once it is inside the
    /// namespace (or has already exited), so that deleting the namespace is sure to
    /// find and kill it.
    pub fn spawn_command(&self, cmd: &mut Command) -> Result<Child> {
        let shown = describe(cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{shown}`"))?;
        let wanted = ns_link(&self.name)
            .with_context(|| format!("network namespace {} is gone", self.name))?;
        let proc_link = format!("/proc/{}/ns/net", child.id());
        let deadline = Instant::now() + SPAWN_TIMEOUT;
        loop {
            if std::fs::read_link(&proc_link).ok() == Some(wanted.clone())
                || child.try_wait().ok().flatten().is_some()
            {
                return Ok(child);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "`{shown}` did not enter network namespace {} within {SPAWN_TIMEOUT:?}",
                    self.name
                );
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Whether process `pid` is inside this namespace.
    pub fn contains_process(&self, pid: u32) -> bool {
        let Some(wanted) = ns_link(&self.name) else {
            return false;
        };
        std::fs::read_link(format!("/proc/{pid}/ns/net")).ok() == Some(wanted)
    }

    /// Writes sysctls of this namespace; keys are paths below `/proc/sys`, for example
    /// `net/ipv4/conf/all/rp_filter`.
    pub fn sysctl(&self, settings: &[(&str, &str)]) -> Result<()> {
        self.run_in(|| {
            for (key, value) in settings {
                let path = Path::new("/proc/sys").join(key);
                std::fs::write(&path, value).with_context(|| {
                    format!(
                        "cannot set {} to {value} in network namespace {}",
                        path.display(),
                        self.name
                    )
                })?;
            }
            Ok(())
        })?
    }

    /// Reads one sysctl of this namespace; the key is a path below `/proc/sys`.
    pub fn read_sysctl(&self, key: &str) -> Result<String> {
        self.run_in(|| {
            let path = Path::new("/proc/sys").join(key);
            std::fs::read_to_string(&path)
                .map(|s| s.trim().to_owned())
                .with_context(|| {
                    format!(
                        "cannot read {} in network namespace {}",
                        path.display(),
                        self.name
                    )
                })
        })?
    }

    fn open(&self) -> Result<File> {
        let path = self.path();
        File::open(&path).with_context(|| format!("cannot open {}", path.display()))
    }

    /// Runs `f` on a fresh thread that has entered this namespace, and returns its
    /// result. A panic inside `f` is resumed on the calling thread; the error case is
    /// only a failure to enter the namespace.
    pub fn run_in<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let file = self.open()?;
        let name = self.name.as_str();
        thread::scope(|scope| {
            let handle = thread::Builder::new()
                .name("netns-run-in".into())
                .spawn_scoped(scope, move || -> Result<R> {
                    enter(&file, name)?;
                    drop(file);
                    Ok(f())
                })
                .context("cannot spawn a thread")?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Starts `f` on a new thread that has entered this namespace, for long-running
    /// servers. Returns once the thread is inside the namespace; threads it spawns
    /// start in the namespace too.
    pub fn spawn_in<F, R>(&self, f: F) -> Result<JoinHandle<R>>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let file = self.open()?;
        let name = self.name.clone();
        let (entered_tx, entered_rx) = mpsc::sync_channel::<Result<()>>(1);
        let handle = thread::Builder::new()
            .name("netns-spawn-in".into())
            .spawn(move || {
                let entered = enter(&file, &name);
                drop(file);
                let ok = entered.is_ok();
                // The receiver waits for this message, so sending cannot fail.
                let _ = entered_tx.send(entered);
                if !ok {
                    // The caller gets the error and drops the handle; end the thread
                    // without a result and without the panic message.
                    std::panic::resume_unwind(Box::new(()));
                }
                f()
            })
            .context("cannot spawn a thread")?;
        entered_rx
            .recv()
            .context("namespace thread ended before entering")??;
        Ok(handle)
    }

    /// Deletes the namespace now and reports failure, which dropping cannot do.
    pub fn delete(mut self) -> Result<()> {
        self.deleted = true;
        delete_registered(&self.name)
    }
}

impl Netns {
    /// Returns `nsenter --net=PATH PROGRAM` as a [`Command`]: the program runs in
    /// this network namespace but keeps the caller's mounts. Unlike `ip netns exec`,
    /// which mounts a private /sys and so hides the bpffs at /sys/fs/bpf, this lets
    /// a load balancer agent find the datapath an earlier agent pinned there.
    pub fn net_command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg(program);
        cmd
    }

    /// A second handle on this namespace, for another thread, that never deletes
    /// it: the namespace still goes when its owner is dropped.
    pub fn borrowed(&self) -> Netns {
        Netns {
            name: self.name.clone(),
            deleted: true,
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        if let Err(e) = delete_registered(&self.name) {
            eprintln!("lb-tests: {e:#}");
        }
    }
}

fn delete_registered(name: &str) -> Result<()> {
    let mut reg = registry();
    if !reg.live.remove(name) {
        // The signal cleanup has already deleted it.
        return Ok(());
    }
    kill_processes_in(name);
    ip(&["netns", "del", name])
        .with_context(|| format!("cannot delete network namespace {name}"))?;
    Ok(())
}

/// Deletes every registered namespace and forbids new ones; the signal cleanup.
fn delete_all_registered() {
    let mut reg = registry();
    reg.shutting_down = true;
    let names: Vec<String> = std::mem::take(&mut reg.live).into_iter().collect();
    for name in names {
        kill_processes_in(&name);
        if let Err(e) = ip(&["netns", "del", &name]) {
            eprintln!("lb-tests: {e:#}");
        }
    }
}

/// The write end of the self-pipe that the signal handler writes the signal number to.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(signal: libc::c_int) {
    // Only async-signal-safe calls here: write(2), and errno saved around it.
    // SAFETY: __errno_location returns the calling thread's errno slot.
    let saved_errno = unsafe { *libc::__errno_location() };
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = signal as u8;
        // SAFETY: writes one byte from a live stack variable to a descriptor this
        // module owns for the rest of the process.
        unsafe {
            libc::write(fd, (&raw const byte).cast(), 1);
        }
    }
    // SAFETY: as above.
    unsafe {
        *libc::__errno_location() = saved_errno;
    }
}

/// Installs, once per process, the SIGINT/SIGTERM handler that deletes every live
/// namespace and exits with 128 + the signal number.
///
/// The handler itself only writes to a pipe; a dedicated thread reads it and does
/// the cleanup, since running `ip` is not allowed inside a signal handler.
pub fn install_signal_cleanup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = try_install_signal_cleanup() {
            eprintln!("lb-tests: namespaces will not be removed on SIGINT/SIGTERM: {e:#}");
        }
    });
}

fn try_install_signal_cleanup() -> Result<()> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2 failed");
    }
    // SAFETY: fds[0] is a fresh descriptor that nothing else owns.
    let mut reader = unsafe { File::from_raw_fd(fds[0]) };
    // A full pipe must never block the handler.
    // SAFETY: fcntl on a descriptor this function owns.
    unsafe {
        let flags = libc::fcntl(fds[1], libc::F_GETFL);
        libc::fcntl(fds[1], libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
    thread::Builder::new()
        .name("lbt-signals".into())
        .spawn(move || {
            let mut byte = [0u8; 1];
            loop {
                match reader.read(&mut byte) {
                    Ok(1) => {
                        delete_all_registered();
                        std::process::exit(128 + i32::from(byte[0]));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    _ => return,
                }
            }
        })
        .context("cannot spawn the signal cleanup thread")?;
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is valid; the handler only does
        // async-signal-safe work.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("sigaction({signal}) failed"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_short_unique_and_parse_back() {
        let a = unique_prefix();
        let b = unique_prefix();
        assert_ne!(a, b);
        assert!(a.len() <= 11, "{a} is too long");
        assert_eq!(creator_pid(&a), Some(std::process::id()));
        assert_eq!(
            creator_pid(&format!("{a}-backend3")),
            Some(std::process::id())
        );
        assert_eq!(creator_pid("lbtest"), None);
        assert_eq!(creator_pid("other-1-sw"), None);
        assert_eq!(base36(0), "0");
        assert_eq!(base36(36), "10");
        assert_eq!(base36(4_194_304).len(), 5);
    }
}
