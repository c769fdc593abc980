"""End to end: `pbx_call_mos` and `pbx_rtp_packets_lost_total` after real calls
through `pbx serve`, one of whose legs loses every 10th RTP packet.

Two SIPp callers (extension 1001, G.711 A-law from SIPp's pcap) call two SIPp
answering machines that echo the RTP back (-rtp_echo) at the same time:

- 1002's SDP points at its own media port: a clean call.
- 1003's SDP points at a UDP forwarder in this test, which passes what the
  server's relay sends on to 1003's real media port, and the echo back to the
  relay, dropping every 10th packet of the echo. The relay learns the
  forwarder as 1003's source from its first packet (symmetric RTP).

So four legs finish, each having received RTP: both callers' (clean), 1002's
echo (clean) and 1003's echo through the forwarder (10% lost).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.server import PASSWORDS, Server, free_port, start_server
from tests.support.sipp import BENCH_SCENARIOS, SippProcess, free_media_port, run_sipp, start_sipp

DROP_EVERY = 10
CALL_MS = 3000
LEG_LINE = re.compile(
    r"call=(?P<call>\S+) event=leg_quality leg=(?P<leg>[ab]) codec=(?P<codec>\S+) packets=(?P<packets>\d+) "
    r"lost=(?P<lost>\d+) jitter_ms=(?P<jitter>[\d.]+) mos=(?P<mos>[\d.]+)"
)


class LossyForwarder(asyncio.DatagramProtocol):
    """Between the server's relay and a phone's media port: relay -> phone
    untouched, phone -> relay with every ``drop_every``-th packet dropped."""

    def __init__(self, phone: tuple[str, int], drop_every: int) -> None:
        self.phone = phone
        self.drop_every = drop_every
        self.relay: tuple[str, int] | None = None  # learnt from the relay's first packet
        self.echoed = 0  # packets from the phone
        self.dropped = 0
        self.transport: asyncio.DatagramTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr != self.phone:
            self.relay = addr
            self.transport.sendto(data, self.phone)
        elif self.relay is not None:
            self.echoed += 1
            if self.echoed % self.drop_every == 0:
                self.dropped += 1
            else:
                self.transport.sendto(data, self.relay)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    # SIPp 3.6 answers only MD5 challenges, and only the first one it reads.
    srv = await start_server(tmp_path / "pbx", sip={"auth_algorithms": ["MD5", "SHA-256"]})
    yield srv
    assert await srv.stop() == 0


async def echoing_phone(server: Server, tmp_path: Path, ext: str, sdp_port: int | None = None, media_port: int = 0) -> SippProcess:
    """A SIPp UAS registered as ``ext`` that echoes RTP; its SDP names
    ``sdp_port`` instead of its own media port when given."""
    scenario = BENCH_SCENARIOS / "uas_echo.xml"
    if sdp_port is not None:
        text = scenario.read_text()
        assert "m=audio [media_port] " in text
        scenario = tmp_path / f"uas_echo_{ext}.xml"
        scenario.write_text(text.replace("m=audio [media_port] ", f"m=audio {sdp_port} "))
    port = free_port()
    reg = await run_sipp(
        BENCH_SCENARIOS / "register.xml", server.sip, local_port=port, service=ext, extra=["-au", ext, "-ap", PASSWORDS[ext]], timeout=10
    )
    assert reg.ok, reg.report()
    return await start_sipp(scenario, local_port=port, media_port=media_port, extra=["-rtp_echo"])


def leg_reports(server: Server, start: int) -> list[dict[str, str]]:
    return [m.groupdict() for line in server.log[start:] if (m := LEG_LINE.search(line))]


async def test_a_leg_losing_every_tenth_packet_scores_a_lower_mos(server: Server, tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    media_port = free_media_port()
    _, forwarder = await loop.create_datagram_endpoint(
        lambda: LossyForwarder(("127.0.0.1", media_port), DROP_EVERY), local_addr=("127.0.0.1", 0)
    )
    forwarder_port = forwarder.transport.get_extra_info("sockname")[1]
    clean = await echoing_phone(server, tmp_path, "1002")
    lossy = await echoing_phone(server, tmp_path, "1003", sdp_port=forwarder_port, media_port=media_port)
    try:
        mark = len(server.log)
        callers = await asyncio.gather(
            *(
                run_sipp(
                    "uac_pcap", server.sip, service=callee, timeout=20,
                    # SIPp's digest uri is sip:HOST:PORT unless told: the PBX wants the Request-URI.
                    extra=["-au", "1001", "-ap", PASSWORDS["1001"], "-auth_uri", f"{callee}@{server.sip}", "-set", "duration", str(CALL_MS)],
                )  # fmt: skip
                for callee in ("1002", "1003")
            )
        )
        for result in callers:
            assert result.ok, result.report()
        # _end logs each leg's line, then emits the event the metrics count.
        async with asyncio.timeout(10):
            while len(leg_reports(server, mark)) < 4:
                await server.wait_log(r"event=leg_quality", start=len(server.log))
    finally:
        for uas in (clean, lossy):
            await uas.stop(grace=0)
        forwarder.transport.close()

    legs = leg_reports(server, mark)
    assert len(legs) == 4, legs
    assert forwarder.dropped >= 5, "the forwarder saw too little RTP to mean anything"
    lossy_legs = [leg for leg in legs if int(leg["lost"]) > 0]
    assert len(lossy_legs) == 1, legs
    lossy_leg = lossy_legs[0]
    clean_legs = [leg for leg in legs if leg is not lossy_leg]
    assert lossy_leg["leg"] == "b" and lossy_leg["codec"] == "PCMA"
    assert abs(int(lossy_leg["lost"]) - forwarder.dropped) <= 1, (lossy_leg, forwarder.dropped)
    assert int(lossy_leg["lost"]) / (int(lossy_leg["packets"]) + int(lossy_leg["lost"])) == pytest.approx(0.1, abs=0.02)
    assert all(int(leg["packets"]) > 50 for leg in legs), legs
    assert float(lossy_leg["mos"]) < 3.8
    assert all(float(leg["mos"]) > 4.2 for leg in clean_legs), legs

    _, text = await server.http("/metrics")
    samples = {
        (s.name, s.labels.get("le")): s.value
        for family in text_string_to_metric_families(text)
        if family.name in ("pbx_call_mos", "pbx_rtp_packets_lost")
        for s in family.samples
    }
    assert samples[("pbx_call_mos_count", None)] == 4  # one per finished leg
    assert samples[("pbx_call_mos_sum", None)] == pytest.approx(sum(float(leg["mos"]) for leg in legs), abs=0.02)
    assert samples[("pbx_call_mos_bucket", "3.0")] == 0
    assert samples[("pbx_call_mos_bucket", "4.0")] == 1  # the lossy leg, about 3.4-3.5
    assert samples[("pbx_call_mos_bucket", "4.2")] == 1
    assert samples[("pbx_call_mos_bucket", "4.5")] == 4
    assert samples[("pbx_rtp_packets_lost_total", None)] == int(lossy_leg["lost"])
    assert abs(samples[("pbx_rtp_packets_lost_total", None)] - forwarder.dropped) <= 1
