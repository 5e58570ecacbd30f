//! The HTTP side of the metrics endpoint: [`serve`] answers `GET /metrics` with the
//! latest snapshot, rendered, through axum's router on hyper's HTTP/1.1 server; the
//! agent spawns it when `lb run` has a metrics address.

use std::future::Future;
use std::io;
use std::pin::pin;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout, timeout_at};

use super::encode::{MetricsSnapshot, render_owned};

/// The longest request target (path and query) accepted.
const MAX_REQUEST_TARGET: usize = 8 * 1024;
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
    head: Duration,
    /// For the whole connection, counted from the accept: head, answer and sending it.
    connection: Duration,
    /// After shutdown: how long answers under way may take to finish.
    grace: Duration,
}

/// The time limits in force.
const LIMITS: Limits = Limits {
    head: Duration::from_secs(5),
    connection: Duration::from_secs(10),
    grace: Duration::from_secs(1),
};

/// Why [`serve`] stopped serving before its shutdown future resolved.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Accepting failed for a reason that is neither about one connection nor a
    /// passing shortage of resources.
    #[error("accepting a connection to the metrics endpoint: {0}")]
    Accept(#[source] io::Error),
}

/// Why one connection ended without a whole exchange, for the debug log.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    /// hyper gave up on the connection: a malformed or oversized request head (answered
    /// with 400 or 431 first), a request head not received in time, or a client that
    /// went away.
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// The connection was still open at its deadline and was closed.
    #[error("still open at its deadline; closed")]
    Deadline,
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves; any other path → 404,
/// any other method → 405 with `Allow: GET, HEAD` (`HEAD /metrics` is answered too,
/// without a body). Each request is answered with the latest snapshot from `snapshot`,
/// with the OpenMetrics content type.
///
/// The router is axum's, the HTTP/1.1 server hyper's. Never panics on bad input: a
/// request target over 8 KiB gets 414, a head over 16 KiB 431, a malformed request
/// 400, a client that has not sent its request head within 5 s a closed connection,
/// and so does every connection still open 10 s after it was accepted. Each connection
/// has its own task and serves one request (`Connection: close`), so one client never
/// blocks the others; at most 256 are served at once. When `shutdown` resolves, the
/// listener is closed, connections that have sent nothing are closed at once, the others
/// (an answer under way, a request head still coming in) get 1 s to finish before they
/// are closed too, and this returns.
///
/// Returns an error only if accepting fails for a reason that is not about one
/// connection or a passing shortage of resources (those are logged and waited out).
pub async fn serve(
    listener: TcpListener,
    snapshot: watch::Receiver<MetricsSnapshot>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    serve_with(listener, snapshot, shutdown, LIMITS).await
}

/// [`serve`] with the given time limits (the tests shorten them).
async fn serve_with(
    listener: TcpListener,
    snapshot: watch::Receiver<MetricsSnapshot>,
    shutdown: impl Future<Output = ()>,
    limits: Limits,
) -> Result<(), ServeError> {
    let app = router(snapshot);
    let http = http_server(limits);
    // Turns true when the connections are to finish what they are doing and close.
    let (closing, closing_rx) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    let mut tasks: JoinSet<()> = JoinSet::new();
    let result = loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break Ok(()),
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = joined {
                    tracing::error!("metrics: a connection task failed: {e}");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if tasks.len() >= MAX_CONNECTIONS {
                        tracing::warn!("metrics: {MAX_CONNECTIONS} connections open, closing {peer}");
                        drop(stream);
                        continue;
                    }
                    let deadline = Instant::now() + limits.connection;
                    let connection = http.serve_connection(
                        TokioIo::new(stream),
                        TowerToHyperService::new(app.clone()),
                    );
                    let closing = closing_rx.clone();
                    tasks.spawn(async move {
                        if let Err(e) = drive(connection, closing, deadline).await {
                            tracing::debug!("metrics: connection from {peer}: {e}");
                        }
                    });
                }
                Err(e) if is_connection_error(&e) => {
                    tracing::debug!("metrics: accept: {e}");
                }
                Err(e) if is_resource_error(&e) => {
                    tracing::warn!("metrics: accept: {e}; pausing");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => break Err(ServeError::Accept(e)),
            }
        }
    };
    drop(listener);
    closing.send_replace(true);
    let finished = timeout(limits.grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::debug!(
            "metrics: closing {} connections still busy {:?} after shutdown",
            tasks.len(),
            limits.grace
        );
        tasks.shutdown().await;
    }
    result
}

