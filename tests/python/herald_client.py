"""A small, standard-library-only Python client for the herald wire protocol v1 / v2.

Written from protocol.md alone (no look at the Rust sources). Contents:

* a table-driven codec for every frame of §2-§8 (encode / decode, with the
  §2.4 receiver checks: length limits per channel, type allowed on channel,
  truncation, trailing bytes, field ranges, undefined enum values, magic);
* ``Client``: the client side of client <-> node (§3): HELLO (with RESUME when
  it has a position), WELCOME (resume result -> loss report), DELIVER
  (position tracking, gap detection, duplicate discard), CONFLATED on a
  version-2 session (§3.8: reported as a ``Conflated`` event, moves the position,
  not a gap), PING -> PONG, keepalive watch, GOODBYE, ERROR, reconnect with resume;
* ``Publisher``: the publisher side of publisher <-> node (§5);
* ``ask_decision``: ASSIGN_REQUEST / ASSIGNMENT / NO_CAPACITY (§7.1), plaintext or
  over TLS (``tls=``, as for the client port) to a decision server whose port speaks TLS;
* tokens (§9): ``mint``, ``mint_ttl``, ``verify_token``; signed frames (§2.5)
  and the mesh tags (§6.2, §6.3);
* TLS on the client port (§11), with the standard ``ssl`` module: ``tls_context``
  (TLS 1.3 only, ALPN ``herald/1``, the node's certificate verified against a CA
  file or the system store, for the host of the endpoint dialled) and
  ``Client(..., tls=...)``. Plaintext stays the default.

Python 3.11, standard library only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import random
import re
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

# ---------------------------------------------------------------------------
# Constants (§1, §2.2, §2.3, §4)
# ---------------------------------------------------------------------------

MAGIC = 0x48524C44  # "HRLD"
VERSION = 1  # what Client / Publisher offer by default (max_version=2 for version 2)

# frame types (§2.3)
HELLO = 0x01
PING = 0x02
PONG = 0x03
PUB_HELLO = 0x10
PUBLISH = 0x11
PUBLISH_BATCH = 0x12
PEER_HELLO = 0x20
PEER_AUTH = 0x21
PRESENCE = 0x22
FORWARD = 0x23
ASSIGN_REQUEST = 0x30
NODES_REQUEST = 0x31
ADMIN = 0x32
HEARTBEAT = 0x40
WELCOME = 0x81
DELIVER = 0x82
CONFLATED = 0x83  # version 2 (§3.8)
GOODBYE = 0x84
PUB_WELCOME = 0x90
PUB_RESULT = 0x91
PEER_WELCOME = 0xA0
ASSIGNMENT = 0xB0
NO_CAPACITY = 0xB1
NODES = 0xB2
ADMIN_RESULT = 0xB3
ADMIN_STATUS = 0xB4
ERROR = 0xFF

FRAME_NAMES = {
    HELLO: "HELLO", PING: "PING", PONG: "PONG", PUB_HELLO: "PUB_HELLO",
    PUBLISH: "PUBLISH", PUBLISH_BATCH: "PUBLISH_BATCH", PEER_HELLO: "PEER_HELLO",
    PEER_AUTH: "PEER_AUTH", PRESENCE: "PRESENCE", FORWARD: "FORWARD",
    ASSIGN_REQUEST: "ASSIGN_REQUEST", NODES_REQUEST: "NODES_REQUEST", ADMIN: "ADMIN",
    HEARTBEAT: "HEARTBEAT", WELCOME: "WELCOME", DELIVER: "DELIVER",
    CONFLATED: "CONFLATED", GOODBYE: "GOODBYE",
    PUB_WELCOME: "PUB_WELCOME", PUB_RESULT: "PUB_RESULT", PEER_WELCOME: "PEER_WELCOME",
    ASSIGNMENT: "ASSIGNMENT", NO_CAPACITY: "NO_CAPACITY", NODES: "NODES",
    ADMIN_RESULT: "ADMIN_RESULT", ADMIN_STATUS: "ADMIN_STATUS", ERROR: "ERROR",
}
FRAME_TYPES = {v: k for k, v in FRAME_NAMES.items()}

# flags (§1)
FLAG_RESUME = 0x01
FLAG_WANT_RESULT = 0x01
FLAG_SNAPSHOT_BEGIN = 0x01
FLAG_SNAPSHOT_END = 0x02
FLAG_DRAINING = 0x01
FLAG_DRAINED = 0x02  # NODES entry: drained by an admin (with DRAINING)

# codes (§4.1)
PROTOCOL_ERROR = 1
UNSUPPORTED_VERSION = 2
BAD_MAGIC = 3
FRAME_TOO_LARGE = 4
UNKNOWN_FRAME_TYPE = 5
UNEXPECTED_FRAME = 6
HANDSHAKE_TIMEOUT = 7
AUTH_FAILED = 8
TOKEN_EXPIRED = 9
SERVER_FULL = 10
SLOW_CONSUMER = 11
IDLE_TIMEOUT = 12
DRAINING = 13
NO_CAPACITY_CODE = 14  # the code; NO_CAPACITY is the frame type 0xB1
BAD_REQUEST = 15
REBALANCE = 16
INTERNAL = 17
SESSION_LIMIT = 18  # version 2; a node sends it to version-1 clients too
LOG_UNAVAILABLE = 19  # durable mode (§13)
CODE_NAMES = {
    1: "PROTOCOL_ERROR", 2: "UNSUPPORTED_VERSION", 3: "BAD_MAGIC", 4: "FRAME_TOO_LARGE",
    5: "UNKNOWN_FRAME_TYPE", 6: "UNEXPECTED_FRAME", 7: "HANDSHAKE_TIMEOUT",
    8: "AUTH_FAILED", 9: "TOKEN_EXPIRED", 10: "SERVER_FULL", 11: "SLOW_CONSUMER",
    12: "IDLE_TIMEOUT", 13: "DRAINING", 14: "NO_CAPACITY", 15: "BAD_REQUEST",
    16: "REBALANCE", 17: "INTERNAL", 18: "SESSION_LIMIT", 19: "LOG_UNAVAILABLE",
}

# resume results (§4.2) and goodbye actions (§4.3)
FRESH, RESUMED, GAP, RESTARTED = 0, 1, 2, 3
RESUME_NAMES = {0: "FRESH", 1: "RESUMED", 2: "GAP", 3: "RESTARTED"}
ASK_DECISION, GO_TO_NODE, RETRY_AFTER = 0, 1, 2
ACTION_NAMES = {0: "ASK_DECISION", 1: "GO_TO_NODE", 2: "RETRY_AFTER"}
OFFLINE, ONLINE = 0, 1
ADMIN_OPS = {1: "STATUS", 2: "SET_CEILING", 3: "SET_CAPACITY", 4: "DRAIN", 5: "UNDRAIN"}

# limits (§2.2)
MAX_USER_LEN = 64
MAX_KEY_LEN = 64
MAX_NODE_ID_LEN = 64
MAX_ENDPOINT_LEN = 128
MAX_TOKEN_LEN = 512
MAX_AGENT_LEN = 64
MAX_PAYLOAD = 65536
MAX_ERROR_MESSAGE_LEN = 1024
MAX_ADMIN_MESSAGE_LEN = 4096
MAX_BATCH = 1024
MAX_ASSIGN_RESULTS = 8
MAX_CONFLATED_KEYS = 255  # keys in one CONFLATED: list8, 1..=255 (§3.8)

# §2.4 step 2, table max-lengths: the largest valid `length` of each type whose
# fields are all bounded; above it -> PROTOCOL_ERROR from the header alone.
MAX_LENGTHS: dict[int, int] = {
    HELLO: 603, PING: 9, PONG: 9, WELCOME: 96, CONFLATED: 16601, GOODBYE: 137,
    ERROR: 1029, PUB_HELLO: 587, PUB_WELCOME: 71, PUB_RESULT: 13, PEER_HELLO: 96,
    PEER_WELCOME: 123, PEER_AUTH: 33,
}

# channels (§2.2): name -> (max length, allowed types)
CHANNELS: dict[str, tuple[int, frozenset[int]]] = {
    "ToNode": (2048, frozenset({HELLO, PING, PONG, ERROR})),
    "ToClient": (65553, frozenset({WELCOME, DELIVER, CONFLATED, GOODBYE, PING, PONG, ERROR})),
    "Ingest": (1048576, frozenset({PUB_HELLO, PUBLISH, PUBLISH_BATCH, PEER_HELLO, PEER_AUTH,
                                   PRESENCE, FORWARD, PING, PONG, ERROR})),
    "FromIngest": (1048576, frozenset({PUB_WELCOME, PUB_RESULT, PEER_WELCOME, PRESENCE,
                                       FORWARD, GOODBYE, PING, PONG, ERROR})),
    "ToDecision": (1024, frozenset({ASSIGN_REQUEST, NODES_REQUEST, ADMIN, ERROR})),
    "FromDecision": (1048576, frozenset({ASSIGNMENT, NO_CAPACITY, NODES, ADMIN_RESULT,
                                         ADMIN_STATUS, ERROR})),
    "Heartbeat": (1024, frozenset({HEARTBEAT})),
}


class HeraldError(Exception):
    """A local protocol failure; ``code`` is the §4.1 code to send in ERROR."""

    def __init__(self, code: int, message: str = ""):
        self.code = code
        self.message = message
        super().__init__(f"{CODE_NAMES.get(code, code)}: {message}")


class RemoteError(Exception):
    """The peer sent ERROR (and closed)."""

    def __init__(self, code: int, message: bytes):
        self.code = code
        self.message = message
        super().__init__(f"ERROR {CODE_NAMES.get(code, 'code ' + str(code))}: "
                         f"{message.decode('utf-8', 'replace')}")


class ConnectionClosed(Exception):
    """EOF, I/O error, keepalive timeout or handshake timeout."""


class TLSError(ConnectionClosed):
    """The TLS session to the node could not be set up, or does not meet §11: the
    certificate failed verification (``verify_failed``; ``verify_message`` says why),
    the node sent an alert (``reason``, e.g. ``TLSV1_ALERT_PROTOCOL_VERSION``), the
    handshake timed out or was cut, or the version is not TLS 1.3 / the ALPN protocol
    is not ``herald/1``. No HELLO was sent on such a session (§11)."""

    def __init__(self, message: str, *, reason: Optional[str] = None, verify_failed: bool = False,
                 verify_message: Optional[str] = None):
        self.reason = reason
        self.verify_failed = verify_failed
        self.verify_message = verify_message
        super().__init__(message)


class TLSPortError(ConnectionClosed):
    """A plaintext connection heard a TLS alert record where it expected a frame: the
    port speaks TLS (§11). Connect with ``tls=``. ``alert`` is the alert description
    code when it was received whole (50 decode_error, 70 protocol_version, ...)."""

    def __init__(self, message: str, alert: Optional[int] = None):
        self.alert = alert
        super().__init__(message)


# ---------------------------------------------------------------------------
# Codec (§2-§8). A layout is a list of field specs:
#   (name, "magic")
#   (name, "u8"|"u16"|"u32"|"u64"|"i32", allowed-or-None)
#   (name, "str8"|"str16"|"str32", lo, hi)      -> bytes
#   (name, "bytes", n)                          -> bytes
#   (name, "rest", lo, hi)                      -> bytes
#   (name, "list8"|"list16"|"list32", lo, hi, layout) -> list[dict]
# ---------------------------------------------------------------------------

_INT = {"u8": ">B", "u16": ">H", "u32": ">I", "u64": ">Q", "i32": ">i"}
_LEN = {"str8": "u8", "str16": "u16", "str32": "u32",
        "list8": "u8", "list16": "u16", "list32": "u32"}
_NO_RANGE = None

LAYOUTS: dict[int, list[tuple]] = {
    HELLO: [("magic", "magic"), ("min_version", "u8", None), ("max_version", "u8", None),
            ("flags", "u8", None), ("token", "str16", 1, MAX_TOKEN_LEN),
            ("agent", "str8", 0, MAX_AGENT_LEN), ("resume_epoch", "u64", None),
            ("resume_seq", "u64", None)],
    PING: [("nonce", "u64", None)],
    PONG: [("nonce", "u64", None)],
    PUB_HELLO: [("magic", "magic"), ("min_version", "u8", None), ("max_version", "u8", None),
                ("flags", "u8", None), ("credential", "str16", 1, MAX_TOKEN_LEN),
                ("agent", "str8", 0, MAX_AGENT_LEN)],
    PUBLISH: [("flags", "u8", None), ("request_id", "u32", None),
              ("user", "str8", 1, MAX_USER_LEN), ("key", "str8", 0, MAX_KEY_LEN),
              ("payload", "rest", 0, MAX_PAYLOAD)],
    PUBLISH_BATCH: [("flags", "u8", None), ("request_id", "u32", None),
                    ("entries", "list16", 1, MAX_BATCH,
                     [("user", "str8", 1, MAX_USER_LEN), ("key", "str8", 0, MAX_KEY_LEN),
                      ("payload", "str32", 0, MAX_PAYLOAD)])],
    PEER_HELLO: [("magic", "magic"), ("min_version", "u8", None), ("max_version", "u8", None),
                 ("node_id", "str8", 1, MAX_NODE_ID_LEN), ("incarnation", "u64", None),
                 ("nonce", "bytes", 16)],
    PEER_AUTH: [("tag", "bytes", 32)],
    PRESENCE: [("flags", "u8", None),
               ("entries", "list32", 0, 0xFFFFFFFF,
                [("op", "u8", (OFFLINE, ONLINE)), ("user", "str8", 1, MAX_USER_LEN)])],
    FORWARD: [("flags", "u8", None), ("user", "str8", 1, MAX_USER_LEN),
              ("key", "str8", 0, MAX_KEY_LEN), ("payload", "rest", 0, MAX_PAYLOAD)],
    ASSIGN_REQUEST: [("magic", "magic"), ("version", "u8", None),
                     ("user", "str8", 0, MAX_USER_LEN),
                     ("max_results", "u8", range(1, MAX_ASSIGN_RESULTS + 1))],
    NODES_REQUEST: [("magic", "magic"), ("version", "u8", None)],
    ADMIN: [("magic", "magic"), ("version", "u8", None), ("timestamp_ms", "u64", None),
            ("nonce", "u64", None), ("op", "u8", tuple(ADMIN_OPS)),
            ("node_id", "str8", 0, MAX_NODE_ID_LEN), ("value", "u32", None),
            ("tag", "bytes", 32)],
    HEARTBEAT: [("magic", "magic"), ("version", "u8", None),
                ("node_id", "str8", 1, MAX_NODE_ID_LEN), ("incarnation", "u64", None),
                ("seq", "u64", None), ("sent_at_ms", "u64", None),
                ("client_endpoint", "str8", 1, MAX_ENDPOINT_LEN),
                ("ingest_endpoint", "str8", 0, MAX_ENDPOINT_LEN),
                ("connections", "u32", None), ("capacity", "u32", None), ("flags", "u8", None),
                ("msgs_in_per_s", "u32", None), ("msgs_out_per_s", "u32", None),
                ("cpu_permille", "u16", None), ("tag", "bytes", 32)],
    WELCOME: [("version", "u8", None), ("resume", "u8", (FRESH, RESUMED, GAP, RESTARTED)),
              ("heartbeat_ms", "u32", None), ("session_id", "u64", None),
              ("epoch", "u64", None), ("next_seq", "u64", None),
              ("node_id", "str8", 1, MAX_NODE_ID_LEN)],
    DELIVER: [("epoch", "u64", None), ("seq", "u64", None), ("payload", "rest", 0, MAX_PAYLOAD)],
    # §3.8; keys decode as [{"key": b"..."}, ...]; last_seq >= first_seq is checked
    # after the fields (decode_body / encode)
    CONFLATED: [("epoch", "u64", None), ("first_seq", "u64", None), ("last_seq", "u64", None),
                ("keys", "list8", 1, MAX_CONFLATED_KEYS, [("key", "str8", 1, MAX_KEY_LEN)])],
    GOODBYE: [("reason", "u16", None), ("action", "u8", (ASK_DECISION, GO_TO_NODE, RETRY_AFTER)),
              ("delay_ms", "u32", None), ("target", "str8", 0, MAX_ENDPOINT_LEN)],
    PUB_WELCOME: [("version", "u8", None), ("max_frame", "u32", None),
                  ("node_id", "str8", 1, MAX_NODE_ID_LEN)],
    PUB_RESULT: [("request_id", "u32", None), ("accepted", "u16", None), ("local", "u16", None),
                 ("forwarded", "u16", None), ("no_route", "u16", None)],
    PEER_WELCOME: [("version", "u8", None), ("node_id", "str8", 1, MAX_NODE_ID_LEN),
                   ("incarnation", "u64", None), ("nonce", "bytes", 16), ("tag", "bytes", 32)],
    ASSIGNMENT: [("entries", "list8", 1, MAX_ASSIGN_RESULTS,
                  [("node_id", "str8", 1, MAX_NODE_ID_LEN),
                   ("endpoint", "str8", 1, MAX_ENDPOINT_LEN)])],
    NO_CAPACITY: [("retry_after_ms", "u32", None)],
    NODES: [("entries", "list16", 0, 0xFFFF,
             [("node_id", "str8", 1, MAX_NODE_ID_LEN), ("incarnation", "u64", None),
              ("client_endpoint", "str8", 1, MAX_ENDPOINT_LEN),
              ("ingest_endpoint", "str8", 0, MAX_ENDPOINT_LEN), ("flags", "u8", None)])],
    ADMIN_RESULT: [("status", "u16", None), ("message", "str16", 0, MAX_ADMIN_MESSAGE_LEN)],
    ADMIN_STATUS: [("ceiling_pct", "u8", None),
                   ("entries", "list16", 0, 0xFFFF,
                    [("node_id", "str8", 1, MAX_NODE_ID_LEN),
                     ("client_endpoint", "str8", 0, MAX_ENDPOINT_LEN),
                     ("connections", "u32", None), ("capacity", "u32", None),
                     ("ceiling_pct", "u8", None), ("headroom", "i32", None),
                     ("heartbeat_age_ms", "u32", None), ("flags", "u8", None),
                     ("msgs_out_per_s", "u32", None)])],
    ERROR: [("code", "u16", None), ("message", "str16", 0, MAX_ERROR_MESSAGE_LEN)],
}

SIGNED = frozenset({ADMIN, HEARTBEAT})


@dataclass
class Frame:
    type: int
    fields: dict
    raw: bytes = b""

    @property
    def name(self) -> str:
        return FRAME_NAMES.get(self.type, hex(self.type))

    def __getitem__(self, k):
        return self.fields[k]


class _Cursor:
    __slots__ = ("b", "i")

    def __init__(self, b: bytes):
        self.b = b
        self.i = 0

    def take(self, n: int, what: str) -> bytes:
        if self.i + n > len(self.b):
            raise HeraldError(PROTOCOL_ERROR, f"truncated field {what}")
        v = self.b[self.i:self.i + n]
        self.i += n
        return v

    def int(self, kind: str, what: str) -> int:
        fmt = _INT[kind]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]


def _decode_fields(cur: _Cursor, layout: list[tuple], top: bool) -> dict:
    out: dict[str, Any] = {}
    for spec in layout:
        name, kind = spec[0], spec[1]
        if kind == "magic":
            m = cur.take(4, name)
            if m != struct.pack(">I", MAGIC):
                raise HeraldError(BAD_MAGIC, f"magic {m.hex()}")
            out[name] = MAGIC
        elif kind in _INT:
            v = cur.int(kind, name)
            allowed = spec[2]
            if allowed is not None and v not in allowed:
                raise HeraldError(PROTOCOL_ERROR, f"{name}={v} not defined")
            out[name] = v
        elif kind in ("str8", "str16", "str32"):
            n = cur.int(_LEN[kind], name)
            if not spec[2] <= n <= spec[3]:
                raise HeraldError(PROTOCOL_ERROR, f"{name} length {n} outside {spec[2]}..={spec[3]}")
            out[name] = cur.take(n, name)
        elif kind == "bytes":
            out[name] = cur.take(spec[2], name)
        elif kind == "rest":
            v = cur.b[cur.i:]
            cur.i = len(cur.b)
            if not spec[2] <= len(v) <= spec[3]:
                raise HeraldError(PROTOCOL_ERROR, f"{name} length {len(v)} over {spec[3]}")
            out[name] = v
        elif kind in ("list8", "list16", "list32"):
            n = cur.int(_LEN[kind], name)
            if not spec[2] <= n <= spec[3]:
                raise HeraldError(PROTOCOL_ERROR, f"{name} count {n} outside {spec[2]}..={spec[3]}")
            out[name] = [_decode_fields(cur, spec[4], False) for _ in range(n)]
        else:  # pragma: no cover
            raise AssertionError(kind)
    return out


# §7.1: a version-2 ASSIGN_REQUEST ends with the client's token. (This
# client is a version-1 client; it reads the version-2 layout only to check
# the §10 vectors.)
ASSIGN_REQUEST_V2 = LAYOUTS[ASSIGN_REQUEST] + [("token", "str16", 0, MAX_TOKEN_LEN)]


def decode_body(ftype: int, body: bytes) -> dict:
    """Parse a body per §2.4 step 3 (truncation, leftovers, ranges, values, magic)."""
    layout = LAYOUTS.get(ftype)
    if ftype == ASSIGN_REQUEST and len(body) > 4 and body[4] == 2:
        layout = ASSIGN_REQUEST_V2
    if layout is None:
        raise HeraldError(UNKNOWN_FRAME_TYPE, f"type 0x{ftype:02x}")
    cur = _Cursor(body)
    out = _decode_fields(cur, layout, True)
    if cur.i != len(body):
        raise HeraldError(PROTOCOL_ERROR, f"{len(body) - cur.i} bytes left over")
    if ftype == CONFLATED and out["last_seq"] < out["first_seq"]:
        raise HeraldError(PROTOCOL_ERROR, f"CONFLATED last_seq {out['last_seq']} < "
                                          f"first_seq {out['first_seq']}")
    return out


def _largest_body(layout: list[tuple]) -> int:
    n = 0
    for spec in layout:
        kind = spec[1]
        if kind == "magic":
            n += 4
        elif kind in _INT:
            n += struct.calcsize(_INT[kind])
        elif kind in ("str8", "str16", "str32"):
            n += struct.calcsize(_INT[_LEN[kind]]) + spec[3]
        elif kind == "bytes":
            n += spec[2]
        elif kind == "rest":
            n += spec[3]
        else:  # lists
            n += struct.calcsize(_INT[_LEN[kind]]) + spec[3] * _largest_body(spec[4])
    return n


def largest_length(ftype: int) -> int:
    """1 (type) + the body with every field at its limit, from the layout (to check
    the max-lengths table of §2.4 against the layouts)."""
    return 1 + _largest_body(LAYOUTS[ftype])


def check_header(length: int, ftype: Optional[int], channel: str,
                 allowed: Optional[Iterable[int]] = None) -> None:
    """§2.4 steps 1-2. ``allowed`` narrows the channel's types to the current state."""
    max_len, chan_types = CHANNELS[channel]
    if length == 0:
        raise HeraldError(PROTOCOL_ERROR, "zero length")
    if length > max_len:
        raise HeraldError(FRAME_TOO_LARGE, f"length {length} > {max_len} on {channel}")
    if ftype is None:
        return
    if ftype not in FRAME_NAMES:
        raise HeraldError(UNKNOWN_FRAME_TYPE, f"type 0x{ftype:02x}")
    if ftype not in chan_types or (allowed is not None and ftype not in allowed):
        raise HeraldError(UNEXPECTED_FRAME, f"{FRAME_NAMES[ftype]} on {channel}")
    top = MAX_LENGTHS.get(ftype)
    if top is not None and length > top:
        raise HeraldError(PROTOCOL_ERROR, f"{FRAME_NAMES[ftype]} of length {length} > {top}")


