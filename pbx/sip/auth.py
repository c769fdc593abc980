"""Digest authentication of SIP requests (RFC 3261 §22, RFC 7616, RFC 8760)
and blocking of addresses that keep failing it.

Nonces are stateless: a nonce carries the time it was minted and an HMAC that
binds it to the client's address, so verifying one needs no table of issued
nonces, survives any request rate and cannot be reused from another address.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from aiosipua import AuthChallenge, SipRequest, parse_auth, stringify_auth

from pbx.events import EventBus
from pbx.sip.messages import make_response
from pbx.sip.stack import ServerTransaction

logger = logging.getLogger(__name__)

# Challenge value of `algorithm` -> hashlib name. SHA-256 first: RFC 8760 §2.4
# has the server list challenges in its order of preference.
ALGORITHMS: dict[str, str] = {"SHA-256": "sha256", "MD5": "md5"}

# Bytes of the HMAC kept in a nonce: 128 bits cannot be guessed and keep the
# nonce short on every challenge and every request.
_NONCE_MAC_BYTES = 16

# Addresses whose recent failures AddressGuard remembers at most; beyond this
# the address that failed least recently is forgotten first.
MAX_TRACKED_ADDRESSES = 65536


class AuthStatus(enum.Enum):
    """Outcome of checking a request's digest credentials."""

    OK = "ok"
    MISSING = "missing"  # no credentials for us: answer with a challenge
    STALE = "stale"  # right password, expired nonce: challenge with stale=true
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
    ) -> None:
        """``algorithms`` are the ones offered, in challenge order, and the
        only ones accepted (MD5 first helps clients that read only the first
        challenge)."""
        unknown = set(algorithms) - set(ALGORITHMS)
        if unknown or not algorithms:
            raise ValueError(f"unsupported digest algorithms: {sorted(unknown) or 'none given'}")
        self.realm = realm
        self.algorithms = algorithms
        self.nonce_ttl = nonce_ttl
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self._clock = clock
        self._opaque = hmac.new(self._secret, b"opaque", hashlib.sha256).hexdigest()[:16]

    def challenge_headers(self, source_ip: str, *, stale: bool = False) -> list[str]:
        """Values for WWW-Authenticate (or Proxy-Authenticate): one challenge
        per supported algorithm, the preferred one first."""
        nonce = self._mint_nonce(source_ip)
        headers = []
        for algorithm in self.algorithms:
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
        None for a user that does not exist."""
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
        if algorithm not in self.algorithms:
            return failed(f"algorithm {algorithm!r} is not offered")
        if "opaque" in params and params["opaque"] != self._opaque:
            return failed("wrong opaque")
        qop = params.get("qop")
        if qop is not None:
            if qop.lower() != "auth":
                return failed(f"unsupported qop {qop!r}")
            nc, cnonce = params.get("nc", ""), params.get("cnonce", "")
            if len(nc) != 8 or not all(ch in "0123456789abcdefABCDEF" for ch in nc) or not cnonce:
                return failed("qop=auth without a valid nc and cnonce")
        minted = self._nonce_time(params["nonce"], source_ip)
        if minted is None:
            return failed("nonce not issued to this address")

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
        if self._clock() - minted > self.nonce_ttl:
            return AuthResult(AuthStatus.STALE, username, "nonce expired")
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

    def _mac(self, ts: int, source_ip: str) -> str:
        digest = hmac.new(self._secret, f"{ts}:{source_ip}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:_NONCE_MAC_BYTES]).rstrip(b"=").decode("ascii")

    def _mint_nonce(self, source_ip: str) -> str:
        ts = int(self._clock())
        return f"{ts:x}.{self._mac(ts, source_ip)}"

    def _nonce_time(self, nonce: str, source_ip: str) -> int | None:
        """When ``nonce`` was minted, or None unless we minted it for ``source_ip``."""
        ts_hex, _, mac = nonce.partition(".")
        try:
            ts = int(ts_hex, 16)
        except ValueError:
            return None
        if not hmac.compare_digest(mac.encode("utf-8", "replace"), self._mac(ts, source_ip).encode()):
            return None
        return ts


class AddressGuard:
    """Bans an address for ``ban_seconds`` after ``max_failures`` failed
    authentications within ``window`` seconds, so passwords cannot be
    guessed at line rate."""

    def __init__(
        self,
        *,
        max_failures: int = 10,
        window: float = 60,
        ban_seconds: float = 600,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.ban_seconds = ban_seconds
        self._clock = clock
        # Both dicts are kept in time order (an address is moved to the end
        # when it fails again; every ban lasts as long), so pruning only ever
        # looks at the front.
        self._failures: dict[str, deque[float]] = {}
        self._bans: dict[str, float] = {}

    def record_failure(self, ip: str) -> bool:
        """Count a failed authentication from ``ip``; True when it causes a ban."""
        now = self._clock()
        self._prune(now)
        if ip in self._bans:
            return False
        times = self._failures.pop(ip, None) or deque(maxlen=self.max_failures)
        times.append(now)
        while times[0] <= now - self.window:
            times.popleft()
        if len(times) < self.max_failures:
            self._failures[ip] = times
            if len(self._failures) > MAX_TRACKED_ADDRESSES:
                del self._failures[next(iter(self._failures))]
            return False
        self._bans[ip] = now + self.ban_seconds
        logger.warning(
            "blocking %s for %g s after %d failed authentications in %g s",
            ip,
            self.ban_seconds,
            self.max_failures,
            self.window,
        )
        return True

    def is_banned(self, ip: str) -> bool:
        """True while ``ip`` is banned."""
        self._prune(self._clock())
        return ip in self._bans

    def banned(self) -> dict[str, float]:
        """Banned addresses and the seconds left on each ban."""
        now = self._clock()
        self._prune(now)
        return {ip: until - now for ip, until in self._bans.items()}

    def _prune(self, now: float) -> None:
        """Lift expired bans and forget failures older than the window."""
        while self._bans:
            ip, until = next(iter(self._bans.items()))
            if until > now:
                break
            del self._bans[ip]
            logger.info("unblocking %s: ban expired", ip)
        while self._failures:
            ip, times = next(iter(self._failures.items()))
            if times[-1] > now - self.window:
                break
            del self._failures[ip]


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
    from, by digest; None once it has been answered: 401 with a challenge, or
    403 for wrong credentials, which count against the address (``guard``)
    and are announced as ``auth_failure``."""
    result = authenticator.verify(request, ip, passwords)
    if result.ok:
        return result.username
    if result.status is AuthStatus.FAILED:
        logger.warning("%s from %s: authentication failed (%s)", request.method, ip, result.reason)
        events.emit("auth_failure", ip=ip, extension=result.username or "")
        guard.record_failure(ip)
        txn.reply(403)
        return None
    response = make_response(request, 401, to_tag=txn.to_tag)
    for challenge in authenticator.challenge_headers(ip, stale=result.status is AuthStatus.STALE):
        response.headers.append("WWW-Authenticate", challenge)
    txn.respond(response)
    return None

