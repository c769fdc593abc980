"""Prompts: the shipped sound set, conversion to 20 ms codec frames, the
in-memory and on-disk caches, ``say:`` through a TTS program, number helpers.

Decoding the frames back goes through ``audioop`` (the ITU G.711 reference),
not through the code under test. The espeak-ng test is skipped where espeak-ng
is not installed; the other TTS tests use a stand-in program written here.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import stat
import sys
import warnings
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from pbx.media import prompts as prompts_module
from pbx.media.codecs import Decoder, UnsupportedCodec
from pbx.media.prompts import (
    FRAME_BYTES,
    SILENCE,
    PromptLibrary,
    PromptNotFound,
    PromptUnreadable,
    TtsFailed,
    TtsUnavailable,
    g722_encode,
    number_parts,
    to_frames,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

SOUNDS = Path(__file__).resolve().parent.parent / "config" / "sounds"
CODECS = ("PCMU", "PCMA", "G722")
SPEECH = [
    "welcome", "menu", "invalid", "goodbye", "please-hold", "closed", "transferring", "enter-account",
    "digits/hundred", "queue-position", "queue-wait", "minute", "minutes", "less-than-a-minute",
    "callback-offer", "callback-confirm", "callback-enter-number", "callback-already", "callback-not-allowed",
    "agent-logged-in", "agent-logged-out", "agent-paused", "agent-unpaused",
    "dnd-on", "dnd-off", "forward-on", "forward-off", "forward-refused", "parked",
    "vm-greeting", "vm-enter-pin", "vm-invalid-pin", "vm-you-have", "vm-new", "vm-old", "vm-messages",
    "vm-message", "vm-no-messages", "vm-options", "vm-deleted", "vm-saved", "vm-record-greeting",
    "vm-greeting-saved", "vm-enter-mailbox", "vm-locked",
    *[f"digits/{n}" for n in range(20)],
    *[f"digits/{n}" for n in range(20, 100, 10)],
]  # fmt: skip

# A stand-in TTS program: records its arguments, writes a short tone as WAV.
FAKE_TTS = """\
import math, struct, sys, wave
from pathlib import Path
args = sys.argv[1:]
log = Path(__file__).with_name("tts-calls.log")
with log.open("a") as f:
    f.write(repr(args) + "\\n")
if "FAIL" in args[-1]:
    print("cannot say that", file=sys.stderr)
    sys.exit(3)
out = args[args.index("-w") + 1]
rate = 22050
n = int(rate * 0.1 * len(args[-1]))
with wave.open(out, "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(rate)
    w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate))) for i in range(n)))
