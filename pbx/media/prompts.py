"""Prompts: sound files and ``say:`` text, ready to send as 20 ms RTP payloads.

A prompt is a sound name (a file ``<sounds_dir>/<name>.<ext>`` in any format
pydub reads; ``digits/3`` is a file in a subfolder) or ``say:TEXT``, spoken by
the configured text-to-speech command (espeak-ng). Each is decoded once, mixed
to mono, resampled to the codec's audio rate (8 kHz for G.711, 16 kHz for
G.722) and encoded into a tuple of 20 ms payloads that every call playing it
shares; the media clock then only has to hand out ``bytes`` objects.

All decoding, resampling and encoding runs in the default thread executor and
TTS in an asyncio subprocess (STYLE §4), so the event loop never waits on a
disk, pydub or a codec. Results stay in memory per (prompt, codec) under a byte
budget, least recently used first out; concurrent requests for one prompt
share one load. Rendered TTS also stays on disk, under
``cache_dir/tts/<sha256>.wav``, so a restart does not speak everything again.

WAV needs nothing beyond pydub; every other format goes through ffmpeg (or
avconv), and without one such a file is refused with a message that says so.

G.711 is encoded with ``audioop`` (the ITU reference; aiortp's own A-law
encoder has the sign inverted); G.722 with the ``G722`` C extension (the
encoder behind aiortp's ``g722`` extra).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shlex
import shutil
import time
import warnings
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt
from G722 import G722

from pbx.media.codecs import UnsupportedCodec
from pbx.tasks import Shared

with warnings.catch_warnings():
    # 3.12 warns that audioop leaves the stdlib; 3.13+ gets it from audioop-lts.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop
    # pydub warns at import when ffmpeg is missing; WAV needs no ffmpeg, and
    # other formats get a clear error when they are loaded.
    warnings.simplefilter("ignore", RuntimeWarning)
    from pydub import AudioSegment

logger = logging.getLogger(__name__)

Samples = npt.NDArray[np.int16]

FRAME_MS = 20
SAY_PREFIX = "say:"
AUDIO_RATE: Mapping[str, int] = MappingProxyType({"PCMU": 8000, "PCMA": 8000, "G722": 16000})
"""The rate of the audio each codec carries (not its RTP clock: G.722's is 8000)."""
FRAME_BYTES = 160
"""Payload bytes per 20 ms frame: 160 for PCMU, PCMA and G.722 at 64 kbit/s."""

TTS_DEFAULT_ARGS = ("-v", "en", "-s", "150")
"""Voice and speed added when ``sounds.tts`` is a bare program name."""
TTS_TIMEOUT = 30.0
"""Seconds a TTS render may take before it is killed."""
TTS_MAX_CHARS = 2000
"""Longest ``say:`` text rendered (it may come from an HTTP lookup)."""

# Files in the sounds folder that are never prompts (the folder ships render.py).
_NOT_AUDIO = frozenset({".py", ".pyc", ".txt", ".md", ".rst", ".json", ".yaml", ".yml", ".toml", ".sh", ".ini", ".cfg"})
_WAV = frozenset({".wav", ".wave"})


class PromptNotFound(LookupError):
    """A prompt cannot be produced: no sound file has that name.

    The subclasses name the other reasons (unreadable file, TTS missing or
    failing), so that a caller skipping unplayable prompts catches just this.
    """


class PromptUnreadable(PromptNotFound):
    """The sound file exists but cannot be decoded (or needs ffmpeg, which is missing)."""


class TtsUnavailable(PromptNotFound):
    """A ``say:`` prompt, but TTS is disabled or its program is not installed."""


class TtsFailed(PromptNotFound):
    """The TTS program ran but produced no audio (error exit, timeout, bad text)."""


# ---------------------------------------------------------------------------
# Encoding


def encode(codec_name: str, pcm: Samples) -> bytes:
    """Encode 16-bit mono samples at ``AUDIO_RATE[codec_name]`` into that codec.

    Raises UnsupportedCodec for codecs other than PCMU, PCMA and G722.
    """
    name = codec_name.upper()
    data = np.ascontiguousarray(pcm, dtype="<i2").tobytes()
    if name == "PCMU":
        return audioop.lin2ulaw(data, 2)
    if name == "PCMA":
        return audioop.lin2alaw(data, 2)
    if name == "G722":
        return g722_encode(pcm)
    raise UnsupportedCodec(f"no prompt encoder for {codec_name}")


def to_frames(codec_name: str, pcm: Samples) -> tuple[bytes, ...]:
    """Split samples into encoded 20 ms payloads, the last one padded with silence.

    Always at least one frame, so that even an empty file plays as something.
    """
    name = codec_name.upper()
    rate = AUDIO_RATE.get(name)
    if rate is None:
        raise UnsupportedCodec(f"no prompt encoder for {codec_name}")
    per_frame = rate * FRAME_MS // 1000
    count = max(1, -(-len(pcm) // per_frame))
    padded = np.zeros(count * per_frame, dtype=np.int16)
    padded[: len(pcm)] = pcm
    data = encode(name, padded)
    return tuple(data[i : i + FRAME_BYTES] for i in range(0, len(data), FRAME_BYTES))


def g722_encode(pcm: Samples) -> bytes:
    """Encode 16 kHz 16-bit mono samples as G.722 (64 kbit/s) from a reset
    state: one byte per two samples."""
    samples = np.asarray(pcm, dtype="=i2")
    if len(samples) % 2:
        samples = np.append(samples, np.int16(0))
    return bytes(G722(16000, 64000).encode(array("h", samples.tobytes())))


SILENCE: Mapping[str, bytes] = MappingProxyType(
    {name: encode(name, np.zeros(AUDIO_RATE[name], dtype=np.int16))[-FRAME_BYTES:] for name in AUDIO_RATE}
)
"""One 20 ms frame of silence per codec name, to send over and over: the last
of a second of silence, by when G.722's adaptive encoder has settled (its
first frame, sent over and over, decodes to a hum at -43 dBFS)."""


# ---------------------------------------------------------------------------
# Decoding and resampling (runs in a worker thread)


def _lowpass(samples: npt.NDArray[np.float64], rate: int, cutoff: float) -> npt.NDArray[np.float64]:
    """Linear-phase FIR low-pass (Blackman-windowed sinc), no delay.

    pydub's ``set_frame_rate`` (``audioop.ratecv``) only interpolates, so
    without this a 16 kHz prompt brought to 8 kHz would fold its 4-8 kHz
    sibilants back into the speech band.
    """
    transition = cutoff * 0.2
    taps = int(np.ceil(5.5 * rate / transition)) | 1
    t = np.arange(taps) - taps // 2
    kernel = np.sinc(2 * cutoff / rate * t) * np.blackman(taps)
    kernel /= kernel.sum()
    return np.convolve(samples, kernel, mode="same")


def _read_segment(path: Path) -> Any:
    """Decode a sound file with pydub: PCM WAV by itself, the rest through ffmpeg.

    With ffmpeg installed, pydub also hands it the WAVs it cannot parse
    (float, compressed); without, those are refused like other formats.
    """
    is_wav = path.suffix.lower() in _WAV
    has_ffmpeg = shutil.which(AudioSegment.converter) is not None
    if not is_wav and not has_ffmpeg:
        raise PromptUnreadable(
            f"{path}: {path.suffix or 'this format'} needs ffmpeg, which is not installed;"
            " install ffmpeg or convert the file to WAV"
        )
    try:
        if has_ffmpeg:
            return AudioSegment.from_file(path)
        return AudioSegment(data=path.read_bytes())
    except FileNotFoundError as exc:
        if not path.is_file():
            raise PromptNotFound(f"{path}: no such file") from exc
        raise PromptUnreadable(f"{path}: cannot decode: {exc}") from exc
    except Exception as exc:  # pydub raises CouldntDecodeError, IndexError, struct.error...
        hint = "" if has_ffmpeg else " (without ffmpeg only PCM WAV can be read)"
        raise PromptUnreadable(f"{path}: cannot decode: {exc}{hint}") from exc


def load_pcm(path: Path, rate: int) -> Samples:
    """Decode ``path`` to 16-bit mono samples at ``rate`` Hz (blocking: run in a thread)."""
    segment = _read_segment(path)
    try:
        segment = segment.set_sample_width(2).set_channels(1)
        if segment.frame_rate > rate:
            source = np.frombuffer(segment.raw_data, dtype="<i2").astype(np.float64)
            filtered = _lowpass(source, segment.frame_rate, rate * 0.45)
            segment = AudioSegment(
                data=np.clip(np.rint(filtered), -32768, 32767).astype("<i2").tobytes(),
                sample_width=2,
                frame_rate=segment.frame_rate,
                channels=1,
            )
        segment = segment.set_frame_rate(rate)
    except Exception as exc:
        raise PromptUnreadable(f"{path}: cannot convert to {rate} Hz mono: {exc}") from exc
    return np.frombuffer(segment.raw_data, dtype="<i2").astype(np.int16)


# ---------------------------------------------------------------------------
# The library


class PromptLibrary:
    """The prompts of one configuration: ``sounds.dir`` and ``sounds.tts``.

    ``cache_dir`` holds rendered TTS (``cache_dir/tts``); ``cache_bytes``
    bounds the encoded frames kept in memory.
    """

    def __init__(self, sounds_dir: Path, tts: str | None, cache_dir: Path, *, cache_bytes: int = 64 << 20) -> None:
        self.sounds_dir = Path(sounds_dir)
        self.tts = tts or None
        self.cache_dir = Path(cache_dir)
        self.cache_bytes = cache_bytes
        self._tts_argv: tuple[str, ...] = ()
        if self.tts:
            argv = tuple(shlex.split(self.tts))
            self._tts_argv = argv + TTS_DEFAULT_ARGS if len(argv) == 1 else argv
        self._frames: OrderedDict[tuple[str, str], tuple[bytes, ...]] = OrderedDict()
        self._frames_size = 0
        self._loading = Shared()  # decodes and renderings in progress

    # -- names -------------------------------------------------------------

    def exists(self, name: str) -> bool:
        """True when ``name`` can be played: a sound file by that name (any
        extension, subfolders allowed), or ``say:`` text with TTS configured.

        Cheap (one directory listing, no decoding): flow validation calls it
        for every prompt. Whether the TTS program is installed is not checked
        here; see :meth:`tts_available`.
        """
        if name.startswith(SAY_PREFIX):
            return self.tts is not None and bool(name[len(SAY_PREFIX) :].strip())
        try:
            self.path(name)
        except PromptNotFound:
            return False
        return True

    def path(self, name: str) -> Path:
        """The file of sound ``name`` (blocking file system access).

        ``name`` is relative to the sounds folder, with ``/`` between
        folders and without extension (``digits/3``); a name with its
        extension works too. When several files share the name, a WAV wins
        (no ffmpeg needed), then the first by name. Names that would leave
        the sounds folder are refused.
        """
        relative = PurePosixPath(name)
        if (
            not name
            or "\\" in name
            or "\0" in name
            or relative.is_absolute()
            or any(part in ("", ".", "..") for part in name.split("/"))
        ):
            raise PromptNotFound(f"{name!r} is not a sound name")
        folder = self.sounds_dir.joinpath(*relative.parent.parts)
        exact = folder / relative.name
        if exact.suffix and exact.suffix.lower() not in _NOT_AUDIO and exact.is_file():
            return exact
        try:
            entries = [
                entry
                for entry in folder.iterdir()
                if entry.stem == relative.name
                and entry.suffix
                and entry.suffix.lower() not in _NOT_AUDIO
                and not entry.name.startswith(".")
                and entry.is_file()
            ]
        except OSError:
            entries = []
        if not entries:
            raise PromptNotFound(f"no sound file {name}.* in {self.sounds_dir}")
        entries.sort(key=lambda p: (p.suffix.lower() not in _WAV, p.name))
        return entries[0]

    # -- frames ------------------------------------------------------------

    async def frames(self, part: str, codec_name: str) -> Sequence[bytes]:
        """Prompt ``part`` (a sound name or ``say:TEXT``) as encoded 20 ms payloads.

        PCMU and PCMA: 160 bytes of 8 kHz audio each; G722: 160 bytes of
        16 kHz audio each. The last frame is padded with silence. Raises
        PromptNotFound (or a subclass: unreadable, TTS unavailable or failed)
        and UnsupportedCodec.
        """
        codec = codec_name.upper()
        rate = AUDIO_RATE.get(codec)
        if rate is None:
            raise UnsupportedCodec(f"no prompt encoder for {codec_name}")
        key = (part, codec)
        cached = self._frames.get(key)
        if cached is not None:
            self._frames.move_to_end(key)
            return cached
        frames: tuple[bytes, ...] = await self._loading.run(("frames", *key), lambda: self._load(part, codec, rate))
        return frames

    async def file_frames(self, path: Path, codec_name: str) -> tuple[bytes, ...]:
        """A sound file from anywhere (a voicemail message or greeting) as
        20 ms payloads, like :meth:`frames` but not cached. Raises PromptNotFound
        (PromptUnreadable for a file that does not decode) and UnsupportedCodec."""
        codec = codec_name.upper()
        rate = AUDIO_RATE.get(codec)
        if rate is None:
            raise UnsupportedCodec(f"no prompt encoder for {codec_name}")
        if not await asyncio.to_thread(path.is_file):
            raise PromptNotFound(f"no file {path}")
        return await asyncio.get_running_loop().run_in_executor(None, _encode_file, path, codec, rate)

    async def _load(self, part: str, codec: str, rate: int) -> tuple[bytes, ...]:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        if part.startswith(SAY_PREFIX):
            path = await self.say(part[len(SAY_PREFIX) :])
        else:
            path = await loop.run_in_executor(None, self.path, part)
        frames = await loop.run_in_executor(None, _encode_file, path, codec, rate)
        logger.debug(
            "prompt %s loaded for %s: %d frames in %.0f ms",
            part,
            codec,
            len(frames),
            (time.perf_counter() - started) * 1e3,
        )
        self._remember((part, codec), frames)
        return frames

    def _remember(self, key: tuple[str, str], frames: tuple[bytes, ...]) -> None:
        size = len(frames) * FRAME_BYTES
        if size > self.cache_bytes:
            return
        old = self._frames.pop(key, None)
        if old is not None:
            self._frames_size -= len(old) * FRAME_BYTES
        self._frames[key] = frames
        self._frames_size += size
        while self._frames_size > self.cache_bytes:
            _, dropped = self._frames.popitem(last=False)
            self._frames_size -= len(dropped) * FRAME_BYTES

    # -- text to speech ----------------------------------------------------

    def tts_available(self) -> bool:
        """True when TTS is configured and its program is on PATH (for ``pbx check``)."""
        return bool(self._tts_argv) and shutil.which(self._tts_argv[0]) is not None

    def tts_cache_path(self, text: str) -> Path:
        """Where the rendering of ``text`` with the configured command is kept."""
        digest = hashlib.sha256("\0".join((*self._tts_argv, text)).encode()).hexdigest()
        return self.cache_dir / "tts" / f"{digest}.wav"

    async def say(self, text: str) -> Path:
        """Render ``text`` with the TTS command; returns the WAV file.

        The command is espeak-ng compatible: it is run (never through a shell)
        as ``COMMAND -w OUT.wav -- TEXT``, with ``-v en -s 150`` added when
        ``sounds.tts`` names just the program. A rendering already in
        ``cache_dir/tts`` is reused; a new one is written under a temporary
        name and renamed, so a crash never leaves a half file there. Raises
        TtsUnavailable (disabled or not installed) and TtsFailed.
        """
        if not self._tts_argv:
            raise TtsUnavailable(f"say:{text}: text-to-speech is disabled (sounds.tts is null)")
        text = text.strip()
        if not text:
            raise TtsFailed("say: prompt without text")
        if len(text) > TTS_MAX_CHARS:
            raise TtsFailed(f"say: text of {len(text)} characters is longer than {TTS_MAX_CHARS}")
        target = self.tts_cache_path(text)
        path: Path = await self._loading.run(("tts", target), lambda: self._render(text, target))
        return path

    async def _render(self, text: str, target: Path) -> Path:
        loop = asyncio.get_running_loop()
        if await loop.run_in_executor(None, _nonempty_file, target):
            return target
        await loop.run_in_executor(None, lambda: target.parent.mkdir(parents=True, exist_ok=True))
        temp = target.with_name(f".{target.stem}.{os.getpid()}.{os.urandom(4).hex()}.tmp.wav")
        argv = (*self._tts_argv, "-w", str(temp), "--", text)
        program = self._tts_argv[0]
        started = time.perf_counter()
        try:
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                )
            except (FileNotFoundError, PermissionError) as exc:
                message = f"sounds.tts is {self.tts} but {program} is not installed ({exc.strerror})"
                raise TtsUnavailable(message) from exc
            try:
                _, stderr = await asyncio.wait_for(process.communicate(), TTS_TIMEOUT)
            except BaseException:  # timeout, or the caller went away: do not leave it running
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                raise
            if process.returncode != 0:
                detail = stderr.decode(errors="replace").strip()[:300]
                raise TtsFailed(f"{program} exited with {process.returncode}: {detail}")
            if not await loop.run_in_executor(None, _nonempty_file, temp):
                raise TtsFailed(f"{program} wrote no audio for {text[:60]!r}")
            await loop.run_in_executor(None, os.replace, temp, target)
        except TimeoutError as exc:
            raise TtsFailed(f"{program} took longer than {TTS_TIMEOUT:.0f} s") from exc
        finally:
            await loop.run_in_executor(None, lambda: temp.unlink(missing_ok=True))
        logger.info("rendered say:%s with %s in %.0f ms", text[:60], program, (time.perf_counter() - started) * 1e3)
        return target


def _nonempty_file(path: Path) -> bool:
    try:
        return path.stat().st_size > 44  # more than a bare WAV header
    except OSError:
        return False


def _encode_file(path: Path, codec: str, rate: int) -> tuple[bytes, ...]:
    return to_frames(codec, load_pcm(path, rate))


# ---------------------------------------------------------------------------
# Saying numbers with the shipped set

_ONES = [f"digits/{n}" for n in range(20)]
_TENS = {n: f"digits/{n}" for n in range(20, 100, 10)}


def number_parts(n: int) -> list[str]:
    """Sound names that say ``n`` (0-999) in English from the shipped set.

    ``23 -> ["digits/20", "digits/3"]``, ``342 -> ["digits/3",
    "digits/hundred", "digits/40", "digits/2"]``. Use as
    ``["queue-position", *number_parts(3)]``. Raises ValueError outside 0-999.
    """
    if not 0 <= n <= 999:
        raise ValueError(f"number_parts covers 0-999, not {n}")
    if n == 0:
        return [_ONES[0]]
    parts: list[str] = []
    hundreds, rest = divmod(n, 100)
    if hundreds:
        parts += [_ONES[hundreds], "digits/hundred"]
    if rest >= 20:
        tens, ones = divmod(rest, 10)
        parts.append(_TENS[tens * 10])
        if ones:
            parts.append(_ONES[ones])
    elif rest:
        parts.append(_ONES[rest])
    return parts