/// hyper's HTTP/1.1 server with the endpoint's bounds: one request per connection, a
/// bounded head received within `limits.head`.
fn http_server(limits: Limits) -> http1::Builder {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.head)
        .max_header_size(MAX_HEAD)
        .keep_alive(false)
        .title_case_headers(true);
    http
}

/// The routes: `/metrics` and `/ready` for GET and HEAD, 405 for their other methods,
/// 404 elsewhere.
fn router(snapshot: watch::Receiver<MetricsSnapshot>) -> Router {
    Router::new()
        .route("/metrics", get(metrics).fallback(method_not_allowed))
        .route("/ready", get(ready).fallback(method_not_allowed))
        .fallback(not_found)
        .layer(middleware::from_fn(bound_target))
        .with_state(snapshot)
}

/// One accepted connection, served by hyper with the router.
type Connection = http1::Connection<TokioIo<TcpStream>, TowerToHyperService<Router>>;

/// Drives `connection` to its end or to `deadline`, whichever comes first. When
/// `closing` turns true, hyper is told to shut down gracefully: a connection that has
/// sent nothing is closed at once, a request under way is still answered (the caller
/// bounds how long that may take).
async fn drive(
    connection: Connection,
    mut closing: watch::Receiver<bool>,
    deadline: Instant,
) -> Result<(), ConnectionError> {
    let mut connection = pin!(connection);
    let mut asked_to_finish = false;
    let served = async {
        loop {
            tokio::select! {
                result = connection.as_mut() => return result,
                // An error here means the server is gone: finish all the same.
                _ = closing.wait_for(|&closing| closing), if !asked_to_finish => {
                    asked_to_finish = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    };
    match timeout_at(deadline, served).await {
        Ok(result) => Ok(result?),
        Err(_elapsed) => Err(ConnectionError::Deadline),
    }
}

/// Answers a request whose target is too long with 414 before it is routed.
async fn bound_target(request: Request, next: Next) -> Response {
    let target = request
        .uri()
        .path_and_query()
        .map_or(0, |t| t.as_str().len());
    if target > MAX_REQUEST_TARGET {
        return (StatusCode::URI_TOO_LONG, "request target too long\n").into_response();
    }
    next.run(request).await
}

/// `GET /metrics`: the latest snapshot, rendered.
async fn metrics(State(snapshot): State<watch::Receiver<MetricsSnapshot>>) -> Response {
    // Copy the snapshot out so that the sender is not held up while rendering.
    let current = snapshot.borrow().clone();
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        render_owned(current),
    )
        .into_response()
}

/// `/ready`: 200 when this LB may take traffic (a router's announcement follows
/// it, see `deploy/bird/`), else 503 with what it waits for.
async fn ready(State(snapshot): State<watch::Receiver<MetricsSnapshot>>) -> Response {
    let readiness = snapshot.borrow().readiness.clone();
    if readiness.ready {
        (StatusCode::OK, "ready\n".to_owned()).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: waiting for {}\n",
                readiness.waiting_for.join("; ")
            ),
        )
            .into_response()
    }
}

/// Any method but GET and HEAD on `/metrics` or `/ready`.
async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::ALLOW, "GET, HEAD")],
        "only GET and HEAD are allowed\n",
    )
        .into_response()
}

