//! A minimal HTTP/1.1 client for `GET` on tokio, just enough for metrics endpoints and
//! health checks: plain HTTP, one request per connection (`Connection: close`), bodies
//! delimited by `Content-Length`, by chunked transfer coding or by the end of the
//! connection, each read up to a byte limit.
//!
//! Nothing here has a deadline of its own: callers wrap a whole exchange in
//! `tokio::time::timeout`, which bounds a silent or trickling server as well.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::CollectError;

/// The most the response head (status line and headers) may take.
pub const MAX_HEAD_BYTES: u64 = 64 * 1024;

/// The most one chunk-size line or trailer line may take.
const MAX_CHUNK_LINE: u64 = 4 * 1024;

/// How many interim (1xx) responses are skipped before giving up.
const MAX_INTERIM: usize = 4;

/// A parsed `http://host[:port]/path` address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl {
    /// The host as written, without brackets for IPv6.
    pub host: String,
    pub port: u16,
    /// The path and query, starting with `/`.
    pub path: String,
}

impl HttpUrl {
    /// Parses a URL; only plain `http://` with a host, an optional port, path and query.
    pub fn parse(url: &str) -> Result<HttpUrl, CollectError> {
        let bad = |reason: &'static str| CollectError::BadUrl {
            url: url.to_owned(),
            reason,
        };
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("only plain http:// URLs are supported"))?;
        if rest.contains('#') {
            return Err(bad("a fragment (#...) is not allowed"));
        }
        if rest
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(bad("whitespace or control characters"));
        }
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        if authority.contains('@') {
            return Err(bad("user information is not allowed"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed [ in the host"))?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad("not an IPv6 address inside [ ]"));
            }
            match after {
                "" => (host, None),
                p => (
                    host,
                    Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?),
                ),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if !authority.starts_with('[')
            && !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
        {
            return Err(bad("the host has characters a host name cannot have"));
        }
        let port = match port {
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("the port is not a number from 1 to 65535"))?,
        };
        Ok(HttpUrl {
            host: host.to_owned(),
            port,
            path,
        })
    }

    /// The `Host` header value.
    pub fn host_header(&self) -> String {
        host_header(&self.host, self.port)
    }
}

/// Formats a `Host` header for a host name or address and a port.
pub fn host_header(host: &str, port: u16) -> String {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    if port == 80 {
        host
    } else {
        format!("{host}:{port}")
    }
}

/// Opens a TCP connection to the URL's host, resolving a name if needed and trying
/// each address in turn.
pub async fn connect(url: &HttpUrl) -> Result<TcpStream, CollectError> {
    let addrs: Vec<SocketAddr> = match url.host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, url.port)],
        Err(_) => tokio::net::lookup_host((url.host.as_str(), url.port))
            .await
            .map_err(|source| CollectError::Resolve {
                host: url.host.clone(),
                source,
            })?
            .collect(),
    };
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(source) => last = Some(CollectError::Connect { addr, source }),
        }
    }
    Err(last.unwrap_or_else(|| CollectError::Resolve {
        host: url.host.clone(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
    }))
}

/// Writes a `GET` request that closes the connection after the response.
pub async fn send_get(
    stream: &mut TcpStream,
    host_header: &str,
    path: &str,
    accept: &str,
) -> Result<(), CollectError> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: lb-collect\r\n\
         Accept: {accept}\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|source| CollectError::Io { source })
}

/// How the body of a response ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    Close,
}

/// A response's status line and the headers that matter here.
#[derive(Debug)]
pub struct Head {
    pub status: u16,
    framing: Framing,
    /// When the head was complete.
    pub at: Instant,
}

/// A complete response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// When the response head arrived: the server had produced its answer by then.
    pub head_at: Instant,
}

fn bad_response(reason: impl Into<String>) -> CollectError {
    CollectError::BadResponse {
        reason: reason.into(),
    }
}

/// Reads one line ending in `\n` of at most `limit` bytes, without the line end.
/// `Ok(None)` at the end of the stream before any byte.
async fn read_line<R: AsyncBufReadExt + Unpin>(
    reader: &mut R,
    limit: u64,
    what: &str,
) -> Result<Option<Vec<u8>>, CollectError> {
    let mut line = Vec::new();
    let n = (&mut *reader)
        .take(limit)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|source| CollectError::Io { source })?;
    if n == 0 {
        return Ok(None);
    }
    if !line.ends_with(b"\n") {
        if n as u64 >= limit {
            return Err(bad_response(format!("{what} longer than {limit} bytes")));
        }
        return Err(bad_response(format!("connection closed inside the {what}")));
    }
    line.pop();
    if line.ends_with(b"\r") {
        line.pop();
    }
    Ok(Some(line))
}

