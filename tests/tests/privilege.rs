//! Privilege and hostile clients at the agent's edges: the control socket answers
//! root only (mode 0600), refuses requests of another protocol version and survives
//! a megabyte of garbage; `lb run` refuses a configuration file that every user may
//! write, before it touches the kernel.
//!
//! The socket tests serve the real control socket (`control::bind` and `serve`) with
//! a stand-in for the agent's loop, and talk to it with the real `lb` binary
//! (`$LB_BIN`, else `target/debug/lb`) and with raw connections. They need root: the
//! refused caller is `lb` started as uid and gid 65534 (nobody).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use lb_tests::{netns::Netns, spread::lb_binary};
use lb_userspace::{
    api::{Answer, MAX_REQUEST, Request, Response, Status},
    control,
};

/// nobody and nogroup on Debian.
const NOBODY: u32 = 65534;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the privilege tests need root (they start `lb` as another user); run them through \
         `cargo xtask test` or as root"
    );
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "lb-privilege-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The real control socket, served on a runtime of its own, with a stand-in for the
/// agent's loop that answers `status` with a fixed result (instance `privilege-test`)
/// and refuses every other request.
struct Server {
    dir: TempDir,
    socket: PathBuf,
    /// Serves the socket until the server is dropped.
    _runtime: tokio::runtime::Runtime,
}

