#!/usr/bin/env python3
"""Render the shipped prompt set into this folder.

The WAVs next to this script are committed; run it again only to change or
add a prompt (``python config/sounds/render.py``, or with names to render just
those: ``render.py welcome digits/7 beep moh``). Everything comes out as WAV,
16 kHz, mono, 16-bit, so the server needs no ffmpeg to read it.

- Speech: espeak-ng (``-v en -s 150``, the server's ``say:`` default) renders
  each (name, text) below; sox brings it to 16 kHz, trims the silence at both
  ends, shortens pauses inside it to 0.25 s, leaves a short pause around it
  (so that concatenated prompts such as "You are caller number" + "three" do
  not run together) and normalizes the peak to -3 dBFS. Needs ``espeak-ng`` and ``sox`` on PATH. Dither is off,
  so the same espeak-ng and sox versions give the same bytes.
- ``beep``: a 1 kHz tone, 0.25 s, with 5 ms ramps (numpy).
- ``moh/default/calm.wav``: 30 s of music on hold (numpy): a slow I-vi-IV-V
  progression with soft pads, a bass and a triangle-wave melody, seeded so it
  renders identically every time; note tails that run past the end are wrapped
  to the start so the file loops without a seam; about -18 dBFS RMS. It is
  made here from nothing, so the project may ship it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt

HERE = Path(__file__).resolve().parent
RATE = 16000
ESPEAK = ["espeak-ng", "-v", "en", "-s", "150"]

_NUMBERS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
]  # fmt: skip
_TENS = {20: "twenty", 30: "thirty", 40: "forty", 50: "fifty", 60: "sixty", 70: "seventy", 80: "eighty", 90: "ninety"}

PROMPTS: list[tuple[str, str]] = [
    ("welcome", "Welcome, and thank you for calling."),
    ("menu", "For sales, press 1. For support, press 2."),
    ("invalid", "That is not a valid choice."),
    ("goodbye", "Thank you for calling. Goodbye."),
    ("please-hold", "Please hold."),
    ("closed", "We are closed. Please call again during business hours."),
    ("transferring", "Please wait while we transfer your call."),
    ("enter-account", "Please enter your account number, followed by the pound key."),
    *[(f"digits/{n}", word) for n, word in enumerate(_NUMBERS)],
    *[(f"digits/{n}", word) for n, word in _TENS.items()],
    ("digits/hundred", "hundred"),
    ("queue-position", "You are caller number"),
    ("queue-wait", "Your expected wait time is about"),
    ("minute", "minute"),
    ("minutes", "minutes"),
    ("less-than-a-minute", "less than a minute"),
    ("callback-offer", "Press 1 to be called back; you keep your place in line."),
    ("callback-confirm", "Thank you. We will call you back when it is your turn."),
    ("callback-enter-number", "Please enter your phone number, followed by the pound key."),
    ("callback-already", "A call back is already scheduled for this number."),
    ("callback-not-allowed", "Sorry, that number cannot be called back."),
    ("agent-logged-in", "Agent logged in."),
    ("agent-logged-out", "Agent logged out."),
    ("agent-paused", "Agent paused."),
    ("agent-unpaused", "Agent available again."),
    ("dnd-on", "Do not disturb is on."),
    ("dnd-off", "Do not disturb is off."),
    ("forward-on", "Your calls are now forwarded."),
    ("forward-off", "Call forwarding is off."),
    ("forward-refused", "Sorry, calls cannot be forwarded to that number."),
    ("parked", "The call is parked at"),
    ("vm-greeting", "The person you are calling is not available. Please leave a message after the tone."),
    ("vm-enter-pin", "Please enter your PIN, followed by the pound key."),
    ("vm-invalid-pin", "That PIN is not correct."),
    ("vm-locked", "This mailbox is locked after too many wrong PINs. Please try again later."),
    ("vm-you-have", "You have"),
    ("vm-new", "new"),
    ("vm-old", "old"),
    ("vm-messages", "messages"),
    ("vm-message", "message"),
    ("vm-no-messages", "You have no messages."),
    ("vm-enter-mailbox", "Please enter your mailbox number, then the pound key."),
    ("vm-options", "Press 1 for the next message, 2 to repeat it, 7 to delete it, 9 to save it, 5 to record your greeting, or pound to hang up."),
    ("vm-deleted", "Message deleted."),
    ("vm-saved", "Message saved."),
    ("vm-record-greeting", "Record your greeting after the tone, then press the pound key."),
    ("vm-greeting-saved", "Your greeting has been saved."),
]


def write_wav(path: Path, samples: npt.NDArray[np.float64]) -> None:
    """Write float samples in [-1, 1] as 16 kHz mono 16-bit PCM."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = np.clip(np.rint(samples * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(pcm.tobytes())


def render_speech(name: str, text: str) -> Path:
    target = HERE / f"{name}.wav"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        subprocess.run([*ESPEAK, "-w", str(raw), "--", text], check=True)
        subprocess.run(
            ["sox", "-V1", "-D", str(raw), "-b", "16", str(target),
             "remix", "-", "rate", "-v", str(RATE),
             "silence", "-l", "1", "0.02", "-45d", "-1", "0.25", "-45d",
             "reverse", "silence", "1", "0.02", "-45d", "reverse",
             "norm", "-3", "pad", "0.03", "0.1"],
            check=True,
        )  # fmt: skip
    return target


def render_beep() -> Path:
    t = np.arange(int(0.25 * RATE)) / RATE
    tone = 0.35 * np.sin(2 * np.pi * 1000 * t)
    ramp = int(0.005 * RATE)
    tone[:ramp] *= np.linspace(0, 1, ramp)
    tone[-ramp:] *= np.linspace(1, 0, ramp)
    path = HERE / "beep.wav"
    write_wav(path, tone)
    return path