/// Reads the status line and headers, skipping interim 1xx responses.
pub async fn read_head<R: AsyncBufReadExt + Unpin>(reader: &mut R) -> Result<Head, CollectError> {
    let mut budget = MAX_HEAD_BYTES;
    for _ in 0..=MAX_INTERIM {
        let status_line = read_line(reader, budget, "response head")
            .await?
            .ok_or_else(|| bad_response("connection closed before a response"))?;
        budget = budget.saturating_sub(status_line.len() as u64 + 2);
        let status = parse_status_line(&status_line)?;
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut has_te = false;
        loop {
            if budget == 0 {
                return Err(bad_response(format!(
                    "response head longer than {MAX_HEAD_BYTES} bytes"
                )));
            }
            let line = read_line(reader, budget, "response head")
                .await?
                .ok_or_else(|| bad_response("connection closed inside the response head"))?;
            budget = budget.saturating_sub(line.len() as u64 + 2);
            if line.is_empty() {
                break;
            }
            let line = std::str::from_utf8(&line)
                .map_err(|_| bad_response("a header line is not UTF-8"))?;
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| bad_response(format!("header line without a colon: {line:?}")))?;
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                let n = value
                    .parse::<u64>()
                    .map_err(|_| bad_response(format!("bad Content-Length {value:?}")))?;
                if length.is_some_and(|l| l != n) {
                    return Err(bad_response("conflicting Content-Length headers"));
                }
                length = Some(n);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                has_te = true;
                // The last coding decides; anything but a plain `chunked` is unsupported.
                let last = value.rsplit(',').next().unwrap_or("").trim();
                chunked = last.eq_ignore_ascii_case("chunked")
                    && value
                        .split(',')
                        .all(|c| c.trim().eq_ignore_ascii_case("chunked"));
                if !chunked {
                    return Err(bad_response(format!(
                        "unsupported Transfer-Encoding {value:?}"
                    )));
                }
            } else if name.eq_ignore_ascii_case("content-encoding")
                && !value.eq_ignore_ascii_case("identity")
            {
                return Err(bad_response(format!(
                    "unsupported Content-Encoding {value:?}"
                )));
            }
        }
        if (100..200).contains(&status) {
            continue;
        }
        let framing = if status == 204 || status == 304 {
            Framing::None
        } else if has_te && chunked {
            Framing::Chunked
        } else if let Some(n) = length {
            Framing::Length(n)
        } else {
            Framing::Close
        };
        return Ok(Head {
            status,
            framing,
            at: Instant::now(),
        });
    }
    Err(bad_response("too many interim (1xx) responses"))
}

fn parse_status_line(line: &[u8]) -> Result<u16, CollectError> {
    let text = String::from_utf8_lossy(line);
    let mut parts = text.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let code = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(bad_response(format!(
            "not an HTTP/1.x status line: {text:?}"
        )));
    }
    code.parse::<u16>()
        .ok()
        .filter(|c| (100..600).contains(c))
        .ok_or_else(|| bad_response(format!("bad status code {code:?}")))
}

/// Reads the body that `head` announced, keeping at most `max_bytes` of it: a longer
/// body is `Oversize` as soon as that is known, without reading the rest.
pub async fn read_body<R: AsyncBufReadExt + Unpin>(
    reader: &mut R,
    head: &Head,
    max_bytes: usize,
) -> Result<Vec<u8>, CollectError> {
    let limit = max_bytes as u64;
    let oversize = || CollectError::Oversize { limit: max_bytes };
    match head.framing {
        Framing::None => Ok(Vec::new()),
        Framing::Length(n) => {
            if n > limit {
                return Err(oversize());
            }
            let body = read_exactly(reader, n).await?;
            if (body.len() as u64) < n {
                return Err(bad_response(format!(
                    "body ended after {} of {n} bytes (Content-Length)",
                    body.len()
                )));
            }
            Ok(body)
        }
        Framing::Close => {
            let mut body = Vec::new();
            (&mut *reader)
                .take(limit + 1)
                .read_to_end(&mut body)
                .await
                .map_err(|source| CollectError::Io { source })?;
            if body.len() as u64 > limit {
                return Err(oversize());
            }
            Ok(body)
        }
        Framing::Chunked => {
            let mut body = Vec::new();
            loop {
                let line = read_line(reader, MAX_CHUNK_LINE, "chunk size line")
                    .await?
                    .ok_or_else(|| bad_response("connection closed before the last chunk"))?;
                let text = String::from_utf8_lossy(&line);
                let size = text.split(';').next().unwrap_or("").trim();
                if size.is_empty() || size.len() > 15 {
                    return Err(bad_response(format!("bad chunk size {size:?}")));
                }
                let size = u64::from_str_radix(size, 16)
                    .map_err(|_| bad_response(format!("bad chunk size {size:?}")))?;
                if size == 0 {
                    // Trailer fields, up to the empty line.
                    let mut budget = MAX_HEAD_BYTES;
                    loop {
                        let line = read_line(reader, MAX_CHUNK_LINE, "trailer")
                            .await?
                            .ok_or_else(|| bad_response("connection closed inside trailers"))?;
                        if line.is_empty() {
                            return Ok(body);
                        }
                        budget = budget.saturating_sub(line.len() as u64 + 2);
                        if budget == 0 {
                            return Err(bad_response("trailers too long"));
                        }
                    }
                }
                if body.len() as u64 + size > limit {
                    return Err(oversize());
                }
                let chunk = read_exactly(reader, size).await?;
                if (chunk.len() as u64) < size {
                    return Err(bad_response("connection closed inside a chunk"));
                }
                body.extend_from_slice(&chunk);
                let end = read_exactly(reader, 2).await?;
                if end != b"\r\n" {
                    return Err(bad_response("chunk not followed by CRLF"));
                }
            }
        }
    }
}

