//! The HTTP publish API (`herald node --http`, http-api.md) over real
//! sockets: a node in-process on port 0, publishers speaking HTTP/1.1 by
//! hand, clients speaking herald's protocol.

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use herald::node::{Config, Node, ShutdownHandle};
use herald::protocol::frame::Frame;
use herald::protocol::{token, Channel};
use util::*;

struct ApiNode {
    client: SocketAddr,
    http: SocketAddr,
    handle: ShutdownHandle,
    thread: Option<std::thread::JoinHandle<Result<(), herald::node::NodeError>>>,
}

impl ApiNode {
    fn start(cfg: Config) -> ApiNode {
        let node = Node::bind(Config { http: Some("127.0.0.1:0".parse().unwrap()), ..cfg }).expect("bind");
        let (client, http) = (node.client_addr(), node.http_addr().expect("--http"));
        let handle = node.shutdown_handle();
        let thread = Some(std::thread::spawn(move || node.run()));
        ApiNode { client, http, handle, thread }
    }

    /// A client of `user`, WELCOMEd.
    fn client(&self, user: &str) -> Raw {
        let mut r = Raw::connect(self.client, Channel::ToClient);
        send_hello(&mut r, &token_for(user), None);
        assert!(matches!(frame(&r.expect(Duration::from_secs(5)), Channel::ToClient), Frame::Welcome(_)));
        r
    }
}

impl Drop for ApiNode {
    fn drop(&mut self) {
        self.handle.trigger();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One HTTP/1.1 response: status, headers (lower-cased names), body.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: serde_json::Value,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// A keep-alive HTTP connection.
struct Http {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Http {
    fn connect(addr: SocketAddr) -> Http {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Http { s, buf: Vec::new() }
    }

    fn send(&mut self, raw: &[u8]) {
        self.s.write_all(raw).unwrap();
    }

    fn request(method: &str, path: &str, auth: Option<&str>, ctype: &str, body: &[u8]) -> Vec<u8> {
        let mut r = format!("{method} {path} HTTP/1.1\r\nHost: herald\r\nContent-Length: {}\r\n", body.len());
        if let Some(a) = auth {
            r += &format!("Authorization: Bearer {a}\r\n");
        }
        if !ctype.is_empty() {
            r += &format!("Content-Type: {ctype}\r\n");
        }
        let mut v = (r + "\r\n").into_bytes();
        v.extend_from_slice(body);
        v
    }

    fn call(&mut self, method: &str, path: &str, auth: Option<&str>, ctype: &str, body: &[u8]) -> Resp {
        self.send(&Http::request(method, path, auth, ctype, body));
        self.read().expect("a response")
    }

    fn post(&mut self, path: &str, body: &str) -> Resp {
        self.call("POST", path, Some(&pub_credential()), "application/json", body.as_bytes())
    }

    /// The next response, or None at EOF.
    fn read(&mut self) -> Option<Resp> {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8(self.buf[..end].to_vec()).unwrap();
                let mut lines = head.split("\r\n");
                let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
                let headers: Vec<(String, String)> = lines
                    .map(|l| {
                        let (n, v) = l.split_once(':').unwrap();
                        (n.trim().to_ascii_lowercase(), v.trim().to_string())
                    })
                    .collect();
                let len: usize =
                    headers.iter().find(|(n, _)| n == "content-length").unwrap().1.parse().unwrap();
                if self.buf.len() >= end + 4 + len {
                    let body = serde_json::from_slice(&self.buf[end + 4..end + 4 + len]).unwrap();
                    self.buf.drain(..end + 4 + len);
                    return Some(Resp { status, headers, body });
                }
            }
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("read: {e}"),
            }
        }
    }
}

fn counts(r: &Resp) -> (u64, u64, u64, u64) {
    let n = |k: &str| r.body[k].as_u64().unwrap_or(u64::MAX);
    (n("accepted"), n("local"), n("forwarded"), n("no_route"))
}

