"""A reload while 20 callers are in a flow: they finish on the version they
started with, new callers get the new one, and a broken flow changes nothing."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from tests.support.phone import Phone
from tests.support.server import PASSWORDS
from tests.support.sipp import run_sipp
from tests.test_ivr_calls import SIPP, ivr_server

CALLERS = 20
# Version 1: key 1 says goodbye and hangs up. Version 2: key 1 rings extension 1003.
V1 = """
start: menu
nodes:
  menu: {type: menu, prompt: menu, options: {"1": bye}, timeout: 10, retries: 5, on_fail: bye}
  bye: {type: play, prompt: goodbye, next: hangup}
"""
V2 = """
start: menu
nodes:
  menu: {type: menu, prompt: menu, options: {"1": extension:1003}, timeout: 10, retries: 5, on_fail: extension:1003}
"""


async def test_reload_keeps_calls_on_their_version_and_refuses_a_broken_flow(tmp_path: Path) -> None:
    server = await ivr_server(tmp_path, flow=V1)
    flow_file = server.folder / "ivr_flows" / "main.yaml"
    try:
        async with await Phone.start(name="alice") as alice, await Phone.start(name="carol") as carol:
            await alice.register(server.sip, "1001", PASSWORDS["1001"])
            await carol.register(server.sip, "1003", PASSWORDS["1003"])
            # 20 callers enter version 1 and press 1 only after the reload.
            callers = asyncio.create_task(
                run_sipp(
                    SIPP / "ivr_dtmf.xml", server.sip, local_ip="127.0.0.2", service="8000", calls=CALLERS,
                    extra=("-set", "wait", "6000", "-r", str(CALLERS), "-l", str(CALLERS)), timeout=60,
                )
            )  # fmt: skip
            seen = 0
            # A caller's flow version is fixed where it enters the flow (event=ivr),
            # which comes after event=started once its CDR row is stored.
            for _ in range(CALLERS):
                line = await server.wait_log(r"event=ivr flow=main\b", start=seen, timeout=15)
                seen = server.log.index(line, seen) + 1
            assert await server.metric("pbx_active_calls") == CALLERS

            flow_file.write_text(V2)
            server.proc.send_signal(signal.SIGHUP)
            await server.wait_log(r"configuration reloaded")
            assert await server.metric("pbx_active_calls") == CALLERS

            call = await alice.call("sip:8000@pbx.local")
            await alice.wait_event("call_state", call=call, state="confirmed")
            await server.wait_log(r"ivr main: menu", start=seen)
            await alice.dtmf(call, "1")
            ringing = await carol.wait_event("incoming")
            await carol.reject(ringing["call"], 486)
            await alice.wait_event("call_state", call=call, state="disconnected")

            result = await callers  # each got its goodbye and a BYE: version 1 to the end
            assert result.returncode == 0, result.report()
            assert result.successful_calls == CALLERS

            flow_file.write_text(V2.replace("extension:1003", "extension:4711"))
            mark = len(server.log)
            server.proc.send_signal(signal.SIGHUP)
            refused = await server.wait_log(r"reload refused: .*main\.yaml:\d+: ", start=mark)
            assert "4711" in refused
            assert await server.metric("pbx_config_reload_errors_total") == 1

            call = await alice.call("sip:8000@pbx.local")
            await alice.wait_event("call_state", call=call, state="confirmed")
            await server.wait_log(r"ivr main: menu", start=mark)
            await alice.dtmf(call, "1")
            await carol.wait_event("incoming")
    finally:
        assert await server.stop() == 0