/// Any path but `/metrics`.
async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found; try /metrics\n").into_response()
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use lb_common::types::GlobalStats;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

    /// A server on 127.0.0.1 with its shutdown trigger and the task it runs in.
    struct Server {
        addr: SocketAddr,
        stop: oneshot::Sender<()>,
        task: JoinHandle<Result<(), ServeError>>,
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

    /// The status code of an HTTP/1.0 or HTTP/1.1 answer, e.g. `"200"`.
    fn code(answer: &str) -> &str {
        status(answer)
            .strip_prefix("HTTP/1.")
            .and_then(|rest| rest.get(2..5))
            .unwrap_or("")
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
            head.contains(&format!("\r\nContent-Type: {METRICS_CONTENT_TYPE}\r\n")),
            "{head}"
        );
        assert!(head.contains("\r\nConnection: close\r\n"), "{head}");
        assert!(
            head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())),
            "{head}"
        );
        assert!(
            body.lines()
                .any(|l| l == r#"lb_conntrack_total{result="miss_non_syn"} 7"#),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"));

        // HEAD: the same head, no body. Bare LF line ends are accepted. hyper answers
        // an HTTP/1.0 request in HTTP/1.0.
        let answer = exchange(server.addr, b"HEAD /metrics HTTP/1.0\n\n")
            .await
            .unwrap();
        assert_eq!(status(&answer), "HTTP/1.0 200 OK", "{answer}");
        assert!(
            answer.contains(&format!("\r\nContent-Type: {METRICS_CONTENT_TYPE}\r\n")),
            "{answer}"
        );
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
        // Once `serve` has returned, the listener is closed.
        let refused = TcpStream::connect(addr).await;
        assert!(refused.is_err(), "{refused:?}");
    }

    /// `/ready` follows the snapshot's readiness: 503 naming what it waits for, then 200.
    #[tokio::test]
    async fn ready_says_what_it_waits_for() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (publish, snapshot) = watch::channel(MetricsSnapshot {
            readiness: crate::api::Readiness {
                ready: false,
                waiting_for: vec!["the flows of lb-b".into()],
            },
            ..MetricsSnapshot::default()
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, snapshot, async {
            let _ = stopped.await;
        }));
        let get = b"GET /ready HTTP/1.1\r\n\r\n";
        let answer = exchange(addr, get).await.unwrap();
        assert_eq!(code(&answer), "503", "{answer}");
        assert!(
            answer.ends_with("not ready: waiting for the flows of lb-b\n"),
            "{answer}"
        );
        publish.send_modify(|s| s.readiness = crate::api::Readiness::ready());
        let answer = exchange(addr, get).await.unwrap();
        assert_eq!(code(&answer), "200", "{answer}");
        assert!(answer.ends_with("ready\n"), "{answer}");
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
    async fn request_lines_are_checked_strictly() {
        let server = start(LIMITS).await;
        for good in [
            &b"GET /metrics HTTP/1.1\r\n\r\n"[..],
            b"GET /metrics?x=1 HTTP/1.0\r\n\r\n",
        ] {
            let answer = exchange(server.addr, good).await.unwrap();
            assert_eq!(code(&answer), "200", "{answer}");
            assert!(answer.ends_with("# EOF\n"), "{answer}");
        }
        for bad in [
            &b"GET /metrics\r\n\r\n"[..],
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/2.0\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            b"G\xffT /metrics HTTP/1.1\r\n\r\n",
            b"GE(T /metrics HTTP/1.1\r\n\r\n",
            b"GET /me\x01trics HTTP/1.1\r\n\r\n",
        ] {
            let answer = exchange(server.addr, bad).await.unwrap();
            assert_eq!(
                status(&answer),
                "HTTP/1.1 400 Bad Request",
                "{:?} got {answer}",
                String::from_utf8_lossy(bad)
            );
        }
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
    async fn an_overlong_request_gets_414_431_or_a_close() {
        let server = start(LIMITS).await;
        // A request target over 8 KiB in a head under 16 KiB: 414, on any path.
        for prefix in ["/metrics?", "/"] {
            let mut raw = format!("GET {prefix}").into_bytes();
            raw.resize(10 * 1024, b'a');
            raw.extend_from_slice(b" HTTP/1.1\r\n\r\n");
            let answer = exchange(server.addr, &raw).await.unwrap();
            assert_eq!(status(&answer), "HTTP/1.1 414 URI Too Long", "{answer}");
        }
        // A request line over the head's bound: 431 or a closed connection.
        let mut raw = b"GET /".to_vec();
        raw.resize(16 * 1024, b'a');
        raw.extend_from_slice(b" HTTP/1.1\r\n\r\n");
        match exchange(server.addr, &raw).await {
            Ok(answer) => assert!(
                answer.is_empty() || status(&answer).starts_with("HTTP/1.1 431 "),
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
        // Shutting down does not wait for the silent clients' deadlines (5 s), only for
        // the grace given to the one that has sent part of a request (1 s).
        server.stop().await;
    }

    /// Reads from `stream` until the server closes it (bounded in time) and returns what
    /// was read; a reset counts as a close.
    async fn read_until_closed(stream: &mut TcpStream) -> String {
        let mut answer = Vec::new();
        match timeout(Duration::from_secs(3), stream.read_to_end(&mut answer))
            .await
            .expect("closed by the server")
        {
            Ok(_) => {}
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        }
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn a_slow_client_is_dropped_after_the_head_deadline() {
        let limits = Limits {
            head: Duration::from_millis(200),
            ..LIMITS
        };
        let server = start(limits).await;
        let mut slow = TcpStream::connect(server.addr).await.unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        let started = std::time::Instant::now();
        let answer = read_until_closed(&mut slow).await;
        assert!(!answer.contains(" 200 "), "{answer}");
        assert!(started.elapsed() >= Duration::from_millis(150));
        // So is one that sends nothing at all.
        let mut silent = TcpStream::connect(server.addr).await.unwrap();
        let started = std::time::Instant::now();
        let answer = read_until_closed(&mut silent).await;
        assert!(!answer.contains(" 200 "), "{answer}");
        assert!(started.elapsed() >= Duration::from_millis(150));
        server.stop().await;
    }

    #[tokio::test]
    async fn a_connection_is_closed_at_its_deadline() {
        // The head's own deadline is out of reach: only the connection's applies.
        let limits = Limits {
            connection: Duration::from_millis(300),
            ..LIMITS
        };
        let server = start(limits).await;
        let mut slow = TcpStream::connect(server.addr).await.unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        let started = std::time::Instant::now();
        let answer = read_until_closed(&mut slow).await;
        assert!(answer.is_empty(), "{answer}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < LIMITS.head,
            "{took:?}"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn shutdown_lets_a_request_under_way_finish() {
        let Server {
            addr,
            stop,
            task,
            _publish,
        } = start(LIMITS).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /metrics HTTP/1.1\r\n")
            .await
            .unwrap();
        // The test runtime has one thread: while this sleeps, the server takes the
        // connection and reads the first part of the head.
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The listener is closed, but the request under way is still answered.
        let refused = TcpStream::connect(addr).await;
        assert!(refused.is_err(), "{refused:?}");
        client.write_all(b"Host: localhost\r\n\r\n").await.unwrap();
        let answer = read_until_closed(&mut client).await;
        assert_eq!(status(&answer), "HTTP/1.1 200 OK", "{answer}");
        assert!(answer.ends_with("# EOF\n"), "{answer}");
        let result = timeout(Duration::from_secs(2), task)
            .await
            .expect("serve returns soon after shutdown")
            .expect("serve did not panic");
        result.expect("serve returned Ok");
    }
}