def decode_frame(data: bytes, channel: str) -> Frame:
    """Decode exactly one whole frame (length prefix included) received on ``channel``."""
    if len(data) < 4:
        raise HeraldError(PROTOCOL_ERROR, "short frame")
    length = struct.unpack(">I", data[:4])[0]
    check_header(length, data[4] if len(data) > 4 else None, channel)
    if len(data) != 4 + length:
        raise HeraldError(PROTOCOL_ERROR, f"frame is {len(data)} bytes, length says {4 + length}")
    return Frame(data[4], decode_body(data[4], data[5:]), bytes(data))


def _encode_fields(layout: list[tuple], values: dict, out: bytearray) -> None:
    for spec in layout:
        name, kind = spec[0], spec[1]
        if kind == "magic":
            out += struct.pack(">I", values.get(name, MAGIC))
        elif kind in _INT:
            v = values.get(name, 0)
            allowed = spec[2]
            if allowed is not None and v not in allowed:
                raise ValueError(f"{name}={v} not allowed")
            out += struct.pack(_INT[kind], v)
        elif kind in ("str8", "str16", "str32"):
            v = _b(values.get(name, b""))
            if not spec[2] <= len(v) <= spec[3]:
                raise ValueError(f"{name}: length {len(v)} outside {spec[2]}..={spec[3]}")
            out += struct.pack(_INT[_LEN[kind]], len(v)) + v
        elif kind == "bytes":
            v = _b(values[name])
            if len(v) != spec[2]:
                raise ValueError(f"{name}: need exactly {spec[2]} bytes")
            out += v
        elif kind == "rest":
            v = _b(values.get(name, b""))
            if len(v) > spec[3]:
                raise ValueError(f"{name}: {len(v)} bytes > {spec[3]}")
            out += v
        elif kind in ("list8", "list16", "list32"):
            items = values.get(name, [])
            if not spec[2] <= len(items) <= spec[3]:
                raise ValueError(f"{name}: count {len(items)} outside {spec[2]}..={spec[3]}")
            out += struct.pack(_INT[_LEN[kind]], len(items))
            for item in items:
                _encode_fields(spec[4], item, out)
        else:  # pragma: no cover
            raise AssertionError(kind)


