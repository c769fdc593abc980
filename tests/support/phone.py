"""Asyncio driver for test softphones running ``phone_proc.py`` in subprocesses.

Each :class:`Phone` is an independent pjsua2 endpoint (up to 4 calls) bound to
127.0.0.1 on an ephemeral port. Commands are sent as JSON lines; events come
back and are buffered, so :meth:`Phone.wait_event` also finds events that
arrived before it was called::

    async with await Phone.start(name="alice") as alice, await Phone.start(name="bob") as bob:
        call = await alice.call(bob.uri)
        incoming = await bob.wait_event("incoming")
        await bob.answer(incoming["call"])
        await alice.wait_event("call_state", call=call, state="confirmed")

Event shapes (every event also has ``"event": <kind>``):

* ``ready {sip_port, transport}``
* ``reg_state {code, reason, active, expires}``
* ``incoming {call, from, to}``
* ``call_state {call, state, code, reason}``; ``state`` is one of ``calling``,
  ``incoming``, ``early``, ``connecting``, ``confirmed``, ``disconnected``
* ``media {call, active, dir, status, codec, srtp}``; ``dir`` is ``sendrecv``,
  ``sendonly``, ``recvonly`` or ``inactive``; ``status`` is ``active``,
  ``local_hold``, ``remote_hold``, ``none`` or ``error``; ``codec`` is the
  negotiated encoding name (``"PCMU"``, ``"PCMA"``) or None; ``srtp`` is
  True when the stream is RTP/SAVP
* ``dtmf {call, digit}``
* ``xfer_status {call, code, reason, final}`` for each NOTIFY of a transfer
  this phone asked for (:meth:`Phone.xfer`): the sipfrag's status code, and
  whether it was the final one
* ``request {call, method}`` for each request the far end sends in a call's
  dialog (re-INVITE, UPDATE, BYE, ...)
* ``mwi {in_dialog, subscription_state, body, waiting, account, new, old}``
  for each message-summary NOTIFY (RFC 3842), in a subscription
  (``in_dialog``) or unsolicited; ``waiting`` is Messages-Waiting as a bool,
  ``new``/``old`` the Voice-Message counts
* ``error {message}``
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import sys
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.support.audio import dominant_frequency

log = logging.getLogger(__name__)

PHONE_PROGRAM = Path(__file__).with_name("phone_proc.py")
#: Time allowed for the subprocess to start its endpoint and for a command reply.
COMMAND_TIMEOUT = 10.0
#: Time allowed for a graceful ``close`` before the subprocess is killed.
CLOSE_TIMEOUT = 6.0
#: Number of stderr lines kept to explain a failure.
STDERR_TAIL = 40


class PhoneError(Exception):
    """A command failed in the phone, or the phone process went away."""


class Phone:
    """A SIP softphone in a subprocess; create it with :meth:`start`."""

    def __init__(self, process: asyncio.subprocess.Process, *, name: str, transport: str) -> None:
        self.name = name
        self.transport = transport
        self.sip_port = 0
        assert process.stdin and process.stdout and process.stderr, "phone pipes are required"
        self._process = process
        self._stdin = process.stdin
        self._stdout = process.stdout
        self._stderr_stream = process.stderr
        self._events: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 1
        self._exited = False
        self._stderr_lines: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self._tasks = [
            asyncio.create_task(self._read_stdout(), name=f"{name}-stdout"),
            asyncio.create_task(self._read_stderr(), name=f"{name}-stderr"),
        ]

    @classmethod
    async def start(
        cls,
        *,
        transport: str = "udp",
        codecs: Sequence[str] = ("PCMU", "PCMA"),
        name: str = "phone",
        log_level: int = 1,
        srtp: str = "off",
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        session_timers: bool = True,
    ) -> Phone:
        """Spawn a phone and wait until its SIP transport is bound.

        ``transport`` is ``"udp"``, ``"tcp"`` or ``"tls"`` (``tls_cert`` and
        ``tls_key``: the certificate it shows when called over TLS);
        ``srtp`` is ``"off"``, ``"optional"`` or ``"mandatory"`` (SDES
        keys, sent only over TLS unless the transport is plain on purpose);
        ``codecs`` lists the only
        codecs to enable, most preferred first (e.g. ``"PCMU"`` or
        ``"PCMA/8000"``); ``name`` is the user part of :attr:`uri` and labels
        the phone's log lines; ``log_level`` is pjsua2's (0-6), logged at debug
        level through :mod:`logging`; without ``session_timers`` the phone
        neither asks for nor agrees to RFC 4028 session timers (pjsua's own
        cannot go below 90 s).
        """
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(PHONE_PROGRAM),
            "--name",
            name,
            "--transport",
            transport,
            "--codecs",
            ",".join(codecs),
            "--log-level",
            str(log_level),
            "--srtp",
            srtp,
            *(("--tls-cert", str(tls_cert), "--tls-key", str(tls_key)) if tls_cert and tls_key else ()),
            *(() if session_timers else ("--no-session-timers",)),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        phone = cls(process, name=name, transport=transport)
        try:
            ready = await phone.wait_event("ready", timeout=COMMAND_TIMEOUT)
        except BaseException:
            await phone.close()
            raise
        phone.sip_port = ready["sip_port"]
        return phone

    @property
    def pid(self) -> int:
        """The phone's process: SIGSTOP makes it a phone that vanished without a word."""
        return self._process.pid

    @property
    def uri(self) -> str:
        """URI that reaches this phone directly, without a server."""
        params = f";transport={self.transport}" if self.transport != "udp" else ""
        return f"sip:{self.name}@127.0.0.1:{self.sip_port}{params}"

    # -- registration --------------------------------------------------------

    async def register(
        self,
        server: str,
        user: str,
        password: str,
        domain: str = "pbx.local",
        expect_ok: bool = True,
        mwi: bool = False,
    ) -> int:
        """Register ``user@domain`` with the registrar at ``server`` ("host:port").

        The server also becomes the outbound proxy for calls. With ``mwi``
        the phone also subscribes to its message-summary once registered
        (``mwi`` events report every NOTIFY either way). Returns the final
        status code of the registration (e.g. 200 or 403); with ``expect_ok``
        anything other than 200 raises :class:`PhoneError`.
        """
        self._discard("reg_state")
        await self._request("register", server=server, user=user, password=password, domain=domain, mwi=mwi)
        event = await self.wait_event("reg_state")
        if expect_ok and event["code"] != 200:
            raise PhoneError(f"{self.name}: registration failed: {event['code']} {event['reason']}")
        return event["code"]

    async def unregister(self) -> int:
        """Remove the registration; returns the status code of the answer."""
        self._discard("reg_state")
        await self._request("unregister")
        event = await self.wait_event("reg_state", active=False)
        return event["code"]

    # -- calls -----------------------------------------------------------------

    async def call(self, uri: str) -> int:
        """Place a call to ``uri`` and return its handle (without waiting for an answer)."""
        return await self._request("call", uri=uri)

    async def answer(self, call: int, code: int = 200) -> None:
        """Answer an incoming call with ``code`` (provisional or final)."""
        await self._request("answer", call=call, code=code)

    async def ringing(self, call: int) -> None:
        """Send 180 Ringing for an incoming call."""
        await self.answer(call, 180)

    async def reject(self, call: int, code: int = 486) -> None:
        """Reject an incoming call with a final ``code``."""
        await self._request("hangup", call=call, code=code)

    async def hangup(self, call: int) -> None:
        """End a call: BYE when established, CANCEL or 603 before."""
        await self._request("hangup", call=call)

    async def hold(self, call: int) -> None:
        """Send a re-INVITE offering ``sendonly`` audio."""
        await self._request("hold", call=call)

    async def unhold(self, call: int) -> None:
        """Send a re-INVITE offering ``sendrecv`` audio again."""
        await self._request("unhold", call=call)

    # -- media -----------------------------------------------------------------

    async def play_tone(self, call: int, freq_hz: int) -> None:
        """Send a continuous sine tone on the call, replacing any previous tone.

        If the call has no audio yet, the tone starts as soon as it does.
        """
        await self._request("play_tone", call=call, freq=freq_hz)

    async def stop_tone(self, call: int) -> None:
        """Stop the tone: the call sends silence again."""
        await self._request("stop_tone", call=call)

    async def record(self, call: int, path: str | Path) -> None:
        """Record the audio received on the call to a WAV file (8 kHz, 16-bit mono)."""
        await self._request("record", call=call, path=str(path))

    async def stop_record(self, call: int) -> None:
        """Stop recording; on return the WAV file is complete and closed."""
        await self._request("stop_record", call=call)

    async def xfer(self, call: int, uri: str) -> None:
        """Blind-transfer the far end of ``call`` to ``uri`` (REFER)."""
        await self._request("xfer", call=call, uri=uri)

    async def xfer_replaces(self, call: int, other: int) -> None:
        """Attended transfer: join the far end of ``call`` to that of ``other`` (REFER with Replaces)."""
        await self._request("xfer_replaces", call=call, other=other)

    async def dtmf(self, call: int, digits: str) -> None:
        """Send ``digits`` as RFC 4733 telephone events."""
        await self._request("dtmf", call=call, digits=digits)

    # -- events ----------------------------------------------------------------

    async def wait_event(
        self, kind: str, *, call: int | None = None, timeout: float = 10.0, **match: Any
    ) -> dict[str, Any]:
        """Return (and consume) the oldest buffered or next event of ``kind``.

        Only events for ``call`` (if given) whose fields equal ``match`` are
        considered; others stay buffered for later waits.
        """
        wanted = {"event": kind, **match}
        if call is not None:
            wanted["call"] = call
        try:
            async with asyncio.timeout(timeout), self._changed:
                while True:
                    for index, event in enumerate(self._events):
                        if all(event.get(key) == value for key, value in wanted.items()):
                            return self._events.pop(index)
                    if self._exited:
                        raise PhoneError(f"{self.name}: phone exited while waiting for {wanted}{self._stderr_tail()}")
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(
                f"{self.name}: no event {wanted} within {timeout}s; buffered: {self._events}{self._stderr_tail()}"
            ) from None

    def _discard(self, kind: str) -> None:
        self._events = [event for event in self._events if event["event"] != kind]

    # -- lifecycle -------------------------------------------------------------

    async def close(self) -> None:
        """Hang up all calls, shut pjsua2 down and wait for the process to exit.

        The process is killed if it does not finish within a few seconds.
        Closing twice is harmless.
        """
        if self._process.returncode is None:
            with contextlib.suppress(PhoneError, TimeoutError, ConnectionError):
                await self._request("quit", timeout=CLOSE_TIMEOUT)
            with contextlib.suppress(ConnectionError):
                self._stdin.close()
            try:
                await asyncio.wait_for(self._process.wait(), CLOSE_TIMEOUT)
            except TimeoutError:
                log.warning("%s: phone did not exit, killing it", self.name)
                self._process.kill()
                await self._process.wait()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- plumbing --------------------------------------------------------------

    async def _request(self, cmd: str, *, timeout: float = COMMAND_TIMEOUT, **args: Any) -> Any:
        if self._exited:
            raise PhoneError(f"{self.name}: phone has exited{self._stderr_tail()}")
        request_id = self._next_id
        self._next_id += 1
        reply = asyncio.get_running_loop().create_future()
        self._replies[request_id] = reply
        line = json.dumps({"id": request_id, "cmd": cmd, "args": args}) + "\n"
        try:
            self._stdin.write(line.encode())
            await self._stdin.drain()
            async with asyncio.timeout(timeout):
                return await reply
        finally:
            self._replies.pop(request_id, None)

    async def _read_stdout(self) -> None:
        try:
            async for line in self._stdout:
                message = json.loads(line)
                if "reply" in message:
                    self._resolve(message)
                else:
                    log.debug("%s: %s", self.name, message)
                    async with self._changed:
                        self._events.append(message)
                        self._changed.notify_all()
        finally:
            await self._process.wait()
            self._exited = True
            for reply in self._replies.values():
                if not reply.done():
                    reply.set_exception(PhoneError(f"{self.name}: phone exited{self._stderr_tail()}"))
            async with self._changed:
                self._changed.notify_all()

    def _resolve(self, message: dict[str, Any]) -> None:
        reply = self._replies.get(message["reply"])
        if reply is None or reply.done():
            return
        if message["ok"]:
            reply.set_result(message["result"])
        else:
            reply.set_exception(PhoneError(f"{self.name}: {message['error']}"))

    async def _read_stderr(self) -> None:
        async for raw in self._stderr_stream:
            line = raw.decode(errors="replace").rstrip()
            self._stderr_lines.append(line)
            log.debug("%s stderr: %s", self.name, line)

    def _stderr_tail(self) -> str:
        if not self._stderr_lines:
            return ""
        return "\nphone stderr:\n" + "\n".join(self._stderr_lines)


@contextlib.asynccontextmanager
async def phones_for(extensions: Iterable[str]) -> AsyncIterator[dict[str, Phone]]:
    """One phone per extension (named ``p<ext>``), keyed by it; all closed at the end."""
    names = list(extensions)
    started = await asyncio.gather(*(Phone.start(name=f"p{ext}") for ext in names))
    try:
        yield dict(zip(names, started, strict=True))
    finally:
        await asyncio.gather(*(p.close() for p in started))


async def exchange_tones(tmp_path: Path, caller: Phone, a: int, callee: Phone, b: int) -> tuple[float, float]:
    """Each side plays its own tone and records the other; returns (heard by caller, heard by callee)."""
    await caller.play_tone(a, 440)
    await callee.play_tone(b, 1000)
    await caller.record(a, tmp_path / "caller.wav")
    await callee.record(b, tmp_path / "callee.wav")
    await asyncio.sleep(1.5)  # the recording's length, not synchronisation
    await caller.stop_record(a)
    await callee.stop_record(b)
    return dominant_frequency(tmp_path / "caller.wav"), dominant_frequency(tmp_path / "callee.wav")
