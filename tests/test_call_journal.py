"""The call journal: a call's row exists while the call is up, so a server
killed mid-call closes it as ``interrupted`` at its next start, and an API
that hangs a call up answers only once the call's row is stored."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.bare_phone import answered_call, ivr_server
from tests.support.server import Server, start_server


def _db_rows(folder: Path, sql: str) -> list[dict[str, Any]]:
    """Rows read straight from the database a killed server left."""
    with sqlite3.connect(folder / "pbx.db") as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute(sql)]


async def _cdr(server: Server) -> list[dict[str, Any]]:
    status, body = await server.http("/api/cdr")
    assert status == 200
    items: list[dict[str, Any]] = json.loads(body)["items"]
    return items


async def test_a_call_cut_by_a_killed_server_is_closed_as_interrupted_at_the_next_start(tmp_path: Path) -> None:
    server = await ivr_server(tmp_path)
    folder = server.folder
    try:
        async with answered_call(server):
            (open_row,) = _db_rows(folder, "select * from cdr")  # stored before the 200
            assert open_row["ended"] is None
            async with asyncio.timeout(3):  # the answer is stored just after the 200
                while open_row["answered"] is None:
                    await asyncio.sleep(0.02)
                    (open_row,) = _db_rows(folder, "select * from cdr")
            assert await _cdr(server) == []  # a call in progress is no finished call
            server.proc.kill()
            await server.proc.wait()
    finally:
        await server.stop()
    (beat,) = _db_rows(folder, "select time from heartbeat")

    restarted = await start_server(folder, sounds={"dir": str(folder / "sounds")}, ivr={"dir": str(folder / "ivr_flows")})
    try:
        (row,) = await _cdr(restarted)
        assert row["call_id"] == open_row["call_id"]
        assert row["disposition"] == "interrupted"
        assert open_row["answered"] <= row["ended"] <= beat["time"]
        assert row["duration"] >= row["billsec"] >= 0
        assert await restarted.metric("pbx_calls_total", direction="inbound", disposition="interrupted") == 1
        _, csv = await restarted.http("/api/cdr?format=csv")
        assert "interrupted" in csv
    finally:
        await restarted.stop()


async def test_a_call_hung_up_through_the_api_has_its_row_once_answered_204_even_if_killed_then(tmp_path: Path) -> None:
    server = await ivr_server(tmp_path)
    try:
        async with answered_call(server):
            status, body = await server.http("/api/calls")
            (call,) = json.loads(body)["items"]
            url = f"http://127.0.0.1:{server.http_port}/api/calls/{call['id']}"
            async with aiohttp.ClientSession() as http:
                async with http.delete(url, headers={"Authorization": "Bearer test-token"}) as reply:
                    assert reply.status == 204
            server.proc.kill()
            await server.proc.wait()
    finally:
        await server.stop()
    (row,) = _db_rows(server.folder, "select * from cdr")
    assert row["call_id"] == call["id"]
    assert row["ended"] is not None and row["disposition"] not in (None, "interrupted")