def _b(v) -> bytes:
    if isinstance(v, str):
        return v.encode("utf-8")
    return bytes(v)


def encode(ftype: int, fields: Optional[dict] = None, *, channel: Optional[str] = None,
           secret: Optional[bytes] = None) -> bytes:
    """Encode one frame, length prefix included. For ADMIN / HEARTBEAT give ``secret``
    to compute the tag (§2.5); otherwise the ``tag`` field is used as given."""
    fields = dict(fields or {})
    if ftype in SIGNED and secret is not None:
        fields["tag"] = b"\0" * 32
    body = bytearray()
    layout = LAYOUTS[ftype]
    if ftype == ASSIGN_REQUEST and fields.get("version") == 2:
        layout = ASSIGN_REQUEST_V2
    _encode_fields(layout, fields, body)
    if ftype == CONFLATED and fields.get("last_seq", 0) < fields.get("first_seq", 0):
        raise ValueError("CONFLATED: last_seq < first_seq")
    frame = struct.pack(">IB", 1 + len(body), ftype) + bytes(body)
    if ftype in SIGNED and secret is not None:
        frame = frame[:-32] + hmac.new(secret, frame[4:-32], hashlib.sha256).digest()
    if channel is not None:
        check_header(len(frame) - 4, ftype, channel)
    return frame


