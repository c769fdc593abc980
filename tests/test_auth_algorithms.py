"""Digest algorithms per extension and per trunk.

Debian's baresip 1.0 (libre 1.1) gives up on a 401 that carries two
challenges, whatever their order ("Register: Function not implemented"), so
it cannot register with the default ``sip.auth_algorithms: [SHA-256, MD5]``;
an extension with ``auth_algorithms: [MD5]`` is challenged with MD5 alone,
for its REGISTERs (named by To) and its calls (named by From). A trunk's
``auth_algorithms`` are the ones the server may answer that provider's
challenges with: the provider's first challenge in one of them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
from aiosipua import SipDigestAuth, SipMessage, SipRequest, parse_auth, stringify_auth
from aiosipua.auth import build_credentials

from pbx.config.load import load_config
from pbx.config.model import ConfigError
from pbx.sip.auth import AuthResult, AuthStatus, DigestAuthenticator
from tests.support.baresip import BARESIP, baresip_config, read_until
from tests.support.raw_sip import response_to
from tests.support.server import PASSWORDS, free_port, start_server

# 1002 is the old phone; 1001 keeps the default.
EXTENSIONS = {
    "1001": {"name": "Alice", "password": PASSWORDS["1001"]},
    "1002": {"name": "Bob", "password": PASSWORDS["1002"], "auth_algorithms": ["MD5"]},
    "1003": {"name": "Carol", "password": PASSWORDS["1003"]},
}


@pytest.mark.skipif(BARESIP is None, reason="baresip is not installed (make test-deps)")
async def test_baresip_registers_and_calls_as_an_md5_only_extension_and_fails_with_the_default(tmp_path: Path) -> None:
    server = await start_server(tmp_path / "pbx", extensions=EXTENSIONS)
    assert BARESIP is not None
    phone = await asyncio.create_subprocess_exec(
        BARESIP, "-f", str(baresip_config(tmp_path / "baresip", server, ["1002", "1001"])), "-t", "10", "-e", "/dial 1003",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    seen: list[str] = []
    try:
        assert phone.stdout is not None
        async with asyncio.timeout(8):
            await read_until(
                phone.stdout,
                [
                    "1002@127.0.0.1: {0/UDP/v4} 200 OK",  # registered, as an MD5-only extension
                    f"sip:1001@{server.sip}: Register: Function not implemented",  # two challenges: given up
                    "session closed: 480",  # its call got past the challenge; 1003 has no phone
                ],
                seen,
            )
        status, body = await server.http("/api/registrations")
        assert status == 200
        assert [binding["extension"] for binding in json.loads(body)["items"]] == ["1002"]
        await server.wait_log(r"event=\w+ .*from=1002 to=1003")
    finally:
        if phone.returncode is None:
            phone.terminate()
        await phone.wait()
        await server.stop()


class Provider(asyncio.DatagramProtocol):
    """A registrar that challenges with ``offered`` algorithms, in that order,
    and says 200 to the right digest; :attr:`answered` gets each answer's algorithm."""

    def __init__(self, offered: list[str], username: str, password: str) -> None:
        self.offered, self.username, self.password = offered, username, password
        self.answered: list[str] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        request = SipMessage.parse(data)
        if not isinstance(request, SipRequest) or request.method != "REGISTER":
            return
        assert self.transport is not None
        authorization = request.headers.get_first("authorization")
        if authorization is None:
            challenges = "".join(
                f'WWW-Authenticate: Digest realm="carrier", nonce="n{index}", algorithm={algorithm}, qop="auth"\r\n'
                for index, algorithm in enumerate(self.offered)
            )
            text = response_to(request, 401, "prov").replace("SIP/2.0 401 Unknown", "SIP/2.0 401 Unauthorized")
            reply = text.replace("Content-Length: 0", challenges + "Content-Length: 0")
        else:
            params = parse_auth(authorization, credentials=True).params
            self.answered.append(params["algorithm"])
            reply = response_to(request, 200 if self._right(params) else 403, "prov")
        self.transport.sendto(reply.replace("\r\n", "\n").replace("\n", "\r\n").encode(), addr)

    def _right(self, p: dict[str, str]) -> bool:
        def h(text: str) -> str:
            return hashlib.new({"MD5": "md5", "SHA-256": "sha256"}[p["algorithm"]], text.encode()).hexdigest()

        ha1, ha2 = h(f"{self.username}:carrier:{self.password}"), h(f"REGISTER:{p['uri']}")
        return p["response"] == h(f"{ha1}:{p['nonce']}:{p['nc']}:{p['cnonce']}:auth:{ha2}")


