//! The HTTP publish API, sans-IO: bytes of an HTTP/1.1 request in, a typed
//! [`Call`] out, and a typed [`Response`] back to bytes. No sockets and no
//! clock; the event loop owns the connection, and `http_publish.rs`
//! (the `herald node --http` listener) checks the bearer token, routes the
//! messages and keeps the connection alive.
//!
//! The head is parsed by `httparse`; bodies are JSON (`serde_json`), NDJSON
//! or raw bytes. Every length is checked before anything is buffered: a head
//! over [`MAX_HEAD`] and a `Content-Length` over the endpoint's limit are
//! refused from the head alone, so no request can make the node buffer more
//! than [`MAX_HEAD`] + [`MAX_BATCH_BODY`] per connection.

use std::borrow::Cow;

use base64::Engine as _;
use serde::Deserialize;

use crate::protocol::limits::{MAX_BATCH, MAX_KEY_LEN, MAX_PAYLOAD, MAX_USER_LEN};

/// Longest request head (request line and headers) taken.
pub const MAX_HEAD: usize = 8192;
/// Most headers in one request.
const MAX_HEADERS: usize = 32;
/// Longest body of a single publish: a 64 KiB payload in base64 and JSON.
pub const MAX_PUBLISH_BODY: usize = 96 * 1024;
/// Longest body of a batch, as PUBLISH_BATCH's frame limit (1 MiB).
pub const MAX_BATCH_BODY: usize = 1 << 20;

/// One message to publish, borrowed from the request's body where the JSON
/// string needs no unescaping (no copy per message on the common path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    /// The user id, 1..=64 bytes.
    pub user: Cow<'a, [u8]>,
    /// The conflation key, 0..=64 bytes.
    pub key: Cow<'a, [u8]>,
    /// The payload, 0..=65,536 bytes.
    pub payload: Cow<'a, [u8]>,
}

/// What a request asks for, once its head and body are valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call<'a> {
    /// `POST /v1/publish` or `POST /v1/publish/{user}`: one message.
    Publish(Message<'a>),
    /// `POST /v1/publish/batch`: up to 1,024 messages, in order.
    Batch(Vec<Message<'a>>),
    /// `GET /v1/users/{id}`: where the user is.
    User(Vec<u8>),
}

/// A request head, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// `GET`, `POST`, ….
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query, without the `?` (empty if none).
    pub query: String,
    /// `Content-Length` (0 if absent).
    pub content_length: usize,
    /// Whether the connection stays open after the answer.
    pub keep_alive: bool,
    /// The bearer token of `Authorization: Bearer …`, if any.
    pub bearer: Option<Vec<u8>>,
    /// `Content-Type`, lower-cased, parameters removed (empty if absent).
    pub content_type: String,
    /// Length of the head in bytes; the body follows.
    pub len: usize,
}

/// A request that cannot be carried out: its HTTP status and a stable code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// A stable machine-readable code (`code` values are stable).
    pub code: &'static str,
    /// The field at fault, for 400s about one field.
    pub field: Option<String>,
    /// For humans.
    pub message: String,
    /// For 405: the method the path takes (the `Allow` header).
    pub allow: Option<&'static str>,
}

impl ApiError {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, field: None, message: message.into(), allow: None }
    }

    fn field(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            code: "bad_field",
            field: Some(field.into()),
            message: message.into(),
            allow: None,
        }
    }
}

