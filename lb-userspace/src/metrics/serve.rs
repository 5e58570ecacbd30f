//! The HTTP side of the metrics endpoint: [`serve`] answers `GET /metrics` with the
//! rendered snapshot; the agent starts it when `lb run` has a metrics address.

use std::future::Future;
use std::io;
use std::pin::pin;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout, timeout_at};

use super::encode::{MetricsSnapshot, render_owned};

/// The longest request line accepted (without its line end).
const MAX_REQUEST_LINE: usize = 8 * 1024;
/// The longest request head accepted: request line and header fields.
const MAX_HEAD: usize = 16 * 1024;
/// Connections served at once; more are closed as soon as they are accepted.
const MAX_CONNECTIONS: usize = 256;
/// What the body of a successful answer is.
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The HTTP side's time limits.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// To receive the whole request head, counted from the accept.
    read: Duration,
    /// To send the whole response.
    write: Duration,
    /// To send an error response after the client ran out of time.
    late_write: Duration,
    /// After the response: how long unread input is drained so that closing does not
    /// reset the connection before the client has read the answer.
    linger: Duration,
}

const LIMITS: Limits = Limits {
    read: Duration::from_secs(5),
    write: Duration::from_secs(5),
    late_write: Duration::from_secs(1),
    linger: Duration::from_secs(1),
};

/// Serves `GET /metrics` on `listener` until `shutdown` resolves; any other path → 404,
/// any other method → 405 (`HEAD /metrics` is answered too, without a body). Each
/// request is answered with the latest snapshot from `snapshot`.
///
/// Never panics on bad input: a request line over 8 KiB gets 414, a head over 16 KiB
/// 431, a client that has not sent its request head within 5 s 408, a malformed request
/// 400, and a client that goes away just a closed connection. Each connection has its
/// own task, so one client never blocks the others; at most 256 are served at once.
/// When `shutdown` resolves, connections still open are closed and this returns.
///
/// Returns an error only if accepting fails for a reason that is not about one
/// connection or a passing shortage of resources (those are logged and waited out).
pub async fn serve(
    listener: TcpListener,
    snapshot: watch::Receiver<MetricsSnapshot>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    serve_with(listener, snapshot, shutdown, LIMITS).await
}

async fn serve_with(
    listener: TcpListener,
    snapshot: watch::Receiver<MetricsSnapshot>,
    shutdown: impl Future<Output = ()>,
    limits: Limits,
) -> io::Result<()> {
    let mut shutdown = pin!(shutdown);
    let mut tasks: JoinSet<()> = JoinSet::new();
    let result = loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break Ok(()),
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = joined {
                    log::error!("metrics: a connection task failed: {e}");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if tasks.len() >= MAX_CONNECTIONS {
                        log::warn!("metrics: {MAX_CONNECTIONS} connections open, closing {peer}");
                        drop(stream);
                        continue;
                    }
                    let snapshot = snapshot.clone();
                    tasks.spawn(async move {
                        if let Err(e) = handle_connection(stream, snapshot, limits).await {
                            log::debug!("metrics: connection from {peer}: {e}");
                        }
                    });
                }
                Err(e) if is_connection_error(&e) => {
                    log::debug!("metrics: accept: {e}");
                }
                Err(e) if is_resource_error(&e) => {
                    log::warn!("metrics: accept: {e}; pausing");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => break Err(e),
            }
        }
    };
    tasks.shutdown().await;
    result
}

/// An accept error about one connection only: try the next.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
    ) || matches!(e.raw_os_error(), Some(libc::EPROTO | libc::EPERM))
}

/// An accept error from a passing shortage (descriptors, memory): wait and try again.
fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    ) || e.kind() == io::ErrorKind::OutOfMemory
}

/// Why a request head could not be taken.
#[derive(Debug)]
enum HeadError {
    /// The client closed or failed before sending a whole head: nothing to answer.
    Gone(Option<io::Error>),
    /// The request line is longer than [`MAX_REQUEST_LINE`].
    LineTooLong,
    /// The head is longer than [`MAX_HEAD`].
    HeadTooLarge,
    /// Not an HTTP/1.x request line.
    Malformed,
}

/// The part of a request that decides the answer.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    path: String,
}

