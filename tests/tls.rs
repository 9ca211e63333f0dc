//! TLS on the client port (protocol.md §11), over real sockets: a TLS
//! client gets its messages; a client that trusts another CA, or a node
//! with an expired certificate, is refused; plaintext bytes on a TLS port
//! get a clean close; SIGHUP swaps the certificate for new connections
//! while old ones keep receiving, and a broken new key keeps the old one.
//! The decision server's TLS request port too: ASSIGN, NODES and `herald
//! admin` over TLS, a plaintext request answered by an alert and a close,
//! and a client assigned a DNS name (`localhost:PORT`) that it verifies.
//! The metrics port over HTTPS.

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald::client::{Client, ClientConfig, Event, Publisher};
use herald::decision::client::{self as dc, AssignOutcome, DecisionError, Dial};
use herald::protocol::frame::{self as f, Frame};
use herald::protocol::VERSION;
use herald::tls::ServerFiles;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use util::proc::{self, Proc};
use util::*;

/// A test CA in a directory of its own.
struct Pki {
    dir: PathBuf,
    ca_pem: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("herald-tls-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("herald test CA {tag}"));
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let ca_pem = dir.join("ca.pem");
        std::fs::write(&ca_pem, cert.pem()).unwrap();
        Pki { dir, ca_pem, issuer: Issuer::new(params, key) }
    }

    /// A certificate for localhost and 127.0.0.1, written as NAME.pem and
    /// NAME.key; returns (cert path, key path, the leaf's DER).
    fn issue(&self, name: &str, expired: bool) -> (PathBuf, PathBuf, Vec<u8>) {
        self.issue_for(name, &["localhost"], expired)
    }

    /// A certificate whose DNS names are `dns` (plus IP 127.0.0.1).
    fn issue_for(&self, name: &str, dns: &[&str], expired: bool) -> (PathBuf, PathBuf, Vec<u8>) {
        let mut p = CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>()).unwrap();
        p.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let (cp, kp) = (self.dir.join(format!("{name}.pem")), self.dir.join(format!("{name}.key")));
        std::fs::write(&cp, cert.pem()).unwrap();
        std::fs::write(&kp, key.serialize_pem()).unwrap();
        (cp, kp, cert.der().to_vec())
    }

    fn files(&self, name: &str, expired: bool) -> ServerFiles {
        let (cert, key, _) = self.issue(name, expired);
        ServerFiles { cert, key, client_ca: None, client_cert_optional: false }
    }

    fn client(&self) -> Arc<rustls::ClientConfig> {
        herald::tls::client_config(Some(&self.ca_pem)).unwrap()
    }
}

/// A fresh session's HELLO for `user`.
fn hello_bytes(user: &str) -> Vec<u8> {
    let token = token_for(user);
    Frame::Hello(f::Hello {
        min_version: VERSION,
        max_version: VERSION,
        token: token.as_bytes(),
        agent: b"",
        resume: None,
    })
    .to_vec()
}

fn tls_node(files: ServerFiles) -> TestNode {
    TestNode::start(herald::node::Config { tls: Some(files), ..test_config() })
}

fn tls_client(addr: SocketAddr, user: &str, tls: Arc<rustls::ClientConfig>) -> Result<Client, String> {
    let cfg = ClientConfig {
        tls: Some(tls),
        ..ClientConfig::new(format!("localhost:{}", addr.port()), token_for(user))
    };
    Client::connect(cfg).map_err(|e| e.to_string())
}

fn expect_message(c: &mut Client, want: &[u8]) {
    loop {
        match c.next_event().unwrap() {
            Event::Message(m) => {
                assert_eq!(&m.payload[..], want);
                return;
            }
            Event::Connected { .. } => continue,
            other => panic!("{other:?}"),
        }
    }
}

fn publish(ingest: SocketAddr, user: &[u8], msg: &[u8]) {
    let mut p = Publisher::connect(&ingest.to_string(), &pub_credential()).unwrap();
    p.publish(user, msg).unwrap();
    p.flush().unwrap();
}

#[test]
fn a_tls_client_gets_its_messages() {
    let pki = Pki::new("ok");
    let node = tls_node(pki.files("node", false));
    let mut c = tls_client(node.client, "tina", pki.client()).expect("TLS client connects");
    publish(node.ingest, b"tina", b"over tls");
    expect_message(&mut c, b"over tls");
    // A plaintext client on the TLS port gets nowhere.
    let plain = Client::connect(ClientConfig::new(node.client.to_string(), token_for("plain")));
    assert!(plain.is_err(), "a plaintext client on a TLS port must not be welcomed");
}

