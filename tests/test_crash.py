"""A crash loses nothing the server confirmed: `pbx serve` is SIGKILLed with a
call of every kind up (a recorded queue call, a voicemail deposit, a caller
in an IVR flow, two extensions bridged), a callback pending and phones
registered, then started again on the same folder, config and ports.

After the restart the database is intact, no temporary file is left, every
recording and voicemail row has its complete WAV and every WAV its row, the
callback and the registrations are back, each call cut by the kill has its
``interrupted`` row (and is counted), and a new call hears only its own
party although every phone of the cut calls still sends its own tone to the
ports the dead process had.
"""

from __future__ import annotations

import asyncio
import sqlite3
import wave
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from tests.support.audio import read_samples
from tests.support.phone import Phone, exchange_tones, phones_for
from tests.support.server import Server, free_udp_block, queue_settings, restart_server, start_server
from tests.test_calls import connect
from tests.test_queues import take_call
from tests.test_voicemail import dial, leave_message

REPO = Path(__file__).resolve().parent.parent
SOUNDS = REPO / "config" / "sounds"
QUEUE, DEPOSIT, IVR = "7000", "8500", "8000"
MAILBOX = "1007"  # also the one agent of the callback queue: never registered, so the callback waits
PASSWORDS = {ext: f"secret-{ext}" for ext in ("1001", "1002", "1003", "1004", "1005", "1006", "1007", "1008")}
# What each phone sends on its call up at the kill: a stream of theirs that
# reached the new call would show as its tone. The new call's own are
# exchange_tones' 440 Hz (caller) and 1000 Hz (callee).
TONES = {"1001": 700, "1002": 1300, "1003": 1600, "1004": 1900, "1005": 2300, "1006": 2700}
AGENT, CUSTOMER, DEPOSITOR, IVR_CALLER = "1003", "1004", "1005", "1006"
NEWCOMER = "1008"  # registers only after the restart, and calls 1002
# The RTP range: the 4 calls up hold 8 of its pairs, 6 of which (a phone on each)
# still hear their stale phone after the kill, so a new call given any port the
# old process had would most likely meet one.
PAIRS = 11
FLOW = """
start: menu
nodes:
  menu: {type: menu, prompt: welcome, options: {"1": hangup}, timeout: 30, retries: 0, on_fail: hangup}
"""


async def crash_server(folder: Path) -> Server:
    flows = folder / "ivr_flows"
    flows.mkdir(parents=True)
    (flows / "main.yaml").write_text(FLOW)
    low = free_udp_block(2 * PAIRS)
    extensions: dict[str, dict[str, Any]] = {ext: {"name": f"User {ext}", "password": pw} for ext, pw in PASSWORDS.items()}
    extensions[MAILBOX]["voicemail"] = {"pin": None}
    return await start_server(
        folder,
        rtp={"ports": [low, low + 2 * PAIRS - 1]},
        sounds={"dir": str(SOUNDS)},
        ivr={"dir": str(flows)},
        extensions=extensions,
        inbound={QUEUE: "queue:support", DEPOSIT: f"voicemail:{MAILBOX}", IVR: "ivr:main"},
        queues={
            "support": queue_settings([AGENT], record=True),
            "later": queue_settings([MAILBOX], callback={"enabled": True}),
        },
        recording={"stereo": True},
        voicemail={"max_seconds": 20, "min_seconds": 1, "greeting": "beep"},
        log_level="INFO",
    )


async def api(server: Server, method: str, path: str, **body: Any) -> Any:
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{server.http_port}{path}"
        async with http.request(method, url, json=body or None, headers={"Authorization": "Bearer test-token"}) as reply:
            assert reply.status in (200, 201), (reply.status, await reply.text())
            return await reply.json()


async def queue_call(server: Server, phones: dict[str, Phone]) -> tuple[int, int]:
    """The customer calls the queue and the agent answers: both send their tones."""
    customer = await phones[CUSTOMER].call(f"sip:{QUEUE}@pbx.local")
    await phones[CUSTOMER].play_tone(customer, TONES[CUSTOMER])
    agent, _ = await take_call(phones[AGENT])
    await phones[AGENT].play_tone(agent, TONES[AGENT])
    return customer, agent