/// Reads `n` bytes, or fewer if the stream ends first.
async fn read_exactly<R: AsyncRead + Unpin>(
    reader: &mut R,
    n: u64,
) -> Result<Vec<u8>, CollectError> {
    let mut out = Vec::with_capacity(n.min(64 * 1024) as usize);
    (&mut *reader)
        .take(n)
        .read_to_end(&mut out)
        .await
        .map_err(|source| CollectError::Io { source })?;
    Ok(out)
}

/// Fetches `url` with `GET`: connects, sends, reads the head and a body of at most
/// `max_bytes`. Any status is returned; the caller decides which are errors.
pub async fn get(url: &HttpUrl, max_bytes: usize, accept: &str) -> Result<Response, CollectError> {
    let mut stream = connect(url).await?;
    send_get(&mut stream, &url.host_header(), &url.path, accept).await?;
    let mut reader = BufReader::new(stream);
    let head = read_head(&mut reader).await?;
    let body = read_body(&mut reader, &head, max_bytes).await?;
    Ok(Response {
        status: head.status,
        body,
        head_at: head.at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(raw: &[u8], max: usize) -> Result<(u16, Vec<u8>), CollectError> {
        let mut reader = BufReader::new(raw);
        let head = read_head(&mut reader).await?;
        let body = read_body(&mut reader, &head, max).await?;
        Ok((head.status, body))
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn urls() {
        let u = HttpUrl::parse("http://198.18.0.1:9100/metrics").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("198.18.0.1", 9100, "/metrics")
        );
        assert_eq!(u.host_header(), "198.18.0.1:9100");
        let u = HttpUrl::parse("http://[fd00::1]/m?x=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("fd00::1", 80, "/m?x=1")
        );
        assert_eq!(u.host_header(), "[fd00::1]");
        let u = HttpUrl::parse("http://backend-1.example:8080").unwrap();
        assert_eq!((u.port, u.path.as_str()), (8080, "/"));
        let u = HttpUrl::parse("http://h?q").unwrap();
        assert_eq!(u.path, "/?q");
        for bad in [
            "https://h/",
            "h:80/",
            "http://",
            "http://:80/",
            "http://h:0/",
            "http://h:99999/",
            "http://h:x/",
            "http://u@h/",
            "http://h/#f",
            "http://h /",
            "http://[fd00::1/",
            "http://[nope]/",
            "http://[fd00::1]x/",
            "http://fd00::1/",
        ] {
            assert!(
                matches!(HttpUrl::parse(bad), Err(CollectError::BadUrl { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn bodies() {
        block_on(async {
            let (s, b) = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 10)
                .await
                .unwrap();
            assert_eq!((s, b.as_slice()), (200, &b"hello"[..]));
            let (_, b) = parse(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nT: v\r\n\r\n",
                11,
            )
            .await
            .unwrap();
            assert_eq!(b, b"hello world");
            let (_, b) = parse(b"HTTP/1.0 200 OK\nServer: x\n\nall of it", 9)
                .await
                .unwrap();
            assert_eq!(b, b"all of it");
            let (s, b) = parse(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
                0,
            )
            .await
            .unwrap();
            assert_eq!((s, b.len()), (204, 0));
        });
    }

    #[test]
    fn limits_and_malformed_responses() {
        block_on(async {
            let over = |r| matches!(r, Err(CollectError::Oversize { limit: 4 }));
            assert!(over(
                parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 4).await
            ));
            assert!(over(parse(b"HTTP/1.1 200 OK\r\n\r\nhello", 4).await));
            assert!(over(
                parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", 4)
                    .await
            ));
            let bad =
                |r: Result<_, CollectError>| matches!(r, Err(CollectError::BadResponse { .. }));
            for raw in [
                &b""[..],
                b"SSH-2.0-OpenSSH\r\n\r\n",
                b"HTTP/1.1 20 OK\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
                b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX0\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n",
                b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nX: y",
            ] {
                assert!(
                    bad(parse(raw, 100).await),
                    "{:?}",
                    String::from_utf8_lossy(raw)
                );
            }
            let mut long = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
            long.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES as usize));
            long.extend_from_slice(b"\r\n\r\n");
            assert!(bad(parse(&long, 100).await));
        });
    }
}
