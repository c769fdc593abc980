"""SRTP at the relay's socket edge, with real UDP sockets on loopback.

The peers protect and unprotect with pylibsrtp under the keys exchanged as
SDES would (``a=crypto`` lines), never through the code under test; forged and
replayed packets are sent at the relay as an attacker on the path would.
"""

from __future__ import annotations

import base64
import os
import struct
from collections.abc import AsyncIterator

import pylibsrtp
import pytest
from aiortp import RtpPacket

from pbx.media.clock import MediaClock
from pbx.media.codecs import PCMU
from pbx.media.ports import RtpPortPool
from pbx.media.relay import RtpRelay
from pbx.media.srtp import SdesSession, SrtpSides, parse_crypto
from tests.support.server import free_udp_block
from tests.test_media import HOST, Peer, free_range, open_peer, rtp


def crypto_line(key: bytes, tag: int = 1, suite: str = "AES_CM_128_HMAC_SHA1_80") -> str:
    return f"{tag} {suite} inline:{base64.b64encode(key).decode()}"


def sender(key: bytes) -> pylibsrtp.Session:
    return pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND))


def receiver(key: bytes) -> pylibsrtp.Session:
    return pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND))


@pytest.fixture
async def relay() -> AsyncIterator[RtpRelay]:
    low, high = free_range(4)
    clock = MediaClock()
    clock.start()
    relay = await RtpRelay.create(RtpPortPool(HOST, low, high), clock)
    yield relay
    relay.close()
    await clock.stop()


@pytest.fixture
async def peers() -> AsyncIterator[tuple[Peer, Peer]]:
    a, b = await open_peer(), await open_peer()
    yield a, b
    a.transport.close()
    b.transport.close()


def srtp_side_a(relay: RtpRelay, peer_key: bytes) -> SdesSession:
    """Side a negotiated SRTP: the peer offered ``peer_key``, we answered with ours."""
    session = SdesSession(relay.a)
    assert session.accept_offer([crypto_line(peer_key)])
    return session


async def test_srtp_peer_and_plain_peer_hear_each_other_through_the_relay(relay: RtpRelay, peers: tuple[Peer, Peer]) -> None:
    a, b = peers
    a_key = os.urandom(30)
    session = srtp_side_a(relay, a_key)
    relay.a.set_remote(a.addr, PCMU, None, HOST)
    relay.b.set_remote(b.addr, PCMU, None, HOST)
    plain = rtp(0, seq=7, payload=bytes(range(160)))

    a.send(sender(a_key).protect(plain), relay.a.port)
    assert (await b.recv())[0] == plain  # decrypted for the plain leg

    b.send(plain, relay.b.port)
    wire = (await a.recv())[0]
    assert wire != plain and len(wire) == len(plain) + 10  # SRTP with an 80-bit tag
    assert receiver(session.local.key).unprotect(wire) == plain  # under the key we answered with


async def test_both_legs_srtp_each_with_its_own_keys(relay: RtpRelay, peers: tuple[Peer, Peer]) -> None:
    a, b = peers
    a_key, b_key = os.urandom(30), os.urandom(30)
    a_session = srtp_side_a(relay, a_key)
    b_session = SdesSession(relay.b)  # we offered b our key, b answered with its own
    assert b_session.accept_answer([crypto_line(b_key)])
    assert a_session.local.key != b_session.local.key
    relay.a.set_remote(a.addr, PCMU, None, HOST)
    relay.b.set_remote(b.addr, PCMU, None, HOST)
    plain = rtp(0, seq=1, payload=b"\x55" * 160)

    sent = sender(a_key).protect(plain)
    a.send(sent, relay.a.port)
    wire = (await b.recv())[0]
    assert wire != sent  # no pass-through: re-encrypted
    assert receiver(b_session.local.key).unprotect(wire) == plain


async def test_forged_and_replayed_srtp_is_dropped_and_latches_nothing(relay: RtpRelay, peers: tuple[Peer, Peer]) -> None:
    a, b = peers
    attacker = await open_peer()
    try:
        a_key = os.urandom(30)
        srtp_side_a(relay, a_key)
        relay.a.set_remote(a.addr, PCMU, None, HOST)
        relay.b.set_remote(b.addr, PCMU, None, HOST)
        # From the peer's own host (its signalling IP), but without the key: plain RTP
        # with a negotiated payload type, and SRTP under a guessed key.
        attacker.send(rtp(0, seq=1), relay.a.port)
        attacker.send(sender(os.urandom(30)).protect(rtp(0, seq=2)), relay.a.port)
        assert await b.nothing(0.2)
        assert relay.a.source is None

        tx = sender(a_key)
        first = tx.protect(rtp(0, seq=3, payload=b"\x01" * 160))
        a.send(first, relay.a.port)
        assert RtpPacket.parse((await b.recv())[0]).sequence_number == 3
        a.send(first, relay.a.port)  # replayed as captured
        assert await b.nothing(0.2)
        b.send(rtp(0, seq=50), relay.b.port)
        await a.recv()  # answers go to the real peer ...
        assert await attacker.nothing(0.1)  # ... never to the forger
        assert relay.stats()["a_to_b"]["relayed"] == 1
    finally:
        attacker.transport.close()


