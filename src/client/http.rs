//! [`HttpPublisher`]: publishes through a node's HTTP publish API
//! (http-api.md) over one keep-alive connection, plain or HTTPS: for tools
//! (`herald publish --http`) and for checking the API from the library's
//! side. The answer's head is parsed by `httparse`, its body by
//! `serde_json`.

use std::io::{self, ErrorKind, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use crate::dial::{self, Stream};
use crate::protocol::frame as f;

use super::ClientError;

/// Longest answer taken (the API's answers are small JSON objects).
const MAX_ANSWER: usize = 1 << 20;

/// A connection to a node's HTTP publish API.
pub struct HttpPublisher {
    stream: Stream,
    host: String,
    credential: String,
    rbuf: Vec<u8>,
}

impl HttpPublisher {
    /// Connects to `url`, `http://host:port` or `https://host:port` (then
    /// with `tls` as the trust, ALPN `http/1.1`; the system's CAs if
    /// `tls` is none). The credential is the publisher credential.
    pub fn connect(
        url: &str,
        credential: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<HttpPublisher, ClientError> {
        let bad = |m: String| ClientError::Io(io::Error::new(ErrorKind::InvalidInput, m));
        let (secure, rest) = match url.split_once("://") {
            Some(("http", r)) => (false, r),
            Some(("https", r)) => (true, r),
            _ => return Err(bad(format!("{url}: give http://host:port or https://host:port"))),
        };
        let host = rest.trim_end_matches('/').to_owned();
        if host.is_empty() || host.contains('/') {
            return Err(bad(format!("{url}: give the node's address only, http://host:port")));
        }
        let tls = match (secure, tls) {
            (false, _) => None,
            (true, Some(t)) => Some(t),
            (true, None) => Some(crate::tls::Trust::System.config().map_err(|e| bad(e.to_string()))?),
        }
        .map(|t| {
            let mut c = (*t).clone();
            c.alpn_protocols = vec![crate::tls::ALPN_HTTP.to_vec()];
            Arc::new(c)
        });
        let (stream, _) = dial::dial_stream(&host, Duration::from_secs(5), tls.as_ref())?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(HttpPublisher { stream, host, credential: credential.to_owned(), rbuf: Vec::new() })
    }

    /// Publishes one message (`POST /v1/publish`, base64 payload) and
    /// returns the node's counts as a PUB_RESULT; an error answer is
    /// [`ClientError::Http`] with its HTTP status and JSON body.
    pub fn publish(&mut self, user: &str, payload: &[u8]) -> Result<f::PubResult, ClientError> {
        self.publish_keyed(user, "", payload)
    }

    /// [`HttpPublisher::publish`] with a conflation key (protocol.md §5.7;
    /// empty: never conflated).
    pub fn publish_keyed(
        &mut self,
        user: &str,
        key: &str,
        payload: &[u8],
    ) -> Result<f::PubResult, ClientError> {
        use base64::Engine as _;
        let mut body = serde_json::json!({
            "user": user,
            "data_b64": base64::engine::general_purpose::STANDARD.encode(payload),
        });
        if !key.is_empty() {
            body["key"] = key.into();
        }
        let body = body.to_string();
        let (status, v) = self.call("POST", "/v1/publish", body.as_bytes())?;
        if status != 200 {
            return Err(ClientError::Http { status, message: v.to_string() });
        }
        let n = |k: &str| v[k].as_u64().unwrap_or(0) as u16;
        Ok(f::PubResult {
            request_id: 0,
            accepted: n("accepted"),
            local: n("local"),
            forwarded: n("forwarded"),
            no_route: n("no_route"),
        })
    }

    /// One request on the connection: its status and JSON body.
    pub fn call(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, serde_json::Value), ClientError> {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            self.credential,
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.stream.write_all(&req)?;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head) = resp
                .parse(&self.rbuf)
                .map_err(|e| ClientError::Http { status: 0, message: format!("bad HTTP answer: {e}") })?
            {
                let len = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok())
                    .ok_or_else(|| ClientError::Http {
                        status: 0,
                        message: "HTTP answer without Content-Length".into(),
                    })?;
                if len > MAX_ANSWER {
                    return Err(ClientError::Http {
                        status: 0,
                        message: format!("HTTP answer of {len} bytes"),
                    });
                }
                if self.rbuf.len() >= head + len {
                    let status = resp.code.unwrap_or(0);
                    let v = serde_json::from_slice(&self.rbuf[head..head + len]).map_err(|e| {
                        ClientError::Http { status: 0, message: format!("HTTP answer is not JSON: {e}") }
                    })?;
                    self.rbuf.drain(..head + len);
                    return Ok((status, v));
                }
            }
            if self.rbuf.len() > MAX_ANSWER {
                return Err(ClientError::Http { status: 0, message: "HTTP answer too large".into() });
            }
            match self.stream.read(&mut chunk)? {
                0 => return Err(ClientError::Closed),
                n => self.rbuf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}