def verify_signed(secret: bytes, frame: bytes) -> bool:
    """§2.5: tag = HMAC-SHA256(secret, frame[4 .. 4+length-32]), constant-time compare."""
    length = struct.unpack(">I", frame[:4])[0]
    if length < 33 or len(frame) != 4 + length:
        return False
    want = hmac.new(secret, frame[4:4 + length - 32], hashlib.sha256).digest()
    return hmac.compare_digest(want, frame[4 + length - 32:4 + length])


def peer_tag(secret: bytes, role: str, nonce_i: bytes, nonce_a: bytes,
             initiator_id: bytes, acceptor_id: bytes) -> bytes:
    """§6.2 / §6.3 mesh proofs; role is "acceptor" (tag_a) or "initiator" (tag_i)."""
    return hmac.new(secret, peer_tag_input(role, nonce_i, nonce_a, initiator_id, acceptor_id),
                    hashlib.sha256).digest()


def peer_tag_input(role: str, nonce_i: bytes, nonce_a: bytes,
                   initiator_id: bytes, acceptor_id: bytes) -> bytes:
    label = {"acceptor": b"herald peer acceptor v1", "initiator": b"herald peer initiator v1"}[role]
    return (label + nonce_i + nonce_a + bytes([len(initiator_id)]) + initiator_id
            + bytes([len(acceptor_id)]) + acceptor_id)


# ---------------------------------------------------------------------------
# Tokens (§9)
# ---------------------------------------------------------------------------

def read_secret(path: str) -> bytes:
    """Read a secret file; trailing whitespace is removed; at least 16 bytes must remain (§1)."""
    with open(path, "rb") as f:
        s = f.read().rstrip()
    if len(s) < 16:
        raise ValueError(f"secret in {path} is shorter than 16 bytes")
    return s


def mint(secret: bytes, user: bytes | str, expiry: int) -> str:
    user = _b(user)
    if not 1 <= len(user) <= MAX_USER_LEN:
        raise ValueError("user id must be 1..=64 bytes")
    signed = "v1." + base64.urlsafe_b64encode(user).rstrip(b"=").decode("ascii") + "." + str(int(expiry))
    return signed + "." + hmac.new(secret, signed.encode("ascii"), hashlib.sha256).hexdigest()


def mint_ttl(secret: bytes, user: bytes | str, ttl_s: int = 3600) -> str:
    return mint(secret, user, int(time.time()) + ttl_s)


class TokenError(Exception):
    def __init__(self, code: int, why: str):
        self.code = code
        super().__init__(f"{CODE_NAMES[code]}: {why}")


