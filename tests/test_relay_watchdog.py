"""A relay process that stops answering (stopped, stuck) is found out by the
server: a call's end waits for it once, not at every call, and after
``HUNG_AFTER`` it is killed, its calls' audio goes through the server, and a
new process takes the calls that begin after it.

The hang is real: the process gets SIGSTOP, so it neither reads its sockets
nor closes them, as one stuck in a loop would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest

from pbx.media import relay_worker
from pbx.media.clock import MediaClock
from pbx.media.codecs import PCMU, TELEPHONE_EVENT
from pbx.media.ports import RtpPortPool
from pbx.media.relay import RtpRelay
from pbx.media.relay_worker import RelayWorker
from tests.support.rtp_peer import until
from tests.test_media import HOST, Peer, free_range, open_peer, rtp
from tests.test_relay_process import reading


@pytest.fixture
async def worker() -> AsyncIterator[RelayWorker]:
    worker = RelayWorker()
    worker.start()
    yield worker
    process = worker._process
    if process is not None and process.poll() is None:
        os.kill(process.pid, signal.SIGCONT)
    await worker.stop()


@pytest.fixture
async def pool(worker: RelayWorker) -> RtpPortPool:
    low, high = free_range(8)
    pool = RtpPortPool(HOST, low, high)
    pool.relay_workers = [worker]
    return pool


@pytest.fixture
async def relay(pool: RtpPortPool, clock: MediaClock) -> AsyncIterator[RtpRelay]:
    relay = await RtpRelay.create(pool, clock)
    yield relay
    relay.close()


async def test_a_hung_relay_process_is_killed_and_its_calls_go_on_in_the_server(
    monkeypatch: pytest.MonkeyPatch, worker: RelayWorker, pool: RtpPortPool, clock: MediaClock, relay: RtpRelay, peers: tuple[Peer, Peer]
) -> None:
    monkeypatch.setattr(relay_worker, "PING_INTERVAL", 0.05)
    monkeypatch.setattr(relay_worker, "HUNG_AFTER", 0.5)
    monkeypatch.setattr(relay_worker, "RESTART_DELAY", 0.2)
    a, b = peers
    a.send(rtp(0, seq=1), relay.a.port)
    await b.recv()
    hung = worker._process
    assert hung is not None and reading(relay) == [False, False]
    os.kill(hung.pid, signal.SIGSTOP)
    a.send(rtp(0, seq=2), relay.a.port)  # waits in the socket the stopped process no longer reads

    data, _ = await b.recv(timeout=3)  # the server reads the socket again, the packet waited there
    assert data[2:4] == (2).to_bytes(2)
    assert reading(relay) == [True, True]
    await until(lambda: hung.poll() is not None)
    assert hung.returncode == -signal.SIGKILL

    await until(lambda: worker.running and worker._process is not hung, timeout=3)
    later = await RtpRelay.create(pool, clock)  # a call that begins now goes to the new process
    c, d = await open_peer(), await open_peer()
    try:
        later.a.set_remote(c.addr, PCMU, TELEPHONE_EVENT.payload_type)
        later.b.set_remote(d.addr, PCMU, TELEPHONE_EVENT.payload_type)
        for seq in (1, 2):
            c.send(rtp(0, seq=seq), later.a.port)
            await d.recv()
        assert reading(later) == [False, False]
        assert later.stats()["a_to_b"]["relayed"] == 2
    finally:
        later.close()
        c.transport.close()
        d.transport.close()


async def test_call_ends_wait_for_a_stopped_relay_process_once_not_at_every_call(
    monkeypatch: pytest.MonkeyPatch, worker: RelayWorker, pool: RtpPortPool, clock: MediaClock
) -> None:
    monkeypatch.setattr(relay_worker, "SETTLE_TIMEOUT", 0.5)
    calls = [await RtpRelay.create(pool, clock) for _ in range(3)]
    assert worker._process is not None
    os.kill(worker._process.pid, signal.SIGSTOP)

    took = []
    for call in calls:
        start = time.monotonic()
        call.close()
        took.append(time.monotonic() - start)

    assert took[0] >= 0.5  # the first end waits: the last counts may still come
    assert max(took[1:]) < 0.25  # the process is known late: the others do not


async def test_the_server_stops_with_a_stopped_relay_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_worker, "HUNG_AFTER", 0.3)
    worker = RelayWorker()
    worker.start()
    process = worker._process
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)  # it will not see our end close

    async with asyncio.timeout(5):
        await worker.stop()

    assert process.returncode == -signal.SIGKILL
