"""SRTP with SDES keys (RFC 4568, RFC 3711) on one side of an RTP relay.

Each relay side whose leg negotiated ``RTP/SAVP`` gets an :class:`SdesSession`:
our own master key (what we send the peer, written in our ``a=crypto`` line)
and the peer's (what it sends us, from its line). Keys are per side, so where
both legs are SRTP the relay decrypts with one leg's key and encrypts with the
other's; there is no pass-through of SRTP, as in rtpengine.

The work happens at the socket edge of the side: incoming packets are
unprotected before the relay looks at them (``RelaySide.unprotect``), and the
side's transports are swapped for ones that protect every packet just before
``sendto``. Everything above (latching, statistics, DTMF, IVR prompts, music
on hold, the recorder) sees plain RTP. RTCP is SRTCP on the same keys.

The cipher work is libsrtp's, through pylibsrtp (as in aiortc).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pylibsrtp

from pbx.media.relay_side import RelaySide

logger = logging.getLogger(__name__)

# RFC 4568 §6.2 suites we support, best first, with their libsrtp profile.
SUITES: dict[str, int] = {
    "AES_CM_128_HMAC_SHA1_80": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    "AES_CM_128_HMAC_SHA1_32": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
}
DEFAULT_SUITE = "AES_CM_128_HMAC_SHA1_80"
_KEY_LENGTH = 30  # 16-byte master key + 14-byte master salt, for both suites

# "<tag> <suite> inline:<key||salt>[|lifetime][|MKI:len]" and nothing after:
# session parameters (UNENCRYPTED_SRTP, KDR, ...) are not supported, so such
# a line is not acceptable (RFC 4568 §6.3).
_CRYPTO = re.compile(r"(?P<tag>[0-9]{1,9})\s+(?P<suite>[A-Za-z0-9_]+)\s+inline:(?P<key>[A-Za-z0-9+/=]+)(?P<rest>\|\S*)?\s*")


@dataclass(frozen=True)
class Crypto:
    """One ``a=crypto`` attribute: tag, suite and the 30-byte master key and salt."""

    tag: int
    suite: str
    key: bytes

    def __str__(self) -> str:
        return f"{self.tag} {self.suite} inline:{base64.b64encode(self.key).decode()}"


def parse_crypto(value: str) -> Crypto | None:
    """The attribute value after ``a=crypto:``; None when it is malformed or
    asks for something we do not do (another suite, an MKI, session parameters)."""
    match = _CRYPTO.fullmatch(value)
    if match is None or match["suite"] not in SUITES:
        return None
    # After the key: an optional lifetime ("2^31"), then an optional MKI ("1:4").
    if any(":" in part for part in (match["rest"] or "").split("|")[1:]):
        return None  # pylibsrtp has no MKI
    try:
        key = base64.b64decode(match["key"], validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(key) != _KEY_LENGTH:
        return None
    return Crypto(int(match["tag"]), match["suite"], key)


def usable(values: Sequence[str]) -> Crypto | None:
    """The first acceptable crypto line of an offer, in the offerer's order."""
    for value in values:
        crypto = parse_crypto(value)
        if crypto is not None:
            return crypto
    return None


class SdesSession:
    """The SDES keys of one relay side, and the SRTP contexts made from them.

    Our key is made once and kept for the life of the side (re-offers and
    answers repeat it); the peer's may change with each offer or answer it
    sends, which rebuilds only the receiving context.
    """

    def __init__(self, side: RelaySide, suite: str = DEFAULT_SUITE, tag: int = 1) -> None:
        self.side = side
        self.local = Crypto(tag, suite, os.urandom(_KEY_LENGTH))
        self.remote: Crypto | None = None
        self._tx: pylibsrtp.Session | None = None
        self._rx: pylibsrtp.Session | None = None
        self._plain: tuple[asyncio.DatagramTransport, asyncio.DatagramTransport] | None = None

    @property
    def active(self) -> bool:
        """Whether the side speaks SRTP now (the peer's key is known)."""
        return self._rx is not None

    def attribute(self) -> str:
        """Our ``a=crypto`` value for the SDP we send this side's peer."""
        return str(self.local)

    def accept_offer(self, values: Sequence[str]) -> bool:
        """The peer offered these crypto lines: take the first we support,
        answer with the same tag and suite (our key), and start. False when
        none is acceptable."""
        crypto = usable(values)
        if crypto is None:
            return False
        if (crypto.tag, crypto.suite) != (self.local.tag, self.local.suite):
            self.local = Crypto(crypto.tag, crypto.suite, self.local.key)
            self._tx = None  # a new suite needs a new sending context
        self._start(crypto)
        return True

    def accept_answer(self, values: Sequence[str]) -> bool:
        """The peer answered our offer with these lines: the one with our tag
        and suite starts the side; False when there is none (RFC 4568 §7.1.3)."""
        for value in values:
            crypto = parse_crypto(value)
            if crypto is not None and (crypto.tag, crypto.suite) == (self.local.tag, self.local.suite):
                self._start(crypto)
                return True
        return False

    def _start(self, remote: Crypto) -> None:
        profile = SUITES[self.local.suite]
        if self._tx is None:
            # A relay may forward a duplicate: libsrtp must let it be sent again.
            policy = pylibsrtp.Policy(key=self.local.key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND, srtp_profile=profile)
            policy.allow_repeat_tx = True
            self._tx = pylibsrtp.Session(policy)
        if remote != self.remote or self._rx is None:
            policy = pylibsrtp.Policy(key=remote.key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND, srtp_profile=SUITES[remote.suite])
            self._rx = pylibsrtp.Session(policy)
            self.remote = remote
        self._install()

    def stop(self) -> None:
        """The peer went back to plain RTP: the side sends and takes it unprotected."""
        self._rx = None
        self.remote = None
        side = self.side
        side.unprotect = None
        side.rtcp.unprotect = None
        if self._plain is not None:
            side.transport, side.rtcp.transport = self._plain
            self._plain = None

    def _install(self) -> None:
        side = self.side
        side.unprotect = self._unprotect_rtp
        side.rtcp.unprotect = self._unprotect_rtcp
        if self._plain is None:
            self._plain = (side.transport, side.rtcp.transport)
            side.transport = _ProtectingTransport(side.transport, self._protect_rtp)
            side.rtcp.transport = _ProtectingTransport(side.rtcp.transport, self._protect_rtcp)

    def _protect_rtp(self, data: bytes) -> bytes:
        assert self._tx is not None
        return self._tx.protect(data)

    def _protect_rtcp(self, data: bytes) -> bytes:
        assert self._tx is not None
        return self._tx.protect_rtcp(data)

    def _unprotect_rtp(self, data: bytes) -> bytes | None:
        rx = self._rx
        if rx is None:
            return None
        try:
            return rx.unprotect(data)
        except pylibsrtp.Error:
            return None  # not authentic, replayed or too short: not the peer's

    def _unprotect_rtcp(self, data: bytes) -> bytes | None:
        rx = self._rx
        if rx is None:
            return None
        try:
            return rx.unprotect_rtcp(data)
        except pylibsrtp.Error:
            return None