/// Reads the head at the front of `buf`: `Ok(None)` until it is complete.
/// A head over [`MAX_HEAD`], or one httparse refuses, is an error, as is a
/// `Content-Length` over the limit of the endpoint it names (checked here,
/// before the body is read).
pub fn head(buf: &[u8]) -> Result<Option<Head>, ApiError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(ApiError::new(431, "head_too_large", format!("request head over {MAX_HEAD} bytes")));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ApiError::new(431, "head_too_large", format!("more than {MAX_HEADERS} headers")));
        }
        Err(e) => return Err(ApiError::new(400, "bad_request", format!("malformed request: {e}"))),
    };
    if len > MAX_HEAD {
        return Err(ApiError::new(431, "head_too_large", format!("request head over {MAX_HEAD} bytes")));
    }
    let (method, target) = (req.method.unwrap_or(""), req.path.unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut h = Head {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        content_length: 0,
        keep_alive: req.version == Some(1),
        bearer: None,
        content_type: String::new(),
        len,
    };
    for hd in req.headers.iter() {
        let value = std::str::from_utf8(hd.value).unwrap_or("").trim();
        if hd.name.eq_ignore_ascii_case("content-length") {
            h.content_length = value
                .parse()
                .map_err(|_| ApiError::new(400, "bad_request", "Content-Length is not a number"))?;
        } else if hd.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ApiError::new(411, "length_required", "send a Content-Length, not a chunked body"));
        } else if hd.name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case("close") {
                h.keep_alive = false;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                h.keep_alive = true;
            }
        } else if hd.name.eq_ignore_ascii_case("authorization") {
            if let Some(t) = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")) {
                h.bearer = Some(t.trim().as_bytes().to_vec());
            }
        } else if hd.name.eq_ignore_ascii_case("content-type") {
            h.content_type = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        }
    }
    let limit = if h.path == "/v1/publish/batch" { MAX_BATCH_BODY } else { MAX_PUBLISH_BODY };
    if h.content_length > limit {
        return Err(ApiError::new(
            413,
            "too_large",
            format!("body of {} bytes; at most {limit} on {}", h.content_length, h.path),
        ));
    }
    Ok(Some(h))
}

/// One message of a JSON body (`user`, `data` or `data_b64`, optional `key`),
/// its strings borrowed from the body unless they hold escapes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Json<'a> {
    #[serde(borrow, deserialize_with = "text")]
    user: Cow<'a, str>,
    #[serde(default, borrow, deserialize_with = "some")]
    data: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "some")]
    data_b64: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "some")]
    key: Option<Cow<'a, str>>,
}

/// A JSON string, borrowed from the input if it has no escapes.
fn text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Cow<'de, str>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Cow<'de, str>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a string")
        }
        fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Cow::Borrowed(v))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Cow::Owned(v.to_owned()))
        }
        fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok(Cow::Owned(v))
        }
    }
    d.deserialize_str(V)
}

/// An optional field that, when present, must be a string (`null` is
/// refused, as the OpenAPI description says).
fn some<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    text(d).map(Some)
}

/// A string's bytes, still borrowed if it was.
fn bytes(s: Cow<'_, str>) -> Cow<'_, [u8]> {
    match s {
        Cow::Borrowed(b) => Cow::Borrowed(b.as_bytes()),
        Cow::Owned(o) => Cow::Owned(o.into_bytes()),
    }
}

/// The call a whole request makes: its head and its `content_length` bytes
/// of body.
pub fn call<'a>(h: &Head, body: &'a [u8]) -> Result<Call<'a>, ApiError> {
    let segments: Vec<&str> = h.path.trim_start_matches('/').split('/').collect();
    match (h.method.as_str(), segments.as_slice()) {
        ("POST", ["v1", "publish"]) => {
            let j: Json<'a> = serde_json::from_slice(body).map_err(bad_json)?;
            Ok(Call::Publish(message(j, "")?))
        }
        ("POST", ["v1", "publish", "batch"]) => batch(h, body).map(Call::Batch),
        ("POST", ["v1", "publish", user]) => {
            let user = percent_decode(user).ok_or_else(|| ApiError::field("user", "bad percent-encoding"))?;
            let key = query_param(&h.query, "key").unwrap_or_default();
            Ok(Call::Publish(checked(user.into(), key.into(), body.into(), "")?))
        }
        ("GET", ["v1", "users", user]) => {
            let user = percent_decode(user).ok_or_else(|| ApiError::field("user", "bad percent-encoding"))?;
            check_user(&user, "")?;
            Ok(Call::User(user))
        }
        (_, ["v1", "publish"] | ["v1", "publish", _]) => Err(not_allowed(h, "POST")),
        (_, ["v1", "users", _]) => Err(not_allowed(h, "GET")),
        _ => Err(ApiError::new(404, "not_found", format!("no endpoint {}", h.path))),
    }
}