def verify_token(secret: bytes, token: bytes | str, now: Optional[int] = None) -> bytes:
    """Verify per §9; returns the user id or raises TokenError (AUTH_FAILED / TOKEN_EXPIRED)."""
    t = _b(token)
    fail = lambda why: TokenError(AUTH_FAILED, why)  # noqa: E731
    if not 1 <= len(t) <= MAX_TOKEN_LEN:
        raise fail("length")
    signed, dot, tag = t.rpartition(b".")
    if not dot or len(tag) != 64 or any(c not in b"0123456789abcdefABCDEF" for c in tag):
        raise fail("tag is not 64 hex digits")
    parts = signed.split(b".")
    if len(parts) != 3 or parts[0] != b"v1":
        raise fail("shape")
    b64, exp = parts[1], parts[2]
    if not b64 or any(c not in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
                      for c in b64) or len(b64) % 4 == 1:
        raise fail("user is not unpadded base64url")
    try:
        user = base64.urlsafe_b64decode(b64 + b"=" * (-len(b64) % 4))
    except (binascii.Error, ValueError):
        raise fail("user is not base64url") from None
    if base64.urlsafe_b64encode(user).rstrip(b"=") != b64:
        raise fail("non-canonical base64url")
    if not 1 <= len(user) <= MAX_USER_LEN:
        raise fail("user length")
    if not 1 <= len(exp) <= 20 or not exp.isdigit() or int(exp) > 0xFFFFFFFFFFFFFFFF:
        raise fail("expiry")
    want = hmac.new(secret, signed, hashlib.sha256).hexdigest().encode()
    if not hmac.compare_digest(want, tag.lower()):
        raise fail("bad signature")
    if int(exp) <= (int(time.time()) if now is None else now):
        raise TokenError(TOKEN_EXPIRED, "expired")
    return user


# ---------------------------------------------------------------------------
# TLS (§11)
# ---------------------------------------------------------------------------

ALPN_PROTOCOL = "herald/1"
TLS_VERSION = "TLSv1.3"
# TLS alert descriptions (RFC 8446 §6), for messages
TLS_ALERTS = {0: "close_notify", 10: "unexpected_message", 20: "bad_record_mac",
              40: "handshake_failure", 42: "bad_certificate", 45: "certificate_expired",
              46: "certificate_unknown", 48: "unknown_ca", 50: "decode_error",
              70: "protocol_version", 80: "internal_error", 112: "unrecognized_name",
              116: "certificate_required", 120: "no_application_protocol"}


def tls_context(cafile: Optional[str] = None, *, capath: Optional[str] = None,
                cadata: Optional[str | bytes] = None, certfile: Optional[str] = None,
                keyfile: Optional[str] = None) -> ssl.SSLContext:
    """A client context per §11: TLS 1.3 only; ALPN ``herald/1`` offered; the node's
    chain verified up to the trust anchors -- ``cafile`` / ``capath`` / ``cadata``
    when given (only those), else the system's CA store -- with its validity period;
    the host checked against the certificate's DNS names (IP addresses for an IP
    literal; no fallback to the subject common name). ``certfile`` / ``keyfile``: a
    client certificate for a node that asks for one (mutual TLS, §11)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile, capath=capath,
                                     cadata=cadata)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.hostname_checks_common_name = False
    ctx.set_alpn_protocols([ALPN_PROTOCOL])
    if certfile is not None:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx


def as_tls_context(tls) -> Optional[ssl.SSLContext]:
    """``tls`` as an SSLContext: None / False -> plaintext; True -> ``tls_context()``
    (system CA store); a str / path -> ``tls_context(cafile=tls)``; an SSLContext is
    used as given (the TLS 1.3 and ALPN checks after the handshake still apply)."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return tls_context()
    if isinstance(tls, ssl.SSLContext):
        return tls
    if isinstance(tls, (str, bytes, os.PathLike)):
        return tls_context(os.fsdecode(tls))
    raise TypeError(f"tls must be None, a bool, a CA file or an ssl.SSLContext, not {type(tls).__name__}")


def _ssl_reason(e: ssl.SSLError) -> Optional[str]:
    """OpenSSL reason from the message when Python has no name for it, e.g.
    "[SSL] tlsv1 alert no application protocol (_ssl.c:1006)" ->
    "TLSV1_ALERT_NO_APPLICATION_PROTOCOL"."""
    text = e.args[1] if len(e.args) > 1 and isinstance(e.args[1], str) else str(e)
    m = re.match(r"\s*(?:\[\w+\]\s*)?(.*?)\s*(?:\(_ssl\.c:\d+\))?\s*$", text)
    words = m.group(1) if m else ""
    return "_".join(words.upper().split()) or None


def tls_handshake(sock: socket.socket, ctx: ssl.SSLContext, host: str,
                  timeout: float) -> ssl.SSLSocket:
    """Run the §11 handshake on a connected TCP socket: SNI / verification for ``host``
    (the host part of the endpoint dialled), then insist on TLS 1.3 and, if ALPN was
    negotiated at all, on ``herald/1``. Raises TLSError (the socket is closed)."""
    sock.settimeout(timeout)
    try:
        tsock = ctx.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    except (ssl.SSLError, ValueError) as e:
        sock.close()
        raise TLSError(f"TLS setup for {host!r}: {e}") from e
    try:
        tsock.do_handshake()
    except ssl.SSLCertVerificationError as e:
        tsock.close()
        raise TLSError(f"TLS: the certificate of {host!r} failed verification: "
                       f"{e.verify_message}", reason=e.reason, verify_failed=True,
                       verify_message=e.verify_message) from e
    except ssl.SSLError as e:
        tsock.close()
        reason = e.reason or _ssl_reason(e)
        raise TLSError(f"TLS handshake with {host!r} failed: {reason or e}", reason=reason) from e
    except (socket.timeout, TimeoutError) as e:
        tsock.close()
        raise TLSError(f"TLS handshake with {host!r} timed out", reason="TIMEOUT") from e
    except OSError as e:
        tsock.close()
        raise TLSError(f"TLS handshake with {host!r}: {e}", reason="IO_ERROR") from e
    version, alpn = tsock.version(), tsock.selected_alpn_protocol()
    if version != TLS_VERSION or alpn not in (None, ALPN_PROTOCOL):
        tsock.close()  # never send HELLO on such a session
        raise TLSError(f"TLS session with {host!r} is {version}, ALPN {alpn!r}; "
                       f"need {TLS_VERSION} and {ALPN_PROTOCOL!r}", reason="POLICY")
    return tsock


# ---------------------------------------------------------------------------
# Framed connection (§2.4 receive loop)
# ---------------------------------------------------------------------------

