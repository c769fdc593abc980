"""Digest authentication of SIP requests (RFC 3261 §22, RFC 7616, RFC 8760)
and blocking of addresses that keep failing it.

A nonce carries the time it was minted, a serial number and an HMAC that
binds both to the client's address, so a nonce cannot be forged, nor used
from another address. What the HMAC cannot tell is whether a nonce was used
before: a fixed ring of nonce counts indexed by the serial number (as
Kamailio's auth module keeps its ``nc`` array) remembers the highest ``nc``
seen for each recent nonce, so captured credentials cannot be replayed. The
ring's size bounds memory whatever the rate of challenges; a nonce whose slot
has since been given to a newer one is answered as stale, like an expired one.
The credentials' ``uri`` must name the Request-URI (:func:`same_uri`), so a
header written for one request cannot carry another.
"""

from __future__ import annotations

import array
import base64
import enum
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

from aiosipua import AuthChallenge, SipRequest, parse_auth, stringify_auth

from pbx.events import EventBus
from pbx.security import address_key, security_event
from pbx.sip.messages import address_user, make_response
from pbx.sip.transactions import ServerTransaction

logger = logging.getLogger(__name__)

# Challenge value of `algorithm` -> hashlib name. SHA-256 first: RFC 8760 §2.4
# has the server list challenges in its order of preference.
ALGORITHMS: dict[str, str] = {"SHA-256": "sha256", "MD5": "md5"}

# Bytes of the HMAC kept in a nonce: 128 bits cannot be guessed and keep the
# nonce short on every challenge and every request.
_NONCE_MAC_BYTES = 16

# Nonces whose nonce count is remembered: the last NONCE_SLOTS minted. At
# 4 bytes a slot the ring takes 512 KiB; a flood of 5,000 challenges a second
# needs 26 s to push a nonce out, far longer than a phone takes to answer.
NONCE_SLOTS = 1 << 17
# Slot value of a nonce answered without qop: spent. Such credentials (RFC
# 2069 style) carry no nc to tell one use from the next, so one use it is.
_SPENT = 0xFFFFFFFF

# Addresses whose recent failures AddressGuard remembers at most; beyond this
# the address that failed least recently is forgotten first.
MAX_TRACKED_ADDRESSES = 65536


class AuthStatus(enum.Enum):
    """Outcome of checking a request's digest credentials."""

    OK = "ok"
    MISSING = "missing"  # no credentials for us: answer with a challenge
    STALE = "stale"  # right password, nonce expired or forgotten: challenge with stale=true
    REPLAY = "replay"  # right password, but the nonce count is not new or the uri is not this request's
    FAILED = "failed"  # wrong password, unknown user, foreign nonce or malformed


@dataclass(frozen=True, slots=True)
class AuthResult:
    """What :meth:`DigestAuthenticator.verify` found.

    ``username`` is the one the credentials claim, when there were any;
    ``reason`` says why authentication did not succeed, for logs.
    """

    status: AuthStatus
    username: str | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status is AuthStatus.OK


