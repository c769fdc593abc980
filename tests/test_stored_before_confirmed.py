"""Nothing is confirmed before it is stored: the server is killed right after
it confirmed something (an API answer, the hang-up that ends a voicemail
message), and the next process on the same data has what was confirmed.

End to end against `pbx serve` with pjsua2 phones; the kill is SIGKILL, as a
power cut, sent as soon as the confirmation is seen.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.phone import Phone, phones_for
from tests.support.server import PASSWORDS, Server, queue_settings, restart_server, start_server
from tests.test_voicemail import DEPOSIT, SOUNDS, leave_message, messages

SETTINGS: dict[str, Any] = {
    "sounds": {"dir": str(SOUNDS)},
    "extensions": {ext: {"name": f"User {ext}", "password": pw, "voicemail": {"pin": None}} for ext, pw in PASSWORDS.items()},
    "inbound": {DEPOSIT: "voicemail:1001"},
    "voicemail": {"max_seconds": 20, "min_seconds": 1},
    "queues": {"support": queue_settings(["1001", "1002"])},
    "log_level": "INFO",
}


@pytest.fixture
async def phones() -> AsyncIterator[dict[str, Phone]]:
    async with phones_for(["1001", "1002"]) as started:
        yield started


async def _api(server: Server, method: str, path: str, body: Any) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{server.http_port}{path}"
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, json=body, headers={"Authorization": "Bearer test-token"}) as reply:
            return reply.status, await reply.json()


async def _kill_and_restart(server: Server) -> Server:
    """SIGKILL ``server`` now, then start a new process on its data."""
    server.proc.kill()
    await server.stop()
    return await restart_server(server, log_level="INFO")


async def test_a_click_to_call_answered_202_has_its_row_even_if_the_server_dies_then(
    tmp_path: Path, phones: dict[str, Phone]
) -> None:
    server = await start_server(tmp_path, **SETTINGS)
    try:
        await phones["1001"].register(server.sip, "1001", PASSWORDS["1001"])
        status, placed = await _api(server, "POST", "/api/calls", {"from": "1001", "to": "1002"})
        assert status == 202
        server = await _kill_and_restart(server)
        _, body = await server.http("/api/cdr")
        (row,) = json.loads(body)["items"]
        assert (row["call_id"], row["direction"], row["disposition"]) == (placed["id"], "click-to-call", "interrupted")
        assert (row["from_number"], row["to_number"]) == ("1001", "1002")
    finally:
        await server.stop()


async def test_an_agent_logged_in_through_the_api_is_still_logged_in_after_a_kill(tmp_path: Path) -> None:
    server = await start_server(tmp_path, **SETTINGS)
    try:
        status, answer = await _api(server, "POST", "/api/queues/support/agents/1002", {"action": "logout"})
        assert (status, answer["state"]) == (200, "logged_out")
        server = await _kill_and_restart(server)
        _, body = await server.http("/api/queues/support")
        agents = {agent["extension"]: agent["state"] for agent in json.loads(body)["agents"]}
        assert agents["1002"] == "logged_out"
        assert agents["1001"] != "logged_out"
    finally:
        await server.stop()


async def test_a_message_whose_caller_was_hung_up_on_is_kept_even_if_the_server_dies_then(
    tmp_path: Path, phones: dict[str, Phone]
) -> None:
    server = await start_server(tmp_path, **SETTINGS)
    try:
        await phones["1002"].register(server.sip, "1002", PASSWORDS["1002"])
        await leave_message(server, phones["1002"], DEPOSIT, tone=1.5, end="#")  # returns once the server hung up
        server = await _kill_and_restart(server)
        (message,) = messages(server, "1001")
        assert message["caller"] == "1002" and message["seconds"] >= 1
        assert (server.folder / message["path"]).is_file()
    finally:
        await server.stop()