async def finished_queue_call(server: Server, phones: dict[str, Phone]) -> None:
    """A recorded queue call that ends before the kill: its recording is at rest."""
    mark = len(server.log)
    customer, agent = await queue_call(server, phones)
    await asyncio.sleep(1.0)  # the recording's length, not synchronisation
    await phones[CUSTOMER].hangup(customer)
    await phones[AGENT].wait_event("call_state", call=agent, state="disconnected")
    await server.wait_log(r"recording \S+ saved", start=mark)


async def recording_in_progress(server: Server, phones: dict[str, Phone]) -> None:
    """A recorded queue call up, its audio reaching the temporary file (flushed each second)."""
    await queue_call(server, phones)
    async with asyncio.timeout(10):
        while not any(p.stat().st_size > 44 for p in server.folder.glob("recordings/**/.*.part")):
            await asyncio.sleep(0.1)


async def deposit_in_progress(server: Server, phones: dict[str, Phone]) -> None:
    mark = len(server.log)
    call = await dial(phones[DEPOSITOR], DEPOSIT)
    await phones[DEPOSITOR].play_tone(call, TONES[DEPOSITOR])
    await server.wait_log(rf"voicemail for {MAILBOX} from {DEPOSITOR}: recording", start=mark, timeout=15)


async def in_ivr(server: Server, phones: dict[str, Phone]) -> None:
    mark = len(server.log)
    call = await dial(phones[IVR_CALLER], IVR)
    await phones[IVR_CALLER].play_tone(call, TONES[IVR_CALLER])
    await server.wait_log(r"event=ivr flow=main\b", start=mark)


async def bridged(phones: dict[str, Phone]) -> None:
    a, b = await connect(phones["1001"], phones["1002"])
    await phones["1001"].play_tone(a, TONES["1001"])
    await phones["1002"].play_tone(b, TONES["1002"])


def db_rows(folder: Path, sql: str) -> list[dict[str, Any]]:
    with sqlite3.connect(folder / "pbx.db") as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute(sql)]


def complete_wav(path: Path, row: dict[str, Any]) -> None:
    """``path`` is a whole WAV: its header's length is the file's, and its length the row's."""
    with wave.open(str(path), "rb") as wav:
        frames, channels, width, rate = wav.getnframes(), wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
        assert len(wav.readframes(frames)) == frames * channels * width
    assert path.stat().st_size == 44 + frames * channels * width, path
    assert abs(frames / rate - row["seconds"]) < 0.05, (path, row)


def levels(path: Path, freqs: list[int]) -> dict[int, float]:
    """The spectrum's peak within 20 Hz of each of ``freqs`` (Hann window, after the first 0.3 s)."""
    samples, rate = read_samples(path)
    samples = samples[int(0.3 * rate) :]
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    bins = np.fft.rfftfreq(samples.size, 1 / rate)
    return {f: float(spectrum[np.abs(bins - f) <= 20].max()) for f in freqs}


def hears_only(path: Path, party: int, strangers: list[int]) -> None:
    """``path`` has ``party``'s tone, and none of ``strangers`` above 5% of its level."""
    heard = levels(path, [party, *strangers])
    assert heard[party] > 0, (path, heard)
    loud = {f: round(level / heard[party], 3) for f, level in heard.items() if f != party and level > 0.05 * heard[party]}
    assert not loud, f"{path.name}: besides {party} Hz, heard {loud} (relative level)"


def bindings(registrations: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """What a registration is, without what changes with time or with qualify's probes."""
    return [(r["extension"], r["contact"], r["source"], r["transport"], r["expires"], r["user_agent"]) for r in registrations]


async def interrupted_counted(server: Server) -> float:
    _, text = await server.http("/metrics")
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "pbx_calls_total" and s.labels.get("disposition") == "interrupted"
    )


