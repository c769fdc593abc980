"""Qualify, as Asterisk calls it: an OPTIONS to every registered contact and
every trunk each ``sip.qualify_seconds``, so that a phone that vanished
without unregistering is no longer rung and a trunk that stopped answering
shows in ``pbx_trunk_up``.

Any final response is an answer, a 404 or a 405 too: something is there,
which is all qualify asks (Asterisk's counts them alike). An OPTIONS left
unanswered for :data:`TIMEOUT` seconds makes its target unreachable until
one is answered again; a contact also comes back at once when it registers
again. The registrar keeps each contact's state (:meth:`Registrar.qualified`),
this module each trunk's.

One loop asks everyone, with a callback per request and no task per contact
(a trunk gets one while its name resolves or its TLS connection opens): each
round takes the targets of the moment and spreads their OPTIONS evenly over
the interval, so thousands of contacts are not all asked in the same
millisecond, and no target has two OPTIONS out at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiosipua import SipResponse

from pbx.config.model import Config, Trunk
from pbx.sip.registrar import Registrar
from pbx.sip.stack import SipStack
from pbx.sip.transport import Flow
from pbx.tasks import Background

logger = logging.getLogger(__name__)

# Seconds an OPTIONS may go unanswered before its target is unreachable:
# Asterisk's qualify_timeout default. Capped at the interval, so a round's
# OPTIONS is answered or given up before the next round asks again.
TIMEOUT = 3.0
IDLE_CHECK = 5.0  # seconds between looks at sip.qualify_seconds while it is 0

# ("contact", extension, contact URI) or ("trunk", trunk name, "")
Target = tuple[str, str, str]
Answered = Callable[[float | None], None]  # the round trip in seconds, or None: no answer


class Qualifier:
    """Asks every registered contact and every trunk whether it is there."""

    def __init__(self, config: Callable[[], Config], stack: SipStack, registrar: Registrar) -> None:
        self._config = config
        self._stack = stack
        self._registrar = registrar
        self._trunks: dict[str, bool] = {}  # by name: answered its last OPTIONS
        self._asking: set[Target] = set()
        self._tasks = Background("qualify")

    def trunks_up(self) -> dict[str, bool]:
        """Whether each trunk answered its last OPTIONS; a trunk not asked
        yet, or while qualify is off, is absent: nobody knows."""
        return dict(self._trunks)

    def start(self) -> None:
        self._tasks.spawn(self._run())

    async def stop(self) -> None:
        await self._tasks.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        # The first round waits one interval: bindings just loaded or
        # registered and trunks just configured need no question yet.
        await asyncio.sleep(self._config().sip.qualify_seconds or IDLE_CHECK)
        while True:
            period = self._config().sip.qualify_seconds
            if not period:
                # Contacts found unreachable stay so until they register again.
                self._trunks.clear()
                await asyncio.sleep(IDLE_CHECK)
                continue
            started = loop.time()
            targets = self._targets()
            for index, target in enumerate(targets):
                await asyncio.sleep(max(0.0, started + period * index / len(targets) - loop.time()))
                if target in self._asking:
                    continue
                try:
                    self._ask(target, min(TIMEOUT, period))
                except Exception:  # one target's failure must not stop the others' questions
                    logger.exception("qualify: asking %s failed", target)
            await asyncio.sleep(max(0.0, started + period - loop.time()))

    def _targets(self) -> list[Target]:
        trunks = self._config().trunks
        for name in [name for name in self._trunks if name not in trunks]:
            del self._trunks[name]  # a reload removed it
        contacts = [("contact", b.extension, b.contact) for b in self._registrar.all_bindings()]
        return [("trunk", name, "") for name in trunks] + contacts

    def _ask(self, target: Target, timeout: float) -> None:
        """Send ``target`` its OPTIONS, if it is still there to ask."""
        kind, name, contact = target
        if kind == "contact":
            binding = self._registrar.binding(name, contact)
            if binding is None:
                return
            try:
                transport = self._stack.transport(binding.transport)
            except LookupError:
                return
            # Where the REGISTER came from: behind NAT, the binding its REGISTERs keep open.
            flow = Flow(transport, binding.source)
            self._send(target, flow, binding.contact, timeout, lambda rtt: self._registrar.qualified(binding, rtt))
            return
        trunk = self._config().trunks.get(name)
        if trunk is not None:
            self._asking.add(target)
            self._tasks.spawn(self._ask_trunk(target, trunk, timeout))

    async def _ask_trunk(self, target: Target, trunk: Trunk, timeout: float) -> None:
        name = trunk.name
        try:
            async with asyncio.timeout(timeout):  # a name to resolve, a TLS connection to open
                flow = await self._stack.flow_to(trunk.host, trunk.port, trunk.transport)
        except (OSError, LookupError, TimeoutError) as exc:
            self._asking.discard(target)
            self._trunk_answered(name, None, f"unreachable: {str(exc) or 'timeout'}")
            return
        params = f";transport={trunk.transport}" if trunk.transport != "udp" else ""
        uri = f"sip:{trunk.host}:{trunk.port}{params}"
        self._send(target, flow, uri, timeout, lambda rtt: self._trunk_answered(name, rtt, f"no answer within {timeout:g} s"))

    def _send(self, target: Target, flow: Flow, uri: str, timeout: float, answered: Answered) -> None:
        request = self._stack.out_of_dialog("OPTIONS", uri, uri, flow, self._config().sip.domain)
        request.headers.set_single("Accept", "application/sdp")
        request.headers.set_single("User-Agent", self._stack.user_agent)
        loop = asyncio.get_running_loop()
        sent = loop.time()

        def on_response(response: SipResponse) -> None:
            if response.status_code < 200:
                return
            self._asking.discard(target)
            # The transaction's own 408 on timeout leaves its final_response unset.
            answered(loop.time() - sent if txn.final_response is not None else None)

        self._asking.add(target)
        txn = self._stack.request(request, flow, on_response, timeout=timeout)

    def _trunk_answered(self, name: str, rtt: float | None, why: str) -> None:
        if name not in self._config().trunks:
            return  # removed by a reload while its OPTIONS was out
        up = rtt is not None
        if self._trunks.get(name) != up:
            if rtt is not None:
                logger.info("trunk %s: up (answers OPTIONS in %.0f ms)", name, rtt * 1000)
            else:
                logger.warning("trunk %s: down (%s)", name, why)
        self._trunks[name] = up
