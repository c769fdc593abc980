"""The admin side attacked for real on loopback: the API token (required on
every address, swapped by a reload), bodies that are not JSON, formulas
smuggled into the CDR export through a caller id, the mode of `.env`, and
where the database lands."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pbx.calls.cdr_http import csv_cell
from pbx.config.load import load_config
from tests.support.server import Server, start_server
from tests.support.sipp import run_sipp

REPO = Path(__file__).resolve().parent.parent
SIPP = REPO / "tests" / "sipp"
TOKEN = "test-token"  # tests.support.server's


def pbx(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PBX_ADMIN_TOKEN"}
    return subprocess.run([sys.executable, "-m", "pbx.cli", *args], capture_output=True, text=True, timeout=30, cwd=cwd, env=env)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(
    http: aiohttp.ClientSession, server: Server, method: str, path: str, token: str | None = TOKEN, **kwargs: Any
) -> tuple[int, Any, aiohttp.ClientResponse]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    headers |= kwargs.pop("headers", {})
    async with http.request(method, f"http://127.0.0.1:{server.http_port}{path}", headers=headers, **kwargs) as response:
        body = await response.json() if response.content_type == "application/json" else await response.text()
        return response.status, body, response


# --- the token ---


@pytest.mark.parametrize("http_section", ['{listen: "127.0.0.1:18080"}', '{listen: "127.0.0.1:18080", token: ""}'])
def test_serve_refuses_to_start_without_a_token_even_on_loopback(tmp_path: Path, http_section: str) -> None:
    config = tmp_path / "pbx.yaml"
    config.write_text(f"sounds: {{tts: null}}\nhttp: {http_section}\n")
    serve = pbx("serve", "--config", str(config), cwd=tmp_path)
    assert serve.returncode == 2, serve.stderr
    assert serve.stderr.splitlines() == [f"{config}:2: http.token is empty: the admin API needs a token on every address"
                                         " (`make run` writes PBX_ADMIN_TOKEN to .env)"]  # fmt: skip
    check = pbx("check", "--config", str(config), cwd=tmp_path)
    assert check.returncode == 1 and check.stderr == serve.stderr
    assert not (tmp_path / "pbx.db").exists()


def test_a_config_without_an_http_section_is_refused_at_line_zero(tmp_path: Path) -> None:
    config = tmp_path / "pbx.yaml"
    config.write_text("sounds: {tts: null}\n")
    check = pbx("check", "--config", str(config), cwd=tmp_path)
    assert check.returncode == 1
    assert check.stderr.startswith(f"{config}:0: http.token is empty")


async def test_a_reload_that_changes_the_token_refuses_the_old_one_at_once(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    server = await start_server(tmp_path / "pbx", sounds={"tts": None})
    try:
        config = server.folder / "pbx.yaml"
        assert (await call(http, server, "GET", "/api/calls"))[0] == 200

        # SIGHUP with a new token: the old one is refused from the next request on.
        config.write_text(config.read_text().replace(f"token: {TOKEN}", "token: second-token"))
        mark = len(server.log)
        server.proc.send_signal(signal.SIGHUP)
        await server.wait_log(r"configuration reloaded", start=mark)
        for path in ("/api/calls", "/metrics", "/api/openapi.json"):
            status, body, response = await call(http, server, "GET", path)
            assert status == 401 and body["error"] == "unauthorized", (path, body)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await call(http, server, "GET", "/api/calls", token="second-token"))[0] == 200
        assert (await call(http, server, "GET", "/api/calls", headers={"Authorization": "bearer second-token"}, token=None))[0] == 200
        assert (await call(http, server, "GET", "/api/calls", token="second-toke"))[0] == 401
        assert (await call(http, server, "GET", "/healthz", token=None))[0] == 200

        # The API's own reload swaps it too.
        config.write_text(config.read_text().replace("token: second-token", "token: third-token"))
        status, body, _ = await call(http, server, "POST", "/api/ivr/reload", token="second-token")
        assert (status, body["status"]) == (200, "reloaded")
        assert (await call(http, server, "GET", "/api/calls", token="second-token"))[0] == 401
        assert (await call(http, server, "GET", "/api/calls", token="third-token"))[0] == 200

        # A reload that would empty the token is refused: the running one stays.
        config.write_text(config.read_text().replace("token: third-token", "token: ''"))
        status, body, _ = await call(http, server, "POST", "/api/ivr/reload", token="third-token")
        assert status == 422 and any("http.token is empty" in error for error in body["errors"]), body
        assert (await call(http, server, "GET", "/api/calls", token=""))[0] == 401
        assert (await call(http, server, "GET", "/api/calls", token=None, headers={"Authorization": "Bearer "}))[0] == 401
        assert (await call(http, server, "GET", "/api/calls", token="third-token"))[0] == 200
        # Bytes no client library would send: refused like any wrong token, no 500.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
        writer.write(b"GET /api/calls HTTP/1.0\r\nAuthorization: Bearer \xff\xfe\r\n\r\n")
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.0 401 ") and b'"unauthorized"' in answer

        # Every refusal is a security event fail2ban can read.
        refusals = [line for line in server.log if "event=security kind=auth_failure src=127.0.0.1 service=http" in line]
        assert len(refusals) == 8
        status, metrics, _ = await call(http, server, "GET", "/metrics", token="third-token")
        assert 'pbx_security_events_total{event="auth_failure"} 8.0' in metrics
    finally:
        assert await server.stop() == 0


# --- request bodies ---


async def test_bodies_that_are_not_declared_json_get_415(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    server = await start_server(tmp_path / "pbx", sounds={"tts": None})
    try:
        body = '{"queue": "support", "number": "+15551234567"}'
        # JSON text sent as text/plain or a form (what a browser posts cross-site) is never read.
        for content_type, data in (
            ("text/plain", body),
            ("application/x-www-form-urlencoded", "queue=support&number=%2B15551234567"),
            ("multipart/form-data; boundary=x", '--x\r\nContent-Disposition: form-data; name="queue"\r\n\r\nsupport\r\n--x--\r\n'),
        ):
            for method, path in (("POST", "/api/callbacks"), ("POST", "/api/calls"), ("POST", "/api/ivr/reload"),
                                 ("PATCH", "/api/voicemail/1001/x"), ("POST", "/api/queues/support/agents/1001")):  # fmt: skip
                status, answer, response = await call(http, server, method, path, data=data, headers={"Content-Type": content_type})
                assert status == 415, (method, path, content_type, status, answer)
                assert response.content_type == "application/json"
                assert answer["error"] == "unsupported-media-type" and content_type.split(";")[0] in answer["message"]
        # No body and no type where one is needed: 415 too, not a guess.
        status, answer, _ = await call(http, server, "POST", "/api/callbacks")
        assert (status, answer["error"]) == (415, "unsupported-media-type")
        # The same text declared as JSON is read (and found wanting: there is no queue here).
        status, answer, _ = await call(http, server, "POST", "/api/callbacks", data=body, headers={"Content-Type": "application/json; charset=utf-8"})
        assert (status, answer["fields"]["queue"]) == (422, "there is no queue support"), answer
        # Still a plain 401 for a stranger, whatever the body.
        assert (await call(http, server, "POST", "/api/callbacks", token=None, data=body, headers={"Content-Type": "text/plain"}))[0] == 401

        _, doc, _ = await call(http, server, "GET", "/api/openapi.json")
        for path, operations in doc["paths"].items():
            for method, operation in operations.items():
                assert ("415" in operation["responses"]) == ("requestBody" in operation), (method, path)
    finally:
        assert await server.stop() == 0


# --- CSV injection through a caller id ---

FORMULAS = ["=HYPERLINK(%22http%3A//evil.example/%22)", "-2+3+cmd", "+1+1"]


async def test_caller_ids_that_look_like_formulas_are_exported_as_text(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    server = await start_server(
        tmp_path / "pbx",
        sounds={"tts": None},
        trunks={"carrier": {"host": "127.0.0.2:5060", "inbound_from": ["127.0.0.2/32"]}},
        inbound={"7000": "hangup"},
    )
    try:
        callers = tmp_path / "callers.csv"
        callers.write_text("SEQUENTIAL\n" + "".join(f"{value};\n" for value in [*FORMULAS, "+15557654321"]))
        result = await run_sipp(
            SIPP / "trunk_rejected.xml", server.sip, local_ip="127.0.0.2", service="7000", calls=4, extra=("-inf", str(callers))
        )
        assert result.returncode == 0, result.report()
        start = 0
        for _ in range(4):  # each call's row is written before its "ended" line
            line = await server.wait_log(r"event=ended", start=start)
            start = server.log.index(line, start) + 1
        status, page, _ = await call(http, server, "GET", "/api/cdr")
        assert status == 200 and page["total"] == 4, page
        assert sorted(row["from_number"] for row in page["items"]) == sorted([*FORMULAS, "+15557654321"])  # JSON: as sent

        status, text, response = await call(http, server, "GET", "/api/cdr?format=csv")
        assert status == 200 and response.content_type == "text/csv"
        rows = list(csv.DictReader(io.StringIO(text)))
        exported = sorted(row["from_number"] for row in rows)
        assert exported == sorted([*(f"'{value}" for value in FORMULAS), "+15557654321"])
        # No cell of the export starts a formula, whatever column it is in.
        for row in rows:
            for name, cell in row.items():
                assert not cell.startswith(("=", "@", "\t", "\r")), (name, cell)
                assert not cell.startswith(("+", "-")) or cell.lstrip("+-").replace(".", "", 1).isdigit(), (name, cell)
    finally:
        assert await server.stop() == 0


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ("=1+2", "'=1+2"),
        ("@SUM(1+1)*cmd|' /C calc'!A0", "'@SUM(1+1)*cmd|' /C calc'!A0"),
        ("\t=1+2", "'\t=1+2"),
        ("\r=1+2", "'\r=1+2"),
        ("-2+3+cmd|' /C calc'!A0", "'-2+3+cmd|' /C calc'!A0"),
        ("+1E5", "'+1E5"),
        ("+15551234567", "+15551234567"),  # a phone number stays a phone number
        ("-3", "-3"),
        ("-1.5", "-1.5"),
        ("1002", "1002"),
        ("a=b", "a=b"),
        (None, ""),
        (12.5, 12.5),
        (-7, -7),
    ],
)
def test_csv_cells_neutralise_formulas_and_keep_numbers(value: Any, cell: Any) -> None:
    assert csv_cell(value) == cell


# --- .env ---


def make_env(folder: Path) -> subprocess.CompletedProcess[str]:
    """`make .env` in ``folder`` (holding copies of the Makefile and config/make-env), with a lax umask."""
    return subprocess.run(
        ["make", "--no-print-directory", ".env"], cwd=folder, capture_output=True, text=True, timeout=30, preexec_fn=lambda: os.umask(0o022)
    )


def test_make_writes_env_readable_by_its_owner_only_and_tightens_a_loose_one(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    shutil.copy(REPO / "config" / "make-env", tmp_path / "config" / "make-env")
    env = tmp_path / ".env"

    first = make_env(tmp_path)
    assert first.returncode == 0, first.stderr
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    values = dict(line.split("=", 1) for line in env.read_text().splitlines())
    assert set(values) == {"PBX_PASSWORD_1001", "PBX_PASSWORD_1002", "PBX_PASSWORD_1003", "PBX_ADMIN_TOKEN"}
    assert len(values["PBX_ADMIN_TOKEN"]) == 32 and values["PBX_ADMIN_TOKEN"].isalnum()
    assert f"PBX_ADMIN_TOKEN={values['PBX_ADMIN_TOKEN']}" in first.stdout  # printed once, for the admin

    # An older .env, readable by all and without a token: tightened, completed, its passwords kept.
    env.chmod(0o644)
    env.write_text("".join(f"PBX_PASSWORD_{n}={values[f'PBX_PASSWORD_{n}']}\n" for n in (1001, 1002, 1003)))
    second = make_env(tmp_path)
    assert second.returncode == 0, second.stderr
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert "readable by others" in second.stderr
    again = dict(line.split("=", 1) for line in env.read_text().splitlines())
    assert {k: v for k, v in again.items() if k != "PBX_ADMIN_TOKEN"} == {k: v for k, v in values.items() if k != "PBX_ADMIN_TOKEN"}
    assert len(again["PBX_ADMIN_TOKEN"]) == 32 and again["PBX_ADMIN_TOKEN"] != values["PBX_ADMIN_TOKEN"]

    third = make_env(tmp_path)
    assert (third.returncode, third.stdout, third.stderr) == (0, "", "")
    assert dict(line.split("=", 1) for line in env.read_text().splitlines()) == again


# --- storage.db ---


def test_a_relative_db_resolves_under_data_dir(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "pbx.yaml"
    path.write_text("storage: {data_dir: ../data, db: pbx.db}\n")
    assert load_config(path, env={}).storage.db == tmp_path / "etc" / ".." / "data" / "pbx.db"
    path.write_text(f"storage: {{data_dir: ../data, db: {tmp_path / 'elsewhere.db'}}}\n")
    assert load_config(path, env={}).storage.db == tmp_path / "elsewhere.db"


async def test_the_server_keeps_its_database_under_data_dir(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    folder = tmp_path / "etc"
    data = tmp_path / "var"
    server = await start_server(folder, sounds={"tts": None}, storage={"data_dir": str(data), "db": "pbx.db"})
    try:
        assert (await call(http, server, "GET", "/healthz", token=None))[0] == 200
        assert (data / "pbx.db").is_file()
        assert not (folder / "pbx.db").exists()
    finally:
        assert await server.stop() == 0
