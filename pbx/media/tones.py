"""Call progress tones the server plays itself: ringback for a caller whose
call the server rings on for it (a transfer's target), where no 180 can
tell the phone to make its own, as the caller's dialog was answered long ago.
"""

from __future__ import annotations

import functools

import numpy as np

from pbx.media.codecs import UnsupportedCodec
from pbx.media.prompts import AUDIO_RATE, to_frames

# North American ringback (ANSI T1.401): 440 + 480 Hz, 2 s on, 4 s off.
RINGBACK_HZ = (440.0, 480.0)
RINGBACK_ON = 2.0
RINGBACK_OFF = 4.0


@functools.cache
def ringback(codec_name: str) -> tuple[bytes, ...]:
    """One cadence of ringback as 20 ms frames in ``codec_name``, for ``play(loop=True)``;
    empty for a codec we cannot encode (the caller then hears silence)."""
    rate = AUDIO_RATE.get(codec_name.upper())
    if rate is None:
        return ()
    t = np.arange(int(rate * RINGBACK_ON)) / rate
    tone = sum(np.sin(2 * np.pi * hz * t) for hz in RINGBACK_HZ) * 4000
    pcm = np.concatenate([tone, np.zeros(int(rate * RINGBACK_OFF))]).astype(np.int16)
    try:
        return to_frames(codec_name, pcm)
    except UnsupportedCodec:
        return ()
