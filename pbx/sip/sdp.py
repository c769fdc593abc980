"""SDP offer/answer for the B2BUA: what a peer offers, and what we offer and answer.

The server sits in the media path of every call, so each leg sees our address
and port; the codec each leg gets is chosen so that the relay either passes
packets through or transcodes between PCMU and PCMA.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiosipua import SdpNegotiationError, parse_sdp

STATIC_CODECS: dict[int, tuple[str, int]] = {0: ("PCMU", 8000), 8: ("PCMA", 8000), 9: ("G722", 8000)}
TRANSCODABLE = ("PCMU", "PCMA")
DTMF_PT = 101
SECURE_PROFILES = ("RTP/SAVP", "RTP/SAVPF")


@dataclass(frozen=True)
class SdpCodec:
    name: str
    payload_type: int
    clock_rate: int = 8000


@dataclass(frozen=True)
class MediaDescription:
    """The audio stream of one SDP body, reduced to what the relay needs."""

    addr: tuple[str, int]
    codecs: tuple[SdpCodec, ...]
    dtmf_pt: int | None
    direction: str
    secure: bool = False  # RTP/SAVP: SRTP (RFC 3711)
    cryptos: tuple[str, ...] = ()  # its a=crypto values (RFC 4568), in the sender's order

    def codec(self, name: str) -> SdpCodec | None:
        return next((c for c in self.codecs if c.name == name), None)


def parse_media(body: str, supported: tuple[str, ...]) -> MediaDescription:
    """The first audio stream of ``body``, keeping only codecs in ``supported``.

    Raises SdpNegotiationError when there is no audio or no codec in common.
    """
    try:
        sdp = parse_sdp(body)
    except (ValueError, IndexError) as exc:
        raise SdpNegotiationError(f"unreadable SDP: {exc}") from exc
    audio = sdp.audio
    addr = sdp.rtp_address
    if audio is None or addr is None:
        raise SdpNegotiationError("no audio stream in SDP")
    codecs: list[SdpCodec] = []
    dtmf_pt: int | None = None
    for fmt in audio.formats:
        try:
            pt = int(fmt)
        except ValueError:
            continue
        found = next((c for c in audio.codecs if c.payload_type == pt), None)
        name = found.encoding_name.upper() if found and found.encoding_name else STATIC_CODECS.get(pt, ("", 0))[0]
        if name == "TELEPHONE-EVENT":
            dtmf_pt = pt
        elif name in supported:
            codecs.append(SdpCodec(name, pt))
    if not codecs and audio.port != 0:
        raise SdpNegotiationError("no codec in common")
    direction = audio.direction
    if addr[0] in ("0.0.0.0", "::") and direction == "sendrecv":
        direction = "sendonly"  # RFC 2543 hold
    secure = audio.proto.upper() in SECURE_PROFILES
    cryptos = tuple(audio.attributes.get("crypto", ())) if secure else ()
    return MediaDescription(addr, tuple(codecs), dtmf_pt, direction, secure, cryptos)


def plain_offer(body: str) -> str:
    """``body`` (one of our SRTP offers) as plain RTP: RTP/AVP and no keys,
    for a leg whose signalling would carry the keys in the clear."""
    lines = [line for line in body.split("\r\n") if not line.startswith("a=crypto:")]
    return "\r\n".join(line.replace(" RTP/SAVP ", " RTP/AVP ", 1) if line.startswith("m=") else line for line in lines)


def offer_codecs(peer: MediaDescription, supported: tuple[str, ...]) -> tuple[SdpCodec, ...]:
    """What to offer the other leg: the peer's codecs in its order, then the
    G.711 law we can transcode to if the peer did not offer it."""
    codecs = list(peer.codecs)
    if any(c.name in TRANSCODABLE for c in codecs):
        for name in TRANSCODABLE:
            if name in supported and peer.codec(name) is None:
                codecs.append(SdpCodec(name, 0 if name == "PCMU" else 8))
    return tuple(codecs)


def answer_codec(peer: MediaDescription, chosen: SdpCodec) -> SdpCodec:
    """The codec to answer ``peer`` with when the other leg settled on ``chosen``.

    Raises SdpNegotiationError when neither pass-through nor transcoding works.
    """
    same = peer.codec(chosen.name)
    if same is not None:
        return same
    if chosen.name in TRANSCODABLE:
        for codec in peer.codecs:
            if codec.name in TRANSCODABLE:
                return codec
    raise SdpNegotiationError(f"caller cannot take {chosen.name}")


def reverse_direction(direction: str) -> str:
    return {"sendonly": "recvonly", "recvonly": "sendonly"}.get(direction, direction)


class SdpOrigin:
    """Our SDP towards one peer over a whole session. Its ``o=`` line keeps
    one session id, and its version goes up by one exactly when the
    description changes (RFC 3264 §8): a 200 repeats its 183's SDP as it was,
    and a re-INVITE answer that changes nothing says so."""

    def __init__(self) -> None:
        self.session_id = int(time.time())
        self.version = 0
        self._last: list[str] | None = None

    def describe(
        self,
        ip: str,
        port: int,
        codecs: tuple[SdpCodec, ...],
        dtmf_pt: int | None,
        direction: str = "sendrecv",
        crypto: str | None = None,
    ) -> str:
        """An SDP body with one audio stream (RFC 4566); with ``crypto`` (our
        ``a=crypto`` value, RFC 4568) the stream is SRTP, RTP/SAVP."""
        family = "IP6" if ":" in ip else "IP4"
        formats = [str(c.payload_type) for c in codecs] + ([str(dtmf_pt)] if dtmf_pt is not None else [])
        lines = [
            "v=0",
            "s=pbx",
            f"c=IN {family} {ip}",
            "t=0 0",
            f"m=audio {port} {'RTP/SAVP' if crypto else 'RTP/AVP'} {' '.join(formats)}",
        ]
        if crypto:
            lines.append(f"a=crypto:{crypto}")
        lines += [f"a=rtpmap:{c.payload_type} {c.name}/{c.clock_rate}" for c in codecs]
        if dtmf_pt is not None:
            lines += [f"a=rtpmap:{dtmf_pt} telephone-event/8000", f"a=fmtp:{dtmf_pt} 0-16"]
        lines += ["a=ptime:20", f"a={direction}"]
        if lines != self._last:
            self.version += 1
            self._last = lines
        origin = f"o=pbx {self.session_id} {self.version} IN {family} {ip}"
        return "\r\n".join([lines[0], origin, *lines[1:]]) + "\r\n"
