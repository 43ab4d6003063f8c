//! Raw HTTP/1.1 client connections to the server under test, and the few protocol requests the
//! scenarios share (create, append, tail offset).
//!
//! Every connection is its own keep-alive TCP connection driven by hyper's low-level client, so a
//! writer's latency is never queued behind another writer's request in a shared pool.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

/// Header that carries a stream's tail offset (spec 5.2, 5.6).
pub const NEXT_OFFSET: &str = "stream-next-offset";
/// Header that says a read reached the tail (spec 5.6).
pub const UP_TO_DATE: &str = "stream-up-to-date";

/// Loopback source addresses are spread over this many `127.0.0.x` addresses: tens of thousands
/// of connections to one server port (fan-out, idle readers, then their TIME_WAIT remains) would
/// otherwise exhaust the ~28 000 ephemeral ports of a single source address.
const LOOPBACK_SOURCES: u32 = 64;

/// Hands out the next source address in round-robin order.
static NEXT_SOURCE: AtomicU32 = AtomicU32::new(0);

/// Where the server under test listens.
#[derive(Clone, Debug)]
pub struct Server {
    pub addr: SocketAddr,
    /// `Host` header value; hyper's low-level client sends the URI as given and no `Host`.
    pub host: HeaderValue,
}

impl Server {
    /// Parses `http://127.0.0.1:PORT` (loopback only: this tool never sends load elsewhere).
    pub fn from_url(url: &str) -> anyhow::Result<Server> {
        let uri: Uri = url.parse().with_context(|| format!("bad --url {url}"))?;
        if uri.scheme_str() != Some("http") {
            bail!("--url must be plain http://, got {url}");
        }
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow!("--url has no host:port: {url}"))?;
        let ip: IpAddr = authority
            .host()
            .trim_matches(|c| c == '[' || c == ']')
            .parse()
            .with_context(|| format!("--url host must be an IP address: {url}"))?;
        if !ip.is_loopback() {
            bail!("--url must be a loopback address, got {ip}");
        }
        let port = authority
            .port_u16()
            .ok_or_else(|| anyhow!("--url needs an explicit port: {url}"))?;
        Ok(Server {
            addr: SocketAddr::new(ip, port),
            host: HeaderValue::from_str(authority.as_str())?,
        })
    }

    /// Opens one keep-alive connection (TCP_NODELAY) and spawns its driver task.
    pub async fn connect(&self) -> anyhow::Result<Conn> {
        let stream = self.tcp_connect().await?;
        self.handshake(stream).await
    }

    /// [`Server::connect`] without the retries.
    pub(crate) async fn connect_once(&self) -> anyhow::Result<Conn> {
        let stream = self.tcp_connect_once().await?;
        self.handshake(stream).await
    }

    async fn handshake(&self, stream: TcpStream) -> anyhow::Result<Conn> {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // The connection ends when the scenario drops its sender or the server closes it;
            // the request that was in flight reports the error.
            let _ = conn.await;
        });
        Ok(Conn {
            sender,
            host: self.host.clone(),
        })
    }

    /// Opens one TCP connection (TCP_NODELAY); scenarios that speak HTTP by hand use it as is.
    pub async fn tcp_connect(&self) -> anyhow::Result<TcpStream> {
        let mut last_err = None;
        // A rare EADDRNOTAVAIL when a source port is still in TIME_WAIT towards the same
        // destination is worth a second try on another source address.
        for _ in 0..3 {
            match self.tcp_connect_once().await {
                Ok(c) => return Ok(c),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("connect failed")))
    }

    async fn tcp_connect_once(&self) -> anyhow::Result<TcpStream> {
        let socket = match self.addr.ip() {
            IpAddr::V4(v4) if v4.is_loopback() => {
                let n = NEXT_SOURCE.fetch_add(1, Ordering::Relaxed) % LOOPBACK_SOURCES;
                let socket = TcpSocket::new_v4()?;
                socket.set_reuseaddr(true)?;
                // `n` < 64, so the last octet stays within 2..=65.
                let source = Ipv4Addr::new(127, 0, 0, 2 + n as u8);
                socket.bind(SocketAddr::new(source.into(), 0))?;
                socket
            }
            IpAddr::V4(_) => TcpSocket::new_v4()?,
            IpAddr::V6(_) => TcpSocket::new_v6()?,
        };
        let stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(self.addr))
            .await
            .map_err(|_| anyhow!("connect to {} timed out", self.addr))?
            .with_context(|| format!("connect to {}", self.addr))?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// One HTTP/1.1 keep-alive connection.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    host: HeaderValue,
}