#[test]
fn a_client_that_trusts_another_ca_is_refused() {
    let (pki, other) = (Pki::new("node-ca"), Pki::new("other-ca"));
    let node = tls_node(pki.files("node", false));
    let err = tls_client(node.client, "eve", other.client()).err().expect("must be refused");
    assert!(err.contains("UnknownIssuer") || err.contains("certificate"), "{err}");
    // The node keeps serving everyone else.
    let mut c = tls_client(node.client, "ok", pki.client()).unwrap();
    publish(node.ingest, b"ok", b"still here");
    expect_message(&mut c, b"still here");
}

#[test]
fn an_expired_certificate_is_refused() {
    let pki = Pki::new("expired");
    let node = tls_node(pki.files("old", true));
    let err = tls_client(node.client, "x", pki.client()).err().expect("must be refused");
    assert!(err.contains("Expired") || err.contains("expired"), "{err}");
}

#[test]
fn a_plaintext_hello_on_a_tls_port_gets_a_clean_close() {
    let pki = Pki::new("plain");
    let node = tls_node(pki.files("node", false));
    let mut s = TcpStream::connect(node.client).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&hello_bytes("p")).unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue, // a TLS alert
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("no close within 5 s: {e}"),
        }
    }
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(eventually(|| node.closes("tls_error"), 1), 1);
}

/// The leaf certificate a TLS handshake with `addr` is shown.
fn served_cert(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Vec<u8> {
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(tls, name).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).unwrap();
    }
    conn.peer_certificates().unwrap()[0].to_vec()
}

/// Issues a new certificate under `name`'s paths, sends SIGHUP, and waits
/// until `addr` serves it instead of `first`; returns the new one.
fn rotate(p: &Proc, pki: &Pki, name: &str, addr: SocketAddr, first: &[u8]) -> Vec<u8> {
    assert_eq!(served_cert(addr, pki.client()), first);
    let (_, _, second) = pki.issue(name, false);
    assert_ne!(first, second);
    p.signal(libc::SIGHUP);
    let t0 = Instant::now();
    while served_cert(addr, pki.client()) != second {
        assert!(t0.elapsed() < Duration::from_secs(5), "the new certificate is never served");
        std::thread::sleep(Duration::from_millis(50));
    }
    second
}

/// Breaks the key file, sends SIGHUP: the reload is refused and `addr`
/// keeps serving `current`.
fn reload_a_broken_key(p: &Proc, pki: &Pki, key: &Path, addr: SocketAddr, current: &[u8]) {
    std::fs::write(key, b"-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n").unwrap();
    p.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(served_cert(addr, pki.client()), current, "a bad reload must keep the old certificate");
}

fn write_secret(dir: &Path, name: &str, s: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, s).unwrap();
    p
}