class DigestAuthenticator:
    """Issues digest challenges and verifies the credentials that answer them.

    ``secret`` keys the nonce HMAC; a random one (the default) means nonces
    issued before a restart are rejected after it, which clients survive by
    answering the next challenge.
    """

    def __init__(
        self,
        realm: str,
        *,
        secret: bytes | None = None,
        nonce_ttl: float = 300,
        clock: Callable[[], float] = time.time,
        algorithms: tuple[str, ...] = tuple(ALGORITHMS),
        algorithms_of: Callable[[str], tuple[str, ...] | None] = lambda user: None,
        nonce_slots: int = NONCE_SLOTS,
    ) -> None:
        """``algorithms`` are the ones offered, in challenge order, and the
        only ones accepted (MD5 first helps clients that read only the first
        challenge), unless ``algorithms_of`` gives a user's own (an extension's
        ``auth_algorithms``: old clients give up on two challenges). ``nonce_slots``
        is how many of the newest nonces keep their nonce count."""
        unknown = set(algorithms) - set(ALGORITHMS)
        if unknown or not algorithms:
            raise ValueError(f"unsupported digest algorithms: {sorted(unknown) or 'none given'}")
        self.realm = realm
        self.algorithms = algorithms
        self.algorithms_of = algorithms_of
        self.nonce_ttl = nonce_ttl
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self._clock = clock
        self._opaque = hmac.new(self._secret, b"opaque", hashlib.sha256).hexdigest()[:16]
        # Highest nc seen per nonce, at its serial modulo the ring's size;
        # 0 until the nonce is first used.
        self._counts = array.array("I", bytes(4 * nonce_slots))
        self._next_serial = 0

    def algorithms_for(self, user: str | None) -> tuple[str, ...]:
        """The algorithms ``user`` is challenged with and may answer in."""
        return (self.algorithms_of(user) if user else None) or self.algorithms

    def challenge_headers(self, source_ip: str, *, stale: bool = False, user: str | None = None) -> list[str]:
        """Values for WWW-Authenticate (or Proxy-Authenticate) to a request
        for ``user``: one challenge per algorithm of theirs, the preferred one
        first, all with one new nonce."""
        nonce = self._mint_nonce(source_ip)
        headers = []
        for algorithm in self.algorithms_for(user):
            params = {
                "realm": self.realm,
                "nonce": nonce,
                "opaque": self._opaque,
                "algorithm": algorithm,
                "qop": "auth",
            }
            if stale:
                params["stale"] = "true"
            headers.append(stringify_auth(AuthChallenge(scheme="Digest", params=params)))
        return headers

    def verify(
        self,
        request: SipRequest,
        source_ip: str,
        password_for: Callable[[str], str | None],
        header: str = "Authorization",
    ) -> AuthResult:
        """Check the digest credentials in ``header`` of ``request``, which
        came from ``source_ip``; ``password_for`` gives a user's password, or
        None for a user that does not exist. Credentials that pass use up
        their nonce count: the same ones again are a replay."""
        candidates = [parse_auth(value, credentials=True) for value in request.headers.get(header)]
        digests = [
            {key.lower(): value for key, value in c.params.items()} for c in candidates if c.scheme.lower() == "digest"
        ]
        if not digests:
            return AuthResult(AuthStatus.MISSING)
        # A request may carry credentials for several realms (RFC 3261 §22.3):
        # judge the one for ours, or the first when none is.
        params = next((p for p in digests if p.get("realm") == self.realm), digests[0])
        username = params.get("username") or None

        def failed(reason: str) -> AuthResult:
            return AuthResult(AuthStatus.FAILED, username, reason)

        for name in ("username", "realm", "nonce", "uri", "response"):
            if not params.get(name):
                return failed(f"no {name} in credentials")
        assert username is not None
        if params["realm"] != self.realm:
            return failed(f"wrong realm {params['realm']!r}")
        algorithm = params.get("algorithm", "MD5").upper()
        if algorithm not in self.algorithms_for(username):
            return failed(f"algorithm {algorithm!r} is not offered")
        if "opaque" in params and params["opaque"] != self._opaque:
            return failed("wrong opaque")
        nc: int | None = None
        qop = params.get("qop")
        if qop is not None:
            if qop.lower() != "auth":
                return failed(f"unsupported qop {qop!r}")
            nc_hex, cnonce = params.get("nc", ""), params.get("cnonce", "")
            if len(nc_hex) != 8 or not all(ch in "0123456789abcdefABCDEF" for ch in nc_hex) or not cnonce:
                return failed("qop=auth without a valid nc and cnonce")
            nc = int(nc_hex, 16)
        minted = self._nonce_origin(params["nonce"], source_ip)
        if minted is None:
            return failed("nonce not issued to this address")
        issued_at, serial = minted

        password = password_for(username)
        # An unknown user costs the same hashing as a known one, so response
        # times do not reveal which extensions exist.
        expected = self._response(
            params, algorithm, request.method, password if password is not None else secrets.token_hex(16)
        )
        matches = hmac.compare_digest(expected.encode(), params["response"].lower().encode("utf-8", "replace"))
        if password is None:
            return failed("unknown user")
        if not matches:
            return failed("wrong password")
        # The response is right: whatever is wrong from here on, the client
        # knew the password once, so it gets a challenge, not a 403.
        if self._clock() - issued_at > self.nonce_ttl:
            return AuthResult(AuthStatus.STALE, username, "nonce expired")
        if not same_uri(params["uri"], request.uri):
            return AuthResult(AuthStatus.REPLAY, username, f"digest uri {params['uri']} is not the Request-URI")
        if not self._next_serial - len(self._counts) < serial < self._next_serial:
            return AuthResult(AuthStatus.STALE, username, "nonce forgotten: newer ones took its place")
        slot = serial % len(self._counts)
        last = self._counts[slot]
        if nc is None:
            if last:
                return AuthResult(AuthStatus.REPLAY, username, "nonce without qop used again")
            self._counts[slot] = _SPENT
        else:
            if nc <= last:
                return AuthResult(AuthStatus.REPLAY, username, f"nonce count {nc} not above {last}")
            self._counts[slot] = nc
        return AuthResult(AuthStatus.OK, username)

    def _response(self, params: dict[str, str], algorithm: str, method: str, password: str) -> str:
        """The digest response a client knowing ``password`` sends (RFC 7616 §3.4.1)."""
        hash_name = ALGORITHMS[algorithm]

        def h(text: str) -> str:
            return hashlib.new(hash_name, text.encode("utf-8"), usedforsecurity=False).hexdigest()

        ha1 = h(f"{params['username']}:{self.realm}:{password}")
        ha2 = h(f"{method}:{params['uri']}")
        if "qop" in params:
            return h(f"{ha1}:{params['nonce']}:{params['nc']}:{params['cnonce']}:auth:{ha2}")
        return h(f"{ha1}:{params['nonce']}:{ha2}")

    def _mac(self, ts: int, serial: int, source_ip: str) -> str:
        digest = hmac.new(self._secret, f"{ts}:{serial}:{source_ip}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:_NONCE_MAC_BYTES]).rstrip(b"=").decode("ascii")

    def _mint_nonce(self, source_ip: str) -> str:
        ts = int(self._clock())
        serial = self._next_serial
        self._next_serial += 1
        self._counts[serial % len(self._counts)] = 0
        return f"{ts:x}.{serial:x}.{self._mac(ts, serial, source_ip)}"

    def _nonce_origin(self, nonce: str, source_ip: str) -> tuple[int, int] | None:
        """When ``nonce`` was minted and its serial number, or None unless
        we minted it for ``source_ip``."""
        ts_hex, serial_hex, mac = (nonce.split(".", 2) + ["", ""])[:3]
        # Bounded lengths keep int() cheap on whatever a client sends.
        if not (0 < len(ts_hex) <= 16 and 0 < len(serial_hex) <= 16):
            return None
        try:
            ts, serial = int(ts_hex, 16), int(serial_hex, 16)
        except ValueError:
            return None
        if not hmac.compare_digest(mac.encode("utf-8", "replace"), self._mac(ts, serial, source_ip).encode()):
            return None
        return ts, serial


_SIP_URI = re.compile(r"(sips?):(?:([^@]*)@)?(\[[0-9A-Fa-f:.]+\]|[^;?:@\[\]]+)(?::([0-9]{1,5}))?(?:[;?].*)?", re.I | re.S)


def same_uri(digest_uri: str, request_uri: str) -> bool:
    """Whether the credentials' ``uri`` names the Request-URI (RFC 7616 §3.4.6,
    RFC 3261 §22.4): SIP and SIPS URIs compare by scheme, user (unescaped,
    case-sensitive), host (case-insensitive) and port, a missing port being
    the scheme's default; URI parameters and headers do not count, since
    routing reads none of them. Other URIs must be the same text."""
    return _uri_key(digest_uri) == _uri_key(request_uri)


def _uri_key(uri: str) -> tuple[str, str, str, int] | str:
    text = uri.strip()
    match = _SIP_URI.fullmatch(text)
    if match is None:
        return text
    scheme, user, host, port = match.groups()
    scheme = scheme.lower()
    host = host.lower()
    if host.startswith("["):
        try:
            host = f"[{ipaddress.IPv6Address(host[1:-1])}]"
        except ValueError:
            return text
    return scheme, unquote(user or ""), host, int(port) if port else (5061 if scheme == "sips" else 5060)




class AddressGuard:
    """Bans an address for ``ban_seconds`` after ``max_failures`` failed
    authentications within ``window`` seconds, so passwords cannot be
    guessed at line rate. IPv6 addresses count and are banned per /64
    (:func:`address_key`); each ban is announced as a ``ban`` security event."""

    def __init__(
        self,
        *,
        max_failures: int = 10,
        window: float = 60,
        ban_seconds: float = 600,
        clock: Callable[[], float] = time.monotonic,
        events: EventBus | None = None,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.ban_seconds = ban_seconds
        self._clock = clock
        self._events = events
        # Both dicts are keyed by address_key and kept in time order (a key is
        # moved to the end when it fails again; every ban lasts as long), so
        # pruning only ever looks at the front.
        self._failures: dict[str, deque[float]] = {}
        self._bans: dict[str, float] = {}

    def record_failure(self, ip: str) -> bool:
        """Count a failed authentication from ``ip``; True when it causes a ban."""
        now = self._clock()
        self._prune(now)
        key = address_key(ip)
        if key in self._bans:
            return False
        times = self._failures.pop(key, None) or deque(maxlen=self.max_failures)
        times.append(now)
        while times[0] <= now - self.window:
            times.popleft()
        if len(times) < self.max_failures:
            self._failures[key] = times
            if len(self._failures) > MAX_TRACKED_ADDRESSES:
                del self._failures[next(iter(self._failures))]
            return False
        self._bans[key] = now + self.ban_seconds
        logger.warning(
            "blocking %s for %g s after %d failed authentications in %g s",
            key,
            self.ban_seconds,
            self.max_failures,
            self.window,
        )
        if self._events is not None:
            network = {"network": key} if key != ip else {}
            security_event(self._events, "ban", ip, **network, seconds=self.ban_seconds)
        return True

    def is_banned(self, ip: str) -> bool:
        """True while ``ip`` (its /64, for IPv6) is banned."""
        if not self._bans:  # every packet asks: keep the usual answer cheap
            return False
        self._prune(self._clock())
        return address_key(ip) in self._bans

    def banned(self) -> dict[str, float]:
        """Banned addresses and IPv6 /64 networks, and the seconds left on each ban."""
        now = self._clock()
        self._prune(now)
        return {key: until - now for key, until in self._bans.items()}

    def _prune(self, now: float) -> None:
        """Lift expired bans and forget failures older than the window."""
        while self._bans:
            key, until = next(iter(self._bans.items()))
            if until > now:
                break
            del self._bans[key]
            logger.info("unblocking %s: ban expired", key)
        while self._failures:
            key, times = next(iter(self._failures.items()))
            if times[-1] > now - self.window:
                break
            del self._failures[key]


def report_refusal(
    result: AuthResult,
    ip: str,
    method: str,
    *,
    guard: AddressGuard,
    events: EventBus,
    extension: str | None = None,
) -> None:
    """Announce credentials that were refused (``FAILED`` or ``REPLAY``) and
    count them against the address. A wrong password is ``auth_failure``
    (also the ``auth_failure`` domain event behind pbx_auth_failures_total),
    reused credentials are ``replay``: a phone never sends those, since a
    retransmission is answered by its transaction before it gets here."""
    extension = extension or result.username or ""
    if result.status is AuthStatus.REPLAY:
        security_event(events, "replay", ip, extension=extension, method=method, reason=result.reason)
    else:
        security_event(events, "auth_failure", ip, extension=extension, method=method, reason=result.reason)
        events.emit("auth_failure", ip=ip, extension=extension)
    guard.record_failure(ip)


def authenticate_request(
    request: SipRequest,
    ip: str,
    txn: ServerTransaction,
    *,
    authenticator: DigestAuthenticator,
    guard: AddressGuard,
    events: EventBus,
    passwords: Callable[[str], str | None],
) -> str | None:
    """The extension a request other than REGISTER (INVITE, SUBSCRIBE) comes
    from, by digest; None once it has been answered: 401 with a challenge
    (stale=true when the password was right but the nonce is expired or
    reused), or 403 for wrong credentials. Wrong and replayed credentials
    count against the address (``guard``) and are security events."""
    result = authenticator.verify(request, ip, passwords)
    if result.ok:
        return result.username
    if result.status in (AuthStatus.FAILED, AuthStatus.REPLAY):
        report_refusal(result, ip, request.method, guard=guard, events=events)
    if result.status is AuthStatus.FAILED:
        txn.reply(403)
        return None
    response = make_response(request, 401, to_tag=txn.to_tag)
    stale = result.status in (AuthStatus.STALE, AuthStatus.REPLAY)
    # Before any credentials, From names the extension the request comes from.
    user = result.username or address_user(request.headers.get_first("from"))
    for challenge in authenticator.challenge_headers(ip, stale=stale, user=user):
        response.headers.append("WWW-Authenticate", challenge)
    txn.respond(response)
    return None