class _ProtectingTransport(asyncio.DatagramTransport):
    """A side's socket that encrypts every packet on its way out."""

    def __init__(self, inner: asyncio.DatagramTransport, protect: Callable[[bytes], bytes]) -> None:
        super().__init__()
        self._inner = inner
        self._protect = protect

    def sendto(self, data: Any, addr: Any = None) -> None:
        try:
            packet = self._protect(bytes(data))
        except pylibsrtp.Error as exc:
            # Too short to be RTP: nothing the peer could use.
            logger.debug("SRTP cannot protect a %d-byte packet: %s", len(data), exc)
            return
        self._inner.sendto(packet, addr)

    def close(self) -> None:
        self._inner.close()

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def abort(self) -> None:
        self._inner.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)


class SrtpSides:
    """The SRTP of one call's relay sides under ``rtp.srtp`` (``mode``).

    ``optional``: a side is SRTP when its peer offers or answers RTP/SAVP;
    the call service offers it only on legs over TLS. ``mandatory``: every
    side must be SRTP. ``off``: none may be. The methods below take what an
    SDP said (``secure``: RTP/SAVP; ``cryptos``: its ``a=crypto`` values) and
    say whether it is acceptable; our own ``a=crypto`` value for a side comes
    from :meth:`offer` (a new offer) or :meth:`crypto` (an answer, a re-offer).
    """

    def __init__(self, mode: str = "optional") -> None:
        self.mode = mode
        self._sessions: dict[str, SdesSession] = {}

    def refusal(self, secure: bool, cryptos: Sequence[str]) -> str | None:
        """Why an offer cannot be taken under this mode (488), or None."""
        if secure and self.mode == "off":
            return "SRTP offered but rtp.srtp is off"
        if not secure and self.mode == "mandatory":
            return "plain RTP offered but rtp.srtp is mandatory"
        if secure and usable(cryptos) is None:
            return f"no usable a=crypto line (supported: {', '.join(SUITES)})"
        return None

    def offer(self, side: RelaySide) -> str | None:
        """Our ``a=crypto`` value for an offer to ``side``'s peer; None when off."""
        if self.mode == "off":
            return None
        session = self._sessions.get(side.name)
        if session is None:
            session = self._sessions[side.name] = SdesSession(side)
        return session.attribute()

    def crypto(self, side: RelaySide) -> str | None:
        """Our ``a=crypto`` value for ``side`` when it speaks SRTP now, else None (plain RTP)."""
        session = self._sessions.get(side.name)
        return session.attribute() if session is not None and session.active else None

    def take_offer(self, side: RelaySide, secure: bool, cryptos: Sequence[str]) -> bool:
        """``side``'s peer offered this; False when it is not acceptable (answer 488)."""
        if self.refusal(secure, cryptos) is not None:
            return False
        if not secure:
            self._plain(side)
            return True
        session = self._sessions.get(side.name)
        if session is None:
            session = self._sessions[side.name] = SdesSession(side)
        return session.accept_offer(cryptos)

    def take_answer(self, side: RelaySide, secure: bool, cryptos: Sequence[str]) -> bool:
        """``side``'s peer answered our offer with this; False when unusable
        (SRTP we did not offer, no matching key, or plain RTP when mandatory)."""
        session = self._sessions.get(side.name)
        if not secure:
            if self.mode == "mandatory":
                return False
            self._plain(side)
            return True
        return session is not None and session.accept_answer(cryptos)

    def turn(self) -> None:
        """The relay's sides swapped names (a transfer): each keeps its keys."""
        sessions = self._sessions
        self._sessions = {name: sessions[other] for name, other in (("a", "b"), ("b", "a")) if other in sessions}

    def forget(self, side: RelaySide) -> None:
        """``side``'s peer left: the next peer gets new keys from :meth:`offer`."""
        session = self._sessions.pop(side.name, None)
        if session is not None and session.active:
            session.stop()

    def _plain(self, side: RelaySide) -> None:
        session = self._sessions.get(side.name)
        if session is not None and session.active:
            session.stop()