"""


# --- helpers ---


def read_wav(path: Path) -> tuple[npt.NDArray[np.float64], int]:
    with wave.open(str(path)) as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64), w.getframerate()


def write_wav(path: Path, samples: npt.NDArray[np.float64], rate: int, channels: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.clip(np.rint(samples), -32768, 32767).astype("<i2").tobytes())


def decode(codec: str, frames: Sequence[bytes]) -> npt.NDArray[np.float64]:
    data = b"".join(frames)
    linear = audioop.ulaw2lin(data, 2) if codec == "PCMU" else audioop.alaw2lin(data, 2)
    return np.frombuffer(linear, dtype="<i2").astype(np.float64)


def rms(x: npt.NDArray[np.float64]) -> float:
    return float(np.sqrt(np.mean(x**2)))


def band_power(x: npt.NDArray[np.float64], rate: int, freq: float, width: float = 50) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    return float(spectrum[(freqs > freq - width) & (freqs < freq + width)].sum() / spectrum.sum())


def fake_tts(tmp_path: Path) -> Path:
    script = tmp_path / "fake-tts"
    script.write_text(f"#!{sys.executable}\n{FAKE_TTS}")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def tts_calls(tmp_path: Path) -> list[list[str]]:
    log = tmp_path / "tts-calls.log"
    return [eval(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def library(tmp_path: Path) -> PromptLibrary:
    return PromptLibrary(SOUNDS, "espeak-ng", tmp_path / "cache")


# --- the shipped set ---


def test_shipped_set_is_complete_16k_mono_and_small() -> None:
    for name in [*SPEECH, "beep"]:
        path = SOUNDS / f"{name}.wav"
        assert path.is_file(), name
        samples, rate = read_wav(path)
        assert rate == 16000, name
        assert 0.1 < len(samples) / rate < 12, name
        assert rms(samples) > 300, f"{name} is (nearly) silent"
    total = sum(p.stat().st_size for p in SOUNDS.rglob("*") if p.is_file())
    assert total < 5_000_000  # the whole set: greetings, queue, voicemail and feature prompts, 30 s of music


def test_music_on_hold_is_about_30_seconds_and_not_silent() -> None:
    samples, rate = read_wav(SOUNDS / "moh" / "default" / "calm.wav")
    assert rate == 16000
    assert 28 <= len(samples) / rate <= 32
    level = 20 * math.log10(rms(samples) / 32768)
    assert -21 < level < -15  # about -18 dBFS
    # not silent anywhere for long: every second carries sound
    seconds = samples[: len(samples) // rate * rate].reshape(-1, rate)
    assert min(rms(s) for s in seconds) > 100


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("name", ["welcome", "digits/7", "vm-options"])
async def test_frames_count_and_size(library: PromptLibrary, name: str, codec: str) -> None:
    samples, rate = read_wav(SOUNDS / f"{name}.wav")
    frames = await library.frames(name, codec)
    assert len(frames) == math.ceil(len(samples) / rate / 0.020)
    assert {len(f) for f in frames} == {FRAME_BYTES}


@pytest.mark.parametrize("codec", ["PCMU", "PCMA"])
async def test_decoded_g711_keeps_the_energy_of_the_source(library: PromptLibrary, codec: str) -> None:
    source, rate = read_wav(SOUNDS / "menu.wav")
    decoded = decode(codec, await library.frames("menu", codec))
    assert len(decoded) >= len(source) * 8000 // rate
    assert abs(20 * math.log10(rms(decoded) / rms(source))) < 1.0
    # same loudness over time, not just overall: compare 100 ms windows
    window_src, window_dec = rate // 10, 800
    count = len(source) // window_src
    src_env = [rms(source[i * window_src : (i + 1) * window_src]) for i in range(count)]
    dec_env = [rms(decoded[i * window_dec : (i + 1) * window_dec]) for i in range(count)]
    assert np.corrcoef(src_env, dec_env)[0, 1] > 0.98


async def test_beep_is_a_1khz_tone(library: PromptLibrary) -> None:
    decoded = decode("PCMU", await library.frames("beep", "PCMU"))
    spectrum = np.abs(np.fft.rfft(decoded))
    peak = np.fft.rfftfreq(len(decoded), 1 / 8000)[np.argmax(spectrum)]
    assert abs(peak - 1000) < 20
    assert band_power(decoded, 8000, 1000) > 0.95


# --- conversion of other files ---


async def test_44k_stereo_wav_becomes_8k_mono(tmp_path: Path) -> None:
    rate, seconds = 44100, 1.0
    t = np.arange(int(rate * seconds)) / rate
    left = 8000 * np.sin(2 * np.pi * 500 * t) + 4000 * np.sin(2 * np.pi * 11000 * t)
    right = 8000 * np.sin(2 * np.pi * 1500 * t)
    stereo = np.empty(2 * len(t))
    stereo[0::2], stereo[1::2] = left, right
    write_wav(tmp_path / "sounds" / "stereo.wav", stereo, rate, channels=2)
    library = PromptLibrary(tmp_path / "sounds", None, tmp_path / "cache")

    frames = await library.frames("stereo", "PCMU")
    assert len(frames) == 50  # 1 s of 20 ms frames
    decoded = decode("PCMU", frames)
    body = decoded[400:-400]  # away from the filter's edges
    # both channels are mixed in at half amplitude
    assert band_power(body, 8000, 500) > 0.3 and band_power(body, 8000, 1500) > 0.3
    assert abs(rms(body) - math.sqrt(4000**2 / 2 + 4000**2 / 2)) < 300
    # 11 kHz is above the new Nyquist: filtered out, not folded to 3 kHz
    assert band_power(body, 8000, 3000) < 0.001


async def test_8k_source_is_upsampled_for_g722(tmp_path: Path) -> None:
    t = np.arange(8000) / 8000
    write_wav(tmp_path / "tone.wav", 6000 * np.sin(2 * np.pi * 400 * t), 8000)
    library = PromptLibrary(tmp_path, None, tmp_path / "cache")
    frames = await library.frames("tone", "G722")
    assert len(frames) == 50 and {len(f) for f in frames} == {160}


async def test_non_wav_without_ffmpeg_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "jingle.mp3").write_bytes(b"ID3\x03\x00\x00\x00\x00\x00\x00not really mp3")
    monkeypatch.setattr(prompts_module.AudioSegment, "converter", "no-such-ffmpeg-here")
    library = PromptLibrary(tmp_path, None, tmp_path / "cache")
    assert library.exists("jingle")
    with pytest.raises(PromptUnreadable, match="ffmpeg"):
        await library.frames("jingle", "PCMU")


async def test_broken_wav_is_unreadable(tmp_path: Path) -> None:
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunk")
    library = PromptLibrary(tmp_path, None, tmp_path / "cache")
    with pytest.raises(PromptUnreadable, match="broken.wav"):
        await library.frames("broken", "PCMA")


# --- names and errors ---


async def test_missing_name_raises_prompt_not_found(library: PromptLibrary) -> None:
    with pytest.raises(PromptNotFound):
        await library.frames("no-such-prompt", "PCMU")
    with pytest.raises(LookupError):
        await library.frames("digits/1000", "PCMU")


async def test_unknown_codec(library: PromptLibrary) -> None:
    with pytest.raises(UnsupportedCodec):
        await library.frames("welcome", "opus")


def test_exists(tmp_path: Path) -> None:
    library = PromptLibrary(SOUNDS, "espeak-ng", tmp_path)
    assert library.exists("welcome")
    assert library.exists("welcome.wav")
    assert library.exists("digits/3")
    assert library.exists("moh/default/calm")
    assert library.exists("say:Hello there")
    assert not library.exists("say:")
    assert not library.exists("nope")
    assert not library.exists("digits/nope")
    assert not library.exists("nofolder/3")
    assert not library.exists("render")  # the generator script is no prompt
    assert not library.exists("digits")  # a folder is no prompt
    for sneaky in ("../sounds/welcome", "/etc/passwd", "digits/../welcome", "", "./welcome", "digits\\3"):
        assert not library.exists(sneaky), sneaky
    assert not PromptLibrary(SOUNDS, None, tmp_path).exists("say:Hello")


def test_a_wav_wins_over_other_formats(tmp_path: Path) -> None:
    write_wav(tmp_path / "hello.wav", np.zeros(160), 8000)
    (tmp_path / "hello.mp3").write_bytes(b"x")
    (tmp_path / "hello.txt").write_text("not audio")
    assert PromptLibrary(tmp_path, None, tmp_path).path("hello").name == "hello.wav"


# --- frames details and caching ---


async def test_last_frame_is_padded_with_silence(tmp_path: Path) -> None:
    write_wav(tmp_path / "short.wav", np.full(200, 5000.0), 8000)  # 25 ms
    library = PromptLibrary(tmp_path, None, tmp_path / "cache")
    frames = await library.frames("short", "PCMU")
    assert len(frames) == 2
    tail = decode("PCMU", [frames[1]])
    assert np.all(tail[:40] > 4000) and np.all(tail[40:] == 0)


def test_silence_frames() -> None:
    assert set(SILENCE) == {"PCMU", "PCMA", "G722"}
    assert all(len(frame) == 160 for frame in SILENCE.values())
    assert not decode("PCMU", [SILENCE["PCMU"]]).any()
    assert np.all(np.abs(decode("PCMA", [SILENCE["PCMA"]])) <= 8)  # A-law has no zero level


def test_g722_silence_sent_over_and_over_after_speech_stays_silent() -> None:
    # What a caller hears between prompts: a G.722 decoder that has just had
    # a tone gets the silence frame again and again (the stream fills gaps with it).
    tone = (8000 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.int16)
    decoder = Decoder("G722")
    for frame in to_frames("G722", tone):
        decoder(frame)
    heard = np.concatenate([decoder(SILENCE["G722"]) for _ in range(50)]).astype(np.float64)
    assert rms(heard[len(heard) // 5 :]) < 100  # below -50 dBFS once the tone has died away


async def test_concurrent_requests_share_one_load(library: PromptLibrary, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Path, str]] = []
    real = prompts_module._encode_file

    def counting(path: Path, codec: str, rate: int) -> tuple[bytes, ...]:
        calls.append((path, codec))
        return real(path, codec, rate)

    monkeypatch.setattr(prompts_module, "_encode_file", counting)
    results = await asyncio.gather(*(library.frames("goodbye", "PCMU") for _ in range(5)))
    assert len(calls) == 1
    assert all(r is results[0] for r in results)
    assert await library.frames("goodbye", "PCMU") is results[0]  # from memory
    await library.frames("goodbye", "PCMA")
    assert len(calls) == 2


async def test_cancelled_waiter_does_not_cancel_the_load(library: PromptLibrary) -> None:
    first = asyncio.ensure_future(library.frames("closed", "G722"))
    second = asyncio.ensure_future(library.frames("closed", "G722"))
    await asyncio.sleep(0)
    first.cancel()
    frames = await second
    assert len(frames) > 10 and first.cancelled()


async def test_memory_cache_is_bounded(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        write_wav(tmp_path / f"{name}.wav", np.zeros(8000), 8000)  # 50 frames, 8000 bytes
    library = PromptLibrary(tmp_path, None, tmp_path / "cache", cache_bytes=20_000)
    a = await library.frames("a", "PCMU")
    await library.frames("b", "PCMU")
    assert await library.frames("a", "PCMU") is a  # a is now the most recent
    await library.frames("c", "PCMU")  # b goes
    assert await library.frames("a", "PCMU") is a
    assert ("b", "PCMU") not in library._frames


# --- G.722 ---


def test_g722_encoding_keeps_a_tone() -> None:
    from G722 import G722

    t = np.arange(16000) / 16000
    tone = (8000 * np.sin(2 * np.pi * 1000 * t)).astype(np.int16)
    encoded = g722_encode(tone)
    assert len(encoded) == 8000
    decoded = np.asarray(G722(16000, 64000).decode(encoded), dtype=np.float64)[1600:]
    spectrum = np.abs(np.fft.rfft(decoded * np.hanning(decoded.size)))
    assert np.argmax(spectrum) * 16000 / decoded.size == pytest.approx(1000, abs=10)


# --- say: ---


async def test_say_renders_once_and_is_cached_on_disk(tmp_path: Path) -> None:
    tts = fake_tts(tmp_path)
    cache = tmp_path / "cache"
    library = PromptLibrary(SOUNDS, str(tts), cache)
    assert library.tts_available()
    assert library.exists("say:Your account is -42")

    frames = await library.frames("say:Your account is -42", "PCMU")
    (args,) = tts_calls(tmp_path)
    # default voice and speed, the text after "--" so a leading "-" is no option
    assert args[:4] == ["-v", "en", "-s", "150"] and args[-2:] == ["--", "Your account is -42"]
    assert len(frames) == math.ceil(0.1 * len("Your account is -42") / 0.020)
    rendered = list((cache / "tts").iterdir())
    assert len(rendered) == 1 and rendered[0].suffix == ".wav"
    assert rendered[0] == library.tts_cache_path("Your account is -42")

    await library.frames("say:Your account is -42", "G722")  # other codec: same rendering
    restarted = PromptLibrary(SOUNDS, str(tts), cache)  # a new server start
    assert await restarted.frames("say:Your account is -42", "PCMU") == frames
    assert len(tts_calls(tmp_path)) == 1
    # a different command is a different rendering
    await PromptLibrary(SOUNDS, f"{tts} -v en-us", cache).frames("say:Your account is -42", "PCMU")
    assert tts_calls(tmp_path)[1][:2] == ["-v", "en-us"]
    assert len(list((cache / "tts").iterdir())) == 2


async def test_concurrent_say_renders_once(tmp_path: Path) -> None:
    library = PromptLibrary(SOUNDS, str(fake_tts(tmp_path)), tmp_path / "cache")
    await asyncio.gather(
        library.frames("say:Hello", "PCMU"), library.frames("say:Hello", "PCMA"), library.frames("say:Hello", "PCMU")
    )
    assert len(tts_calls(tmp_path)) == 1


async def test_say_failure_leaves_no_file(tmp_path: Path) -> None:
    library = PromptLibrary(SOUNDS, str(fake_tts(tmp_path)), tmp_path / "cache")
    with pytest.raises(TtsFailed, match="cannot say that"):
        await library.frames("say:FAIL now", "PCMU")
    assert list((tmp_path / "cache" / "tts").iterdir()) == []


async def test_say_without_tts(tmp_path: Path) -> None:
    disabled = PromptLibrary(SOUNDS, None, tmp_path)
    assert not disabled.tts_available()
    with pytest.raises(TtsUnavailable, match="disabled"):
        await disabled.frames("say:Hello", "PCMU")

    missing = PromptLibrary(SOUNDS, "no-such-tts-program", tmp_path)
    assert not missing.tts_available()
    assert missing.exists("say:Hello")  # configured: `pbx check` warns about the program instead
    with pytest.raises(TtsUnavailable, match="no-such-tts-program is not installed"):
        await missing.frames("say:Hello", "PCMU")
    with pytest.raises(PromptNotFound):  # callers that skip missing prompts skip this too
        await missing.say("Hello")


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
async def test_say_with_espeak_ng(tmp_path: Path) -> None:
    # A wrapper that counts its runs, then is espeak-ng.
    wrapper = tmp_path / "espeak-counting"
    wrapper.write_text(f'#!/bin/sh\necho run >> "{tmp_path}/runs"\nexec espeak-ng "$@"\n')
    wrapper.chmod(0o755)
    library = PromptLibrary(SOUNDS, str(wrapper), tmp_path / "cache")

    frames = await library.frames("say:Thank you for waiting", "PCMU")
    assert 0.5 < len(frames) * 0.020 < 5
    speech = decode("PCMU", frames)
    assert rms(speech) > 300
    path = library.tts_cache_path("Thank you for waiting")
    mtime = path.stat().st_mtime_ns

    again = PromptLibrary(SOUNDS, str(wrapper), tmp_path / "cache")
    assert len(await again.frames("say:Thank you for waiting", "G722")) == len(frames)
    assert (tmp_path / "runs").read_text().count("run") == 1
    assert path.stat().st_mtime_ns == mtime


# --- numbers ---


@pytest.mark.parametrize(
    ("n", "parts"),
    [
        (0, ["digits/0"]),
        (7, ["digits/7"]),
        (13, ["digits/13"]),
        (20, ["digits/20"]),
        (42, ["digits/40", "digits/2"]),
        (100, ["digits/1", "digits/hundred"]),
        (342, ["digits/3", "digits/hundred", "digits/40", "digits/2"]),
        (910, ["digits/9", "digits/hundred", "digits/10"]),
        (999, ["digits/9", "digits/hundred", "digits/90", "digits/9"]),
    ],
)
def test_number_parts(n: int, parts: list[str]) -> None:
    assert number_parts(n) == parts


def test_number_parts_are_all_shipped(tmp_path: Path) -> None:
    library = PromptLibrary(SOUNDS, None, tmp_path)
    names = {part for n in range(1000) for part in number_parts(n)}
    assert all(library.exists(name) for name in names)
    for bad in (-1, 1000):
        with pytest.raises(ValueError):
            number_parts(bad)