fn not_allowed(h: &Head, allow: &'static str) -> ApiError {
    let message = format!("{} is not allowed on {}; use {allow}", h.method, h.path);
    ApiError { allow: Some(allow), ..ApiError::new(405, "method_not_allowed", message) }
}

fn bad_json(e: serde_json::Error) -> ApiError {
    ApiError::new(400, "bad_json", format!("the body is not valid JSON for this endpoint: {e}"))
}

/// A batch: a JSON array, or NDJSON (one object per line) with
/// `Content-Type: application/x-ndjson`.
fn batch<'a>(h: &Head, body: &'a [u8]) -> Result<Vec<Message<'a>>, ApiError> {
    let items: Vec<Json<'a>> = match h.content_type.as_str() {
        "application/x-ndjson" | "application/jsonl" => {
            let mut v = Vec::new();
            for (i, line) in body.split(|&b| b == b'\n').enumerate() {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                if v.len() == MAX_BATCH {
                    return Err(too_many());
                }
                v.push(serde_json::from_slice(line).map_err(|e| {
                    ApiError::new(400, "bad_json", format!("line {}: not a message object: {e}", i + 1))
                })?);
            }
            v
        }
        // JSON, whatever else the type says (curl's -d sends a form type).
        _ => serde_json::from_slice(body).map_err(bad_json)?,
    };
    if items.is_empty() {
        return Err(ApiError::new(400, "empty_batch", "a batch needs at least one message"));
    }
    if items.len() > MAX_BATCH {
        return Err(too_many());
    }
    // The field prefix (`[3].`) is only written into an error.
    items.into_iter().enumerate().map(|(i, j)| message(j, "").map_err(|e| at_index(e, i))).collect()
}

/// `e` about message `i` of a batch: its field as `[i].field`.
fn at_index(mut e: ApiError, i: usize) -> ApiError {
    e.field = e.field.map(|f| format!("[{i}].{f}"));
    e
}

fn too_many() -> ApiError {
    ApiError::new(400, "too_many_messages", format!("at most {MAX_BATCH} messages per batch"))
}

/// One JSON message, checked; `at` prefixes field names (`[3].user`).
fn message<'a>(j: Json<'a>, at: &str) -> Result<Message<'a>, ApiError> {
    let payload = match (j.data, j.data_b64) {
        (Some(d), None) => bytes(d),
        (None, Some(b)) => {
            Cow::Owned(base64::engine::general_purpose::STANDARD.decode(b.as_bytes()).map_err(|e| {
                ApiError::field(format!("{at}data_b64"), format!("not base64 (RFC 4648, padded): {e}"))
            })?)
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::field(format!("{at}data"), "give data or data_b64, not both"))
        }
        (None, None) => return Err(ApiError::field(format!("{at}data"), "missing: give data or data_b64")),
    };
    checked(bytes(j.user), j.key.map(bytes).unwrap_or_default(), payload, at)
}

fn checked<'a>(
    user: Cow<'a, [u8]>,
    key: Cow<'a, [u8]>,
    payload: Cow<'a, [u8]>,
    at: &str,
) -> Result<Message<'a>, ApiError> {
    check_user(&user, at)?;
    if key.len() > MAX_KEY_LEN {
        return Err(ApiError::field(
            format!("{at}key"),
            format!("{} bytes; at most {MAX_KEY_LEN}", key.len()),
        ));
    }
    if payload.len() > MAX_PAYLOAD {
        return Err(ApiError {
            status: 400,
            code: "payload_too_large",
            field: Some(format!("{at}data")),
            message: format!("payload of {} bytes; at most {MAX_PAYLOAD}", payload.len()),
            allow: None,
        });
    }
    Ok(Message { user, key, payload })
}

fn check_user(user: &[u8], at: &str) -> Result<(), ApiError> {
    if user.is_empty() || user.len() > MAX_USER_LEN {
        return Err(ApiError::field(
            format!("{at}user"),
            format!("{} bytes; 1..={MAX_USER_LEN} allowed", user.len()),
        ));
    }
    Ok(())
}

/// `%XX` decoding of one path segment or query value (`+` stays `+`).
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