impl Server {
    /// Binds `DIR/ctl/lb.sock` and serves it. `control::bind` makes `ctl` 0700; with
    /// `traversable`, the test opens it to 0755 afterwards so that another user can
    /// reach the socket itself, which stays 0600.
    fn start(traversable: bool) -> Server {
        let dir = TempDir::new("socket");
        let socket = dir.0.join("ctl/lb.sock");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime.block_on(async { control::bind(&socket) }).unwrap();
        let ctl = socket.parent().unwrap();
        assert_eq!(mode(ctl), 0o700, "control::bind leaves its directory 0700");
        assert_eq!(mode(&socket), 0o600, "control::bind makes the socket 0600");
        if traversable {
            std::fs::set_permissions(ctl, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel::<control::Job>(16);
        runtime.spawn(control::serve(listener, tx));
        runtime.spawn(async move {
            while let Some((request, reply)) = rx.recv().await {
                let _ = reply.send(match request {
                    Request::Status => Response::ok(Answer::Status(Box::new(Status {
                        instance: "privilege-test".into(),
                        ..Status::default()
                    }))),
                    other => Response::error(format!("the stand-in answers only status: {other}")),
                });
            }
        });
        Server {
            dir,
            socket,
            _runtime: runtime,
        }
    }

    /// Sends `line` on a raw connection, from a thread of its own (a large request
    /// fills the socket buffer while the agent has stopped reading), and returns the
    /// agent's answer.
    fn raw(&self, line: Vec<u8>) -> Response {
        let stream = UnixStream::connect(&self.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            // The agent closes the connection once it has answered: the rest of an
            // oversized request then fails to send, which is expected.
            let _ = writer.write_all(&line);
        });
        let mut answer = String::new();
        BufReader::new(&stream)
            .read_line(&mut answer)
            .expect("the agent answers");
        drop(stream);
        sender.join().unwrap();
        serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("the answer {answer:?} is not a response: {e}"))
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Runs `lb ARGS` to completion (at most 60 s), as `uid`:`uid` when given.
fn lb(args: &[&str], uid: Option<u32>, cwd: &Path) -> Output {
    let bin = lb_binary().unwrap();
    let mut cmd = Command::new(&bin);
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .env("RUST_LOG", "warn");
    if let Some(id) = uid {
        // std drops the supplementary groups too when root changes its uid.
        cmd.uid(id).gid(id);
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {} {args:?}: {e}", bin.display()));
    wait_bounded(child, Duration::from_secs(60))
}

/// Waits for `child`, killing it after `limit`.
fn wait_bounded(mut child: std::process::Child, limit: Duration) -> Output {
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn control_socket_answers_root_and_refuses_others() {
    require_root();
    let server = Server::start(true);
    let socket = server.socket.to_str().unwrap();
    let cwd = server.dir.0.clone();

    let nobody = lb(&["status", "--socket", socket], Some(NOBODY), &cwd);
    let stderr = String::from_utf8_lossy(&nobody.stderr);
    assert!(
        !nobody.status.success(),
        "a non-root caller was answered: {nobody:?}"
    );
    assert_eq!(nobody.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("permission denied") && stderr.contains("root-only"),
        "a non-root caller should be told the socket is root-only: {stderr}"
    );
    assert!(
        stderr.contains(socket),
        "the message names the socket: {stderr}"
    );
    assert!(nobody.stdout.is_empty());

    let root = lb(&["status", "--socket", socket, "--json"], None, &cwd);
    let stdout = String::from_utf8_lossy(&root.stdout);
    assert!(
        root.status.success(),
        "root was not answered: {}",
        String::from_utf8_lossy(&root.stderr)
    );
    // Only a `status` request is answered with this instance.
    let answer: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(answer["instance"], "privilege-test", "{stdout}");

    // Nothing about the socket changed: still root's and 0600.
    assert_eq!(mode(&server.socket), 0o600);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&server.socket).unwrap().uid(), 0);
}

#[test]
fn control_socket_directory_keeps_others_out() {
    require_root();
    // As `control::bind` leaves it: the directory is 0700, so another user cannot
    // even reach the socket, and is told the same.
    let server = Server::start(false);
    let socket = server.socket.to_str().unwrap();
    std::fs::set_permissions(&server.dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let nobody = lb(&["status", "--socket", socket], Some(NOBODY), &server.dir.0);
    let stderr = String::from_utf8_lossy(&nobody.stderr);
    assert_eq!(nobody.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("permission denied") && stderr.contains("root-only"),
        "{stderr}"
    );
}

/// A socket in a directory that already exists (`--socket /tmp/lb.sock`) is 0600,
/// and the directory keeps its mode: binding must not lock others out of `/tmp`.
/// Many binds at once (the umask is process-wide; a bind must not depend on it)
/// all come out 0600.
#[test]
fn control_socket_in_an_existing_directory_leaves_it_alone() {
    require_root();
    let dir = TempDir::new("shared");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sockets: Vec<PathBuf> = (0..16).map(|i| dir.0.join(format!("lb{i}.sock"))).collect();
    let listeners = runtime.block_on(async {
        let binds = sockets.iter().cloned().map(|path| {
            tokio::task::spawn_blocking(move || {
                tokio::runtime::Handle::current().block_on(async { control::bind(&path) })
            })
        });
        let mut out = Vec::new();
        for bind in binds.collect::<Vec<_>>() {
            out.push(bind.await.unwrap().unwrap());
        }
        out
    });
    assert_eq!(mode(&dir.0), 0o1777, "bind changed the directory's mode");
    for socket in &sockets {
        assert_eq!(mode(socket), 0o600, "{}", socket.display());
    }
    let leftovers: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| !name.to_string_lossy().ends_with(".sock"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    drop(listeners);
}

#[test]
fn request_of_an_unknown_version_is_refused_clearly() {
    require_root();
    let server = Server::start(false);
    for (line, version) in [
        (&br#"{"version":2,"request":"status"}"#[..], "2"),
        (br#"{"version":0,"request":"status"}"#, "0"),
        (
            br#"{"version":4294967295,"request":"status"}"#,
            "4294967295",
        ),
    ] {
        let mut line = line.to_vec();
        line.push(b'\n');
        match server.raw(line) {
            Response::Error { ok, error } => {
                assert!(!ok);
                assert!(
                    error.contains(&format!("protocol version {version} is not supported"))
                        && error.contains("speaks 1"),
                    "{error}"
                );
            }
            other => panic!("a request of version {version} was answered: {other:?}"),
        }
    }
    // A version that is not a number at all is a bad request, also said.
    match server.raw(b"{\"version\":\"1\",\"request\":\"status\"}\n".to_vec()) {
        Response::Error { error, .. } => assert!(error.starts_with("bad request"), "{error}"),
        other => panic!("answered: {other:?}"),
    }
}

#[test]
fn a_megabyte_of_garbage_gets_an_error_and_the_agent_keeps_serving() {
    require_root();
    let server = Server::start(false);
    // Pseudo-random bytes (xorshift, fixed seed), newlines and all.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let random: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    // The same megabyte without a newline: more than the agent reads.
    let no_newline: Vec<u8> = random
        .iter()
        .map(|&b| if b == b'\n' { b'x' } else { b })
        .collect();
    // A megabyte of valid JSON that never ends its line.
    let mut long_json =
        br#"{"version":1,"request":{"drain":{"backend":"198.18.0.11","vip":""#.to_vec();
    long_json.resize(1 << 20, b'a');
    for (what, garbage, expect) in [
        ("random bytes", random, None),
        ("bytes without a newline", no_newline, Some("over")),
        ("an endless JSON line", long_json, Some("over")),
    ] {
        match server.raw(garbage) {
            Response::Error { ok, error } => {
                assert!(!ok && !error.is_empty(), "{what}: {error:?}");
                if let Some(word) = expect {
                    assert!(
                        error.contains(word) && error.contains(&MAX_REQUEST.to_string()),
                        "{what}: {error}"
                    );
                }
            }
            other => panic!("{what} were answered: {other:?}"),
        }
        // The agent still answers, through the library and through `lb`.
        let socket = server.socket.clone();
        let answer: Status = control::request(&socket, Request::Status)
            .unwrap_or_else(|e| panic!("no answer after {what}: {e:#}"));
        assert_eq!(answer.instance, "privilege-test");
    }
    let out = lb(
        &[
            "status",
            "--json",
            "--socket",
            server.socket.to_str().unwrap(),
        ],
        None,
        &server.dir.0,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn lb_run_refuses_a_world_writable_config_before_touching_the_kernel() {
    require_root();
    let dir = TempDir::new("config");
    let config = dir.0.join("lb.toml");
    std::fs::write(
        &config,
        "[[vip]]\naddress = \"198.18.1.1\"\nport = 80\nprotocol = \"tcp\"\n\n\
         [[vip.backend]]\naddress = \"198.18.0.11\"\nmac = \"02:00:00:00:00:11\"\nweight = 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o666)).unwrap();
    let socket = dir.0.join("run/lb.sock");
    let instance = format!("privilege-{}", std::process::id());
    let ns = Netns::new(format!("{}-priv", lb_tests::netns::unique_prefix())).unwrap();
    let mut cmd = ns.net_command(lb_binary().unwrap());
    cmd.args(["run", "--iface", "lo", "--config"])
        .arg(&config)
        .args(["--instance", &instance, "--socket"])
        .arg(&socket)
        .args(["--xdp-mode", "generic", "--metrics-address", "off"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = wait_bounded(cmd.spawn().unwrap(), Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(config.to_str().unwrap())
            && stderr.contains("writable by every user")
            && stderr.contains("666"),
        "the message should name the file and the problem: {stderr}"
    );
    // Before anything: no XDP program on lo, no pins, no control socket.
    let link = ns.ip(&["link", "show", "dev", "lo"]).unwrap();
    assert!(!link.contains("xdp"), "{link}");
    assert!(!Path::new("/sys/fs/bpf/lb").join(&instance).exists());
    assert!(!socket.exists() && !socket.parent().unwrap().exists());

    // The same file, no longer world-writable, gets past that check (and stops at the
    // next one: the interface does not exist).
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = ns
        .net_command(lb_binary().unwrap())
        .args(["run", "--iface", "lbnosuchif0", "--config"])
        .arg(&config)
        .args(["--instance", &instance, "--socket"])
        .arg(&socket)
        .args(["--metrics-address", "off"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("writable by every user"), "{stderr}");
    assert!(stderr.contains("lbnosuchif0"), "{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
}
