"""The `pbx` command as an admin meets it: check, serve on a bad file, reload, restart."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.support.phone import Phone
from tests.support.server import PASSWORDS, start_server

REPO = Path(__file__).resolve().parent.parent


def pbx(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pbx.cli", *args], capture_output=True, text=True, timeout=30, env=env)


def test_version() -> None:
    result = pbx("--version")
    assert result.returncode == 0 and result.stdout.startswith("pbx ")


def test_check_accepts_the_shipped_config() -> None:
    env = {f"PBX_PASSWORD_{ext}": f"long-enough-{ext}" for ext in ("1001", "1002", "1003")}
    env["PBX_ADMIN_TOKEN"] = "long-random-token"
    result = pbx("check", "--config", str(REPO / "pbx.yaml"), env={"PATH": "/usr/bin:/bin", **env})
    assert result.returncode == 0, result.stderr


def test_check_and_serve_report_errors_with_file_and_line(tmp_path: Path) -> None:
    config = tmp_path / "pbx.yaml"
    config.write_text("sip:\n  domain: pbx.local\n  colour: blue\nextensions:\n  '1001': {name: A, password: short}\n")
    check = pbx("check", "--config", str(config))
    assert check.returncode == 1
    assert f"{config}:3: " in check.stderr and f"{config}:5: " in check.stderr
    serve = pbx("serve", "--config", str(config))
    assert serve.returncode == 2
    assert serve.stderr.splitlines() == check.stderr.splitlines()
    assert "Traceback" not in serve.stderr


async def test_sighup_reloads_and_a_bad_file_keeps_the_old_config(tmp_path: Path) -> None:
    server = await start_server(tmp_path / "pbx")
    try:
        config = server.folder / "pbx.yaml"
        good = config.read_text()
        config.write_text(good.replace("ring_timeout: 20", "ring_timeout: 25"))
        server.proc.send_signal(signal.SIGHUP)
        await server.wait_log(r"configuration reloaded")
        config.write_text(good + "nonsense: [\n")
        mark = len(server.log)
        server.proc.send_signal(signal.SIGHUP)
        await server.wait_log(r"reload refused: .*pbx\.yaml:\d+: ", start=mark)
        assert await server.metric("pbx_config_reload_errors_total") == 1
        status, body = await server.http("/healthz", token=None)
        assert (status, body) == (200, '{"status": "ok"}')
    finally:
        assert await server.stop() == 0


async def test_registrations_survive_a_restart(tmp_path: Path) -> None:
    folder = tmp_path / "pbx"
    async with await Phone.start(name="bob") as bob, await Phone.start(name="alice") as alice:
        first = await start_server(folder)
        await bob.register(first.sip, "1002", PASSWORDS["1002"])
        assert await first.stop() == 0

        second = await start_server(folder)
        try:
            await second.wait_log(r"restored 1 registration")
            assert await second.metric("pbx_registrations") == 1
            await alice.register(second.sip, "1001", PASSWORDS["1001"])
            call = await alice.call("sip:1002@pbx.local")
            incoming = await bob.wait_event("incoming")
            await bob.answer(incoming["call"])
            await alice.wait_event("call_state", call=call, state="confirmed")
        finally:
            assert await second.stop() == 0


def test_check_warns_when_the_tts_program_is_missing(tmp_path: Path) -> None:
    config = tmp_path / "pbx.yaml"
    config.write_text("sounds: {tts: no-such-tts-program}\nhttp: {token: test-token}\n")
    result = pbx("check", "--config", str(config))
    assert result.returncode == 0
    assert "warning: sounds.tts is no-such-tts-program, which is not installed" in result.stderr