fn query_param(query: &str, name: &str) -> Option<Vec<u8>> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| percent_decode(v)).flatten()
    })
}

/// Where one message went (as PUB_RESULT counts it, protocol.md §5.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Routed {
    /// Queued to a session on this node.
    pub local: bool,
    /// Forwarded to at least one peer node.
    pub forwarded: bool,
}

/// An answer: status, JSON body, and the headers that depend on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    /// The JSON body.
    pub body: String,
    /// `Retry-After` in seconds (429, 503).
    pub retry_after: Option<u32>,
    /// Close the connection after this answer.
    pub close: bool,
    /// The `Allow` header (405).
    pub allow: Option<&'static str>,
}

impl Response {
    /// The answer to a publish or a batch: the counts, and for a batch one
    /// result per message, in order.
    pub fn published(results: &[Routed], batch: bool) -> Response {
        let count = |f: fn(&Routed) -> bool| results.iter().filter(|r| f(r)).count();
        let mut body = format!(
            "{{\"accepted\":{},\"local\":{},\"forwarded\":{},\"no_route\":{}",
            results.len(),
            count(|r| r.local),
            count(|r| r.forwarded),
            count(|r| !r.local && !r.forwarded)
        );
        if batch {
            body.push_str(",\"results\":[");
            body.reserve(results.len() * 34);
            for (i, r) in results.iter().enumerate() {
                if i > 0 {
                    body.push(',');
                }
                body.push_str(match (r.local, r.forwarded) {
                    (false, false) => "{\"local\":false,\"forwarded\":false}",
                    (true, false) => "{\"local\":true,\"forwarded\":false}",
                    (false, true) => "{\"local\":false,\"forwarded\":true}",
                    (true, true) => "{\"local\":true,\"forwarded\":true}",
                });
            }
            body.push(']');
        }
        body.push('}');
        Response { status: 200, body, retry_after: None, close: false, allow: None }
    }

    /// The JSON error body of `e` (`code` values are stable).
    pub fn error(e: &ApiError) -> Response {
        let body = serde_json::json!({ "error": { "code": e.code, "field": e.field, "message": e.message } });
        let retry_after = matches!(e.status, 429 | 503).then_some(1);
        Response { status: e.status, body: body.to_string(), retry_after, close: false, allow: e.allow }
    }

