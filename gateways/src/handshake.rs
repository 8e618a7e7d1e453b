//! Reading a WebSocket upgrade request before tungstenite does, so the
//! token can be checked with async lookups (revocations live in MySQL and
//! Redis in cluster mode) and a bad one still refused with HTTP 401 before
//! the upgrade: tungstenite's handshake callback cannot wait.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Largest request head accepted (browsers send well under 8 KiB).
pub const MAX_HEAD: usize = 16 * 1024;

/// What the gateway needs from the request head.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Head {
    pub path: String,
    pub query: Option<String>,
    pub authorization: Option<String>,
}

/// Read until the end of the request head. Returns the parsed head and
/// every byte read (head and anything after it), which must be replayed.
pub async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<(Head, Vec<u8>)> {
    // Read straight into `buf` (no chunk array on the stack: this future
    // lives inside every connection's task).
    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve(1024);
        }
        let n = stream.read_buf(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let target = req.path.unwrap_or("/");
                let (path, query) = match target.split_once('?') {
                    Some((p, q)) => (p.to_string(), Some(q.to_string())),
                    None => (target.to_string(), None),
                };
                let authorization = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("authorization"))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .map(str::to_string);
                let head = Head {
                    path,
                    query,
                    authorization,
                };
                return Ok((head, buf));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "request head too large",
                ))
            }
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
}

/// A stream that first yields `prefix`, then reads from `inner`; writes go
/// to `inner`.
pub struct Replay<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Replay<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Replay {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            if self.at == self.prefix.len() {
                self.prefix = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_head_split_over_writes_is_parsed_and_replayed_whole() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let req = "GET /ws?token=abc HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\r\nEXTRA";
        let writer = tokio::spawn(async move {
            for part in req.as_bytes().chunks(7) {
                client.write_all(part).await.unwrap();
            }
            client
        });
        let (head, bytes) = read_head(&mut server).await.unwrap();
        let _client = writer.await.unwrap();
        assert_eq!(head.path, "/ws");
        assert_eq!(head.query.as_deref(), Some("token=abc"));
        assert_eq!(head.authorization.as_deref(), Some("Bearer t"));
        let mut replay = Replay::new(bytes, server);
        let mut again = vec![0u8; req.len()];
        replay.read_exact(&mut again).await.unwrap();
        assert_eq!(again, req.as_bytes());
    }

    #[tokio::test]
    async fn garbage_is_refused() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client
            .write_all(b"\x00\x01 nonsense\r\n\r\n")
            .await
            .unwrap();
        assert!(read_head(&mut server).await.is_err());
    }
}
