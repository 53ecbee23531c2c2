//! A minimal HTTP/1.1 GET over `tokio::net::TcpStream`, for `start` (polling `/v1/models`) and `status`
//! (`/health`, `/v1/workers`): no TLS, no redirects, one request per connection. Bodies may be sized by
//! `Content-Length`, chunked, or end with the connection.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::{Error, Result};

/// A response larger than this is refused (the endpoints polled here answer a few KiB).
const MAX_RESPONSE: usize = 16 << 20;

/// `GET http://{addr}{path}`; `addr` is `host:port` (`[v6]:port` for IPv6). Returns the status code and the
/// body (lossy UTF-8). Connection failures, a malformed answer and `timeout` (for the whole exchange) are
/// `Error::Http`.
pub async fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let url = format!("http://{addr}{path}");
    match tokio::time::timeout(timeout, exchange(addr, path)).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(reason)) => Err(Error::Http { url, reason }),
        Err(_) => Err(Error::Http { url, reason: format!("no answer within {:.1} s", timeout.as_secs_f64()) }),
    }
}

/// The address to connect to for a server bound to `addr`: a wildcard host (`0.0.0.0`, `[::]`) is reached
/// on the loopback of its family.
pub fn local_target(addr: &str) -> String {
    if let Some(port) = addr.strip_prefix("0.0.0.0:") {
        format!("127.0.0.1:{port}")
    } else if let Some(port) = addr.strip_prefix("[::]:") {
        format!("[::1]:{port}")
    } else {
        addr.to_string()
    }
}

/// `host:port`, bracketing an IPv6 literal.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

async fn exchange(addr: &str, path: &str) -> std::result::Result<(u16, String), String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: pipemoe\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("sending the request: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|e| format!("reading the answer: {e}"))?;
        if n == 0 {
            return parse(&buf, true)?.ok_or_else(|| "connection closed before a complete answer".to_string());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE {
            return Err(format!("answer larger than {MAX_RESPONSE} bytes"));
        }
        if let Some(answer) = parse(&buf, false)? {
            return Ok(answer);
        }
    }
}

/// The status and body once `buf` holds a whole response; `None` while more is needed. At end of stream
/// (`eof`), a body without length or chunking is whatever arrived.
fn parse(buf: &[u8], eof: bool) -> std::result::Result<Option<(u16, String)>, String> {
    let Some(head_len) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_len]).map_err(|_| "response head is not UTF-8".to_string())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP/1.x status line: {status_line:?}"))?;
    let (mut length, mut chunked) = (None, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().map_err(|_| format!("bad Content-Length {value:?}"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") && value.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        }
    }
    let body = &buf[head_len + 4..];
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    if chunked {
        return match dechunk(body)? {
            Some(b) => Ok(Some((status, text(&b)))),
            None if eof => Err("connection closed inside a chunked body".into()),
            None => Ok(None),
        };
    }
    match length {
        Some(n) if body.len() >= n => Ok(Some((status, text(&body[..n])))),
        Some(_) if eof => Err("connection closed before Content-Length bytes arrived".into()),
        Some(_) => Ok(None),
        None if eof || status == 204 || status == 304 => Ok(Some((status, text(body)))),
        None => Ok(None),
    }
}

/// The body of a complete chunked encoding, or `None` if the last chunk has not arrived.
fn dechunk(mut data: &[u8]) -> std::result::Result<Option<Vec<u8>>, String> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
        let size_text = std::str::from_utf8(&data[..eol]).map_err(|_| "bad chunk size".to_string())?;
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| format!("bad chunk size {size_hex:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(Some(out));
        }
        if data.len() < size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    /// Serves one connection with `answer`, in pieces, after reading the request head.
    async fn serve_once(answer: &'static [u8]) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = Vec::new();
            let mut b = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut b).await.unwrap();
                req.extend_from_slice(&b[..n]);
            }
            assert!(req.starts_with(b"GET /v1/models HTTP/1.1\r\n"));
            for piece in answer.chunks(7) {
                s.write_all(piece).await.unwrap();
                s.flush().await.unwrap();
            }
            // Keep the connection open: a sized or chunked answer must complete without EOF.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        addr
    }

    #[tokio::test]
    async fn reads_sized_chunked_and_unsized_answers() {
        let t = Duration::from_secs(2);
        let addr = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"data\":[]}").await;
        assert_eq!(http_get(&addr, "/v1/models", t).await.unwrap(), (200, "{\"data\":[]}".into()));
        let addr = serve_once(b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nnot \r\n5;x=y\r\nready\r\n0\r\n\r\n").await;
        assert_eq!(http_get(&addr, "/v1/models", t).await.unwrap(), (503, "not ready".into()));
        // No length and no EOF: the deadline ends it.
        let addr = serve_once(b"HTTP/1.1 200 OK\r\n\r\npartial").await;
        let err = http_get(&addr, "/v1/models", Duration::from_millis(300)).await.unwrap_err();
        assert!(err.to_string().contains("no answer within"), "{err}");
    }

    #[tokio::test]
    async fn connection_refused_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let err = http_get(&addr, "/health", Duration::from_secs(2)).await.unwrap_err();
        assert!(err.to_string().starts_with(&format!("GET http://{addr}/health: ")), "{err}");
    }

    #[test]
    fn addresses() {
        assert_eq!(local_target("0.0.0.0:8000"), "127.0.0.1:8000");
        assert_eq!(local_target("[::]:8000"), "[::1]:8000");
        assert_eq!(local_target("10.0.0.2:80"), "10.0.0.2:80");
        assert_eq!(join_host_port("::1", 80), "[::1]:80");
        assert_eq!(join_host_port("localhost", 80), "localhost:80");
    }
}
