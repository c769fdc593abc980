"""Bounded registrations against `pbx serve`: at most
``extensions.N.max_contacts`` bindings per extension (a REGISTER that would
pass it is refused whole, 503, as Kamailio's registrar answers), an Expires
of absurd length or value gets a 400 instead of a REGISTER left unanswered,
and a failure inside the registrar is a 500."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from pbx.config.load import load_config
from pbx.config.model import ConfigError
from pbx.store.db import Store
from tests.support.server import PASSWORDS, Server, base_config, start_server
from tests.test_digest_replay import DOMAIN, RawClient
from tests.test_registrar import Env


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    extensions: dict[str, dict[str, object]] = {ext: {"name": f"User {ext}", "password": pw} for ext, pw in PASSWORDS.items()}
    extensions["1001"]["max_contacts"] = 2
    srv = await start_server(tmp_path / "pbx", extensions=extensions)
    yield srv
    assert await srv.stop() == 0


@pytest.fixture
async def client(server: Server) -> AsyncIterator[RawClient]:
    raw = await RawClient.open(server)
    yield raw
    raw.close()


async def register(
    client: RawClient, user: str, contacts: tuple[str, ...], expires: str = "600", timeout: float = 5.0
) -> tuple[int, str]:
    """REGISTER ``contacts`` for ``user`` with its password: status and reason."""
    request = client.build(
        "REGISTER", f"sip:{DOMAIN}", user, to=f"<sip:{user}@{DOMAIN}>", contacts=contacts, headers={"Expires": expires}
    )
    response, _ = await client.authorized(request, PASSWORDS[user], timeout)
    return response.status_code, response.reason_phrase


async def bound(server: Server, extension: str) -> list[str]:
    status, body = await server.http("/api/registrations")
    assert status == 200
    return sorted(r["contact"] for r in json.loads(body)["items"] if r["extension"] == extension)


def contact(n: int) -> str:
    return f"<sip:phone{n}@127.0.0.1:{6000 + n}>"


async def test_an_extension_holds_at_most_max_contacts_bindings(server: Server, client: RawClient) -> None:
    assert await register(client, "1001", (contact(1), contact(2))) == (200, "OK")
    assert await register(client, "1001", (contact(3),)) == (503, "Too many registered contacts")
    assert await bound(server, "1001") == ["sip:phone1@127.0.0.1:6001", "sip:phone2@127.0.0.1:6002"]
    # Refreshing what is bound is always fine; so is a swap that stays within the limit.
    assert (await register(client, "1001", (contact(1), contact(2)), expires="900"))[0] == 200
    request = client.build(
        "REGISTER", f"sip:{DOMAIN}", "1001", to=f"<sip:1001@{DOMAIN}>",
        contacts=(f"{contact(2)};expires=0", contact(3)), headers={"Expires": "600"},
    )
    assert (await client.authorized(request, PASSWORDS["1001"]))[0].status_code == 200
    assert await bound(server, "1001") == ["sip:phone1@127.0.0.1:6001", "sip:phone3@127.0.0.1:6003"]


async def test_hundreds_of_contacts_in_one_register_are_refused_whole(server: Server, client: RawClient) -> None:
    # One Contact header with 200 values: the registrar refuses them all.
    status, reason = await register(client, "1002", (", ".join(contact(n) for n in range(200)),))
    assert (status, reason) == (503, "Too many registered contacts")
    assert await bound(server, "1002") == []
    # 300: more header values than the SIP parser takes (256); answered or dropped, never bound.
    with contextlib.suppress(TimeoutError):
        status, _ = await register(client, "1002", (", ".join(contact(n) for n in range(300)),), timeout=1.5)
        assert status in (400, 503)
    assert await bound(server, "1002") == []
    assert await register(client, "1002", tuple(contact(n) for n in range(10))) == (200, "OK")  # the default limit


@pytest.mark.parametrize(
    ("expires", "contact_param"),
    [("9" * 5000, ""), ("600", ";expires=" + "7" * 5000), ("42949672960", ""), ("0" * 4000 + "4294967296", "")],
)
async def test_an_absurd_expires_is_a_bad_request_not_a_hung_transaction(
    server: Server, client: RawClient, expires: str, contact_param: str
) -> None:
    assert await register(client, "1002", (contact(1) + contact_param,), expires=expires) == (400, "Bad Expires")
    assert await bound(server, "1002") == []
    # The largest delta-seconds there is: granted, capped at the registrar's maximum.
    assert await register(client, "1002", (contact(1),), expires="4294967295") == (200, "OK")
    assert await bound(server, "1002") == ["sip:phone1@127.0.0.1:6001"]


@pytest.mark.parametrize("value", [0, 101, "ten"])
def test_max_contacts_outside_1_to_100_is_a_config_error_with_its_line(tmp_path: Path, value: object) -> None:
    config = base_config(5060, 8080, tmp_path)
    config["extensions"]["1001"]["max_contacts"] = value
    path = tmp_path / "pbx.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.strip().startswith("max_contacts:"))
    issues = [str(issue) for issue in caught.value.issues]
    assert any(issue.startswith(f"{path}:{line}: ") and "max_contacts" in issue for issue in issues), issues


def test_max_contacts_defaults_to_ten(tmp_path: Path) -> None:
    path = tmp_path / "pbx.yaml"
    path.write_text(yaml.safe_dump(base_config(5060, 8080, tmp_path), sort_keys=False))
    assert {ext.max_contacts for ext in load_config(path).extensions.values()} == {10}


async def test_a_failure_inside_the_registrar_is_answered_500(tmp_path: Path) -> None:
    store = Store(tmp_path / "pbx.db")
    await store.open()
    env = Env(store)
    await env.registrar.load()
    await store.close()  # the next write fails
    response = await env.register()
    assert response.status_code == 500