    /// Appends the whole HTTP/1.1 response to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        use std::io::Write as _;
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            self.status,
            reason(self.status),
            self.body.len()
        );
        if let Some(s) = self.retry_after {
            let _ = write!(out, "retry-after: {s}\r\n");
        }
        if let Some(a) = self.allow {
            let _ = write!(out, "allow: {a}\r\n");
        }
        if self.status == 401 {
            out.extend_from_slice(b"www-authenticate: Bearer\r\n");
        }
        if self.close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(self.body.as_bytes());
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(s: &str) -> (Head, Vec<u8>) {
        let b = s.as_bytes();
        let h = head(b).unwrap().expect("complete");
        (h.clone(), b[h.len..].to_vec())
    }

    fn owned(m: Message<'_>) -> Message<'static> {
        Message {
            user: m.user.into_owned().into(),
            key: m.key.into_owned().into(),
            payload: m.payload.into_owned().into(),
        }
    }

    fn post(path: &str, ctype: &str, body: &str) -> Result<Call<'static>, ApiError> {
        let (h, b) = req(&format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
        assert_eq!(h.bearer.as_deref(), Some(&b"tok"[..]));
        assert_eq!(b.len(), h.content_length);
        call(&h, &b).map(|c| match c {
            Call::Publish(m) => Call::Publish(owned(m)),
            Call::Batch(ms) => Call::Batch(ms.into_iter().map(owned).collect()),
            Call::User(u) => Call::User(u),
        })
    }

    fn msg(user: &str, payload: &[u8]) -> Message<'static> {
        Message {
            user: user.as_bytes().to_vec().into(),
            key: Vec::new().into(),
            payload: payload.to_vec().into(),
        }
    }

    #[test]
    fn a_head_is_taken_once_complete_and_lengths_are_checked_from_it() {
        assert_eq!(head(b"POST /v1/publish HTTP/1.1\r\nContent-Le"), Ok(None));
        let (h, _) = req("GET /v1/users/al%69ce?x=1 HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert_eq!(
            (h.method.as_str(), h.path.as_str(), h.query.as_str(), h.keep_alive),
            ("GET", "/v1/users/al%69ce", "x=1", false)
        );
        assert!(req("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").0.keep_alive);
        let big = format!("POST /v1/publish HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_PUBLISH_BODY + 1);
        assert_eq!(head(big.as_bytes()).unwrap_err().status, 413);
        let ok = format!("POST /v1/publish/batch HTTP/1.1\r\nContent-Length: {MAX_BATCH_BODY}\r\n\r\n");
        assert!(head(ok.as_bytes()).unwrap().is_some());
        assert_eq!(head(&[b'a'; MAX_HEAD + 1]).unwrap_err().status, 431);
        assert_eq!(head(b"GET\x01/ HTTP/1.1\r\n\r\n").unwrap_err().status, 400);
        let long = format!("GET / HTTP/1.1\r\nX: {}", "y".repeat(MAX_HEAD));
        assert_eq!(head(long.as_bytes()).unwrap_err().status, 431);
        let chunked = b"POST /v1/publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(head(chunked).unwrap_err().status, 411);
        assert_eq!(head(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n").unwrap_err().status, 400);
    }

    #[test]
    fn one_message_as_json_text_base64_or_raw() {
        assert_eq!(
            post("/v1/publish", "application/json", r#"{"user":"alice","data":"hi"}"#),
            Ok(Call::Publish(msg("alice", b"hi")))
        );
        let b64 =
            post("/v1/publish", "application/json", r#"{"user":"bob","data_b64":"AP8=","key":"EURUSD"}"#);
        assert_eq!(
            b64,
            Ok(Call::Publish(Message {
                user: b"bob".to_vec().into(),
                key: b"EURUSD".to_vec().into(),
                payload: vec![0, 255].into()
            }))
        );
        let raw = post("/v1/publish/d%C3%A9j%C3%A0?key=k1", "application/octet-stream", "\u{1}raw");
        assert_eq!(
            raw,
            Ok(Call::Publish(Message {
                user: "déjà".as_bytes().to_vec().into(),
                key: b"k1".to_vec().into(),
                payload: b"\x01raw".to_vec().into()
            }))
        );
    }

    #[test]
    fn plain_strings_are_borrowed_from_the_body_and_escaped_ones_unescaped() {
        let body = br#"[{"user":"alice","data":"plain"},{"user":"b\u006fb","data":"a\nb"}]"#;
        let h = Head { path: "/v1/publish/batch".into(), ..req("POST / HTTP/1.1\r\n\r\n").0 };
        let Ok(Call::Batch(ms)) = call(&Head { method: "POST".into(), ..h }, body) else { panic!() };
        assert!(matches!((&ms[0].user, &ms[0].payload), (Cow::Borrowed(b"alice"), Cow::Borrowed(b"plain"))));
        assert_eq!((&*ms[1].user, &*ms[1].payload), (&b"bob"[..], &b"a\nb"[..]));
        assert!(matches!(ms[1].payload, Cow::Owned(_)));
    }

    #[test]
    fn bad_messages_name_their_field() {
        let e = |body: &str| post("/v1/publish", "application/json", body).unwrap_err();
        assert_eq!(e(r#"{"user":"","data":"x"}"#).field.as_deref(), Some("user"));
        assert_eq!(
            e(&format!(r#"{{"user":"{}","data":"x"}}"#, "u".repeat(65))).field.as_deref(),
            Some("user")
        );
        assert_eq!(e(r#"{"user":"a"}"#).field.as_deref(), Some("data"));
        assert_eq!(e(r#"{"user":"a","data":"x","data_b64":"eA=="}"#).field.as_deref(), Some("data"));
        assert_eq!(e(r#"{"user":"a","data_b64":"%%"}"#).field.as_deref(), Some("data_b64"));
        assert_eq!(
            e(&format!(r#"{{"user":"a","data":"x","key":"{}"}}"#, "k".repeat(65))).field.as_deref(),
            Some("key")
        );
        assert_eq!(e(r#"{"user":"a","data":"x","extra":1}"#).code, "bad_json");
        assert_eq!(e(r#"{"user":"a","data":"x","key":null}"#).code, "bad_json");
        assert_eq!(e("not json").code, "bad_json");
        let big = format!(r#"{{"user":"a","data":"{}"}}"#, "x".repeat(MAX_PAYLOAD + 1));
        let (h, b) = (
            Head { content_length: big.len(), ..req("POST /v1/publish HTTP/1.1\r\n\r\n").0 },
            big.into_bytes(),
        );
        assert_eq!(call(&h, &b).unwrap_err().code, "payload_too_large");
        let any = post("/v1/publish", "application/x-www-form-urlencoded", r#"{"user":"a","data":"x"}"#);
        assert_eq!(any, Ok(Call::Publish(msg("a", b"x"))), "JSON whatever the Content-Type (curl -d)");
    }

    #[test]
    fn batches_as_json_arrays_or_ndjson() {
        let want = Call::Batch(vec![msg("a", b"1"), msg("b", b"2")]);
        assert_eq!(
            post(
                "/v1/publish/batch",
                "application/json",
                r#"[{"user":"a","data":"1"},{"user":"b","data":"2"}]"#
            ),
            Ok(want.clone())
        );
        assert_eq!(
            post(
                "/v1/publish/batch",
                "application/x-ndjson",
                "{\"user\":\"a\",\"data\":\"1\"}\n\n{\"user\":\"b\",\"data\":\"2\"}\n"
            ),
            Ok(want)
        );
        let e = post(
            "/v1/publish/batch",
            "application/json",
            r#"[{"user":"a","data":"1"},{"user":"","data":"2"}]"#,
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("[1].user"));
        assert_eq!(post("/v1/publish/batch", "application/json", "[]").unwrap_err().code, "empty_batch");
        let many = format!("[{}]", vec![r#"{"user":"a","data":""}"#; MAX_BATCH + 1].join(","));
        assert_eq!(
            post("/v1/publish/batch", "application/json", &many).unwrap_err().code,
            "too_many_messages"
        );
        let lines = vec![r#"{"user":"a","data":""}"#; MAX_BATCH + 1].join("\n");
        assert_eq!(
            post("/v1/publish/batch", "application/x-ndjson", &lines).unwrap_err().code,
            "too_many_messages"
        );
    }

    #[test]
    fn users_methods_and_unknown_paths() {
        let (h, _) = req("GET /v1/users/al%69ce HTTP/1.1\r\n\r\n");
        assert_eq!(call(&h, b""), Ok(Call::User(b"alice".to_vec())));
        let (h, _) = req("DELETE /v1/users/alice HTTP/1.1\r\n\r\n");
        assert_eq!(call(&h, b"").unwrap_err().allow, Some("GET"));
        let (h, _) = req("GET /v2/nothing HTTP/1.1\r\n\r\n");
        assert_eq!(call(&h, b"").unwrap_err().status, 404);
        let (h, _) = req("GET /v1/users/%zz HTTP/1.1\r\n\r\n");
        assert_eq!(call(&h, b"").unwrap_err().field.as_deref(), Some("user"));
    }

    #[test]
    fn responses_are_json_with_the_counts_of_pub_result() {
        let rs = [
            Routed { local: true, forwarded: false },
            Routed::default(),
            Routed { local: true, forwarded: true },
        ];
        let r = Response::published(&rs, true);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(
            (v["accepted"].as_u64(), v["local"].as_u64(), v["forwarded"].as_u64(), v["no_route"].as_u64()),
            (Some(3), Some(2), Some(1), Some(1))
        );
        assert_eq!(v["results"][2]["forwarded"], true);
        let mut out = Vec::new();
        Response::error(&ApiError::new(503, "draining", "the node is draining")).encode(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 503 Service Unavailable\r\n") && text.contains("retry-after: 1\r\n"),
            "{text}"
        );
        let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "draining");
    }
}