#[test]
fn sighup_serves_a_new_certificate_to_new_connections_and_keeps_the_old_sessions() {
    let pki = Pki::new("reload");
    let (cert, key, first) = pki.issue("node", false);
    let cs = write_secret(&pki.dir, "c", CLIENT_SECRET);
    let ps = write_secret(&pki.dir, "p", PUBLISHER_SECRET);
    let node = Proc::spawn(
        [
            "node",
            "--listen",
            "127.0.0.1:0",
            "--ingest",
            "127.0.0.1:0",
            "--secret-file",
            cs.to_str().unwrap(),
            "--publisher-secret-file",
            ps.to_str().unwrap(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        None,
    );
    let addr: SocketAddr = node.after("clients on ").unwrap().parse().unwrap();
    let ingest: SocketAddr = node.after("ingest on ").unwrap().parse().unwrap();
    assert_eq!(served_cert(addr, pki.client()), first);
    let mut old = tls_client(addr, "old", pki.client()).unwrap();

    // A new certificate under the same paths, then SIGHUP.
    let second = rotate(&node, &pki, "node", addr, &first);
    publish(ingest, b"old", b"after reload");
    expect_message(&mut old, b"after reload");

    // A broken key: refused, and the last good certificate stays in use.
    reload_a_broken_key(&node, &pki, &key, addr, &second);
    let mut fresh = tls_client(addr, "fresh", pki.client()).unwrap();
    publish(ingest, b"fresh", b"still served");
    expect_message(&mut fresh, b"still served");
}

/// A node whose client and ingest ports both speak TLS, mesh peers verified
/// against `pki`'s CA.
fn tls_ingest_node(pki: &Pki) -> TestNode {
    let (cert, key, _) = pki.issue("node", false);
    TestNode::start(herald::node::Config {
        tls: Some(ServerFiles { cert, key, client_ca: None, client_cert_optional: false }),
        tls_ports: herald::node::TlsPorts { client: true, ingest: true, metrics: false, http: false },
        cluster_ca: Some(pki.ca_pem.clone()),
        cluster_secret: CLUSTER.to_vec(),
        ..test_config()
    })
}

const CLUSTER: &[u8] = b"cluster-secret-for-tls-tests";

#[test]
fn a_publisher_over_tls_reaches_a_tls_client() {
    let pki = Pki::new("ingest");
    let node = tls_ingest_node(&pki);
    let mut c = tls_client(node.client, "pat", pki.client()).unwrap();
    let ingest = format!("localhost:{}", node.ingest.port());
    let mut p = Publisher::connect_tls(&[ingest], &pub_credential(), Some(pki.client())).unwrap();
    p.publish(b"pat", b"tls both ways").unwrap();
    p.flush().unwrap();
    expect_message(&mut c, b"tls both ways");
    // A plaintext publisher on the TLS ingest port gets nowhere.
    assert!(Publisher::connect(&node.ingest.to_string(), &pub_credential()).is_err());
}

/// Sends PEER_HELLO claiming `claim` over TLS to the ingest port, with the
/// client certificate `cert` (none: no certificate); returns the frame type
/// and code of the answer.
fn peer_hello_over_tls(
    pki: &Pki,
    ingest: SocketAddr,
    cert: Option<(&Path, &Path)>,
    claim: &str,
) -> (u8, Option<herald::protocol::Code>) {
    let cfg = match cert {
        Some((c, k)) => herald::tls::mesh_client_config(c, k, &pki.ca_pem).unwrap(),
        None => pki.client(),
    };
    let sock = TcpStream::connect(ingest).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = rustls::StreamOwned::new(rustls::ClientConnection::new(cfg, name).unwrap(), sock);
    let hello = Frame::PeerHello(f::PeerHello {
        min_version: VERSION,
        max_version: VERSION,
        node_id: claim.as_bytes(),
        incarnation: 1,
        nonce: [7; 16],
    });
    s.write_all(&hello.to_vec()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok(herald::protocol::Decoded::Frame(fr, _)) =
            herald::protocol::decode(&buf, herald::protocol::Channel::FromIngest)
        {
            return match fr {
                Frame::Error(e) => (f::ty::ERROR, Some(e.code)),
                other => (other.frame_type(), None),
            };
        }
        let n = s.read(&mut chunk).expect("an answer");
        assert!(n > 0, "closed without an answer");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn a_mesh_peer_must_hold_a_cluster_certificate_for_the_node_id_it_claims() {
    let pki = Pki::new("mesh");
    let node = tls_ingest_node(&pki);
    let (a0_cert, a0_key, _) = pki.issue_for("a0", &["a0"], false);
    let a0 = Some((a0_cert.as_path(), a0_key.as_path()));
    // The right certificate: the handshake goes on (PEER_WELCOME).
    assert_eq!(peer_hello_over_tls(&pki, node.ingest, a0, "a0"), (f::ty::PEER_WELCOME, None));
    // A certificate for a0 claiming to be n2: refused.
    let refused = (f::ty::ERROR, Some(herald::protocol::Code::AuthFailed));
    assert_eq!(peer_hello_over_tls(&pki, node.ingest, a0, "n2"), refused);
    // No certificate at all (as a publisher would connect): refused as a peer.
    assert_eq!(peer_hello_over_tls(&pki, node.ingest, None, "a0"), refused);
}

/// With several event loops, loop 0 hands each TLS session (rustls state
/// and all) to the loop that owns its user.
#[test]
fn tls_sessions_are_handed_to_the_loop_that_owns_the_user() {
    let pki = Pki::new("threads");
    let node = TestNode::start(herald::node::Config {
        tls: Some(pki.files("node", false)),
        threads: 3,
        ..test_config()
    });
    for id in 0..3 {
        let user = (0..)
            .map(|i| format!("lp{i}"))
            .find(|u| herald::node::shard::owner(u.as_bytes(), 3) == id)
            .unwrap();
        let mut c = tls_client(node.client, &user, pki.client()).unwrap();
        publish(node.ingest, user.as_bytes(), b"on its own loop");
        expect_message(&mut c, b"on its own loop");
    }
}

/// Regression (review of the TLS transport): a burst of more than 128 KiB
/// to a TLS client that reads as fast as it can is written in full at once.
/// The transport used to hand rustls 64 KiB per write and stop short with
/// room left in the socket, so no WRITABLE edge ever came for the rest: it
/// waited for the next keepalive, and a fast reader could be cut off as a
/// slow consumer.
#[test]
fn a_burst_over_128_kib_reaches_a_fast_tls_reader_at_once() {
    let pki = Pki::new("burst");
    let node = tls_node(pki.files("node", false));
    let sock = TcpStream::connect(node.client).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = rustls::StreamOwned::new(rustls::ClientConnection::new(pki.client(), name).unwrap(), sock);
    s.write_all(&hello_bytes("burst")).unwrap();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut next = |s: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>, buf: &mut Vec<u8>| loop {
        if let Ok(herald::protocol::Decoded::Frame(fr, n)) =
            herald::protocol::decode(buf, herald::protocol::Channel::ToClient)
        {
            let t = fr.frame_type();
            buf.drain(..n);
            return Some(t);
        }
        match s.read(&mut chunk) {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    };
    assert_eq!(next(&mut s, &mut buf), Some(f::ty::WELCOME));
    let mut p = Publisher::connect(&node.ingest.to_string(), &pub_credential()).unwrap();
    let payload = vec![b'x'; 1000];
    for _ in 0..200 {
        p.publish(b"burst", &payload).unwrap();
    }
    p.flush().unwrap();
    let t0 = Instant::now();
    let mut got = 0;
    while got < 200 {
        match next(&mut s, &mut buf) {
            Some(t) if t == f::ty::DELIVER => got += 1,
            Some(_) => {}
            None => panic!("{got} of 200 DELIVERs after {:?}", t0.elapsed()),
        }
    }
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
}

/// Mutual TLS on the client port (`--client-ca`): a client without a
/// certificate from that CA is refused at the handshake; one with it is
/// welcomed (and still needs its token).
#[test]
fn mutual_tls_refuses_a_client_without_a_certificate() {
    let pki = Pki::new("mtls");
    let (cert, key, _) = pki.issue("node", false);
    let node =
        tls_node(ServerFiles { cert, key, client_ca: Some(pki.ca_pem.clone()), client_cert_optional: false });
    let err = tls_client(node.client, "anon", pki.client()).err().expect("no client certificate: refused");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    let (dc, dk, _) = pki.issue_for("device", &["device"], false);
    let with_cert = herald::tls::mesh_client_config(&dc, &dk, &pki.ca_pem).unwrap();
    let mut c =
        tls_client(node.client, "dev", with_cert).expect("a client certificate from the CA is accepted");
    publish(node.ingest, b"dev", b"mutual");
    expect_message(&mut c, b"mutual");
}

// ---- The decision server's TCP port (protocol.md §7, §11) ----

const ADMIN_SECRET: &[u8] = b"admin-secret-for-tls-tests";

/// A decision server on loopback; TLS on its request port with `tls`.
fn decision(tls: Option<ServerFiles>) -> TestDecision {
    TestDecision::start(herald::decision::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        heartbeat: "127.0.0.1:0".parse().unwrap(),
        cluster_secret: CLUSTER.to_vec(),
        admin_secret: ADMIN_SECRET.to_vec(),
        log_every: Duration::ZERO,
        tls,
        ..herald::decision::Config::default()
    })
}

fn over_tls(tls: Arc<rustls::ClientConfig>) -> Dial {
    Dial::new(Duration::from_secs(2), Some(tls))
}

#[test]
fn a_tls_decision_server_answers_over_tls_only() {
    let (pki, other) = (Pki::new("dec"), Pki::new("dec-other"));
    let d = decision(Some(pki.files("decision", false)));
    let by_name = vec![format!("localhost:{}", d.tcp.port())];
    // TLS, verified for the DNS name dialled: an answer (no node yet).
    assert!(dc::nodes(&by_name, &over_tls(pki.client())).unwrap().is_empty());
    let a = dc::assign(&by_name, b"u", b"", 1, &over_tls(pki.client())).unwrap();
    assert!(matches!(a, AssignOutcome::NoCapacity { .. }), "{a:?}");
    // A client trusting another CA is refused at the handshake.
    let e = dc::assign(&by_name, b"u", b"", 1, &over_tls(other.client())).unwrap_err();
    assert!(e.to_string().contains("certificate") || e.to_string().contains("UnknownIssuer"), "{e}");
    // A plaintext request: the library says it is a TLS port…
    let plain = Dial::plain(Duration::from_secs(2));
    let e = dc::assign(&by_name, b"u", b"", 1, &plain).unwrap_err();
    assert!(matches!(e, DecisionError::TlsPort), "{e:?}");
    // …because the raw bytes are a TLS alert and a close, not a hang.
    let mut s = TcpStream::connect(d.tcp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let req =
        Frame::AssignRequest(f::AssignRequest { version: VERSION, user: b"u", max_results: 1, token: b"" })
            .to_vec();
    s.write_all(&req).unwrap();
    let t0 = Instant::now();
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("closed, not timed out");
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert_eq!(got, [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32], "a decode_error alert, then EOF");
    // Still serving TLS requesters.
    assert!(dc::nodes(&by_name, &over_tls(pki.client())).unwrap().is_empty());
    d.stop();
}

/// The whole TLS path with DNS names: a node advertising `localhost:PORT`
/// heartbeats a TLS decision server (and asks it for the node list over
/// TLS); the client library asks that server over TLS, is handed
/// `localhost:PORT`, resolves it, verifies the node's certificate for
/// `localhost`, and receives a message.
#[test]
fn a_tls_client_is_assigned_a_dns_name_and_reaches_the_tls_node() {
    let pki = Pki::new("dec-flow");
    let d = decision(Some(pki.files("decision", false)));
    // Free now: the node must advertise its own port before it binds it.
    let port = util::queues::free_port();
    let advertised = format!("localhost:{port}");
    let node = TestNode::start(herald::node::Config {
        node_id: "dns-node".into(),
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        advertise: Some(advertised.clone()),
        tls: Some(pki.files("node", false)),
        decision: vec![format!("localhost:{}/{}", d.tcp.port(), d.udp.port())],
        decision_tls: Some(herald::tls::Trust::Ca(pki.ca_pem.clone())),
        cluster_secret: CLUSTER.to_vec(),
        heartbeat_interval: Duration::from_millis(100),
        ..test_config()
    });
    let servers = vec![format!("localhost:{}", d.tcp.port())];
    let t0 = Instant::now();
    let assigned = loop {
        match dc::assign(&servers, b"dana", b"", 1, &over_tls(pki.client())).unwrap() {
            AssignOutcome::Nodes(n) => break n,
            AssignOutcome::NoCapacity { .. } => {
                assert!(t0.elapsed() < Duration::from_secs(5), "the node's heartbeat never arrived");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    assert_eq!((assigned[0].node_id.as_str(), assigned[0].endpoint.as_str()), ("dns-node", &advertised[..]));
    let cfg = ClientConfig {
        tls: Some(pki.client()),
        decision_tls: Some(pki.client()),
        user: Some("dana".into()),
        ..ClientConfig::with_decision(servers, token_for("dana"))
    };
    let mut c = Client::connect(cfg).expect("assigned over TLS, connected over TLS");
    publish(node.ingest, b"dana", b"via a dns name");
    expect_message(&mut c, b"via a dns name");
}

/// The real binaries: `herald decision --tls-cert/--tls-key` says so in its
/// first line; `herald admin --tls-ca` sets a ceiling over TLS, plaintext `herald
/// admin` is told it is a TLS port; SIGHUP serves a new certificate.
#[test]
fn herald_admin_over_tls_and_sighup_on_the_decision_server() {
    let pki = Pki::new("dec-bin");
    let (cert, key, first) = pki.issue("decision", false);
    let cs = write_secret(&pki.dir, "cluster", CLUSTER);
    let admin_file = write_secret(&pki.dir, "admin", ADMIN_SECRET);
    let mut args = proc::decision_args(&cs, &admin_file);
    args.extend(["--tls-cert".into(), cert.clone().into(), "--tls-key".into(), key.clone().into()]);
    let server = Proc::spawn(args, None);
    assert!(server.first_line.contains("requests over TLS"), "{}", server.first_line);
    let tcp: SocketAddr = server.after("requests on ").unwrap().parse().unwrap();
    let endpoint = format!("localhost:{}", tcp.port());
    let admin = |extra: &[&str], args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["admin", "--decision", &endpoint, "--admin-secret-file"])
            .arg(&admin_file)
            .args(extra)
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let ca = pki.ca_pem.to_str().unwrap();
    let (ok, out) = admin(&["--tls-ca", ca], &["set-ceiling", "55"]);
    assert!(ok && out.contains(": ok: "), "{out}");
    let (ok, out) = admin(&["--tls-ca", ca], &["status"]);
    assert!(ok && out.contains("global ceiling 55 %"), "{out}");
    let (ok, out) = admin(&[], &["status"]);
    assert!(!ok && out.contains("speaks TLS"), "plaintext admin to a TLS port: {out}");

    let second = rotate(&server, &pki, "decision", tcp, &first);
    reload_a_broken_key(&server, &pki, &key, tcp, &second);
    let (ok, out) = admin(&["--tls-ca", ca], &["status"]);
    assert!(ok, "{out}");
    let mut server = server;
    server.signal(libc::SIGTERM);
    let (status, log) = server.wait();
    assert!(status.success(), "{status}");
    assert!(
        log.iter().any(|l| l.contains("TLS reload refused, the old certificate stays in use")),
        "{log:?}"
    );
}

/// One HTTP/1.0 GET over TLS (ALPN http/1.1); returns the whole answer.
fn https_get(addr: SocketAddr, path: &str, tls: Arc<rustls::ClientConfig>) -> String {
    https_request(addr, format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes(), tls)
}

/// One HTTP/1.0 request over TLS (ALPN http/1.1); returns the whole answer.
fn https_request(addr: SocketAddr, request: &[u8], tls: Arc<rustls::ClientConfig>) -> String {
    let mut cfg = (*tls).clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut s = rustls::StreamOwned::new(conn, sock);
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => panic!("reading the HTTPS answer: {e}"),
    }
    assert_eq!(s.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn the_metrics_port_speaks_https_when_asked() {
    let pki = Pki::new("metrics");
    let node = TestNode::start(herald::node::Config {
        tls: Some(pki.files("node", false)),
        tls_ports: herald::node::TlsPorts { client: true, ingest: false, metrics: true, http: false },
        ..test_config()
    });
    let m = node.metrics.expect("a metrics port");
    let got = https_get(m, "/metrics", pki.client());
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains("herald_messages_in_total"), "{got}");
    assert!(https_get(m, "/healthz", pki.client()).starts_with("HTTP/1.1 200"));
    // Plaintext HTTP on the HTTPS port: an alert and a close, no answer.
    let mut s = TcpStream::connect(m).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(out.starts_with(&[0x15, 0x03]), "an alert record, not HTTP: {out:?}");
    assert!(!String::from_utf8_lossy(&out).contains("herald_"), "no metrics over plaintext");
}

/// `--tls-ports http`: the HTTP publish API over HTTPS (ALPN http/1.1): a
/// publish reaches its user; plaintext HTTP on that port gets an alert.
#[test]
fn the_http_publish_api_speaks_https_when_asked() {
    let pki = Pki::new("http-api");
    let node = herald::node::Node::bind(herald::node::Config {
        tls: Some(pki.files("node", false)),
        tls_ports: herald::node::TlsPorts { client: false, ingest: false, metrics: false, http: true },
        http: Some("127.0.0.1:0".parse().unwrap()),
        ..test_config()
    })
    .unwrap();
    let (client, api) = (node.client_addr(), node.http_addr().unwrap());
    let handle = node.shutdown_handle();
    let t = std::thread::spawn(move || node.run());
    let mut alice = Raw::connect(client, herald::protocol::Channel::ToClient);
    send_hello(&mut alice, &token_for("alice"), None);
    alice.expect(Duration::from_secs(5));
    let body = r#"{"user":"alice","data":"over https"}"#;
    let req = format!(
        "POST /v1/publish HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n{body}",
        pub_credential(),
        body.len()
    );
    let got = https_request(api, req.as_bytes(), pki.client());
    assert!(got.starts_with("HTTP/1.1 200") && got.contains(r#""local":1"#), "{got}");
    assert_eq!(read_delivers(&mut alice, 1)[0].1, b"over https");
    // The library's HttpPublisher over HTTPS, verifying the node for `localhost`.
    let url = format!("https://localhost:{}", api.port());
    let mut p = herald::client::HttpPublisher::connect(&url, &pub_credential(), Some(pki.client())).unwrap();
    assert_eq!(p.publish("alice", b"from the library").unwrap().local, 1);
    assert_eq!(read_delivers(&mut alice, 1)[0].1, b"from the library");
    let mut s = TcpStream::connect(api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(out.starts_with(&[0x15, 0x03]), "an alert record, not HTTP: {out:?}");
    handle.trigger();
    t.join().unwrap().unwrap();
}
