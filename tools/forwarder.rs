//! `herald-forwarder`: the floor that herald is measured against.
//!
//! A minimal single-threaded mio forwarder: clients connect and send a HELLO
//! whose token is taken as the user id *without verifying it*; publishers
//! connect to the ingest port and send PUBLISH / PUBLISH_BATCH without a
//! handshake. Each message is appended (as a DELIVER with epoch 0, seq 0) to
//! the output buffer of the user's connections, and every dirty socket gets
//! one write per loop turn. No auth, no sequencing, no retention, no
//! keepalive, no metrics: what is left is what the kernel costs.
//!
//! It reuses herald's codec so that the load generator can drive both with
//! the same bytes; decoding is a few nanoseconds of the ~10 µs per message.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;

use clap::Parser;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use herald::protocol::frame::{encode_deliver, Frame};
use herald::protocol::{decode, Channel, Decoded};

#[derive(Parser)]
#[command(about = "Minimal forwarder: the loopback floor for herald benchmarks")]
struct Args {
    /// Client endpoint.
    #[arg(long, default_value = "127.0.0.1:7500")]
    listen: SocketAddr,
    /// Publisher endpoint.
    #[arg(long, default_value = "127.0.0.1:7501")]
    ingest: SocketAddr,
}

struct Conn {
    sock: TcpStream,
    publisher: bool,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    dirty: bool,
    want_write: bool,
}

const CLIENTS: Token = Token(0);
const INGEST: Token = Token(1);
const FIRST: usize = 2;

fn main() -> std::io::Result<()> {
    let a = Args::parse();
    let mut poll = Poll::new()?;
    let mut cl = TcpListener::bind(a.listen)?;
    let mut il = TcpListener::bind(a.ingest)?;
    poll.registry().register(&mut cl, CLIENTS, Interest::READABLE)?;
    poll.registry().register(&mut il, INGEST, Interest::READABLE)?;
    eprintln!("herald-forwarder: clients on {}, ingest on {}", cl.local_addr()?, il.local_addr()?);
    let mut conns: Slab<Conn> = Slab::new();
    let mut users: HashMap<Vec<u8>, Vec<usize>> = HashMap::new();
    let mut dirty: Vec<usize> = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut scratch = vec![0u8; 256 * 1024];
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            // A signal (a debugger or tracer attaching) interrupts the wait.
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for ev in events.iter() {
            match ev.token() {
                t @ (CLIENTS | INGEST) => loop {
                    let l = if t == CLIENTS { &cl } else { &il };
                    match l.accept() {
                        Ok((mut sock, _)) => {
                            let _ = sock.set_nodelay(true);
                            let e = conns.vacant_entry();
                            poll.registry().register(
                                &mut sock,
                                Token(e.key() + FIRST),
                                Interest::READABLE,
                            )?;
                            e.insert(Conn {
                                sock,
                                publisher: t == INGEST,
                                rbuf: Vec::new(),
                                wbuf: Vec::new(),
                                wpos: 0,
                                dirty: false,
                                want_write: false,
                            });
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(_) => break,
                    }
                },
                Token(t) => {
                    let key = t - FIRST;
                    if !conns.contains(key) {
                        continue;
                    }
                    if ev.is_writable() && !conns[key].dirty {
                        conns[key].dirty = true;
                        dirty.push(key);
                    }
                    let mut closed = false;
                    loop {
                        let c = &mut conns[key];
                        match c.sock.read(&mut scratch) {
                            Ok(0) => {
                                closed = true;
                                break;
                            }
                            Ok(n) => {
                                let mut buf = std::mem::take(&mut c.rbuf);
                                buf.extend_from_slice(&scratch[..n]);
                                let publisher = c.publisher;
                                let mut at = 0;
                                let ch = if publisher { Channel::Ingest } else { Channel::ToNode };
                                while let Ok(Decoded::Frame(f, used)) = decode(&buf[at..], ch) {
                                    at += used;
                                    match f {
                                        Frame::Hello(h) if !publisher => {
                                            users.entry(h.token.to_vec()).or_default().push(key)
                                        }
                                        Frame::Publish(p) => {
                                            route(&mut conns, &users, &mut dirty, p.user, p.payload)
                                        }
                                        Frame::PublishBatch(b) => {
                                            for e in b.entries.iter() {
                                                route(&mut conns, &users, &mut dirty, e.user, e.payload);
                                            }
                                        }
                                        _ => {}
                                    }
                                }
                                buf.drain(..at);
                                conns[key].rbuf = buf;
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(_) => {
                                closed = true;
                                break;
                            }
                        }
                    }
                    if closed {
                        let mut c = conns.remove(key);
                        let _ = poll.registry().deregister(&mut c.sock);
                        for v in users.values_mut() {
                            v.retain(|&k| k != key);
                        }
                    }
                }
            }
        }
        for key in dirty.drain(..) {
            let Some(c) = conns.get_mut(key) else { continue };
            c.dirty = false;
            if c.wpos < c.wbuf.len() {
                if let Ok(n) = c.sock.write(&c.wbuf[c.wpos..]) {
                    c.wpos += n;
                }
            }
            if c.wpos == c.wbuf.len() {
                c.wbuf.clear();
                c.wpos = 0;
                if c.want_write {
                    c.want_write = false;
                    poll.registry().reregister(&mut c.sock, Token(key + FIRST), Interest::READABLE)?;
                }
            } else if !c.want_write {
                c.want_write = true;
                poll.registry().reregister(
                    &mut c.sock,
                    Token(key + FIRST),
                    Interest::READABLE | Interest::WRITABLE,
                )?;
            }
        }
    }
}

fn route(
    conns: &mut Slab<Conn>,
    users: &HashMap<Vec<u8>, Vec<usize>>,
    dirty: &mut Vec<usize>,
    user: &[u8],
    payload: &[u8],
) {
    if let Some(keys) = users.get(user) {
        for &k in keys {
            if let Some(c) = conns.get_mut(k) {
                encode_deliver(&mut c.wbuf, 0, 0, payload);
                if !c.dirty {
                    c.dirty = true;
                    dirty.push(k);
                }
            }
        }
    }
}
