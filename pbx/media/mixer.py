"""Mixing the voices of relay sides' peers for other peers to hear: a
supervisor listening in on a call, whispering to its agent or barging in
(pbx.calls.monitor).

Each input is one relay side's peer: its audio, heard through the side's
audio listener (:mod:`pbx.media.audio_taps`, beside a recording's), decoded
to 8 kHz samples as recordings decode it (:class:`~pbx.media.codecs.Decoder`)
and queued. Each output is a relay side whose peer hears some of the inputs:
the side sends, in every tick of the media clock, the sum of those inputs'
next 20 ms, encoded in its peer's codec (``side.feed``, :mod:`pbx.media.playback`).
An output never hears itself (mix-minus). The first output a tick asks moves
every input on by one frame, so all outputs of one tick mix the same frames
whatever order the clock ticks the sides in.

Packets reach us on their senders' clocks and are read on ours; an input's
queue absorbs that: it gives frames once it holds ``PREFILL`` of them (and
again after running dry), and it keeps ``LIMIT`` at most, dropping the
oldest, so the delay a listener hears stays under ``LIMIT`` frames. A frame
of silence stands in for an input that has nothing, so an output always
gets its packet. The numbers are numpy's: a decode, a sum and a clip per frame.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from pbx.media.audio_taps import listen, unlisten
from pbx.media.codecs import Decoder, Encoder, UnsupportedCodec
from pbx.media.relay_side import RelaySide

logger = logging.getLogger(__name__)

FRAME = 160  # samples in one tick: 20 ms at the 8 kHz every input is decoded to
PREFILL = 2  # frames an input holds before it gives any (after a start or running dry)
LIMIT = 6  # frames an input holds at most: 120 ms of delay

Samples = npt.NDArray[np.int16]
_SILENT: Samples = np.zeros(FRAME, dtype=np.int16)


class MixInput:
    """What one side's peer says, decoded, until the mixer's ticks take it."""

    def __init__(self, side: RelaySide) -> None:
        self.side = side
        self._decoder: Decoder | None = None
        self._queued: Samples = np.zeros(0, dtype=np.int16)
        self._flowing = False  # gives frames: it held PREFILL since it last ran dry

    def hear(self, payload: bytes, payload_type: int) -> None:
        """The side's audio listener: one packet of its peer's, queued decoded."""
        codec = self.side.codec
        if codec is None or payload_type != codec.payload_type:
            return  # comfort noise and the like: not audio in the side's codec
        decoder = self._decoder
        if decoder is None or decoder.codec != codec.name.upper():
            try:
                decoder = self._decoder = Decoder(codec.name)
            except UnsupportedCodec:
                return
        queued = np.concatenate((self._queued, decoder(payload)))
        self._queued = queued[-LIMIT * FRAME :]

    def take(self) -> Samples | None:
        """The next 20 ms, or None while the queue fills."""
        queued = self._queued
        if not self._flowing and queued.size < PREFILL * FRAME:
            return None
        if queued.size < FRAME:
            self._flowing = False
            return None
        self._flowing = True
        self._queued = queued[FRAME:]
        return queued[:FRAME]


class Mixer:
    """Inputs by name, and the sides that hear a mix of some of them."""

    def __init__(self) -> None:
        self.inputs: dict[str, MixInput] = {}
        self._outputs: list[RelaySide] = []
        self._tick = -1
        self._frames: dict[str, Samples | None] = {}

    def add_input(self, name: str, side: RelaySide) -> None:
        """Mix what ``side``'s peer says as ``name``, from now on."""
        mix_input = MixInput(side)
        self.inputs[name] = mix_input
        listen(side, mix_input.hear)

    def add_output(self, side: RelaySide, hears: tuple[str, ...]) -> None:
        """``side``'s peer hears the inputs named ``hears`` mixed, instead of
        what the other side relays to it, until :meth:`close`."""
        side.feed(self._source(side, hears))
        self._outputs.append(side)

    def close(self) -> None:
        """Stop listening and mixing: the outputs' peers hear what they heard before."""
        for mix_input in self.inputs.values():
            unlisten(mix_input.side, mix_input.hear)
        for side in self._outputs:
            side.feed(None)
        self.inputs.clear()
        self._outputs.clear()

    def _source(self, side: RelaySide, hears: tuple[str, ...]) -> Callable[[int], bytes]:
        encoders: dict[str, Encoder] = {}  # one stream each: G.722 keeps state between frames

        def frame(tick: int) -> bytes:
            codec = side.codec
            if codec is None:
                return b""  # nothing is sent without a codec anyway
            encoder = encoders.get(codec.name)
            if encoder is None:
                encoder = encoders[codec.name] = Encoder(codec.name)
            return encoder(self._mix(tick, hears))

        return frame

    def _mix(self, tick: int, hears: tuple[str, ...]) -> Samples:
        """The sum of the inputs ``hears`` names in ``tick``, clipped to 16 bits."""
        if tick != self._tick:
            self._tick = tick
            self._frames = {name: mix_input.take() for name, mix_input in self.inputs.items()}
        total: npt.NDArray[np.int32] | None = None
        for name in hears:
            frame = self._frames.get(name)
            if frame is not None:
                total = frame.astype(np.int32) if total is None else total + frame
        if total is None:
            return _SILENT
        return np.clip(total, -32768, 32767).astype(np.int16)