impl Conn {
    /// Sends one request and returns the response head; the caller reads or drops the body.
    pub async fn send(
        &mut self,
        method: Method,
        uri: Uri,
        content_type: Option<&'static str>,
        body: Bytes,
    ) -> anyhow::Result<Response<Incoming>> {
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        req.headers_mut().insert(HOST, self.host.clone());
        if let Some(ct) = content_type {
            req.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(ct));
        }
        self.sender.ready().await?;
        Ok(self.sender.send_request(req).await?)
    }

    /// Sends one request and reads the whole (small) response body.
    pub async fn send_collect(
        &mut self,
        method: Method,
        uri: Uri,
        content_type: Option<&'static str>,
        body: Bytes,
    ) -> anyhow::Result<(http::response::Parts, Bytes)> {
        let resp = self.send(method, uri, content_type, body).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok((parts, body))
    }

    /// Sends a JSON request with `Authorization: Bearer <token>` and reads the whole response.
    pub async fn send_collect_with_bearer(
        &mut self,
        method: Method,
        uri: Uri,
        token: &str,
        body: Bytes,
    ) -> anyhow::Result<(http::response::Parts, Bytes)> {
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        let headers = req.headers_mut();
        headers.insert(HOST, self.host.clone());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}"))?,
        );
        self.sender.ready().await?;
        let (parts, body) = self.sender.send_request(req).await?.into_parts();
        Ok((parts, body.collect().await?.to_bytes()))
    }

    /// Creates a stream (or confirms it exists).
    pub async fn create_stream(
        &mut self,
        path: &str,
        content_type: &'static str,
    ) -> anyhow::Result<()> {
        let (parts, body) = self
            .send_collect(Method::PUT, path.parse()?, Some(content_type), Bytes::new())
            .await?;
        if parts.status != StatusCode::CREATED && parts.status != StatusCode::OK {
            bail!(
                "PUT {path} answered {}: {}",
                parts.status,
                String::from_utf8_lossy(&body)
            );
        }
        Ok(())
    }

    /// Appends `body`; returns the status (the caller decides what counts as success).
    pub async fn append(
        &mut self,
        uri: Uri,
        content_type: &'static str,
        body: Bytes,
    ) -> anyhow::Result<StatusCode> {
        let resp = self
            .send(Method::POST, uri, Some(content_type), body)
            .await?;
        let status = resp.status();
        // Drain the (empty) body so the connection is free for the next request.
        resp.into_body().collect().await?;
        Ok(status)
    }

    /// Reads `path` from `offset=-1`, following `Stream-Next-Offset` page by page until
    /// `Stream-Up-To-Date`. The body bytes are counted, not kept, so the client's cost is the
    /// socket read and little else. Fails past `deadline` or when a page makes no progress.
    pub async fn read_to_tail(
        &mut self,
        path: &str,
        deadline: tokio::time::Instant,
    ) -> anyhow::Result<ReadToTail> {
        let mut offset = "-1".to_owned();
        let (mut bytes, mut pages) = (0u64, 0u64);
        loop {
            let page: Uri = format!("{path}?offset={}", encode_query_value(&offset)).parse()?;
            let resp =
                tokio::time::timeout_at(deadline, self.send(Method::GET, page, None, Bytes::new()))
                    .await
                    .map_err(|_| anyhow!("reading {path} did not reach its tail in time"))??;
            if resp.status() != StatusCode::OK {
                let status = resp.status();
                return Ok(ReadToTail::Refused { offset, status });
            }
            let next = header_str(resp.headers(), NEXT_OFFSET)
                .ok_or_else(|| anyhow!("a read of {path} answered without {NEXT_OFFSET}"))?
                .to_owned();
            let up_to_date = header_str(resp.headers(), UP_TO_DATE) == Some("true");
            let mut body = resp.into_body();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    bytes += data.len() as u64;
                }
            }
            pages += 1;
            if up_to_date {
                return Ok(ReadToTail::Read { bytes, pages });
            }
            if next == offset {
                bail!("reading {path} made no progress at offset {offset}");
            }
            offset = next;
        }
    }

    /// The stream's current tail offset, from `HEAD`.
    pub async fn tail_offset(&mut self, path: &str) -> anyhow::Result<String> {
        let (parts, _) = self
            .send_collect(Method::HEAD, path.parse()?, None, Bytes::new())
            .await?;
        if !parts.status.is_success() {
            bail!("HEAD {path} answered {}", parts.status);
        }
        header_str(&parts.headers, NEXT_OFFSET)
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("HEAD {path} has no {NEXT_OFFSET}"))
    }
}

/// What reading a stream from `offset=-1` to `Stream-Up-To-Date` gave.
pub enum ReadToTail {
    /// Every page answered 200: the body bytes counted and the pages read.
    Read { bytes: u64, pages: u64 },
    /// A page answered another status.
    Refused { offset: String, status: StatusCode },
}

/// A header as text, if present and ASCII.
pub fn header_str<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Percent-encodes an offset for a query string (offsets are opaque to clients).
pub fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Waits until the server answers any HTTP request (any status), or the deadline passes.
pub async fn wait_until_answering(server: &Server, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let attempt = async {
            let mut conn = server.connect_once().await?;
            conn.send_collect(
                Method::GET,
                Uri::from_static("/__ds_bench_ready"),
                None,
                Bytes::new(),
            )
            .await
        };
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), attempt).await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{} did not answer HTTP within {timeout:?}", server.addr);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