def _freq(midi: float) -> float:
    return 440.0 * 2 ** ((midi - 69) / 12)


def _tone(freq: float, seconds: float, harmonics: list[tuple[int, float]]) -> npt.NDArray[np.float64]:
    """Additive tone; harmonics above 7 kHz are left out so nothing aliases."""
    t = np.arange(int(seconds * RATE)) / RATE
    out = np.zeros_like(t)
    for k, amp in harmonics:
        if k * freq < 7000:
            out += amp * np.sin(2 * np.pi * k * freq * t)
    return out


def _envelope(n: int, attack: float, decay: float, release: float, hold: float) -> npt.NDArray[np.float64]:
    """Attack, exponential decay while held for ``hold`` s, then a cosine release."""
    t = np.arange(n) / RATE
    env = np.minimum(1.0, t / attack) * np.exp(-np.maximum(0.0, t - attack) / decay)
    after = t > hold
    fade = np.clip((t[after] - hold) / release, 0, 1)
    env[after] *= 0.5 * (1 + np.cos(np.pi * fade))
    return env


def render_moh(seconds_per_beat: float = 0.75, bars: int = 10) -> Path:
    """Music on hold: ``bars`` bars of 4 beats (10 x 3 s = 30 s), loopable."""
    rng = np.random.default_rng(20260)
    length = int(bars * 4 * seconds_per_beat * RATE)
    mix = np.zeros(length + 6 * RATE)  # room for tails, folded back below
    triangle = [(k, (1 / k**2) * (-1) ** ((k - 1) // 2)) for k in (1, 3, 5, 7, 9)]
    soft = [(1, 1.0), (2, 0.25), (3, 0.08)]
    # I vi IV V I iii IV V ii V, each chord as MIDI notes around middle C
    progression = [
        [60, 64, 67], [57, 60, 64], [53, 57, 60], [55, 59, 62], [60, 64, 67],
        [52, 55, 59], [53, 57, 60], [55, 59, 62], [50, 53, 57], [55, 59, 62],
    ]  # fmt: skip
    scale = [72, 74, 76, 79, 81, 84]  # C major pentatonic, one octave up
    bar_len = 4 * seconds_per_beat
    note_index = 2
    for bar, chord in enumerate(progression[:bars]):
        start = int(bar * bar_len * RATE)
        # pad: the chord, slow attack, held through the bar, long release
        for note in chord:
            n = int((bar_len + 1.5) * RATE)
            pad = _tone(_freq(note), n / RATE, soft) * _envelope(n, 0.6, 8.0, 1.5, bar_len)
            mix[start : start + n] += 0.05 * pad
        # bass: the root, an octave below the chord, on beats 1 and 3
        for bass_beat in (0, 2):
            n = int(2 * seconds_per_beat * RATE)
            b = _tone(_freq(chord[0] - 12), n / RATE, soft) * _envelope(n, 0.02, 0.9, 0.3, 1.2)
            s = start + int(bass_beat * seconds_per_beat * RATE)
            mix[s : s + n] += 0.09 * b
        # melody: wandering steps over the pentatonic scale, a chord tone on beat 1
        beat = 0.0
        while beat < 4:
            duration = float(rng.choice([1.0, 1.0, 2.0, 0.5])) if beat < 3.5 else 0.5
            duration = min(duration, 4 - beat)
            if beat == 0:
                tones = [i for i, m in enumerate(scale) if m % 12 in {c % 12 for c in chord}]
                note_index = min(tones, key=lambda i: abs(i - note_index))
            else:
                note_index = int(np.clip(note_index + rng.choice([-2, -1, -1, 1, 1, 2]), 0, len(scale) - 1))
            if beat == 0 or rng.random() > 0.2:  # an occasional rest
                n = int((duration * seconds_per_beat + 1.2) * RATE)
                m = _tone(_freq(scale[note_index]), n / RATE, triangle)
                m *= _envelope(n, 0.015, 0.7, 0.6, duration * seconds_per_beat)
                s = start + int(beat * seconds_per_beat * RATE)
                mix[s : s + n] += 0.11 * (0.8 + 0.2 * rng.random()) * m
            beat += duration
    # wrap the tails so that the end flows into the start when looped
    loop = mix[:length].copy()
    tail = mix[length:]
    loop[: len(tail)] += tail
    loop *= 10 ** (-18 / 20) / np.sqrt(np.mean(loop**2))  # -18 dBFS RMS
    peak = np.max(np.abs(loop))
    if peak > 0.89:  # keep 1 dB of headroom
        loop *= 0.89 / peak
    path = HERE / "moh" / "default" / "calm.wav"
    write_wav(path, loop)
    return path


def main(argv: list[str]) -> int:
    wanted = set(argv)
    speech = [(name, text) for name, text in PROMPTS if not wanted or name in wanted]
    if speech:
        missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
        if missing:
            print(f"render.py needs {' and '.join(missing)} on PATH (apt-get install espeak-ng sox)", file=sys.stderr)
            return 1
    for name, text in speech:
        print(render_speech(name, text).relative_to(HERE))
    if not wanted or "beep" in wanted:
        print(render_beep().relative_to(HERE))
    if not wanted or "moh" in wanted:
        print(render_moh().relative_to(HERE))
    total = sum(p.stat().st_size for p in HERE.rglob("*.wav"))
    print(f"{len(list(HERE.rglob('*.wav')))} files, {total / 1e6:.2f} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