async def test_prompts_played_to_an_srtp_side_go_out_encrypted(relay: RtpRelay, peers: tuple[Peer, Peer]) -> None:
    a, _ = peers
    session = srtp_side_a(relay, os.urandom(30))
    relay.a.set_remote(a.addr, PCMU, None, HOST)
    frame = bytes(range(160))
    done = relay.a.play([frame] * 3).done
    rx = receiver(session.local.key)
    for _ in range(3):
        wire = (await a.recv())[0]
        assert RtpPacket.parse(rx.unprotect(wire)).payload == frame
    assert await done


def test_crypto_lines_are_read_as_rfc_4568_writes_them() -> None:
    key = os.urandom(30)
    assert parse_crypto(crypto_line(key)) is not None
    assert parse_crypto(crypto_line(key, 2, "AES_CM_128_HMAC_SHA1_32")) is not None
    assert parse_crypto(crypto_line(key) + "|2^31") is not None  # a lifetime
    assert parse_crypto(crypto_line(key) + "|2^31|1:4") is None  # an MKI: not with pylibsrtp
    assert parse_crypto(crypto_line(key) + " UNENCRYPTED_SRTP") is None  # session parameters
    assert parse_crypto(crypto_line(key, suite="AES_256_CM_HMAC_SHA1_80")) is None
    assert parse_crypto(crypto_line(key[:20])) is None
    assert parse_crypto("1 AES_CM_128_HMAC_SHA1_80 inline:not*base64") is None


def test_srtp_modes_decide_which_offers_are_taken() -> None:
    good = [crypto_line(os.urandom(30))]
    assert SrtpSides("optional").refusal(True, good) is None
    assert SrtpSides("optional").refusal(False, []) is None
    assert SrtpSides("mandatory").refusal(False, []) is not None
    assert SrtpSides("mandatory").refusal(True, ["1 F8_128_HMAC_SHA1_80 inline:x"]) is not None
    assert SrtpSides("off").refusal(True, good) is not None
    assert SrtpSides("off").refusal(False, []) is None


async def test_an_answer_must_echo_the_offered_tag_and_suite(relay: RtpRelay) -> None:
    sides = SrtpSides("optional")
    ours = sides.offer(relay.b)
    assert ours is not None and ours.startswith("1 AES_CM_128_HMAC_SHA1_80 inline:")
    assert not sides.take_answer(relay.b, True, [crypto_line(os.urandom(30), tag=2)])
    assert sides.crypto(relay.b) is None
    assert sides.take_answer(relay.b, True, [crypto_line(os.urandom(30))])
    assert sides.crypto(relay.b) == ours
    assert not SrtpSides("mandatory").take_answer(relay.b, False, [])


async def test_rtcp_of_an_srtp_leg_is_srtcp_both_ways(relay: RtpRelay) -> None:
    a_key = os.urandom(30)
    session = srtp_side_a(relay, a_key)
    base_a, base_b = free_udp_block(2, HOST), free_udp_block(2, HOST)
    a_rtp, a_rtcp, b_rtp, b_rtcp = [await open_peer(port) for port in (base_a, base_a + 1, base_b, base_b + 1)]
    try:
        relay.a.set_remote(a_rtp.addr, PCMU, None, HOST)
        relay.b.set_remote(b_rtp.addr, PCMU, None, HOST)
        report = struct.pack("!BBHI", 0x80, 201, 1, 0x1234)  # an empty receiver report
        a_rtcp.send(sender(a_key).protect_rtcp(report), relay.a.port + 1)
        assert (await b_rtcp.recv())[0] == report
        b_rtcp.send(report, relay.b.port + 1)
        wire = (await a_rtcp.recv())[0]
        assert wire != report and receiver(session.local.key).unprotect_rtcp(wire) == report
        a_rtcp.send(sender(os.urandom(30)).protect_rtcp(report), relay.a.port + 1)  # forged
        assert await b_rtcp.nothing(0.2)
    finally:
        for peer in (a_rtp, a_rtcp, b_rtp, b_rtcp):
            peer.transport.close()