async fn handle_connection(
    mut stream: TcpStream,
    snapshot: watch::Receiver<MetricsSnapshot>,
    limits: Limits,
) -> io::Result<()> {
    let started = Instant::now();
    let (response, write_limit) =
        match timeout_at(started + limits.read, read_head(&mut stream)).await {
            Err(_elapsed) => (
                Response::error(408, "Request Timeout", "request not received in time\n"),
                limits.late_write,
            ),
            Ok(Err(HeadError::Gone(e))) => return e.map_or(Ok(()), Err),
            Ok(Err(HeadError::LineTooLong)) => (
                Response::error(414, "URI Too Long", "request line too long\n"),
                limits.write,
            ),
            Ok(Err(HeadError::HeadTooLarge)) => (
                Response::error(
                    431,
                    "Request Header Fields Too Large",
                    "request head too large\n",
                ),
                limits.write,
            ),
            Ok(Err(HeadError::Malformed)) => (
                Response::error(400, "Bad Request", "malformed request\n"),
                limits.write,
            ),
            Ok(Ok(request)) => (respond(&request, &snapshot), limits.write),
        };
    let bytes = response.to_bytes();
    match timeout(write_limit, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await
    {
        Err(_elapsed) => return Err(io::Error::new(io::ErrorKind::TimedOut, "writing")),
        Ok(r) => r?,
    }
    // Read and discard what the client may still send (the rest of an oversized head,
    // a body), a bounded amount for a bounded time, so that closing with unread input
    // does not reset the connection before the client has read the answer.
    let _ = timeout(limits.linger, async {
        let mut sink = [0u8; 4096];
        let mut left = 64 * 1024usize;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
    Ok(())
}

/// Reads up to the end of the request head (the empty line) and parses its request
/// line. Header fields are read past, not interpreted; a body is never read.
async fn read_head(stream: &mut TcpStream) -> Result<Request, HeadError> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let mut request: Option<Request> = None;
    // Where the search for line ends goes on from.
    let mut scanned = 0;
    loop {
        let room = MAX_HEAD + 1 - buf.len();
        let want = room.min(chunk.len());
        let n = match stream.read(&mut chunk[..want]).await {
            Ok(0) => return Err(HeadError::Gone(None)),
            Ok(n) => n,
            Err(e) => return Err(HeadError::Gone(Some(e))),
        };
        buf.extend_from_slice(&chunk[..n]);
        while let Some(offset) = buf[scanned..].iter().position(|&b| b == b'\n') {
            let end = scanned + offset;
            scanned = end + 1;
            match &request {
                None => {
                    let line = strip_cr(&buf[..end]);
                    if line.len() > MAX_REQUEST_LINE {
                        return Err(HeadError::LineTooLong);
                    }
                    request = Some(parse_request_line(line).ok_or(HeadError::Malformed)?);
                }
                Some(_) => {
                    // The line that ends here started after the previous line end.
                    let start = buf[..end]
                        .iter()
                        .rposition(|&b| b == b'\n')
                        .map_or(0, |p| p + 1);
                    if strip_cr(&buf[start..end]).is_empty() {
                        return request.ok_or(HeadError::Malformed);
                    }
                }
            }
        }
        if request.is_none() && buf.len() > MAX_REQUEST_LINE + 1 {
            // No line end yet, and the line is already over the limit (allowing one
            // byte for a CR that may precede the LF).
            return Err(HeadError::LineTooLong);
        }
        if buf.len() > MAX_HEAD {
            return Err(HeadError::HeadTooLarge);
        }
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// `METHOD SP request-target SP HTTP/1.x`, or `None`.
fn parse_request_line(line: &[u8]) -> Option<Request> {
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let is_token_char = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if method.is_empty() || !method.chars().all(is_token_char) {
        return None;
    }
    if target.is_empty() || target.chars().any(|c| c.is_control()) {
        return None;
    }
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") {
        return None;
    }
    let path = target.split_once('?').map_or(target, |(path, _query)| path);
    Some(Request {
        method: method.to_string(),
        path: path.to_string(),
    })
}

/// The answer to a well-formed request.
fn respond(request: &Request, snapshot: &watch::Receiver<MetricsSnapshot>) -> Response {
    if request.path != "/metrics" {
        return Response::error(404, "Not Found", "not found; try /metrics\n");
    }
    let head_only = match request.method.as_str() {
        "GET" => false,
        "HEAD" => true,
        _ => {
            let mut response =
                Response::error(405, "Method Not Allowed", "only GET and HEAD are allowed\n");
            response.allow = true;
            return response;
        }
    };
    // Copy the snapshot out so that the sender is not held up while rendering.
    let current = snapshot.borrow().clone();
    Response {
        status: 200,
        reason: "OK",
        content_type: METRICS_CONTENT_TYPE,
        body: render_owned(current),
        allow: false,
        head_only,
    }
}

#[derive(Debug)]
struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: String,
    /// Send `Allow: GET, HEAD`.
    allow: bool,
    /// Send the head but not the body (an answer to HEAD).
    head_only: bool,
}

impl Response {
    fn error(status: u16, reason: &'static str, body: &str) -> Self {
        Self {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            body: body.to_string(),
            allow: false,
            head_only: false,
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        );
        if self.allow {
            out.push_str("Allow: GET, HEAD\r\n");
        }
        out.push_str("\r\n");
        if !self.head_only {
            out.push_str(&self.body);
        }
        out.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use lb_common::types::GlobalStats;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    use super::*;

    /// A snapshot with one known number in it.
    fn sample() -> MetricsSnapshot {
        MetricsSnapshot {
            global: GlobalStats {
                conn_miss_non_syn: 7,
                ..GlobalStats::default()
            },
            ..MetricsSnapshot::default()
        }
    }

    #[test]
    fn request_lines_are_parsed_strictly() {
        let ok = |method: &str, path: &str| {
            Some(Request {
                method: method.into(),
                path: path.into(),
            })
        };
        assert_eq!(
            parse_request_line(b"GET /metrics HTTP/1.1"),
            ok("GET", "/metrics")
        );
        assert_eq!(
            parse_request_line(b"GET /metrics?x=1 HTTP/1.0"),
            ok("GET", "/metrics")
        );
        for bad in [
            &b""[..],
            b"GET /metrics",
            b"GET  /metrics HTTP/1.1",
            b"GET /metrics HTTP/2.0",
            b"GET /metrics HTTP/1.1 extra",
            b"G\xffT /metrics HTTP/1.1",
            b"GE(T /metrics HTTP/1.1",
            b"GET /me\x01trics HTTP/1.1",
        ] {
            assert_eq!(
                parse_request_line(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// A server on 127.0.0.1 with its shutdown trigger and the task it runs in.
    struct Server {
        addr: SocketAddr,
        stop: oneshot::Sender<()>,
        task: JoinHandle<io::Result<()>>,
        /// Kept so that the snapshot stays published.
        _publish: watch::Sender<MetricsSnapshot>,
    }

    async fn start(limits: Limits) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (publish, snapshot) = watch::channel(sample());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_with(
            listener,
            snapshot,
            async {
                let _ = stopped.await;
            },
            limits,
        ));
        Server {
            addr,
            stop,
            task,
            _publish: publish,
        }
    }

    impl Server {
        async fn stop(self) {
            let _ = self.stop.send(());
            let result = timeout(Duration::from_secs(2), self.task)
                .await
                .expect("serve returns soon after shutdown")
                .expect("serve did not panic");
            result.expect("serve returned Ok");
        }
    }

    /// Sends `raw`, then reads the answer to the end (bounded in time).
    async fn exchange(addr: SocketAddr, raw: &[u8]) -> io::Result<String> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(raw).await?;
        let mut answer = Vec::new();
        timeout(Duration::from_secs(3), stream.read_to_end(&mut answer))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))??;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }

    fn status(answer: &str) -> &str {
        answer.lines().next().unwrap_or("")
    }

    #[tokio::test]
    async fn serves_metrics_over_tcp() {
        let server = start(LIMITS).await;
        let answer = exchange(
            server.addr,
            b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
        )
        .await
        .unwrap();
        assert_eq!(status(&answer), "HTTP/1.1 200 OK", "{answer}");
        let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
        assert!(
            head.contains(&format!("Content-Type: {METRICS_CONTENT_TYPE}")),
            "{head}"
        );
        assert!(head.contains("Connection: close"), "{head}");
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        assert!(
            body.lines()
                .any(|l| l == r#"lb_conntrack_total{result="miss_non_syn"} 7"#),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"));

        // HEAD: the same head, no body. Bare LF line ends are accepted.
        let answer = exchange(server.addr, b"HEAD /metrics HTTP/1.0\n\n")
            .await
            .unwrap();
        assert_eq!(status(&answer), "HTTP/1.1 200 OK", "{answer}");
        assert!(answer.ends_with("\r\n\r\n"), "{answer}");
        server.stop().await;
    }

    #[tokio::test]
    async fn answers_the_latest_snapshot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (publish, snapshot) = watch::channel(MetricsSnapshot::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, snapshot, async {
            let _ = stopped.await;
        }));
        let get = b"GET /metrics HTTP/1.1\r\n\r\n";
        let answer = exchange(addr, get).await.unwrap();
        assert!(
            answer.contains("\nlb_datapath_frames_total 0\n"),
            "{answer}"
        );
        publish.send_modify(|s| s.global.rx_frames = 42);
        let answer = exchange(addr, get).await.unwrap();
        assert!(
            answer.contains("\nlb_datapath_frames_total 42\n"),
            "{answer}"
        );
        stop.send(()).unwrap();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn other_paths_get_404_and_other_methods_405() {
        let server = start(LIMITS).await;
        let answer = exchange(server.addr, b"GET /other HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(status(&answer), "HTTP/1.1 404 Not Found", "{answer}");
        let answer = exchange(server.addr, b"GET /metricsx HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(status(&answer), "HTTP/1.1 404 Not Found", "{answer}");

        let answer = exchange(
            server.addr,
            b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        )
        .await
        .unwrap();
        assert_eq!(
            status(&answer),
            "HTTP/1.1 405 Method Not Allowed",
            "{answer}"
        );
        assert!(answer.contains("\r\nAllow: GET, HEAD\r\n"), "{answer}");
        assert!(!answer.contains("lb_"), "{answer}");
        server.stop().await;
    }

    #[tokio::test]
    async fn garbage_gets_400() {
        let server = start(LIMITS).await;
        for garbage in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"[..],
            b"hello\n\n",
            b"GET /metrics HTTP/9.9\r\n\r\n",
        ] {
            let answer = exchange(server.addr, garbage).await.unwrap();
            assert_eq!(status(&answer), "HTTP/1.1 400 Bad Request", "{answer}");
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn an_overlong_request_line_gets_414_or_a_close() {
        let server = start(LIMITS).await;
        let mut raw = b"GET /".to_vec();
        raw.resize(16 * 1024, b'a');
        raw.extend_from_slice(b" HTTP/1.1\r\n\r\n");
        match exchange(server.addr, &raw).await {
            Ok(answer) => assert!(
                answer.is_empty() || status(&answer) == "HTTP/1.1 414 URI Too Long",
                "{answer}"
            ),
            Err(e) => assert_ne!(e.kind(), io::ErrorKind::TimedOut, "{e}"),
        }
        // An overlong head of many short header lines is refused too.
        let mut raw = b"GET /metrics HTTP/1.1\r\n".to_vec();
        for i in 0..2000 {
            raw.extend_from_slice(format!("X-Filler-{i}: x\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        match exchange(server.addr, &raw).await {
            Ok(answer) => assert!(
                answer.is_empty() || status(&answer).starts_with("HTTP/1.1 431 "),
                "{answer}"
            ),
            Err(e) => assert_ne!(e.kind(), io::ErrorKind::TimedOut, "{e}"),
        }
        // The server is still serving.
        let answer = exchange(server.addr, b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(status(&answer), "HTTP/1.1 200 OK");
        server.stop().await;
    }

    #[tokio::test]
    async fn a_silent_client_does_not_block_another() {
        let server = start(LIMITS).await;
        let _silent = TcpStream::connect(server.addr).await.unwrap();
        let mut partial = TcpStream::connect(server.addr).await.unwrap();
        partial.write_all(b"GET /metr").await.unwrap();
        let started = std::time::Instant::now();
        let answer = exchange(server.addr, b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(status(&answer), "HTTP/1.1 200 OK", "{answer}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // Shutting down does not wait for the silent clients' deadlines.
        server.stop().await;
    }

    #[tokio::test]
    async fn a_slow_client_gets_408_after_the_deadline() {
        let limits = Limits {
            read: Duration::from_millis(200),
            ..LIMITS
        };
        let server = start(limits).await;
        let mut slow = TcpStream::connect(server.addr).await.unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        let started = std::time::Instant::now();
        let mut answer = Vec::new();
        timeout(Duration::from_secs(3), slow.read_to_end(&mut answer))
            .await
            .expect("closed by the server")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert_eq!(status(&answer), "HTTP/1.1 408 Request Timeout", "{answer}");
        assert!(started.elapsed() >= Duration::from_millis(150));
        server.stop().await;
    }
}