async def test_a_server_killed_with_calls_of_every_kind_up_comes_back_whole(tmp_path: Path) -> None:
    folder = tmp_path / "pbx"
    async with phones_for([*TONES, NEWCOMER]) as phones:
        server = await crash_server(folder)
        try:
            await asyncio.gather(*(phones[ext].register(server.sip, ext, PASSWORDS[ext]) for ext in TONES))
            callback = await api(server, "POST", "/api/callbacks", queue="later", number="1001")
            # At rest before the kill: a finished recording and a message.
            await asyncio.gather(
                finished_queue_call(server, phones),
                leave_message(server, phones[DEPOSITOR], DEPOSIT, tone=1.5, end="#"),
                bridged(phones),
                in_ivr(server, phones),
            )
            await server.wait_log(rf"voicemail \w+ for {MAILBOX} from {DEPOSITOR}: [\d.]+ s, ended by #")
            await asyncio.gather(recording_in_progress(server, phones), deposit_in_progress(server, phones))

            up = {call["id"] for call in (await api(server, "GET", "/api/calls"))["items"]}
            assert len(up) == 4
            registered = (await api(server, "GET", "/api/registrations"))["items"]
            assert {r["extension"] for r in registered} == set(TONES)
            pending = (await api(server, "GET", "/api/callbacks"))["items"]
            assert [c["id"] for c in pending] == [callback["id"]]
            server.proc.kill()
            await server.proc.wait()
        finally:
            await server.stop()
        assert db_rows(folder, "select call_id from cdr where ended is null")  # what the next start closes
        assert list(folder.glob("recordings/**/.*.part"))  # what the next start removes

        restarted = await restart_server(server, log_level="INFO")
        try:
            assert db_rows(folder, "pragma integrity_check") == [{"integrity_check": "ok"}]

            # No temporary file left; every row has its whole file, every file its row.
            assert not list(folder.rglob("*.part"))
            recordings = db_rows(folder, "select * from recordings")
            messages = db_rows(folder, "select * from voicemail")
            assert len(recordings) == 1 and len(messages) == 1
            for row in recordings + messages:
                complete_wav(folder / row["path"], row)
            assert recordings[0]["bytes"] == (folder / recordings[0]["path"]).stat().st_size
            files = {p.relative_to(folder).as_posix() for p in folder.glob("recordings/**/*.wav")}
            assert files == {row["path"] for row in recordings}
            files = {p.relative_to(folder).as_posix() for p in folder.glob("voicemail/**/*.wav")}
            assert files == {row["path"] for row in messages}

            assert (await api(restarted, "GET", "/api/callbacks"))["items"] == pending
            assert await restarted.metric("pbx_callbacks_pending", queue="later") == 1
            assert bindings((await api(restarted, "GET", "/api/registrations"))["items"]) == bindings(registered)

            # Every call up at the kill, and only those, closed as interrupted and counted.
            cdr = (await api(restarted, "GET", "/api/cdr"))["items"]
            assert {row["call_id"] for row in cdr if row["disposition"] == "interrupted"} == up
            assert all(row["answered"] and row["ended"] >= row["answered"] for row in cdr if row["call_id"] in up)
            assert len(cdr) == 6  # with the two calls that ended before the kill
            assert await interrupted_counted(restarted) == 4

            # A new call, while the cut calls' phones still send to the ports the dead process had
            # (only the log shows that they do, and so that the check below means something).
            assert sum("quarantined: packets from" in line for line in restarted.log) >= len(TONES)
            newcomer = phones[NEWCOMER]
            await newcomer.register(restarted.sip, NEWCOMER, PASSWORDS[NEWCOMER])
            a, b = await connect(newcomer, phones["1002"])  # 1002's binding is the restored one
            heard_by_caller, heard_by_callee = await exchange_tones(tmp_path, newcomer, a, phones["1002"], b)
            await newcomer.hangup(a)
            assert not any("kind=rtp_stranger" in line for line in restarted.log)
        finally:
            assert await restarted.stop() == 0
    assert abs(heard_by_caller - 1000) < 30 and abs(heard_by_callee - 440) < 30
    hears_only(tmp_path / "caller.wav", 1000, [440, *TONES.values()])
    hears_only(tmp_path / "callee.wav", 440, [1000, *TONES.values()])
