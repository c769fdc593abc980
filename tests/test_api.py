"""The admin HTTP API (CONTRACT §4) through aiohttp's test client, against a
real Pbx started on loopback from a config in tmp_path: every endpoint's
answers, auth failures, unknown ids, bad bodies, pagination and CSV; the
OpenAPI document against the router; and schemathesis over the document."""

from __future__ import annotations

import asyncio
import csv
import io
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
import yaml
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from pbx.app import Pbx, load_setup
from pbx.http.api import add_api
from pbx.http.server import make_http_app
from pbx.store.db import Store
from tests.support.audio import write_tone
from tests.support.server import base_config, free_port

REPO = Path(__file__).resolve().parent.parent
TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FLOW = """
start: menu
nodes:
  menu: {type: menu, prompt: menu, options: {"1": queue:support, "2": extension:1001}, timeout: 5, retries: 1, on_fail: bye}
  bye: {type: play, prompt: goodbye, next: hangup}
"""
BROKEN_FLOW = """
start: menu
nodes:
  menu: {type: menu, prompt: menu, options: {"1": extension:4711}, timeout: 5, retries: 1, on_fail: hangup}
"""


@dataclass
class Api:
    client: TestClient[web.Request, web.Application]
    pbx: Pbx
    folder: Path

    async def call(self, method: str, path: str, *, token: str | None = TOKEN, **kwargs: Any) -> ClientResponse:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return await self.client.request(method, path, headers=headers | kwargs.pop("headers", {}), **kwargs)

    async def json(self, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
        response = await self.call(method, path, **kwargs)
        body = await response.json()
        assert response.status == status, body
        return body

    async def conforming(self, method: str, path: str, template: str, status: int, **kwargs: Any) -> Any:
        """The JSON answer to a request, checked against what the OpenAPI
        document says of ``method template`` (schemathesis' response checks)."""
        doc = await self.json("GET", "/api/openapi.json")
        response = await self.call(method, path, **kwargs)
        content = await response.read()
        answer = schemathesis.Response(
            response.status,
            {name: response.headers.getall(name) for name in response.headers},
            content,
            requests.Request(method, str(response.url)).prepare(),
            0.0,
            False,
        )
        operation = schemathesis.openapi.from_dict(doc)[template][method]
        parameters = {
            name[1:-1]: value for name, value in zip(template.split("/"), path.split("?")[0].split("/"), strict=True) if name.startswith("{")
        }
        operation.Case(path_parameters=parameters).validate_response(answer, checks=[status_code_conformance, content_type_conformance, response_schema_conformance])
        assert response.status == status, content
        return await response.json()

    async def error(self, method: str, path: str, status: int, error: str, **kwargs: Any) -> dict[str, Any]:
        """The JSON error an invalid request gets, checked for its status and id."""
        body: dict[str, Any] = await self.json(method, path, status, **kwargs)
        assert body["error"] == error, body
        assert isinstance(body["message"], str) and body["message"]
        return body


def write_config(folder: Path) -> Path:
    cfg = base_config(free_port(), free_port(socket.SOCK_STREAM), folder)
    cfg["extensions"]["1001"]["voicemail"] = {"pin": "1234"}
    cfg["sounds"] = {"dir": str(REPO / "config" / "sounds"), "tts": None}
    cfg["ivr"] = {"dir": str(folder / "ivr_flows")}
    cfg["recording"] = {"retention_days": 0}  # the seeded recordings are old
    cfg["trunks"] = {"carrier": {"host": "127.0.0.2:5060", "inbound_from": ["127.0.0.2/32"]}}
    cfg["outbound"] = [{"match": r"^\+[0-9]{7,15}$", "trunk": "carrier"}]
    # Agents with no registered phone: nothing here dials them.
    cfg["queues"] = {
        "support": {"agents": ["1002", "1003"], "callback": {"enabled": True}},
        "sales": {"agents": ["1003"], "callback": {"enabled": False}},
    }
    (folder / "ivr_flows").mkdir(parents=True, exist_ok=True)
    (folder / "ivr_flows" / "main.yaml").write_text(FLOW)
    path = folder / "pbx.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="milliseconds")


DAY = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def tone(path: Path, freq: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tone(path, freq, 0.2)


async def seed(folder: Path, db: Path, sink: socket.socket) -> None:
    """Rows (and files) the server finds at start: a registration whose
    contact is ``sink`` (a socket nobody reads), voicemail, recordings, CDR."""
    store = Store(db)
    await store.open()
    try:
        host, port = sink.getsockname()
        await store.upsert(
            "registrations",
            {
                "extension": "1001", "contact": f"sip:1001@{host}:{port}", "source": f"{host}:{port}", "transport": "udp",
                "expires_at": time.time() + 600, "user_agent": "test phone", "call_id": "reg-1",
            },
        )  # fmt: skip
        for n in range(3):
            relative = f"voicemail/1001/msg{n}.wav"
            tone(folder / relative, 440 + 100 * n)
            await store.insert(
                "voicemail",
                {
                    "id": f"msg{n}", "mailbox": "1001", "caller": f"+1555000{n}", "received": iso(DAY + timedelta(hours=n)),
                    "seconds": 0.2, "heard": 0, "path": relative, "email": "",
                },
            )  # fmt: skip
        for n, (queue, agent) in enumerate([("support", "1002"), ("support", "1003"), (None, None)]):
            relative = f"recordings/2026/03/0{n + 1}/rec{n}.wav"
            tone(folder / relative, 700)
            await store.insert(
                "recordings",
                {
                    "id": f"rec{n}", "call_id": f"rec{n}", "queue": queue, "agent": agent, "caller": "+15550100",
                    "callee": "1001" if queue is None else "7000", "started": iso(DAY + timedelta(days=n - 1)),
                    "seconds": 0.2, "bytes": 3244, "channels": 2, "path": relative,
                },
            )  # fmt: skip
        for n in range(5):
            started = DAY + timedelta(hours=n)
            await store.upsert(
                "cdr",
                {
                    "call_id": f"cdr{n}", "direction": "internal", "from_number": "1001", "to_number": "1002",
                    "started": iso(started), "answered": iso(started + timedelta(seconds=3)) if n % 2 else None,
                    "ended": iso(started + timedelta(seconds=60)), "disposition": "answered" if n % 2 else "no-answer",
                    "duration": 60.0, "billsec": 57.0 if n % 2 else 0.0,
                },
            )  # fmt: skip
    finally:
        await store.close()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    folder = tmp_path / "pbx"
    folder.mkdir()
    path = write_config(folder)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        await seed(folder, folder / "pbx.db", sink)
        config, prompts, flows = load_setup(path)
        pbx = Pbx(config, prompts, flows)
        app = make_http_app(lambda: pbx.config.http.token, pbx.metrics, pbx.healthy, pbx.events)
        add_api(app, pbx.admin())
        app.cleanup_ctx.append(pbx.lifetime)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        try:
            yield Api(client, pbx, folder)
        finally:
            await client.close()


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item}


def concrete(path: str) -> str:
    return path.replace("{", "x-").replace("}", "")


# --- the document and the router ---


async def test_every_route_is_documented_and_every_documented_route_answers(api: Api) -> None:
    doc = await api.json("GET", "/api/openapi.json")
    assert doc["openapi"].startswith("3.")
    routes = {
        (route.method, route.resource.canonical)
        for route in api.client.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    assert routes == documented(doc)
    for method, path in sorted(documented(doc)):
        if (method, path) == ("POST", "/api/ivr/reload"):
            continue  # answers below, with and without a broken flow
        response = await api.call(method, concrete(path), json={})
        assert response.status != 405, (method, path)
        if response.status == 404:  # from the handler (an unknown id), never from the router
            assert (await response.json())["error"].startswith("no-such-"), (method, path)
        assert str(response.status) in doc["paths"][path][method.lower()]["responses"], (method, path, response.status)


async def test_no_endpoint_but_healthz_and_the_wallboard_page_answers_without_the_token(api: Api) -> None:
    doc = await api.json("GET", "/api/openapi.json")
    open_paths = {path for method, path in documented(doc) if doc["paths"][path][method.lower()].get("security") == []}
    assert open_paths == {"/healthz", "/wallboard", "/wallboard.css", "/wallboard.js"}  # the page's data needs a ticket
    for method, path in sorted(documented(doc)):
        for token in (None, "wrong-token", TOKEN + "x"):
            response = await api.call(method, concrete(path), token=token, json={})
            if path in open_paths:
                assert response.status == 200
            else:
                assert response.status == 401, (method, path, token)
                assert (await response.json())["error"] == "unauthorized"
    assert (await api.call("GET", "/api/nothing-here", token=None)).status == 401
    await api.error("GET", "/api/nothing-here", 404, "not-found")
    await api.error("PUT", "/api/calls", 405, "method-not-allowed")


# --- calls and click-to-call ---


async def test_click_to_call_rings_from_then_can_be_cancelled(api: Api) -> None:
    assert await api.json("GET", "/api/calls") == {"items": [], "total": 0, "limit": 100, "offset": 0}
    placed = await api.conforming("POST", "/api/calls", "/api/calls", 202, json={"from": "1001", "to": "1002"})
    assert placed["state"] == "originating" and placed["from"] == "1001" and placed["to"] == "1002"
    assert placed["direction"] == "click-to-call"
    listed = await api.conforming("GET", "/api/calls", "/api/calls", 200)
    assert listed["items"] == [placed]
    await api.error("POST", "/api/calls", 409, "extension-busy", json={"from": "1001", "to": "queue:support"})

    response = await api.call("DELETE", f"/api/calls/{placed['id']}")
    assert response.status == 204
    assert (await api.json("GET", "/api/calls"))["total"] == 0
    await api.error("DELETE", f"/api/calls/{placed['id']}", 404, "no-such-call")
    # The attempt leaves its CDR row (queued for the store before the 204 went out).
    (row,) = [r for r in (await api.json("GET", "/api/cdr"))["items"] if r["call_id"] == placed["id"]]
    assert row["direction"] == "click-to-call" and row["disposition"] == "cancelled"
    assert (row["from_number"], row["to_number"]) == ("1001", "1002")


async def test_click_to_call_refuses_bad_bodies(api: Api) -> None:
    body = await api.error("POST", "/api/calls", 422, "invalid-body", json={})
    assert body["fields"] == {"from": "is required", "to": "is required"}
    body = await api.error("POST", "/api/calls", 422, "invalid-body", json={"from": 1001, "to": "1002", "via": "x"})
    assert body["fields"]["from"] == "must be a string" and "via" in body["fields"]
    body = await api.error("POST", "/api/calls", 422, "invalid-body", json={"from": "9999", "to": "queue:nope"})
    assert set(body["fields"]) == {"from", "to"} and "nope" in body["fields"]["to"]
    body = await api.error("POST", "/api/calls", 422, "number-not-allowed", json={"from": "1001", "to": "0900123"})
    assert "outbound rule" in body["fields"]["to"]
    body = await api.error("POST", "/api/calls", 422, "invalid-body", json={"from": "1001", "to": "1001"})
    assert "itself" in body["fields"]["to"]
    await api.error("POST", "/api/calls", 422, "invalid-body", json=["1001", "1002"])
    await api.error("POST", "/api/calls", 400, "invalid-json", data="{from: 1001", headers={"Content-Type": "application/json"})
    await api.error("POST", "/api/calls", 415, "unsupported-media-type", data='{"from": "1001", "to": "1002"}')
    # Valid, but 1002 has no registered phone to ring.
    await api.error("POST", "/api/calls", 409, "extension-unavailable", json={"from": "1002", "to": "+4930123456"})
    await api.error("DELETE", "/api/calls/nope", 404, "no-such-call")
    await api.error("POST", "/api/calls/nope/recording", 404, "no-such-call", json={"action": "start"})
    await api.error("GET", "/api/calls?limit=0", 422, "invalid-query")


# --- registrations ---


async def test_registrations_list_the_registered_contacts(api: Api) -> None:
    page = await api.json("GET", "/api/registrations")
    assert page["total"] == 1
    (reg,) = page["items"]
    assert reg["extension"] == "1001" and reg["transport"] == "udp" and reg["user_agent"] == "test phone"
    assert reg["contact"].startswith("sip:1001@127.0.0.1:") and reg["source"] == reg["contact"].split("@")[1]
    assert 590 <= reg["expires_in"] <= 600
    assert datetime.fromisoformat(reg["expires"]) > datetime.now(UTC)
    assert (await api.json("GET", "/api/registrations?offset=1"))["items"] == []


# --- extensions ---


async def test_extensions_show_do_not_disturb_and_forwarding_in_effect(api: Api) -> None:
    page = await api.conforming("GET", "/api/extensions", "/api/extensions", 200)
    assert [ext["number"] for ext in page["items"]] == ["1001", "1002", "1003"]
    assert page["items"][0] == {
        "number": "1001", "name": "User 1001", "dnd": False,
        "forward": {"always": None, "busy": "voicemail:1001", "no_answer": "voicemail:1001"},
    }  # fmt: skip
    settings = api.pbx.calls.forwarding.settings
    await settings.set_dnd("1002", True)
    await settings.set_forward("1003", "+15550123")
    items = (await api.conforming("GET", "/api/extensions?offset=1", "/api/extensions", 200))["items"]
    assert [(ext["dnd"], ext["forward"]["always"]) for ext in items] == [(True, None), (False, "external:+15550123")]
    assert {"1002": "dnd"}.items() <= agent_states((await api.json("GET", "/api/queues/support"))["agents"]).items()


# --- queues and agents ---


async def test_queues_show_callers_agents_and_figures(api: Api) -> None:
    page = await api.json("GET", "/api/queues")
    assert [q["name"] for q in page["items"]] == ["support", "sales"]
    assert [q["name"] for q in (await api.json("GET", "/api/queues?limit=1&offset=1"))["items"]] == ["sales"]
    support = await api.json("GET", "/api/queues/support")
    assert agent_states(support["agents"]) == {"1002": "available", "1003": "available"}
    assert support["callers"] == []
    stats = support["stats"]
    assert stats["offered"] == 0 and stats["callbacks"] == {"requested": 0, "completed": 0, "failed": 0}
    assert stats["service_level"] is None and stats["average_speed_of_answer"] is None
    await api.error("GET", "/api/queues/nope", 404, "no-such-queue")


async def test_agents_log_in_and_out_and_pause(api: Api) -> None:
    path = "/api/queues/support/agents/1002"
    for action, state in (("pause", "paused"), ("unpause", "available"), ("logout", "logged_out"), ("login", "available")):
        assert await api.json("POST", path, json={"action": action}) == {"queue": "support", "extension": "1002", "state": state}
        agents = (await api.json("GET", "/api/queues/support"))["agents"]
        assert agent_states(agents)["1002"] == state
    body = await api.error("POST", path, 422, "invalid-body", json={"action": "dance"})
    assert body["fields"] == {"action": "must be one of login, logout, pause, unpause"}
    await api.error("POST", path, 422, "invalid-body", json={})
    await api.error("POST", "/api/queues/support/agents/1001", 404, "no-such-agent", json={"action": "login"})
    await api.error("POST", "/api/queues/nope/agents/1002", 404, "no-such-queue", json={"action": "login"})


# --- callbacks ---


async def test_web_callbacks_join_the_line_and_can_be_cancelled(api: Api) -> None:
    first = await api.conforming("POST", "/api/callbacks", "/api/callbacks", 201, json={"queue": "support", "number": "1001"})
    assert first["status"] == "pending" and first["position"] == 1 and first["attempts"] == 0
    second = await api.json("POST", "/api/callbacks", 201, json={"queue": "support", "number": "+15550123"})
    assert second["position"] == 2
    await api.error("POST", "/api/callbacks", 409, "callback-exists", json={"queue": "support", "number": "1001"})
    await api.error("POST", "/api/callbacks", 409, "callbacks-disabled", json={"queue": "sales", "number": "1001"})

    page = await api.conforming("GET", "/api/callbacks", "/api/callbacks", 200)
    assert [(c["id"], c["position"]) for c in page["items"]] == [(first["id"], 1), (second["id"], 2)]
    callers = (await api.conforming("GET", "/api/queues/support", "/api/queues/{queue}", 200))["callers"]
    assert [(c["id"], c["callback"]) for c in callers] == [(first["id"], True), (second["id"], True)]
    assert (await api.json("GET", "/api/callbacks?limit=1&offset=1"))["items"][0]["id"] == second["id"]
    assert (await api.json("GET", "/api/callbacks?queue=sales"))["total"] == 0

    assert (await api.call("DELETE", f"/api/callbacks/{first['id']}")).status == 204
    page = await api.json("GET", "/api/callbacks")
    assert [(c["id"], c["position"]) for c in page["items"]] == [(second["id"], 1)]
    cancelled = await api.json("GET", "/api/callbacks?status=cancelled")
    assert [(c["id"], c["status"], c["position"]) for c in cancelled["items"]] == [(first["id"], "cancelled", None)]
    await api.error("DELETE", f"/api/callbacks/{first['id']}", 409, "callback-not-pending")
    await api.error("DELETE", "/api/callbacks/cb-nope", 404, "no-such-callback")
    assert [c["id"] for c in (await api.json("GET", "/api/queues/support"))["callers"]] == [second["id"]]


async def test_callback_requests_with_bad_bodies_get_field_errors(api: Api) -> None:
    body = await api.error("POST", "/api/callbacks", 422, "invalid-body", json={"queue": "nope", "number": "0900123"})
    assert set(body["fields"]) == {"queue", "number"}
    body = await api.error("POST", "/api/callbacks", 422, "invalid-body", json={"queue": "support", "number": "call me"})
    assert body["fields"]["number"].startswith("must match")
    body = await api.error("POST", "/api/callbacks", 422, "invalid-body", json={"number": "1001"})
    assert body["fields"] == {"queue": "is required"}
    await api.error("GET", "/api/callbacks?status=lost", 422, "invalid-query")


# --- voicemail ---


async def test_voicemail_messages_listed_played_marked_and_deleted(api: Api) -> None:
    page = await api.json("GET", "/api/voicemail/1001")
    assert page["total"] == 3
    assert [m["id"] for m in page["items"]] == ["msg2", "msg1", "msg0"]  # newest first
    assert page["items"][0] == {
        "id": "msg2", "mailbox": "1001", "caller": "+15550002", "received": iso(DAY + timedelta(hours=2)),
        "seconds": 0.2, "heard": False,
    }  # fmt: skip
    two = await api.json("GET", "/api/voicemail/1001?limit=2")
    assert [m["id"] for m in two["items"]] == ["msg2", "msg1"] and two["total"] == 3 and two["limit"] == 2
    assert [m["id"] for m in (await api.json("GET", "/api/voicemail/1001?limit=2&offset=2"))["items"]] == ["msg0"]
    for bad in ("limit=0", "limit=1001", "limit=two", "offset=-1"):
        body = await api.error("GET", f"/api/voicemail/1001?{bad}", 422, "invalid-query")
        assert list(body["fields"]) == [bad.split("=")[0]]

    audio = await api.call("GET", "/api/voicemail/1001/msg1/audio")
    assert audio.status == 200 and audio.content_type == "audio/wav"
    assert await audio.read() == (api.folder / "voicemail/1001/msg1.wav").read_bytes()

    assert api.pbx.voicemail.counts["1001"] == (3, 0)
    changed = await api.json("PATCH", "/api/voicemail/1001/msg1", json={"heard": True})
    assert changed["heard"] is True
    assert api.pbx.voicemail.counts["1001"] == (2, 1)
    assert [m["heard"] for m in (await api.json("GET", "/api/voicemail/1001"))["items"]] == [False, True, False]
    await api.json("PATCH", "/api/voicemail/1001/msg1", json={"heard": False})
    assert api.pbx.voicemail.counts["1001"] == (3, 0)
    body = await api.error("PATCH", "/api/voicemail/1001/msg1", 422, "invalid-body", json={"heard": "yes"})
    assert body["fields"] == {"heard": "must be true or false"}

    assert (await api.call("DELETE", "/api/voicemail/1001/msg0")).status == 204
    assert not (api.folder / "voicemail/1001/msg0.wav").exists()
    assert [m["id"] for m in (await api.json("GET", "/api/voicemail/1001"))["items"]] == ["msg2", "msg1"]
    assert api.pbx.voicemail.counts["1001"] == (2, 0)
    for method in ("GET", "DELETE"):
        await api.error(method, "/api/voicemail/1001/msg0" + ("/audio" if method == "GET" else ""), 404, "no-such-message")
    await api.error("PATCH", "/api/voicemail/1001/msg0", 404, "no-such-message", json={"heard": True})
    await api.error("GET", "/api/voicemail/1002", 404, "no-such-mailbox")  # 1002 has no mailbox
    await api.error("GET", "/api/voicemail/1002/msg1/audio", 404, "no-such-mailbox")


# --- recordings ---


async def test_recordings_filtered_played_and_deleted(api: Api) -> None:
    async def ids(query: str = "") -> list[str]:
        return [r["id"] for r in (await api.json("GET", f"/api/recordings{query}"))["items"]]

    assert await ids() == ["rec2", "rec1", "rec0"]  # newest first
    assert await ids("?queue=support") == ["rec1", "rec0"]
    assert await ids("?extension=1003") == ["rec1"]
    assert await ids("?extension=1001") == ["rec2"]
    assert await ids("?from=2026-03-02") == ["rec2", "rec1"]
    assert await ids("?from=2026-03-01T00:00:00Z&to=2026-03-02T12:00:00.000%2B00:00") == ["rec0"]
    assert await ids("?to=2026-03-02T13:00:00%2B01:00") == ["rec0"]  # 12:00 UTC, exclusive
    assert await ids("?limit=1&offset=1") == ["rec1"]
    body = await api.error("GET", "/api/recordings?from=yesterday&to=2026-13-01", 422, "invalid-query")
    assert set(body["fields"]) == {"from", "to"}
    (rec,) = (await api.json("GET", "/api/recordings?queue=support&extension=1002"))["items"]
    assert rec == {
        "id": "rec0", "call_id": "rec0", "queue": "support", "agent": "1002", "caller": "+15550100", "callee": "7000",
        "started": iso(DAY - timedelta(days=1)), "seconds": 0.2, "channels": 2, "bytes": 3244,
    }  # fmt: skip

    audio = await api.call("GET", "/api/recordings/rec1/audio")
    assert audio.status == 200 and audio.content_type == "audio/wav"
    assert await audio.read() == (api.folder / "recordings/2026/03/02/rec1.wav").read_bytes()

    assert (await api.call("DELETE", "/api/recordings/rec1")).status == 204
    assert not (api.folder / "recordings/2026/03/02/rec1.wav").exists()
    assert await ids() == ["rec2", "rec0"]
    await api.error("DELETE", "/api/recordings/rec1", 404, "no-such-recording")
    await api.error("GET", "/api/recordings/rec1/audio", 404, "no-such-recording")
    (api.folder / "recordings/2026/03/03/rec2.wav").unlink()
    await api.error("GET", "/api/recordings/rec2/audio", 404, "no-audio")


# --- call detail records ---


async def test_cdr_as_json_and_csv_with_time_filters(api: Api) -> None:
    page = await api.json("GET", "/api/cdr")
    assert [r["call_id"] for r in page["items"]] == ["cdr0", "cdr1", "cdr2", "cdr3", "cdr4"]  # oldest first
    assert page["items"][1]["disposition"] == "answered" and page["items"][1]["billsec"] == 57.0
    window = "from=2026-03-02T13:00:00Z&to=2026-03-02T15:00:00Z"
    assert [r["call_id"] for r in (await api.json("GET", f"/api/cdr?{window}"))["items"]] == ["cdr1", "cdr2"]

    response = await api.call("GET", f"/api/cdr?{window}&format=csv")
    assert response.status == 200 and response.content_type == "text/csv"
    assert response.headers["X-Total-Count"] == "2"
    rows = list(csv.reader(io.StringIO(await response.text())))
    columns = [c.name for c in await api.pbx.store.run(lambda: api.pbx.store.db["cdr"].columns)]
    assert rows[0][:10] == ["call_id", "direction", "from_number", "to_number", "started", "answered", "ended", "disposition", "duration", "billsec"]
    assert sorted(rows[0]) == sorted(columns)
    records = [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]
    assert [(r["call_id"], r["disposition"], r["answered"]) for r in records] == [
        ("cdr1", "answered", iso(DAY + timedelta(hours=1, seconds=3))),
        ("cdr2", "no-answer", ""),
    ]
    assert float(records[0]["billsec"]) == 57.0

    response = await api.call("GET", "/api/cdr?format=csv&limit=2&offset=4")
    assert response.headers["X-Total-Count"] == "5"
    assert [row[0] for row in csv.reader(io.StringIO(await response.text()))] == ["call_id", "cdr4"]
    body = await api.error("GET", "/api/cdr?format=xml&from=noon", 422, "invalid-query")
    assert body["fields"] == {"format": "must be one of json, csv", "from": body["fields"]["from"]}


# --- IVR flows ---


async def test_ivr_flows_validation_state_and_reload(api: Api) -> None:
    flows = await api.json("GET", "/api/ivr")
    assert flows["items"] == [{"name": "main", "file": str(api.folder / "ivr_flows" / "main.yaml"), "loaded": True, "valid": True, "errors": []}]

    broken = api.folder / "ivr_flows" / "broken.yaml"
    broken.write_text(BROKEN_FLOW)
    flows = await api.json("GET", "/api/ivr")
    by_name = {f["name"]: f for f in flows["items"]}
    assert by_name["broken"]["loaded"] is False and by_name["broken"]["valid"] is False
    assert by_name["broken"]["errors"] and all(e.startswith(f"{broken}:4: ") for e in by_name["broken"]["errors"])
    assert "4711" in by_name["broken"]["errors"][0]

    body = await api.error("POST", "/api/ivr/reload", 422, "invalid-config")
    assert body["errors"] == by_name["broken"]["errors"]
    assert set(api.pbx.flows) == {"main"}
    assert await api.json("GET", "/api/ivr") == flows

    broken.write_text(FLOW.replace("extension:1001", "extension:1002"))
    before = api.pbx.flows["main"]
    assert await api.json("POST", "/api/ivr/reload") == {"status": "reloaded", "flows": ["broken", "main"]}
    assert api.pbx.flows["main"] is not before
    assert all(f["loaded"] and f["valid"] for f in (await api.json("GET", "/api/ivr"))["items"])


# --- schemathesis over the document ---


async def test_schemathesis_finds_no_server_errors_and_answers_match_the_document(api: Api) -> None:
    doc = await api.json("GET", "/api/openapi.json")
    base_url = str(api.client.make_url("")).rstrip("/")
    schema = schemathesis.openapi.from_dict(doc)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

    def run(operation: Any, mode: schemathesis.GenerationMode) -> None:
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        @hypothesis.settings(
            max_examples=10,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(hypothesis.HealthCheck),
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )
        def check(case: Any) -> None:
            response = case.call(base_url=base_url, headers=AUTH, timeout=10)
            case.validate_response(response, checks=checks)

        check()

    def run_all() -> list[str]:
        failures = []
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                try:
                    run(operation, mode)
                except hypothesis.errors.Unsatisfiable:
                    assert mode is schemathesis.GenerationMode.NEGATIVE  # nothing to get wrong (GET /healthz)
                except Exception as exc:  # every operation gets its go; all failures are reported together
                    failures.append(f"{mode.value} {operation.method.upper()} {operation.path}: {exc}")
        return failures

    # schemathesis calls through requests, blocking: off the loop that serves.
    failures = await asyncio.to_thread(run_all)
    assert not failures, "\n\n".join(failures)


def agent_states(agents: list[dict[str, Any]]) -> dict[str, str]:
    """A queue's agents as the API lists them, by extension: their states."""
    return {agent["extension"]: agent["state"] for agent in agents}
