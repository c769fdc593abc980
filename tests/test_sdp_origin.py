"""Our SDP's origin line over a session (RFC 3264 §8): one session id, a
version that moves exactly when the description does. So a 200 after early
media repeats its 183's SDP, and a hold answer says it changed."""

from __future__ import annotations

from pbx.calls.bridge import Bridge
from pbx.events import EventBus
from pbx.media.clock import MediaClock
from pbx.media.ports import RtpPortPool
from pbx.media.srtp import SrtpSides
from pbx.sip.sdp import SdpCodec, SdpOrigin, parse_media
from tests.support.server import free_udp_block

PCMU = SdpCodec("PCMU", 0)


def origin_of(body: str) -> tuple[str, str]:
    """The session id and version of a body's o= line."""
    fields = next(line for line in body.splitlines() if line.startswith("o=")).split()
    return fields[1], fields[2]


def peer_sdp(port: int, direction: str = "sendrecv") -> str:
    return (
        "v=0\r\no=peer 7 7 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na={direction}\r\n"
    )


def test_the_version_moves_only_when_the_description_does() -> None:
    origin = SdpOrigin()
    first = origin.describe("192.0.2.1", 10000, (PCMU,), 101)
    again = origin.describe("192.0.2.1", 10000, (PCMU,), 101)
    held = origin.describe("192.0.2.1", 10000, (PCMU,), 101, "sendonly")
    resumed = origin.describe("192.0.2.1", 10000, (PCMU,), 101)
    assert again == first
    session = origin_of(first)[0]
    assert [origin_of(body) for body in (first, held, resumed)] == [(session, "1"), (session, "2"), (session, "3")]


async def test_a_200_after_early_media_repeats_the_183s_sdp() -> None:
    base = free_udp_block(4)
    pool = RtpPortPool("127.0.0.1", base, base + 3)
    bridge = Bridge(parse_media(peer_sdp(30000), ("PCMU",)), SrtpSides("off"), "127.0.0.1", ("PCMU",))
    relay = await bridge.open(pool, MediaClock(), EventBus())
    try:
        early = bridge.join(peer_sdp(31000), "127.0.0.1", "127.0.0.1")  # the callee's 183
        answered = bridge.join(peer_sdp(31000), "127.0.0.1", "127.0.0.1")  # its 200, the same SDP
        assert answered == early
        assert origin_of(early)[1] == "1"
    finally:
        relay.close()