def parse_endpoint(ep: str | bytes) -> tuple[str, int]:
    ep = ep.decode("ascii") if isinstance(ep, bytes) else ep
    host, _, port = ep.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bad endpoint {ep!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class FrameConn:
    """One TCP (or TLS, §11) connection: frames out, frames in (checked against
    ``rx_channel``). ``tls_version`` / ``alpn``: of the TLS session, None in plaintext."""

    def __init__(self, sock: socket.socket, rx_channel: str, tx_channel: str):
        self.sock = sock
        self.rx = rx_channel
        self.tx = tx_channel
        self.buf = bytearray()
        self.last_rx = time.monotonic()
        self.closed = False
        self.frames_in = 0
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.tls_version = sock.version() if self.tls else None
        self.alpn = sock.selected_alpn_protocol() if self.tls else None

    @classmethod
    def open(cls, endpoint, rx: str, tx: str, timeout: float = 2.0, tls=None) -> "FrameConn":
        """Connect to ``endpoint`` (``host:port`` or a (host, port) tuple); with ``tls``
        (see ``as_tls_context``) run the TLS handshake, verifying the certificate for
        the endpoint's host, within ``timeout``."""
        host, port = parse_endpoint(endpoint) if not isinstance(endpoint, tuple) else endpoint
        ctx = as_tls_context(tls)
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ctx is not None:
            sock = tls_handshake(sock, ctx, host, timeout)
        return cls(sock, rx, tx)

    def send_raw(self, data: bytes, timeout: float = 5.0) -> None:
        self.sock.settimeout(timeout)
        self.sock.sendall(data)

    def send(self, ftype: int, fields: Optional[dict] = None, timeout: float = 5.0) -> None:
        self.send_raw(encode(ftype, fields, channel=self.tx), timeout)

    def read_frame(self, timeout: float, allowed: Optional[Iterable[int]] = None) -> Optional[Frame]:
        """Return the next frame, or None if none completed within ``timeout``.
        Raises HeraldError for a malformed frame, ConnectionClosed on EOF / I/O error."""
        deadline = time.monotonic() + timeout
        while True:
            fr = self._parse_one(allowed)
            if fr is not None:
                return fr
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                return None
            except OSError as e:
                raise ConnectionClosed(f"I/O error: {e}") from e
            if not data:
                raise ConnectionClosed("EOF")
            self.last_rx = time.monotonic()
            self.buf += data

    def _parse_one(self, allowed) -> Optional[Frame]:
        b = self.buf
        if not self.tls and self.frames_in == 0 and len(b) >= 2 and b[0] == 0x15 and b[1] == 0x03:
            # A TLS alert record (content type 21, version 3.x) where the first frame
            # should be: a TLS port (§11). No frame can start so (length >= 0x15000000).
            # Not a frame error: send no ERROR into a TLS port.
            alert = b[6] if len(b) >= 7 and b[3:5] == b"\x00\x02" else None
            self.close()
            name = TLS_ALERTS.get(alert, f"alert {alert}") if alert is not None else "an alert"
            raise TLSPortError(f"the port answered with a TLS {name}: it speaks TLS (§11)", alert)
        if len(b) < 4:
            return None
        length = struct.unpack(">I", b[:4])[0]
        # length first, from the 4 bytes alone; the type as soon as its byte is there
        check_header(length, b[4] if len(b) >= 5 else None, self.rx, allowed)
        if len(b) < 4 + length:
            return None
        raw = bytes(b[:4 + length])
        del b[:4 + length]
        self.frames_in += 1
        return Frame(raw[4], decode_body(raw[4], raw[5:]), raw)

    def send_error(self, code: int, message: str = "") -> None:
        """§2.4: send ERROR, then close. Best effort."""
        msg = message.encode("utf-8")[:MAX_ERROR_MESSAGE_LEN]
        try:
            self.send(ERROR, {"code": code, "message": msg}, timeout=1.0)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass


# ---------------------------------------------------------------------------
# Client (§3)
# ---------------------------------------------------------------------------

@dataclass
class Welcome:
    version: int
    resume: int
    heartbeat_ms: int
    session_id: int
    epoch: int
    next_seq: int
    node_id: bytes
    lost: Optional[int]  # messages lost across the reconnect: 0, a count (GAP) or None (RESTARTED: unknown)

    @property
    def resume_name(self) -> str:
        return RESUME_NAMES[self.resume]


@dataclass
class Message:
    epoch: int
    seq: int
    payload: bytes
    gap: int = 0  # messages missed just before this one (0 = in order)


@dataclass
class Conflated:
    """§3.8 (version 2): the messages ``first_seq..=last_seq`` of the stream were replaced
    by later messages with the same keys, which arrive (as DELIVER, or again as
    CONFLATED) later on this session. Not a loss; ``gap`` (as in ``Message.gap``) counts
    messages missed just before ``first_seq``. ``first_seq`` is the first seq newly
    accounted for: the frame's own ``first_seq``, or s + 1 when the frame overlapped the
    position (e, s) (then ``frame_first_seq`` < ``first_seq``)."""
    epoch: int
    first_seq: int
    last_seq: int
    keys: list  # list[bytes], each key once, in the order of its first message
    gap: int = 0
    frame_first_seq: int = 0

    @property
    def count(self) -> int:
        """How many messages were conflated (``last_seq - first_seq + 1``)."""
        return self.last_seq - self.first_seq + 1


def position_step(position: tuple[int, int], epoch: int, first_seq: int,
                  last_seq: int) -> Optional[tuple[int, int, tuple[int, int]]]:
    """The position rules of §3.3 (a DELIVER of seq q: ``first_seq = last_seq = q``) and
    §3.8 (a CONFLATED), for a frame received at ``position`` (e, s). Pure.

    Returns None if the frame must be discarded (``last_seq`` <= s; position unchanged),
    else ``(gap, first, new_position)``: ``gap`` = ``first_seq - s - 1`` messages missed
    before the frame (0 if none), ``first`` = the first seq the frame accounts for
    (``max(first_seq, s + 1)``: a CONFLATED overlapping the position counts only from
    s + 1), ``new_position`` = (e, ``last_seq``). An ``epoch`` other than e raises
    HeraldError(PROTOCOL_ERROR)."""
    e, s = position
    if epoch != e:
        raise HeraldError(PROTOCOL_ERROR, f"epoch {epoch:#x} != session epoch {e:#x}")
    if last_seq <= s:
        return None
    gap = max(0, first_seq - s - 1)
    return gap, max(first_seq, s + 1), (e, last_seq)


@dataclass
class Goodbye:
    reason: int
    action: int
    delay_ms: int
    target: bytes

    @property
    def action_name(self) -> str:
        return ACTION_NAMES[self.action]


@dataclass
class Pong:
    nonce: int
    rtt_s: Optional[float]


class Client:
    """The client side of client <-> node (§3).

    Usage::

        c = Client("127.0.0.1:7400", token)
        w = c.connect()                 # HELLO (RESUME if c.position) -> Welcome
        ev = c.recv(timeout=1.0)        # Message | Conflated | Goodbye | Pong | None
        c.close()
        w = c.connect()                 # resumes from c.position

    ``recv`` answers PINGs itself, checks every DELIVER against the position, reports
    gaps in ``Message.gap``, discards duplicates, and treats a node silent for
    3 x heartbeat_ms as dead. On a version-2 session (``max_version=2``, WELCOME
    version 2) it also takes CONFLATED (§3.8), checked against the position like a
    DELIVER, and returns it as a ``Conflated`` event (first_seq, last_seq, keys,
    count; a gap before it in ``Conflated.gap``); the position moves to its
    ``last_seq``. A CONFLATED on a version-1 session is UNEXPECTED_FRAME. Protocol
    violations by the node are answered with ERROR (§2.4) and raised as HeraldError;
    an ERROR from the node raises RemoteError; EOF or I/O errors raise
    ConnectionClosed. ``position`` survives ``close``.

    TLS (§11): ``tls`` is None (plaintext, the default), an ``ssl.SSLContext`` (e.g.
    from ``tls_context``), a CA file, or True for the system CA store. Every connect,
    including one to a GOODBYE target, verifies the node's certificate for the host
    of the endpoint dialled; a failed handshake raises TLSError before any HELLO. A
    plaintext client that reaches a TLS port raises TLSPortError.
    """

    def __init__(self, endpoint: str, token: str | bytes, *, agent: str = "herald-py/0.1",
                 position: Optional[tuple[int, int]] = None, connect_timeout: float = 2.0,
                 handshake_timeout: float = 10.0, min_version: int = 1, max_version: int = 1,
                 tls=None):
        self.endpoint = endpoint
        self.tls = as_tls_context(tls)
        self.token = _b(token)
        self.agent = _b(agent)
        self.position = position  # (epoch, seq) of the last message accounted for
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.min_version = min_version
        self.max_version = max_version
        self.conn: Optional[FrameConn] = None
        self.welcome: Optional[Welcome] = None
        self.duplicates_discarded = 0
        self.conflated_discarded = 0  # CONFLATED with last_seq <= s (§3.8)
        self.conflated_overlaps = 0  # CONFLATED with first_seq <= s < last_seq (§3.8)
        self._pings: dict[int, float] = {}

    # -- connection lifecycle ------------------------------------------------
    def connect(self, endpoint: Optional[str] = None) -> Welcome:
        if endpoint is not None:
            self.endpoint = endpoint
        self.close()
        conn = FrameConn.open(self.endpoint, "ToClient", "ToNode", self.connect_timeout, self.tls)
        self.conn = conn
        resume = self.position is not None
        epoch, seq = self.position if resume else (0, 0)
        try:
            conn.send(HELLO, {
                "min_version": self.min_version, "max_version": self.max_version,
                "flags": FLAG_RESUME if resume else 0, "token": self.token, "agent": self.agent,
                "resume_epoch": epoch, "resume_seq": seq,
            })
        except OSError:
            # the node may have sent ERROR (e.g. SERVER_FULL) and closed before reading
            # HELLO: look for it before giving up
            pass
        fr = self._read(self.handshake_timeout, allowed={WELCOME, ERROR})
        if fr is None:
            self.close()
            raise ConnectionClosed("no WELCOME within the handshake timeout")
        if fr.type == ERROR:
            self._remote_error(fr)
        f = fr.fields
        if not self.min_version <= f["version"] <= self.max_version:
            self._violation(UNSUPPORTED_VERSION, f"node chose version {f['version']}")
        if f["epoch"] == 0 or f["next_seq"] == 0:
            self._violation(PROTOCOL_ERROR, "WELCOME epoch 0 or next_seq 0")
        r = f["resume"]
        if (r == FRESH) == resume:
            self._violation(PROTOCOL_ERROR, f"{RESUME_NAMES[r]} in answer to a HELLO "
                                            f"{'with' if resume else 'without'} RESUME")
        lost: Optional[int] = 0
        if r == RESUMED:
            if f["epoch"] != epoch or f["next_seq"] != seq + 1:
                self._violation(PROTOCOL_ERROR, "RESUMED with a different epoch or next_seq")
        elif r == GAP:
            if f["epoch"] != epoch or f["next_seq"] <= seq + 1:
                self._violation(PROTOCOL_ERROR, "GAP with a different epoch or nothing lost")
            lost = f["next_seq"] - seq - 1
        elif r == RESTARTED:
            lost = None
        self.welcome = Welcome(f["version"], r, f["heartbeat_ms"], f["session_id"], f["epoch"],
                               f["next_seq"], f["node_id"], lost)
        self.position = (f["epoch"], f["next_seq"] - 1)
        return self.welcome

    def close(self) -> None:
        """Close the connection (there is no close frame for clients); keeps the position."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    @property
    def connected(self) -> bool:
        return self.conn is not None

    @property
    def tls_version(self) -> Optional[str]:
        """The TLS version of the current connection ("TLSv1.3"), None in plaintext."""
        return self.conn.tls_version if self.conn is not None else None

    @property
    def alpn(self) -> Optional[str]:
        """The ALPN protocol the node selected ("herald/1"), None if none / plaintext."""
        return self.conn.alpn if self.conn is not None else None

    # -- established ----------------------------------------------------------
    def ping(self, nonce: Optional[int] = None) -> int:
        if nonce is None:
            nonce = random.getrandbits(64)
        self._pings[nonce] = time.monotonic()
        self.conn.send(PING, {"nonce": nonce})
        return nonce

    def recv(self, timeout: float = 1.0):
        """Next event (Message, Conflated, Goodbye or Pong), or None when ``timeout`` passes."""
        if self.conn is None:
            raise ConnectionClosed("not connected")
        deadline = time.monotonic() + timeout
        hb = (self.welcome.heartbeat_ms or 10000) / 1000.0
        while True:
            now = time.monotonic()
            if now - self.conn.last_rx > 3 * hb:
                self.close()
                raise ConnectionClosed(f"node silent for 3 x {hb:.1f}s")
            remaining = deadline - now
            if remaining <= 0:
                return None
            # wake up in time to notice a dead node
            wait = min(remaining, max(0.01, self.conn.last_rx + 3 * hb - now))
            fr = self._read(wait, allowed=self._established_types())
            if fr is None:
                continue
            ev = self._handle(fr)
            if ev is not None:
                return ev

    def _established_types(self) -> frozenset:
        """What may arrive after WELCOME: CONFLATED only on a version-2 session (§3.8)."""
        if self.welcome is not None and self.welcome.version >= 2:
            return frozenset({DELIVER, CONFLATED, GOODBYE, PING, PONG, ERROR})
        return frozenset({DELIVER, GOODBYE, PING, PONG, ERROR})

    def _step(self, name: str, epoch: int, first_seq: int, last_seq: int):
        try:
            return position_step(self.position, epoch, first_seq, last_seq)
        except HeraldError as err:
            self._violation(err.code, f"{name} {err.message}")

    def _handle(self, fr: Frame):
        """Act on one frame of the Established state; returns the event for the
        application, or None. Needs a socket only for PING and violations."""
        f = fr.fields
        if fr.type == DELIVER:
            step = self._step("DELIVER", f["epoch"], f["seq"], f["seq"])
            if step is None:
                self.duplicates_discarded += 1  # never hand a message over twice
                return None
            gap, _, self.position = step
            return Message(f["epoch"], f["seq"], f["payload"], gap)
        if fr.type == CONFLATED:
            if fr.type not in self._established_types():
                self._violation(UNEXPECTED_FRAME, "CONFLATED on a version-1 session")
            step = self._step("CONFLATED", f["epoch"], f["first_seq"], f["last_seq"])
            if step is None:
                self.conflated_discarded += 1
                return None
            gap, first, self.position = step
            if first != f["first_seq"]:
                self.conflated_overlaps += 1
            return Conflated(f["epoch"], first, f["last_seq"], [k["key"] for k in f["keys"]],
                             gap, f["first_seq"])
        if fr.type == PING:
            self.conn.send(PONG, {"nonce": f["nonce"]})
            return None
        if fr.type == PONG:
            t0 = self._pings.pop(f["nonce"], None)
            if t0 is None:
                return None  # matches no outstanding PING: ignored (§3.4)
            return Pong(f["nonce"], time.monotonic() - t0)
        if fr.type == GOODBYE:
            self.close()  # send nothing more; close (§3.5)
            return Goodbye(f["reason"], f["action"], f["delay_ms"], f["target"])
        if fr.type == ERROR:
            self._remote_error(fr)
        raise AssertionError(fr)  # pragma: no cover

    def _read(self, timeout: float, allowed) -> Optional[Frame]:
        try:
            return self.conn.read_frame(timeout, allowed)
        except HeraldError as e:
            self.conn.send_error(e.code, e.message)
            self.conn = None
            raise
        except ConnectionClosed:
            self.close()
            raise

    def _violation(self, code: int, message: str):
        if self.conn is not None:  # None when frames are fed to _handle without a socket
            self.conn.send_error(code, message)
        self.conn = None
        raise HeraldError(code, message)

    def _remote_error(self, fr: Frame):
        self.close()  # never answer an ERROR
        raise RemoteError(fr["code"], fr["message"])

    # -- what to do after a connection ended (§3.5, §3.6) ----------------------
    def next_endpoint(self, goodbye: Optional[Goodbye]) -> Optional[str]:
        """After a GOODBYE: the endpoint to reconnect to (after ``delay_ms``), or None
        meaning "ask the decision servers" (§7.1, see ``ask_decision``)."""
        if goodbye is None or goodbye.action == RETRY_AFTER:
            return self.endpoint
        if goodbye.action == GO_TO_NODE:
            try:
                parse_endpoint(goodbye.target)
                return goodbye.target.decode("ascii")
            except (ValueError, UnicodeDecodeError):
                return None  # empty or unusable target: ASK_DECISION
        return None


class Backoff:
    """§3.6: random delay up to b, b from 50 ms doubling to a 5 s cap; reset on success."""

    def __init__(self, first: float = 0.05, cap: float = 5.0):
        self.first, self.cap, self.b = first, cap, first

    def next(self) -> float:
        d = random.uniform(0, self.b)
        self.b = min(self.cap, self.b * 2)
        return d

    def reset(self) -> None:
        self.b = self.first


# ---------------------------------------------------------------------------
# Publisher (§5)
# ---------------------------------------------------------------------------

@dataclass
class PubResult:
    request_id: int
    accepted: int
    local: int
    forwarded: int
    no_route: int


class Publisher:
    """The publisher side of publisher <-> node (§5).

    Writes are blocking with a timeout; results are read with ``read_result``. A
    long-running publisher that pipelines heavily must keep reading while it writes
    (§5.6); this small implementation expects the caller to interleave the two.
    ``key`` (PUBLISH, batch entries) is the conflation key of §5.7: empty for a
    message that must arrive, non-empty for a state of which only the latest value
    matters. ``max_version=2`` offers versions 1..=2 in PUB_HELLO.
    """

    def __init__(self, endpoint: str, credential: str | bytes, *, agent: str = "herald-py-pub/0.1",
                 connect_timeout: float = 2.0, handshake_timeout: float = 10.0,
                 min_version: int = 1, max_version: int = 1):
        self.endpoint = endpoint
        self.min_version = min_version
        self.max_version = max_version
        self.version = 0  # negotiated, from PUB_WELCOME
        self.credential = _b(credential)
        self.agent = _b(agent)
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.conn: Optional[FrameConn] = None
        self.max_frame = CHANNELS["Ingest"][0]
        self.node_id = b""
        self.next_request_id = 1
        self.pending: list[int] = []  # request ids awaiting a PUB_RESULT, in order
        self.goodbye: Optional[Goodbye] = None

    def connect(self) -> Frame:
        self.close()
        self.conn = FrameConn.open(self.endpoint, "FromIngest", "Ingest", self.connect_timeout)
        try:
            self.conn.send(PUB_HELLO, {"min_version": self.min_version,
                                       "max_version": self.max_version, "flags": 0,
                                       "credential": self.credential, "agent": self.agent})
        except OSError:
            pass
        fr = self._read(self.handshake_timeout, allowed={PUB_WELCOME, ERROR})
        if fr is None:
            self.close()
            raise ConnectionClosed("no PUB_WELCOME within the handshake timeout")
        if fr.type == ERROR:
            self.close()
            raise RemoteError(fr["code"], fr["message"])
        if not self.min_version <= fr["version"] <= self.max_version:
            self.conn.send_error(UNSUPPORTED_VERSION, "version")
            self.conn = None
            raise HeraldError(UNSUPPORTED_VERSION, f"node chose version {fr['version']}")
        self.version = fr["version"]
        self.max_frame = min(fr["max_frame"], CHANNELS["Ingest"][0])
        self.node_id = fr["node_id"]
        self.pending.clear()
        self.goodbye = None
        return fr

    def _rid(self, request_id: Optional[int]) -> int:
        if request_id is None:
            request_id = self.next_request_id
            self.next_request_id = (self.next_request_id + 1) & 0xFFFFFFFF
        return request_id

    def _send(self, frame: bytes) -> None:
        if len(frame) - 4 > self.max_frame:
            raise ValueError(f"frame length {len(frame) - 4} exceeds max_frame {self.max_frame}")
        self.conn.send_raw(frame)

    def publish(self, user: bytes | str, payload: bytes | str, *, want_result: bool = False,
                key: bytes | str = b"", request_id: Optional[int] = None) -> int:
        """Send one PUBLISH; validates limits first (a bad frame closes the connection)."""
        rid = self._rid(request_id)
        frame = encode(PUBLISH, {"flags": FLAG_WANT_RESULT if want_result else 0,
                                 "request_id": rid, "user": user, "key": key,
                                 "payload": payload}, channel="Ingest")
        self._send(frame)
        if want_result:
            self.pending.append(rid)
        return rid

    def publish_batch(self, entries: list[tuple], *, want_result: bool = False,
                      request_id: Optional[int] = None) -> int:
        """entries: (user, payload) or (user, key, payload) tuples; 1..=1024 of them."""
        rid = self._rid(request_id)
        es = [{"user": e[0], "key": b"", "payload": e[1]} if len(e) == 2
              else {"user": e[0], "key": e[1], "payload": e[2]} for e in entries]
        frame = encode(PUBLISH_BATCH, {"flags": FLAG_WANT_RESULT if want_result else 0,
                                       "request_id": rid, "entries": es}, channel="Ingest")
        self._send(frame)
        if want_result:
            self.pending.append(rid)
        return rid

    def read_result(self, timeout: float = 5.0) -> PubResult:
        """The next PUB_RESULT (answering PINGs meanwhile). Raises RemoteError on ERROR,
        ConnectionClosed on GOODBYE (kept in ``self.goodbye``), EOF or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectionClosed("timed out waiting for PUB_RESULT")
            fr = self._read(remaining, allowed={PUB_RESULT, PING, PONG, GOODBYE, ERROR})
            if fr is None:
                continue
            if fr.type == PING:
                self.conn.send(PONG, {"nonce": fr["nonce"]})
            elif fr.type == PONG:
                pass
            elif fr.type == GOODBYE:
                self.goodbye = Goodbye(fr["reason"], fr["action"], fr["delay_ms"], fr["target"])
                self.close()
                raise ConnectionClosed(f"GOODBYE {CODE_NAMES.get(fr['reason'], fr['reason'])}")
            elif fr.type == ERROR:
                self.close()
                raise RemoteError(fr["code"], fr["message"])
            else:
                f = fr.fields
                if not self.pending or self.pending[0] != f["request_id"]:
                    self.conn.send_error(PROTOCOL_ERROR, "unexpected PUB_RESULT")
                    self.conn = None
                    raise HeraldError(PROTOCOL_ERROR,
                                      f"PUB_RESULT for {f['request_id']}, expected {self.pending[:1]}")
                self.pending.pop(0)
                return PubResult(f["request_id"], f["accepted"], f["local"], f["forwarded"],
                                 f["no_route"])

    def _read(self, timeout, allowed):
        try:
            return self.conn.read_frame(timeout, allowed)
        except HeraldError as e:
            self.conn.send_error(e.code, e.message)
            self.conn = None
            raise
        except ConnectionClosed:
            self.close()
            raise

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# ---------------------------------------------------------------------------
# Decision server, client side (§7.1)
# ---------------------------------------------------------------------------

def ask_decision(servers: list[str], user: bytes | str = b"", max_results: int = 3,
                 timeout: float = 1.0, tls=None):
    """Ask the decision servers in order; returns a list of (node_id, endpoint) or
    ("retry", retry_after_ms) on NO_CAPACITY. Raises ConnectionClosed if none answers.
    ``tls`` (see ``as_tls_context``): for decision servers whose TCP port speaks TLS
    (§7, §11), each verified for the host of its ``host:port``."""
    for s in servers:
        try:
            conn = FrameConn.open(s, "FromDecision", "ToDecision", timeout, tls=tls)
        except (OSError, TLSError):
            continue
        try:
            conn.send(ASSIGN_REQUEST, {"version": 1, "user": user, "max_results": max_results})
            fr = conn.read_frame(timeout, allowed={ASSIGNMENT, NO_CAPACITY, ERROR})
        except (OSError, HeraldError, ConnectionClosed):
            fr = None
        finally:
            conn.close()
        if fr is None or fr.type == ERROR:
            continue
        if fr.type == NO_CAPACITY:
            return ("retry", fr["retry_after_ms"])
        return [(e["node_id"], e["endpoint"].decode("ascii")) for e in fr["entries"]]
    raise ConnectionClosed("no decision server answered")