/// One message as JSON text, one as base64, one as a raw body, and a batch
/// as a JSON array and as NDJSON: each reaches its user's client, exactly
/// once and in order, and the answers count them as PUB_RESULT would.
#[test]
fn messages_published_over_http_reach_their_users() {
    let node = ApiNode::start(test_config());
    let (mut alice, mut bob) = (node.client("alice"), node.client("bob"));
    let mut h = Http::connect(node.http);
    let r = h.post("/v1/publish", r#"{"user":"alice","data":"fill 1"}"#);
    assert_eq!((r.status, counts(&r)), (200, (1, 1, 0, 0)), "{r:?}");
    let r = h.post("/v1/publish", r#"{"user":"bob","data_b64":"AP8BAg==","key":"EURUSD"}"#);
    assert_eq!(counts(&r), (1, 1, 0, 0));
    let r = h.call(
        "POST",
        "/v1/publish/al%69ce",
        Some(&pub_credential()),
        "application/octet-stream",
        b"\x00raw",
    );
    assert_eq!(counts(&r), (1, 1, 0, 0));
    let r = h.post("/v1/publish", r#"{"user":"nobody","data":"x"}"#);
    assert_eq!(counts(&r), (1, 0, 0, 1), "a user online nowhere: no_route");
    let r = h.post(
        "/v1/publish/batch",
        r#"[{"user":"alice","data":"b1"},{"user":"nobody","data":"b2"},{"user":"bob","data":"b3"}]"#,
    );
    assert_eq!(counts(&r), (3, 2, 0, 1));
    assert_eq!(r.body["results"][1], serde_json::json!({"local": false, "forwarded": false}));
    let nd = "{\"user\":\"alice\",\"data\":\"n1\"}\n{\"user\":\"alice\",\"data\":\"n2\"}\n";
    let r =
        h.call("POST", "/v1/publish/batch", Some(&pub_credential()), "application/x-ndjson", nd.as_bytes());
    assert_eq!(counts(&r), (2, 2, 0, 0));
    let got: Vec<Vec<u8>> = read_delivers(&mut alice, 5).into_iter().map(|(_, p)| p).collect();
    assert_eq!(got, [&b"fill 1"[..], b"\x00raw", b"b1", b"n1", b"n2"]);
    let got: Vec<Vec<u8>> = read_delivers(&mut bob, 2).into_iter().map(|(_, p)| p).collect();
    assert_eq!(got, [&[0u8, 255, 1, 2][..], b"b3"]);
    assert!(matches!(alice.next(Duration::from_millis(300)), Got::Timeout), "nothing more for alice");
}

/// Only a valid publisher credential may publish: none, a client token, a
/// forged one or an expired one get 401 with their code, and nothing is
/// delivered.
#[test]
fn publishing_needs_a_publisher_credential() {
    let node = ApiNode::start(test_config());
    let mut alice = node.client("alice");
    let mut h = Http::connect(node.http);
    let body = br#"{"user":"alice","data":"x"}"#;
    let expired = token::mint(PUBLISHER_SECRET, b"tests", unix_now() - 1).unwrap();
    for (auth, code) in [
        (None, "unauthorized"),
        (Some(token_for("alice")), "unauthorized"),
        (Some("v1.dGVzdHM.99999999999.00".to_string()), "unauthorized"),
        (Some(expired), "token_expired"),
    ] {
        let r = h.call("POST", "/v1/publish", auth.as_deref(), "application/json", body);
        assert_eq!((r.status, r.body["error"]["code"].as_str()), (401, Some(code)), "{auth:?}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    }
    assert!(matches!(alice.next(Duration::from_millis(300)), Got::Timeout), "nothing delivered");
    let r = h.post("/v1/publish", std::str::from_utf8(body).unwrap());
    assert_eq!(r.status, 200, "the same connection still works with a good credential");
}

/// Bad requests get a JSON error with a stable code and the field at fault;
/// a body error keeps the connection, a head error (a Content-Length over
/// the limit) is answered from the head alone and closes it.
#[test]
fn bad_requests_are_answered_with_their_codes() {
    let node = ApiNode::start(test_config());
    let mut h = Http::connect(node.http);
    let cases = [
        (r#"{"user":"","data":"x"}"#, 400, "bad_field", Some("user")),
        (r#"{"user":"a"}"#, 400, "bad_field", Some("data")),
        (r#"{"user":"a","data_b64":"***"}"#, 400, "bad_field", Some("data_b64")),
        (r#"{"user":"a","data":"x","colour":"red"}"#, 400, "bad_json", None),
        ("[1,2", 400, "bad_json", None),
    ];
    for (body, status, code, field) in cases {
        let r = h.post("/v1/publish", body);
        assert_eq!(r.status, status, "{body}");
        assert_eq!(r.body["error"]["code"].as_str(), Some(code), "{body}");
        assert_eq!(r.body["error"]["field"].as_str(), field, "{body}");
    }
    let r = h.call("GET", "/v1/nothing", Some(&pub_credential()), "", b"");
    assert_eq!((r.status, r.body["error"]["code"].as_str()), (404, Some("not_found")));
    let r = h.call("PUT", "/v1/publish", Some(&pub_credential()), "", b"");
    assert_eq!(r.status, 405);
    // 10 MB announced: refused before a byte of it is sent, then closed.
    h.send(b"POST /v1/publish/batch HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n");
    let r = h.read().expect("an answer");
    assert_eq!((r.status, r.body["error"]["code"].as_str()), (413, Some("too_large")));
    assert_eq!(r.header("connection"), Some("close"));
    assert!(h.read().is_none(), "closed after a head error");
}

/// Keep-alive: requests pipelined on one connection are answered in order;
/// `Connection: close` ends it after its answer.
#[test]
fn pipelined_requests_are_answered_in_order() {
    let node = ApiNode::start(test_config());
    let mut alice = node.client("alice");
    let mut h = Http::connect(node.http);
    let cred = pub_credential();
    let mut all = Vec::new();
    for i in 0..50 {
        let body = format!(r#"{{"user":"alice","data":"m{i}"}}"#);
        all.extend(Http::request("POST", "/v1/publish", Some(&cred), "application/json", body.as_bytes()));
    }
    all.extend(Http::request("GET", "/v1/users/alice", Some(&cred), "", b""));
    h.send(&all);
    for _ in 0..50 {
        assert_eq!(counts(&h.read().unwrap()), (1, 1, 0, 0));
    }
    let u = h.read().unwrap();
    assert_eq!(u.body["stream"]["head"], 50, "{u:?}");
    let got: Vec<(u64, Vec<u8>)> = read_delivers(&mut alice, 50);
    for (i, (seq, p)) in got.iter().enumerate() {
        assert_eq!((*seq, p.as_slice()), (i as u64 + 1, format!("m{i}").as_bytes()));
    }
    h.send(b"GET /v1/users/alice HTTP/1.1\r\nConnection: close\r\nAuthorization: Bearer ");
    h.send(format!("{cred}\r\n\r\n").as_bytes());
    assert_eq!(h.read().unwrap().status, 200);
    assert!(h.read().is_none(), "Connection: close");
}

/// `GET /v1/users/{id}`: online here, with how many sessions and the
/// stream position; a user with no session anywhere is offline.
#[test]
fn where_a_user_is() {
    let node = ApiNode::start(test_config());
    let (_a1, _a2) = (node.client("alice"), node.client("alice"));
    let mut h = Http::connect(node.http);
    h.post("/v1/publish", r#"{"user":"alice","data":"x"}"#);
    let r = h.call("GET", "/v1/users/alice", Some(&pub_credential()), "", b"");
    assert_eq!(r.status, 200);
    assert_eq!((r.body["online"].as_bool(), r.body["online_here"].as_bool()), (Some(true), Some(true)));
    assert_eq!(r.body["sessions_here"], 2);
    assert_eq!(r.body["stream"]["head"], 1);
    assert!(r.body["stream"]["epoch"].as_str().is_some_and(|e| e.parse::<u64>().is_ok_and(|e| e != 0)));
    let r = h.call("GET", "/v1/users/carol", Some(&pub_credential()), "", b"");
    assert_eq!((r.body["online"].as_bool(), r.body["stream"].is_null()), (Some(false), true));
}

/// Slowloris: a request whose head never completes is closed once the
/// handshake deadline has passed (checked on the keepalive sweep).
#[test]
fn a_request_that_never_completes_is_closed() {
    let cfg = Config {
        handshake_timeout: Duration::from_millis(300),
        heartbeat: Duration::from_millis(200),
        ..test_config()
    };
    let node = ApiNode::start(cfg);
    let mut h = Http::connect(node.http);
    let t0 = Instant::now();
    h.send(b"POST /v1/publish HTTP/1.1\r\nContent-Le");
    let mut sent = 0;
    let closed = loop {
        std::thread::sleep(Duration::from_millis(100));
        if h.s.write_all(b"n").is_err() {
            break true;
        }
        sent += 1;
        if h.read_nonblocking_eof() {
            break true;
        }
        if t0.elapsed() > Duration::from_secs(4) {
            break false;
        }
    };
    assert!(closed, "still open after {:?} ({sent} bytes trickled)", t0.elapsed());
}

impl Http {
    /// Whether the peer has closed (EOF or reset), without waiting.
    fn read_nonblocking_eof(&mut self) -> bool {
        self.s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1024];
        let r = self.s.read(&mut b);
        self.s.set_nonblocking(false).unwrap();
        matches!(r, Ok(0)) || matches!(&r, Err(e) if e.kind() != std::io::ErrorKind::WouldBlock)
    }
}

/// `herald publish --http URL`: the CLI publishes through the API and
/// prints the node's counts; a bad credential exits 1 with the node's
/// answer.
#[test]
fn herald_publish_over_http() {
    let node = ApiNode::start(test_config());
    let mut alice = node.client("alice");
    let url = format!("http://{}", node.http);
    let run = |cred: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args([
                "publish",
                "--http",
                &url,
                "--user",
                "alice",
                "--message",
                "from the cli",
                "--credential",
                cred,
            ])
            .output()
            .unwrap()
    };
    let out = run(&pub_credential());
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "accepted=1 local=1 forwarded=0 no_route=0");
    assert_eq!(read_delivers(&mut alice, 1)[0].1, b"from the cli");
    let out = run("v1.eA.99999999999.00");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 401"), "{out:?}");
}