async def test_a_trunk_answers_the_providers_first_challenge_in_an_algorithm_it_allows(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    both, md5_only = ["MD5", "SHA-256"], ["MD5"]
    providers: dict[str, tuple[Provider, int, list[str] | None]] = {}
    for name, offered, allowed in (("strict", both, ["SHA-256"]), ("legacy", both, None), ("refusing", md5_only, ["SHA-256"])):
        port = free_port()
        _, provider = await loop.create_datagram_endpoint(lambda o=offered: Provider(o, "acme", "s3cret-trunk"), local_addr=("127.0.0.1", port))
        providers[name] = (provider, port, allowed)
    trunks = {
        name: {
            "host": f"127.0.0.1:{port}",
            "register": {"username": "acme", "password": "s3cret-trunk", "expires": 120},
            **({"auth_algorithms": allowed} if allowed else {}),
        }
        for name, (_, port, allowed) in providers.items()
    }
    server = await start_server(tmp_path / "pbx", trunks=trunks)
    try:
        await server.wait_log(r"trunk strict: registered")
        await server.wait_log(r"trunk legacy: registered")
        await server.wait_log(r"REGISTER for acme: no challenge we can answer \(offered \['MD5'\], allowed \['SHA-256'\]\)")
        await server.wait_log(r"trunk refusing: failed")
        assert providers["strict"][0].answered == ["SHA-256"]  # past the provider's MD5
        assert providers["legacy"][0].answered == ["MD5"]  # the provider's first choice (RFC 8760 §2.4)
        assert providers["refusing"][0].answered == []
    finally:
        await server.stop()
        for provider, _, _ in providers.values():
            assert provider.transport is not None
            provider.transport.close()


@pytest.mark.parametrize(
    ("section", "line"),
    [
        ('extensions:\n  "1001":\n    name: A\n    password: secret-1001\n    auth_algorithms: [MD5, SHA-1]\n', 5),
        ("trunks:\n  carrier:\n    host: sip.example.net\n    auth_algorithms: []\n", 4),
        ('extensions:\n  "1001": {name: A, password: secret-1001, auth_algorithms: [MD5, MD5]}\n', 2),
    ],
)
def test_bad_auth_algorithms_are_file_and_line_errors(tmp_path: Path, section: str, line: int) -> None:
    path = tmp_path / "pbx.yaml"
    path.write_text(section)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    [issue] = [str(issue) for issue in caught.value.issues]
    assert issue.startswith(f"{path}:{line}: ") and "auth_algorithms" in issue, issue


def test_an_extension_without_its_own_algorithms_has_the_servers_and_a_trunk_both(tmp_path: Path) -> None:
    path = tmp_path / "pbx.yaml"
    path.write_text(
        'sip: {auth_algorithms: [MD5, SHA-256]}\nextensions:\n  "1001": {name: A, password: secret-1001}\n'
        '  "1002": {name: B, password: secret-1002, auth_algorithms: [MD5]}\ntrunks:\n  carrier: {host: sip.example.net}\n'
    )
    config = load_config(path, env={})
    assert (config.extensions["1001"].auth_algorithms, config.extensions["1002"].auth_algorithms) == (None, ("MD5",))
    assert config.trunks["carrier"].auth_algorithms == ("SHA-256", "MD5")


def test_a_user_with_own_algorithms_is_challenged_with_them_and_answers_in_no_other() -> None:
    auth = DigestAuthenticator("pbx.local", algorithms_of={"1002": ("MD5",)}.get)
    algorithms = {user: [parse_auth(h).params["algorithm"] for h in auth.challenge_headers("127.0.0.1", user=user)] for user in ("1001", "1002", None)}
    assert algorithms == {"1001": ["SHA-256", "MD5"], "1002": ["MD5"], None: ["SHA-256", "MD5"]}

    def register(user: str, algorithm: str) -> AuthResult:
        [challenge] = [c for c in map(parse_auth, auth.challenge_headers("127.0.0.1")) if c.params["algorithm"] == algorithm]
        credentials = build_credentials(SipDigestAuth(user, PASSWORDS[user]), challenge, "REGISTER", "sip:pbx.local")
        assert credentials is not None
        request = SipMessage.parse(
            f"REGISTER sip:pbx.local SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bK{user}{algorithm}\r\n"
            f"From: <sip:{user}@pbx.local>;tag=t\r\nTo: <sip:{user}@pbx.local>\r\nCall-ID: c\r\nCSeq: 1 REGISTER\r\n"
            f"Authorization: {stringify_auth(credentials)}\r\nContent-Length: 0\r\n\r\n".encode()
        )
        assert isinstance(request, SipRequest)
        return auth.verify(request, "127.0.0.1", PASSWORDS.get)

    assert register("1001", "SHA-256").ok and register("1002", "MD5").ok
    refused = register("1002", "SHA-256")
    assert (refused.status, refused.reason) == (AuthStatus.FAILED, "algorithm 'SHA-256' is not offered")
