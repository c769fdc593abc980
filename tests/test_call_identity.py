"""A call's identity is the server's own: an attacker who sends INVITEs with a
Call-ID that another dialog already used (while that call is up, and after it
ended) gets calls of their own, and the first call's CDR row stays as it was.
The same INVITE again on another path (same Call-ID, From tag and CSeq) is a
merged request: 482 (RFC 3261 §8.2.2.2)."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.raw_sip import RawCaller, open_caller
from tests.support.server import Server, queue_settings, start_server

SOUNDS = Path(__file__).resolve().parent.parent / "config" / "sounds"
PROVIDER = "127.0.0.5"  # the trunk's network: its INVITEs need no password
QUEUE = "7000"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    srv = await start_server(
        tmp_path / "pbx",
        sounds={"dir": str(SOUNDS)},
        trunks={"carrier": {"host": "127.0.0.9:5060", "inbound_from": [f"{PROVIDER}/32"]}},
        inbound={QUEUE: "queue:support"},  # answered by the server, held with music: a call that stays up
        queues={"support": queue_settings(["1003"], announce={"position": False, "wait_time": False})},
        log_level="INFO",
    )
    yield srv
    await srv.stop()


@pytest.fixture
async def caller(server: Server) -> AsyncIterator[RawCaller]:
    raw = await open_caller(("127.0.0.1", server.sip_port), host=PROVIDER)
    yield raw
    raw.close()


@pytest.fixture
def media() -> Iterator[int]:
    """A port on the provider's address that takes the server's RTP (and drops it)."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((PROVIDER, 0))
    yield int(sink.getsockname()[1])
    sink.close()


async def api(server: Server, method: str, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.request(
            method, f"http://127.0.0.1:{server.http_port}{path}", headers={"Authorization": "Bearer test-token"}
        ) as response:
            return response.status, await response.json() if response.content_type == "application/json" else None


async def active_calls(server: Server) -> dict[str, str]:
    """The calls up now: caller number -> the call's id in the API."""
    status, page = await api(server, "GET", "/api/calls")
    assert status == 200
    return {call["from"]: call["id"] for call in page["items"]}


async def test_a_reused_call_id_is_a_new_call_and_never_overwrites_the_first(
    server: Server, caller: RawCaller, media: int
) -> None:
    shared = f"{uuid.uuid4().hex}@victim"
    caller.invite(QUEUE, call_id=shared, caller="+15550001", from_tag="first", media_port=media)
    first = await caller.final(shared, "first")
    assert first.status_code == 200
    first_dialog = caller.ack(first, QUEUE)
    await server.wait_log(r"event=queued queue=support")

    # Another dialog (its own From tag) with the same Call-ID while the first is up: a call of its own.
    caller.invite(QUEUE, call_id=shared, caller="+15550002", from_tag="second", media_port=media)
    second = await caller.final(shared, "second")
    assert second.status_code == 200
    caller.ack(second, QUEUE)
    ids = await active_calls(server)
    assert set(ids) == {"+15550001", "+15550002"}
    assert len(set(ids.values())) == 2 and shared not in ids.values()

    # The first INVITE again on another branch (same Call-ID, From tag, CSeq): a merged request.
    caller.invite(QUEUE, call_id=shared, caller="+15550001", from_tag="first", media_port=media)
    assert (await caller.final(shared, "first")).status_code == 482
    assert set(await active_calls(server)) == {"+15550001", "+15550002"}

    # The API hangs up by the server's id: only that call ends.
    status, _ = await api(server, "DELETE", f"/api/calls/{ids['+15550002']}")
    assert status == 204
    await server.wait_log(rf"call={ids['+15550002']} event=ended")
    assert set(await active_calls(server)) == {"+15550001"}
    caller.bye(first_dialog, QUEUE)
    await server.wait_log(rf"call={ids['+15550001']} event=ended")

    # After both ended, the Call-ID once more: a third call, a third row.
    caller.invite(QUEUE, call_id=shared, caller="+15550003", from_tag="third", media_port=media)
    third = await caller.final(shared, "third")
    assert third.status_code == 200
    third_dialog = caller.ack(third, QUEUE)
    third_id = (await active_calls(server))["+15550003"]
    caller.bye(third_dialog, QUEUE)
    await server.wait_log(rf"call={third_id} event=ended")

    status, cdr = await api(server, "GET", "/api/cdr")
    rows = {row["call_id"]: row for row in cdr["items"]}
    assert set(rows) == {ids["+15550001"], ids["+15550002"], third_id}
    assert {row["sip_call_id"] for row in rows.values()} == {shared}
    first_row = rows[ids["+15550001"]]
    assert (first_row["from_number"], first_row["direction"], first_row["disposition"]) == ("+15550001", "inbound", "abandoned")
    assert rows[ids["+15550002"]]["from_number"] == "+15550002"
    assert rows[third_id]["from_number"] == "+15550003"
