"""The audio codecs the server speaks, and G.711 conversions between them.

μ-law and A-law are both 8-bit companded forms of the same 8 kHz signal, so
converting one into the other is a byte-for-byte mapping: two 256-byte tables
built once at import and applied with ``bytes.translate`` (C speed, no
per-sample Python). The tables come from ``audioop`` (stdlib on 3.12, the
``audioop-lts`` package on 3.13+), whose G.711 follows the ITU reference.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from G722 import G722 as G722Adpcm

from pbx.media.rtp_packet import PayloadRules

logger = logging.getLogger(__name__)

with warnings.catch_warnings():
    # 3.12 warns that audioop leaves the stdlib; 3.13+ gets it from audioop-lts.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


@dataclass(frozen=True, slots=True)
class Codec:
    """An RTP payload format as negotiated in SDP (``a=rtpmap:PT NAME/RATE``)."""

    name: str
    payload_type: int
    clock_rate: int = 8000


PCMU = Codec("PCMU", 0, 8000)
PCMA = Codec("PCMA", 8, 8000)
# G.722 samples at 16 kHz but its RTP clock is 8000 (RFC 3551 §4.5.2).
G722 = Codec("G722", 9, 8000)
# RFC 4733 DTMF has a dynamic payload type; 101 is what we offer.
TELEPHONE_EVENT = Codec("telephone-event", 101, 8000)

CODECS: dict[str, Codec] = {c.name.upper(): c for c in (PCMU, PCMA, G722, TELEPHONE_EVENT)}
"""Supported codecs by upper-case SDP encoding name."""


class UnsupportedCodec(ValueError):
    """The operation is not available for this codec."""


_ALL_BYTES = bytes(range(256))

ULAW_TO_ALAW: bytes = audioop.lin2alaw(audioop.ulaw2lin(_ALL_BYTES, 2), 2)
"""``bytes.translate`` table: μ-law byte -> A-law byte of the nearest level."""
ALAW_TO_ULAW: bytes = audioop.lin2ulaw(audioop.alaw2lin(_ALL_BYTES, 2), 2)
"""``bytes.translate`` table: A-law byte -> μ-law byte of the nearest level."""

_TRANSCODE: dict[tuple[str, str], bytes] = {("PCMU", "PCMA"): ULAW_TO_ALAW, ("PCMA", "PCMU"): ALAW_TO_ULAW}

# Codec byte -> linear sample, in native byte order like numpy's int16.
_PCM16: dict[str, npt.NDArray[np.int16]] = {
    "PCMU": np.frombuffer(audioop.ulaw2lin(_ALL_BYTES, 2), dtype=np.int16),
    "PCMA": np.frombuffer(audioop.alaw2lin(_ALL_BYTES, 2), dtype=np.int16),
}


def transcoding_table(source: str, target: str) -> bytes | None:
    """The translate table turning ``source`` payloads into ``target`` ones.

    None when there is none: the names are equal, or no byte mapping exists
    (only PCMU <-> PCMA has one).
    """
    return _TRANSCODE.get((source.upper(), target.upper()))


def decode_to_pcm16(codec_name: str, payload: bytes) -> npt.NDArray[np.int16]:
    """Decode a G.711 payload (PCMU or PCMA) to 16-bit linear samples.

    One numpy lookup per call. Raises UnsupportedCodec for other codecs:
    G.722 is ADPCM and needs a decoder that keeps state between packets.
    """
    table = _PCM16.get(codec_name.upper())
    if table is None:
        raise UnsupportedCodec(f"cannot decode {codec_name} statelessly")
    return table[np.frombuffer(payload, dtype=np.uint8)]


class _StreamCoder:
    """What :class:`Decoder` and :class:`Encoder` share: one stream's codec
    and, for G.722, the state kept from frame to frame. Raises
    UnsupportedCodec for codecs other than G.711 and G.722."""

    role = "coder"

    def __init__(self, codec_name: str) -> None:
        self.codec = codec_name.upper()
        if self.codec == "G722":
            self._g722 = G722Adpcm(16000, 64000)
            self._ratecv: Any = None
        elif self.codec not in _PCM16:
            raise UnsupportedCodec(f"no {self.role} for {codec_name}")


class Decoder(_StreamCoder):
    """Turns one stream's payloads into 8 kHz 16-bit samples, for recording.

    G.711 needs no state; G.722 (ADPCM, 16 kHz) keeps its predictor and the
    resampler's filter state between packets, so use one decoder per stream.
    """

    role = "decoder"

    def __call__(self, payload: bytes) -> npt.NDArray[np.int16]:
        if self.codec != "G722":
            return decode_to_pcm16(self.codec, payload)
        wide = self._g722.decode(payload).tobytes()
        narrow, self._ratecv = audioop.ratecv(wide, 2, 1, 16000, 8000, self._ratecv)
        return np.frombuffer(narrow, dtype=np.int16)


class Encoder(_StreamCoder):
    """Turns 8 kHz 16-bit samples into one stream's payloads: the way back of
    :class:`Decoder`, for audio the server mixes (pbx.media.mixer).

    G.711 needs no state; G.722 keeps its ADPCM state and the resampler's
    (8 kHz up to its 16 kHz) between frames, so use one encoder per stream.
    """

    role = "encoder"

    def __call__(self, pcm: npt.NDArray[np.int16]) -> bytes:
        data = pcm.astype(np.int16, copy=False).tobytes()  # native order, as audioop takes it
        if self.codec == "PCMU":
            return audioop.lin2ulaw(data, 2)
        if self.codec == "PCMA":
            return audioop.lin2alaw(data, 2)
        wide, self._ratecv = audioop.ratecv(data, 2, 1, 8000, 16000, self._ratecv)
        return bytes(self._g722.encode(np.frombuffer(wide, dtype=np.int16)))


def payload_rules(src: Codec | None, src_dtmf: int | None, dst: Codec | None, dst_dtmf: int | None) -> PayloadRules:
    """What packets of a peer sending ``src`` (and RFC 4733 events as
    ``src_dtmf``) need before they reach a peer that takes ``dst`` and ``dst_dtmf``.

    Payload types without a rule (matching numbers, comfort noise, anything
    unknown) are forwarded unchanged.
    """
    rules: PayloadRules = {}
    if src is not None and dst is not None:
        table = transcoding_table(src.name, dst.name)
        if table is not None or (src.name.upper() == dst.name.upper() and src.payload_type != dst.payload_type):
            rules[src.payload_type] = (dst.payload_type, table)
        elif src.name.upper() != dst.name.upper():
            logger.warning("relay: cannot convert %s to %s; forwarding it unchanged", src.name, dst.name)
    if src_dtmf is not None and dst_dtmf is not None and src_dtmf != dst_dtmf:
        rules[src_dtmf] = (dst_dtmf, None)
    return rules
