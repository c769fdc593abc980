"""Content checks for recorded audio: 16-bit PCM WAV files read with :mod:`wave`."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt

FULL_SCALE = 32768.0


def read_samples(path: str | Path) -> tuple[npt.NDArray[np.float64], int]:
    """Return the first channel of a 16-bit WAV file as floats in [-1, 1), and its rate."""
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit samples, got {8 * wav.getsampwidth()}-bit")
        frames = wav.readframes(wav.getnframes())
        channels = wav.getnchannels()
        rate = wav.getframerate()
    samples = np.frombuffer(frames, dtype="<i2")[::channels]
    return samples.astype(np.float64) / FULL_SCALE, rate


def _after(path: str | Path, skip_seconds: float) -> tuple[npt.NDArray[np.float64], int]:
    samples, rate = read_samples(path)
    return samples[int(skip_seconds * rate) :], rate


def dominant_frequency(path: str | Path, *, skip_seconds: float = 0.3) -> float:
    """Frequency in Hz of the strongest spectral peak, ignoring the first ``skip_seconds``.

    The samples are Hann-windowed before the FFT, and the DC component is
    ignored; a silent recording gives 0.0.
    """
    samples, rate = _after(path, skip_seconds)
    if samples.size < 2:
        raise ValueError(f"{path}: too short to analyse after skipping {skip_seconds}s")
    samples = samples - samples.mean()
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    spectrum[0] = 0.0
    return float(np.argmax(spectrum) * rate / samples.size)


def tone_seconds(path: str | Path, freq: float, *, skip: float = 0.0) -> float:
    """How many seconds of ``path`` are dominated by a tone at ``freq`` (100 ms windows)."""
    samples, rate = read_samples(path)
    samples = samples[int(skip * rate) :]
    window = rate // 10
    hits = 0
    for start in range(0, len(samples) - window, window):
        chunk = samples[start : start + window]
        if np.sqrt(np.mean(chunk**2)) < 0.01:
            continue
        spectrum = np.abs(np.fft.rfft(chunk * np.hanning(window)))
        if abs(np.argmax(spectrum) * rate / window - freq) <= 20:
            hits += 1
    return hits / 10


def rms(path: str | Path, skip_seconds: float = 0.0) -> float:
    """Root-mean-square level relative to full scale (a full-scale sine is about 0.707)."""
    samples, _ = _after(path, skip_seconds)
    if samples.size == 0:
        return 0.0
    return float(np.sqrt(np.mean(samples**2)))


def duration(path: str | Path) -> float:
    """Length of the WAV file in seconds."""
    with wave.open(str(path), "rb") as wav:
        return wav.getnframes() / wav.getframerate()


def write_tone(path: str | Path, freq: float, seconds: float, rate: int = 8000, *, amplitude: float = 0.5) -> None:
    """Write a mono 16-bit sine tone of ``freq`` Hz (``amplitude`` relative to full scale)."""
    t = np.arange(int(seconds * rate)) / rate
    samples = np.round(amplitude * (FULL_SCALE - 1) * np.sin(2 * np.pi * freq * t)).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(samples.tobytes())


def sound_spans(path: str | Path, *, threshold: float = 0.01, gap: float = 0.7) -> list[tuple[float, float]]:
    """(start, end) seconds of each stretch of sound, by 20 ms RMS above ``threshold``;
    quiet gaps shorter than ``gap`` seconds (pauses between words) do not split a stretch."""
    samples, rate = read_samples(path)
    frame = rate // 50
    frames = samples[: samples.size // frame * frame].reshape(-1, frame)
    loud = np.sqrt(np.mean(frames**2, axis=1)) > threshold
    spans: list[tuple[float, float]] = []
    for index in np.flatnonzero(loud):
        start, end = index / 50, (index + 1) / 50
        if spans and start - spans[-1][1] < gap:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return spans
