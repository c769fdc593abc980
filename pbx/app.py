"""The composition root: builds every service once and hands each what it needs.

Lifetimes hang off the aiohttp application's ``cleanup_ctx`` (STYLE §7), so
shutdown runs in reverse order of start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import math
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web
from aiosipua import SipRequest

from pbx.config.load import load_config
from pbx.config.model import Config, ConfigError
from pbx.events import EventBus
from pbx.http.api import add_api
from pbx.http.services import AdminServices
from pbx.http.server import make_http_app
from pbx.ivr.flows import load_flows
from pbx.ivr.nodes import Flow as IvrFlow
from pbx.live.feed import EventFeed
from pbx.live.webhooks import Webhooks
from pbx.media.prompts import PromptLibrary
from pbx.media.clock import MediaClock
from pbx.media.moh import MusicOnHold
from pbx.media.ports import RtpPortPool
from pbx.media.relay_worker import RelayWorker
from pbx.metrics import Metrics
from pbx.queues.service import QueueService
from pbx.recordings.recorder import Recorder
from pbx.sip.auth import AddressGuard, DigestAuthenticator
from pbx.calls.click_to_call import ClickToCalls
from pbx.calls.service import CallService
from pbx.sip.blf import BusyLamps
from pbx.sip.mwi import MessageWaiting
from pbx.sip.qualify import Qualifier
from pbx.sip.registrar import Registrar
from pbx.sip.stack import SipStack
from pbx.sip.subscriptions import EventRouter
from pbx.sip.transactions import ServerTransaction
from pbx.sip.tls import client_context, server_context
from pbx.sip.transport import Flow
from pbx.sip.trunks import TrunkRegistration
from pbx.store.db import Store
from pbx import systemd
from pbx.voicemail.service import VoicemailService
from pbx.yamlfile import ConfigIssue

logger = logging.getLogger(__name__)

DRAIN_PROGRESS_INTERVAL = 5.0  # seconds between "draining" lines while the count stays put


class Pbx:
    """Every long-lived service of one running server."""

    def __init__(self, config: Config, prompts: PromptLibrary, flows: dict[str, IvrFlow]) -> None:
        self.config = config
        self.events = EventBus()
        self.metrics = Metrics(self.events)
        self.feed = EventFeed(self.events)
        self.webhooks = Webhooks(config=lambda: self.config, feed=self.feed, events=self.events, http=self.http)
        self.store = Store(config.storage.db)
        host = advertised_host(config)
        self.stack = SipStack(events=self.events, advertised_host=host, user_agent=config.sip.user_agent)
        self.authenticator = DigestAuthenticator(config.sip.domain, algorithms=config.sip.auth_algorithms, algorithms_of=self._auth_algorithms)
        self.guard = AddressGuard(events=self.events)
        self.stack.is_blocked = self.guard.is_banned
        self.registrar = Registrar(
            self._password, self.store, self.authenticator, self.guard, self.events, max_contacts=self._max_contacts
        )
        self.clock = MediaClock()
        self.ports = RtpPortPool(config.rtp.ip, config.rtp.port_min, config.rtp.port_max)
        self.prompts, self.flows = prompts, flows
        # One reload at a time: an earlier one whose files read slower never swaps in over a later one.
        self._reloading = asyncio.Lock()
        self._http: aiohttp.ClientSession | None = None
        media_ip = config.sip.external_ip or (config.rtp.ip if not _wildcard(config.rtp.ip) else host)
        self.calls = CallService(
            config=lambda: self.config,
            stack=self.stack,
            registrar=self.registrar,
            authenticator=self.authenticator,
            guard=self.guard,
            ports=self.ports,
            store=self.store,
            events=self.events,
            media_ip=media_ip,
            clock=self.clock,
            flows=lambda: self.flows,
            prompts=lambda: self.prompts,
            http=self.http,
        )
        # One stream per class for queues and holds alike.
        moh = self.calls.dialer.music = MusicOnHold(self.clock, lambda: self.prompts)
        self.queues = QueueService(
            config=lambda: self.config,
            calls=self.calls,
            registrar=self.registrar,
            store=self.store,
            events=self.events,
            moh=moh,
            prompts=lambda: self.prompts,
        )
        self.calls.answering.queues = self.queues
        self.click_to_call = ClickToCalls(self.calls, self.calls.journal, lambda: self.config)
        self.mwi = MessageWaiting(
            config=lambda: self.config,
            stack=self.stack,
            registrar=self.registrar,
            authenticator=self.authenticator,
            guard=self.guard,
            store=self.store,
            events=self.events,
        )
        self.registrar.on_bound = self.mwi.registered
        self.blf = BusyLamps(
            config=lambda: self.config,
            stack=self.stack,
            passwords=self.registrar.passwords,
            authenticator=self.authenticator,
            guard=self.guard,
            events=self.events,
        )
        self.subscribe = EventRouter(self.mwi.subscriptions, self.blf.subscriptions)
        self.qualifier = Qualifier(lambda: self.config, self.stack, self.registrar)
        self.metrics.watch_trunks(self.qualifier.trunks_up)
        self.voicemail = VoicemailService(
            config=lambda: self.config, store=self.store, events=self.events, clock=self.clock, guard=self.guard
        )
        self.voicemail.mwi = self.mwi
        self.calls.answering.voicemail = self.voicemail
        self.recorder = Recorder(config=lambda: self.config, store=self.store, events=self.events, clock=self.clock)
        self.calls.recording.recorder = self.recorder
        self.metrics.watch_voicemail(lambda: self.voicemail.counts)
        self.queues.voicemail_work.mark_heard = self.voicemail.mark_heard
        self.metrics.watch_voicemail_overdue(self.queues.voicemail_work.overdue)
        self.metrics.watch_queues(self.queues.snapshot)
        self.stack.on_request = self._on_request
        self.stack.on_stray_response = self.calls.midcall.stray_response
        self.trunks: list[TrunkRegistration] = []

    def admin(self) -> AdminServices:
        """What the admin API works with (pbx.http.api.add_api)."""
        return AdminServices(
            config=lambda: self.config,
            calls=self.calls,
            click_to_call=self.click_to_call,
            registrar=self.registrar,
            queues=self.queues,
            voicemail=self.voicemail,
            recorder=self.recorder,
            store=self.store,
            prompts=lambda: self.prompts,
            flows=lambda: self.flows,
            reload=self.reload,
            feed=self.feed,
        )

    def _password(self, extension: str) -> str | None:
        ext = self.config.extensions.get(extension)
        return ext.password if ext else None

    def _max_contacts(self, extension: str) -> int:
        ext = self.config.extensions.get(extension)
        return ext.max_contacts if ext else 0

    def _auth_algorithms(self, extension: str) -> tuple[str, ...] | None:
        ext = self.config.extensions.get(extension)
        return ext.auth_algorithms if ext else None

    def _on_request(self, request: SipRequest, flow: Flow, txn: ServerTransaction) -> None:
        if request.method.upper() == "REGISTER":
            self.stack.spawn(txn, self._register(request, flow, txn))
        elif request.method.upper() == "SUBSCRIBE":
            self.subscribe.handle_subscribe(request, flow, txn)
        else:
            self.calls.handle_request(request, flow, txn)

    async def _register(self, request: SipRequest, flow: Flow, txn: ServerTransaction) -> None:
        txn.respond(await self.registrar.handle_register(request, flow.addr, flow.name))

    def http(self) -> aiohttp.ClientSession:
        """The HTTP client the IVR's http nodes share."""
        if self._http is None:
            self._http = aiohttp.ClientSession()
        return self._http

    async def start(self) -> None:
        await self.store.open()
        await self.calls.journal.start()  # calls cut by a dead process get their rows before anything is served
        await self.calls.forwarding.settings.load()  # do-not-disturb and forwarding that phones set
        await self.recorder.start()
        await self.registrar.load()
        # Before SIP listens: no call may take a port that still hears a call of a process before this one.
        await self.ports.sweep()
        # One relay process per core: a call's sides share one, calls spread over them all.
        self.ports.relay_workers = [RelayWorker() for _ in range(os.cpu_count() or 1)]
        for worker in self.ports.relay_workers:
            worker.start()
        tls = self.config.sip.tls
        # Checked by load_config; the contexts serve every tls: listener.
        server_ssl = server_context(tls.cert, tls.key) if tls is not None else None
        client_ssl = client_context(tls.ca) if tls is not None else None
        for listen in self.config.sip.listen:
            await self.stack.listen(listen.transport, listen.host, listen.port, server_ssl=server_ssl, client_ssl=client_ssl)
        self.clock.start()
        self.calls.watchdog.start()
        self._start_trunks()
        self.registrar.start()
        self.qualifier.start()
        await self.queues.start()
        await self.voicemail.start()
        logger.info("pbx is up: %d extensions, %d trunks", len(self.config.extensions), len(self.config.trunks))

    async def drain(self, interrupted: asyncio.Event) -> None:
        """Stop taking calls (new INVITEs get 503) and let the calls in
        progress finish, for up to ``sip.drain_timeout`` seconds or until
        ``interrupted`` is set (a second SIGTERM or SIGINT). Registrations,
        OPTIONS and in-dialog requests are still answered meanwhile; queued
        callers may still reach an agent. :meth:`stop` hangs up the rest."""
        limit = self.config.sip.drain_timeout
        self.calls.drain(limit)
        changed = asyncio.Event()
        self.events.subscribe("call_ended", lambda **_: changed.set())
        loop = asyncio.get_running_loop()
        start = loop.time()
        left = len(self.calls.calls)
        if not left:
            logger.info("draining: no calls in progress")
            return
        logger.info("draining: %d calls in progress, up to %d s", left, limit)
        while left:
            remaining = start + limit - loop.time()
            if remaining <= 0:
                logger.info("draining: %d calls still in progress after %d s; hanging them up", left, limit)
                return
            changed.clear()
            waits = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(interrupted.wait())]
            try:
                await asyncio.wait(waits, timeout=min(remaining, DRAIN_PROGRESS_INTERVAL), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
            if interrupted.is_set():
                logger.warning("draining interrupted: hanging up %d calls now", len(self.calls.calls))
                return
            left = len(self.calls.calls)
            if left:
                logger.info("draining: %d calls in progress, %d s left", left, math.ceil(start + limit - loop.time()))
        logger.info("draining: every call has finished after %.1f s", loop.time() - start)

    async def stop(self) -> None:
        """Hang up the calls left after :meth:`drain` (their CDR rows and
        recordings finished), then stop every service in reverse order of start."""
        await self.click_to_call.close()  # a `from` still ringing: stopped, with its CDR row
        await self.calls.stop()
        await self.mwi.stop()
        await self.blf.stop()
        await self.queues.stop()
        # Again: callbacks the queues gave up while an agent's phone rang left CDR rows to write.
        await self.calls.stop()
        await self.voicemail.stop()
        await self.recorder.stop()
        await self.qualifier.stop()
        await self.webhooks.stop()
        await self.registrar.stop()
        for trunk in self.trunks:
            await trunk.stop()
        await self.clock.stop()
        for worker in self.ports.relay_workers:
            await worker.stop()
        self.ports.close()
        if self._http is not None:
            await self._http.close()
        await self.stack.close()
        await self.calls.journal.stop()
        await self.store.close()

    def _start_trunks(self) -> None:
        self.trunks = [TrunkRegistration(self.stack, t) for t in self.config.trunks.values() if t.register]
        for trunk in self.trunks:
            trunk.start()

    async def reload(self) -> list[ConfigIssue]:
        """Load pbx.yaml and the flows again; on any error keep what runs.
        Calls already in a flow finish on the version they started with.
        Returns the issues that kept the old configuration: none when it took.

        The files are read and validated in a worker thread: a large flow set
        takes the better part of a second, and on the loop that would stop
        every call's media clock for as long (STYLE §4). Only the swap runs
        on the loop."""
        async with self._reloading:
            try:
                new, prompts, flows = await asyncio.to_thread(load_setup, self.config.path)
            except ConfigError as exc:
                for issue in exc.issues:
                    logger.error("reload refused: %s", issue)
                self.events.emit("config_reload_failed", errors=len(exc.issues))
                return exc.issues
            old = self.config
            # rtp.timeout and rtp.hold_timeout are read at each look, so they take effect at once.
            new_rtp = dataclasses.replace(new.rtp, timeout=old.rtp.timeout, hold_timeout=old.rtp.hold_timeout)
            if new.sip.listen != old.sip.listen or new.sip.tls != old.sip.tls or new_rtp != old.rtp:
                logger.warning("sip.listen, sip.tls and rtp changes take effect at the next restart")
            if new.http.token != self.config.http.token:
                logger.info("http.token changed: the old admin token is refused from now on")
            self.config = new
            self.flows = flows
            self.prompts = prompts
            self.authenticator.realm = new.sip.domain
            self.authenticator.algorithms = new.sip.auth_algorithms
            for trunk in self.trunks:
                await trunk.stop()
            self._start_trunks()
            logger.info("configuration reloaded from %s", new.path)
            return []

    async def healthy(self) -> bool:
        return bool(self.stack.transports) and await self.store.ping()

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        await self.start()
        yield
        await self.stop()


async def serve(config: Config, prompts: PromptLibrary, flows: dict[str, IvrFlow]) -> int:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the configuration."""
    pbx = Pbx(config, prompts, flows)
    # The token is read per request: a reload that changes it takes effect at once.
    app = make_http_app(lambda: pbx.config.http.token, pbx.metrics, pbx.healthy, pbx.events)
    add_api(app, pbx.admin())
    app.cleanup_ctx.append(pbx.lifetime)
    runner = web.AppRunner(app, access_log=None)
    try:
        await runner.setup()
        await web.TCPSite(runner, config.http.host, config.http.port).start()
    except OSError as exc:
        logger.error("cannot start: %s", exc)
        await runner.cleanup()
        return 1
    # The first SIGTERM or SIGINT drains (new calls get 503, calls in progress
    # go on for up to sip.drain_timeout); a second one cuts the drain short.
    stop, interrupted = asyncio.Event(), asyncio.Event()

    def on_stop_signal(sig: signal.Signals) -> None:
        logger.info("%s received%s", sig.name, ": stopping now" if stop.is_set() else "")
        (interrupted if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(pbx.reload()))
    logger.info("admin HTTP on %s:%d", config.http.host, config.http.port)
    steady_garbage_collection()
    # SIP and HTTP listen by now (pbx.start ran in runner.setup): systemd may count us as started.
    pings = systemd.start_watchdog()
    systemd.notify("READY=1", f"STATUS=up: {len(config.extensions)} extensions, {len(config.trunks)} trunks")
    await stop.wait()
    systemd.notify("STOPPING=1", "STATUS=stopping: draining calls")
    await pbx.drain(interrupted)
    logger.info("stopping")
    await runner.cleanup()
    if pings is not None:
        pings.cancel()
    return 0


def steady_garbage_collection() -> None:
    """Keep the garbage collector's pauses short once the server is up.

    A full collection walks every object that lived long enough, and stops
    the loop meanwhile. By default one came every 5 s at 100 calls a second
    and walked what start-up built (config, flows, prompts: some 66,000
    objects) and 75,000 objects of garbage: 150-220 ms, so RTP skipped 10
    ticks and INVITEs waited. Frozen, what start-up built is never walked
    again, and a full collection every second (after 2 middle ones, not 10)
    has a fifth of the garbage: 20-35 ms. Most of that garbage was whole
    calls kept by reference cycles, broken now where the call ends: a
    cancelled task's exception, whose traceback held the task's frames
    (pbx.tasks); a leg's session timer, holding the leg's methods; a relay
    side's key listener, holding the call; a recording's taps, holding the
    recording. What is left of an ended call in cycles is its relay's two
    sides, about 40 objects."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 2)


def load_setup(path: Path) -> tuple[Config, PromptLibrary, dict[str, IvrFlow]]:
    """pbx.yaml, its prompt library and every flow of ``ivr.dir``, as
    `pbx check`, `pbx serve` and a reload see them: ConfigError with every
    issue when anything is broken."""
    config = load_config(path, require_token=True)
    prompts = PromptLibrary(config.sounds.dir, config.sounds.tts, config.storage.data_dir / "cache")
    flows, issues = load_flows(config.ivr.dir, config, prompts.exists)
    if issues:
        raise ConfigError(issues)
    return config, prompts, flows


def advertised_host(config: Config) -> str:
    """The address we write in Via, Contact and SDP: external_ip, a bound
    address, or the one the host routes from."""
    if config.sip.external_ip:
        return config.sip.external_ip
    for listen in config.sip.listen:
        if not _wildcard(listen.host):
            return listen.host
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only asks the routing table
        return str(probe.getsockname()[0])
    return "127.0.0.1"


def _wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")
