//! The control socket: a Unix socket, root-only (mode 0600, in a 0700 directory),
//! one JSON request line and one JSON response line per connection (see [`api`]).
//! The agent's loop calls [`bind`] and [`serve`]; the `lb` command line calls
//! [`request`]. Every request that changes something is logged with who sent it
//! (the peer's uid and pid), what it asked and how it ended.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{
        fs::{DirBuilderExt, PermissionsExt},
        net::UnixStream,
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use serde::de::DeserializeOwned;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt},
    net::UnixListener,
    sync::{mpsc, oneshot},
};
use tracing::{debug, info, warn};

use crate::api::{Answer, Envelope, MAX_REQUEST, Request, Response, VERSION};

/// The default socket of an instance.
pub fn default_socket(instance: &str) -> PathBuf {
    PathBuf::from("/run/lb").join(format!("{instance}.sock"))
}

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A request handed to the agent's loop, with where to send its answer.
pub type Job = (Request, oneshot::Sender<Response<Answer>>);

/// Why the control socket cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another agent is answering on {}; stop it or use another --instance", path.display())]
    Taken { path: PathBuf },
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done: "creating", "restricting", "removing stale", ...
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Creates the socket, mode 0600, refusing to take over one that another agent
/// answers on. A missing parent directory is created 0700; an existing one is left
/// as it is (`--socket /tmp/lb.sock` must not lock everyone out of `/tmp`).
///
/// The socket is bound inside a fresh 0700 directory next to `path`, made 0600, and
/// only then renamed into place: there is no moment at which anyone but root could
/// connect, and no process-wide state (such as the umask) changes, so other threads
/// creating files meanwhile are unaffected.
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| BindError::Io { what, path, source }
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("restricting", dir))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(BindError::Taken {
                path: path.to_owned(),
            });
        }
        std::fs::remove_file(path).map_err(io("removing stale", path))?;
    }
    static BINDS: AtomicU32 = AtomicU32::new(0);
    let private = dir.join(format!(
        ".lb-bind-{}-{}",
        std::process::id(),
        BINDS.fetch_add(1, Ordering::Relaxed)
    ));
    // A leftover of a crashed earlier bind by a process with the same pid.
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(io("creating", &private))?;
    let staged = private.join("lb.sock");
    let bound = UnixListener::bind(&staged)
        .map_err(io("binding the control socket", path))
        .and_then(|listener| {
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
                .map_err(io("restricting", &staged))?;
            std::fs::rename(&staged, path).map_err(io("moving the control socket to", path))?;
            Ok(listener)
        });
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// Accepts connections until the task is dropped; each is served on its own task,
/// so one slow client never holds up another or the agent.
pub async fn serve(listener: UnixListener, agent: mpsc::Sender<Job>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let peer = Peer::of(&stream);
            let (read, mut write) = stream.into_split();
            let request = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(read)).await {
                Err(_) => Err("no request within 5 s".to_owned()),
                Ok(result) => result,
            };
            let response = match &request {
                Err(message) => Response::error(message.clone()),
                Ok(request) => {
                    let (tx, rx) = oneshot::channel();
                    if agent.send((request.clone(), tx)).await.is_err() {
                        Response::error("the agent is shutting down")
                    } else {
                        rx.await
                            .unwrap_or_else(|_| Response::error("the agent is shutting down"))
                    }
                }
            };
            log_request(&peer, &request, &response);
            let mut line = serde_json::to_vec(&response).unwrap_or_default();
            line.push(b'\n');
            let _ = write.write_all(&line).await;
        });
    }
}

/// Who is on the other end of a connection, by the kernel's word (SO_PEERCRED).
struct Peer {
    uid: Option<u32>,
    pid: Option<i32>,
}

impl Peer {
    fn of(stream: &tokio::net::UnixStream) -> Peer {
        match stream.peer_cred() {
            Ok(cred) => Peer {
                uid: Some(cred.uid()),
                pid: cred.pid(),
            },
            Err(_) => Peer {
                uid: None,
                pid: None,
            },
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let or_unknown = |v: Option<String>| v.unwrap_or_else(|| "?".to_owned());
        write!(
            f,
            "uid {} pid {}",
            or_unknown(self.uid.map(|u| u.to_string())),
            or_unknown(self.pid.map(|p| p.to_string()))
        )
    }
}

/// One event in the agent's log per request, with who asked (`uid`, `pid`), what
/// (`request`) and how it ended (`result` or `error`) as fields: `info` for one that
/// changes something (an operator action), `warn` for one that was refused or could
/// not be read, `debug` for a read (`lb top` asks every second).
fn log_request(peer: &Peer, request: &Result<Request, String>, response: &Response<Answer>) {
    let (uid, pid) = (peer.uid, peer.pid);
    match (request, response) {
        (Err(message), _) => warn!(uid, pid, error = %message, "control: unreadable request"),
        (Ok(request), Response::Error { error, .. }) => {
            warn!(uid, pid, request = %request, error = %error, "control: refused")
        }
        (Ok(request), Response::Ok { result, .. }) if request.changes_state() => {
            let outcome = match result {
                Answer::Change(change) => crate::cli::change::lines(change).join("; "),
                _ => "done".to_owned(),
            };
            info!(uid, pid, request = %request, result = %outcome, "control: operator action")
        }
        (Ok(request), Response::Ok { .. }) => {
            debug!(uid, pid, request = %request, "control: read")
        }
    }
}

async fn read_request(read: tokio::net::unix::OwnedReadHalf) -> Result<Request, String> {
    let mut reader = tokio::io::BufReader::new(read).take(MAX_REQUEST as u64 + 1);
    let mut line = Vec::new();
    reader
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("reading the request: {e}"))?;
    if line.len() > MAX_REQUEST {
        return Err(format!("request over {MAX_REQUEST} bytes"));
    }
    decode(&line)
}

