"""Fixtures the media tests share: pytest hands them to any test that names
them, and a module's own fixture of the same name wins (test_moh's clock)."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator

import pytest

from pbx.media.clock import MediaClock
from pbx.media.codecs import PCMU, TELEPHONE_EVENT
from pbx.media.ports import RtpPortPool
from pbx.media.relay import RtpRelay
from tests.support.rtp_peer import HOST, RtpPhone, open_phone
from tests.test_media import Peer, free_range, open_peer


@pytest.fixture
def no_collector() -> Iterator[None]:
    """The garbage collector off: what the test frees, reference counting alone freed."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


@pytest.fixture
async def clock() -> AsyncIterator[MediaClock]:
    """The real media clock, running."""
    clock = MediaClock()
    clock.start()
    yield clock
    await clock.stop()


@pytest.fixture
async def relay(clock: MediaClock) -> AsyncIterator[RtpRelay]:
    """A relay on free loopback ports, its sides ticked by ``clock``."""
    low, high = free_range(4)
    relay = await RtpRelay.create(RtpPortPool(HOST, low, high), clock)
    yield relay
    relay.close()


@pytest.fixture
async def phones() -> AsyncIterator[tuple[RtpPhone, RtpPhone]]:
    """Two fake phones' RTP sockets, A's and B's."""
    a, b = await open_phone(), await open_phone()
    yield a, b
    a.transport.close()
    b.transport.close()


@pytest.fixture
async def peers(relay: RtpRelay) -> AsyncIterator[tuple[Peer, Peer]]:
    """Phone a on side a, phone b on side b of the test's ``relay``, both with PCMU and DTMF."""
    a, b = await open_peer(), await open_peer()
    relay.a.set_remote(a.addr, PCMU, TELEPHONE_EVENT.payload_type)
    relay.b.set_remote(b.addr, PCMU, TELEPHONE_EVENT.payload_type)
    yield a, b
    a.transport.close()
    b.transport.close()