/// Decodes and checks one request line.
pub fn decode(line: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(line).map_err(|_| "the request is not UTF-8".to_owned())?;
    let envelope: Envelope =
        serde_json::from_str(text.trim_end()).map_err(|e| format!("bad request: {e}"))?;
    if envelope.version != VERSION {
        return Err(format!(
            "protocol version {} is not supported (this agent speaks {VERSION})",
            envelope.version
        ));
    }
    Ok(envelope.request)
}

/// Why a request to the agent got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "permission denied on {}: the control socket is root-only; run this as root",
        socket.display()
    )]
    PermissionDenied { socket: PathBuf },
    #[error("the agent is not running (nothing answers on {})", socket.display())]
    NotRunning { socket: PathBuf },
    #[error("connecting to {}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent on {}", socket.display())]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent's answer is not what `{request}` expects: {answer:?}")]
    BadAnswer {
        request: String,
        answer: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the agent refused: {message}")]
    Refused { message: String },
}

/// Sends `request` to the agent at `socket` and returns its answer, read as `T` (the
/// answer type named in [`Request`]'s docs), or an error that says why there is none
/// (not running, not allowed, refused).
pub fn request<T: DeserializeOwned>(socket: &Path, request: Request) -> Result<T, ClientError> {
    let io = |source| ClientError::Io {
        socket: socket.to_owned(),
        source,
    };
    let mut stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(ClientError::PermissionDenied {
                socket: socket.to_owned(),
            });
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ClientError::NotRunning {
                socket: socket.to_owned(),
            });
        }
        Err(source) => {
            return Err(ClientError::Connect {
                socket: socket.to_owned(),
                source,
            });
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let what = request.to_string();
    let mut line = serde_json::to_vec(&Envelope {
        version: VERSION,
        request,
    })
    .expect("a request always encodes");
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    match serde_json::from_str::<Response<T>>(&answer) {
        Ok(Response::Ok { result, .. }) => Ok(result),
        Ok(Response::Error { error, .. }) => Err(ClientError::Refused { message: error }),
        Err(source) => Err(ClientError::BadAnswer {
            request: what,
            answer,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Change, Status};

    #[test]
    fn decode_checks_version_and_shape() {
        assert_eq!(
            decode(br#"{"version":1,"request":"status"}"#).unwrap(),
            Request::Status
        );
        assert!(
            decode(br#"{"version":2,"request":"status"}"#)
                .unwrap_err()
                .contains("version 2")
        );
        assert!(decode(b"\xff\xfe").unwrap_err().contains("UTF-8"));
        assert!(decode(br#"{"version":1}"#).is_err());
    }

    #[tokio::test]
    async fn socket_is_private_and_answers_and_refuses_oversized_requests() {
        let dir = std::env::temp_dir().join(format!("lb-control-test-{}", std::process::id()));
        let path = dir.join("t.sock");
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (tx, mut rx) = mpsc::channel::<Job>(4);
        let server = tokio::spawn(serve(listener, tx));
        let agent = tokio::spawn(async move {
            while let Some((req, reply)) = rx.recv().await {
                let _ = reply.send(match req {
                    Request::Status => Response::ok(Answer::Status(Box::new(Status {
                        instance: "echo".into(),
                        ..Status::default()
                    }))),
                    other => Response::error(format!("not here: {other}")),
                });
            }
        });
        let p = path.clone();
        let result: Status = tokio::task::spawn_blocking(move || request(&p, Request::Status))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(result.instance, "echo");
        let p = path.clone();
        let refused = tokio::task::spawn_blocking(move || request::<Change>(&p, Request::Reload))
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(&refused, ClientError::Refused { message } if message == "not here: reload"),
            "{refused}"
        );
        let p = path.clone();
        let big = tokio::task::spawn_blocking(move || {
            let mut s = UnixStream::connect(&p).unwrap();
            let _ = s.write_all(&vec![b'x'; MAX_REQUEST + 10]);
            let mut answer = String::new();
            BufReader::new(s).read_line(&mut answer).unwrap();
            answer
        })
        .await
        .unwrap();
        assert!(big.contains("over"), "{big}");
        // A second bind on a live socket is refused.
        assert!(
            bind(&path)
                .unwrap_err()
                .to_string()
                .contains("another agent")
        );
        server.abort();
        agent.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
