"""A SIP softphone in its own process, driven with JSON lines over stdin/stdout.

pjsua2 is a per-process singleton limited to 4 calls, so every test phone runs
this program in a subprocess (see ``tests/support/phone.py`` for the asyncio
driver). It is started by path::

    python tests/support/phone_proc.py --name alice --transport udp --codecs PCMU,PCMA

With ``--transport tls`` SIP runs over TLS (``--tls-cert``/``--tls-key``
give the certificate it shows when it is the one called); ``--srtp
optional|mandatory`` offers and takes SRTP with SDES keys (RFC 4568).
``--no-session-timers`` turns pjsua's RFC 4028 session timers off: it then
neither lists ``timer`` in Supported nor answers with Session-Expires (its
own timers cannot go below Min-SE 90 s, too long for a test).

Protocol (one JSON object per line):

* Commands on stdin: ``{"id": 7, "cmd": "call", "args": {"uri": "sip:..."}}``.
* Replies on stdout: ``{"reply": 7, "ok": true, "result": ...}`` or
  ``{"reply": 7, "ok": false, "error": "..."}``.
* Events on stdout, unsolicited: ``{"event": "call_state", "call": 1, ...}``:

  - ``ready {sip_port, transport}`` once the endpoint is up,
  - ``reg_state {code, reason, active, expires}``,
  - ``incoming {call, from, to}`` (nothing is answered automatically),
  - ``call_state {call, state, code, reason}`` with ``state`` one of
    ``calling``, ``incoming``, ``early``, ``connecting``, ``confirmed``,
    ``disconnected``,
  - ``media {call, active, dir, status, codec, srtp}`` with ``dir`` one of
    ``sendrecv``, ``sendonly``, ``recvonly``, ``inactive``, ``codec`` the
    negotiated encoding name (e.g. ``PCMU``) or null without a stream, and
    ``srtp`` whether the stream is RTP/SAVP,
  - ``dtmf {call, digit}``,
  - ``request {call, method}`` for each request the far end sends in a
    call's dialog (re-INVITE, UPDATE, BYE, ...),
  - ``mwi {in_dialog, subscription_state, body, waiting, account, new, old}``
    for every message-summary NOTIFY (RFC 3842): ``in_dialog`` tells a
    subscription's NOTIFY from an unsolicited one, ``body`` is the body
    text, ``waiting`` is Messages-Waiting as a bool and ``new``/``old``
    the Voice-Message counts (null when absent),
  - ``error {message}`` for failures inside pjsua2 callbacks.

Calls are named by handles (1, 2, ...) that this program assigns and never
reuses, unlike pjsua call ids.

Commands: ``register {server, user, password, domain, mwi}`` (``mwi``:
subscribe to the account's message-summary too), ``unregister``,
``call {uri}`` (result: the call handle), ``answer {call, code}``,
``hangup {call, code}``, ``hold {call}``, ``unhold {call}``,
``play_tone {call, freq}``, ``stop_tone {call}``, ``record {call, path}``, ``stop_record {call}``
(replies once the WAV file is closed), ``dtmf {call, digits}``, ``quit``.

pjsua2 rules followed here (see ``/work/shared/ENGINE.md``, "pjsua2 as the
test softphone"): no SIP worker threads (``threadCnt = 0``) and every callback
on the main thread (``mainThreadOnly``), which polls ``libHandleEvents``; Call,
tone and recorder objects are referenced until they are deliberately deleted,
always before ``libDestroy``; conference-bridge operations are asynchronous, so
a disconnected tone or recorder is deleted only after a grace period, and a
deleted recorder's WAV file is complete only some time later. pjsua2's log
goes to stderr: the protocol has stdout to itself.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import selectors
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import pjsua2 as pj

#: How long a media object stays alive after being disconnected from the
#: conference bridge (whose operations are asynchronous) before it is deleted.
MEDIA_GRACE_SECONDS = 0.2
#: How long a deleted recorder may take to complete its WAV file.
WAV_CLOSE_TIMEOUT = 2.0
#: Size of the canonical WAV header that pjmedia writes.
WAV_HEADER_SIZE = 44
#: How long ``quit`` waits for calls to end after hanging them all up.
HANGUP_WAIT_SECONDS = 2.0
#: How long ``quit`` waits for the registrar to answer the unregistration.
UNREGISTER_WAIT_SECONDS = 1.5
#: Maximum time a single ``libHandleEvents`` poll blocks.
POLL_MSEC = 10

CALL_STATES = {
    pj.PJSIP_INV_STATE_NULL: "null",
    pj.PJSIP_INV_STATE_CALLING: "calling",
    pj.PJSIP_INV_STATE_INCOMING: "incoming",
    pj.PJSIP_INV_STATE_EARLY: "early",
    pj.PJSIP_INV_STATE_CONNECTING: "connecting",
    pj.PJSIP_INV_STATE_CONFIRMED: "confirmed",
    pj.PJSIP_INV_STATE_DISCONNECTED: "disconnected",
}
MEDIA_DIRECTIONS = {
    pj.PJMEDIA_DIR_NONE: "inactive",
    pj.PJMEDIA_DIR_ENCODING: "sendonly",
    pj.PJMEDIA_DIR_DECODING: "recvonly",
    pj.PJMEDIA_DIR_ENCODING_DECODING: "sendrecv",
}
MEDIA_STATUSES = {
    pj.PJSUA_CALL_MEDIA_NONE: "none",
    pj.PJSUA_CALL_MEDIA_ACTIVE: "active",
    pj.PJSUA_CALL_MEDIA_LOCAL_HOLD: "local_hold",
    pj.PJSUA_CALL_MEDIA_REMOTE_HOLD: "remote_hold",
    pj.PJSUA_CALL_MEDIA_ERROR: "error",
}


class CommandError(Exception):
    """A command that cannot be carried out; its message goes into the reply."""


def describe(exc: Exception) -> str:
    """Readable text for an exception, including pjsua2's ``Error`` objects."""
    if isinstance(exc, pj.Error):
        return f"{exc.title}: {exc.reason} (status {exc.status})"
    return f"{type(exc).__name__}: {exc}"


class Channel:
    """The JSON-lines protocol channel: commands in, replies and events out."""

    def __init__(self, stdin_fd: int, out: TextIO) -> None:
        self._fd = stdin_fd
        self._out = out
        self._pending = b""
        self.closed = False
        os.set_blocking(stdin_fd, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(stdin_fd, selectors.EVENT_READ)

    def send(self, message: dict[str, Any]) -> None:
        """Write one message as a line and flush it."""
        self._out.write(json.dumps(message) + "\n")
        self._out.flush()

    def emit(self, event: str, **fields: Any) -> None:
        """Send an unsolicited event."""
        self.send({"event": event, **fields})

    def read_commands(self) -> list[dict[str, Any]]:
        """Return the complete command lines available now, without blocking."""
        if self.closed or not self._selector.select(0):
            return []
        chunk = os.read(self._fd, 65536)
        if not chunk:
            self.closed = True
            return []
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


def guarded(method: Callable[..., None]) -> Callable[..., None]:
    """Report exceptions escaping a pjsua2 callback as ``error`` events.

    An exception must never propagate back into pjsua2's C++ code.
    """

    @functools.wraps(method)
    def wrapper(self: PhoneCall | PhoneAccount, *args: Any) -> None:
        try:
            method(self, *args)
        except Exception as exc:  # noqa: BLE001 - reported to the test instead
            self.phone.channel.emit("error", message=f"{method.__name__}: {describe(exc)}")

    return wrapper


class PhoneAccount(pj.Account):
    """The phone's single account; reports registration and incoming calls."""

    def __init__(self, phone: PhoneProcess) -> None:
        super().__init__()
        self.phone = phone

    @guarded
    def onRegState(self, prm: pj.OnRegStateParam) -> None:  # noqa: N802 - pjsua2 API
        self.phone.channel.emit(
            "reg_state",
            code=prm.code,
            reason=prm.reason,
            active=self.getInfo().regIsActive,
            expires=prm.expiration,
        )

    @guarded
    def onMwiInfo(self, prm: pj.OnMwiInfoParam) -> None:  # noqa: N802 - pjsua2 API
        self.phone.channel.emit("mwi", **parse_mwi_notify(prm.rdata.wholeMsg))

    @guarded
    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:  # noqa: N802 - pjsua2 API
        call = self.phone.add_call(lambda handle: PhoneCall(self.phone, handle, prm.callId))
        info = call.getInfo()
        self.phone.channel.emit(
            "incoming", call=call.handle, **{"from": info.remoteUri, "to": info.localUri}
        )


class PhoneCall(pj.Call):
    """One call, with the tone generator and recorder attached to its audio."""

    def __init__(self, phone: PhoneProcess, handle: int, call_id: int = pj.PJSUA_INVALID_ID) -> None:
        super().__init__(phone.account, call_id)
        self.phone = phone
        self.handle = handle
        self.tone: pj.ToneGenerator | None = None
        self.recorder: pj.AudioMediaRecorder | None = None

    def audio_media(self) -> pj.AudioMedia | None:
        """The call's audio in the conference bridge, or None while there is none."""
        info = self.getInfo()  # info.media points into info: keep it referenced
        for media in info.media:
            if media.type == pj.PJMEDIA_TYPE_AUDIO and media.audioConfSlot != pj.PJSUA_INVALID_ID:
                return self.getAudioMedia(media.index)
        return None

    def connect_media(self) -> None:
        """Connect the tone to and the recorder from the call's audio, if it has any.

        Connecting ports that are already connected is a no-op in pjmedia, so
        this is safe to call on every media update.
        """
        audio = self.audio_media()
        if audio is None:
            return
        if self.tone is not None:
            self.tone.startTransmit(audio)
        if self.recorder is not None:
            audio.startTransmit(self.recorder)

    @guarded
    def onCallState(self, prm: pj.OnCallStateParam) -> None:  # noqa: N802 - pjsua2 API
        info = self.getInfo()
        state = CALL_STATES.get(info.state, str(info.state))
        self.phone.channel.emit(
            "call_state", call=self.handle, state=state, code=info.lastStatusCode, reason=info.lastReason
        )
        if info.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self.phone.end_call(self)

    @guarded
    def onCallMediaState(self, prm: pj.OnCallMediaStateParam) -> None:  # noqa: N802 - pjsua2 API
        info = self.getInfo()  # info.media points into info: keep it referenced
        for media in info.media:
            if media.type == pj.PJMEDIA_TYPE_AUDIO:
                has_stream = media.status not in (pj.PJSUA_CALL_MEDIA_NONE, pj.PJSUA_CALL_MEDIA_ERROR)
                stream = self.getStreamInfo(media.index) if has_stream else None
                self.phone.channel.emit(
                    "media",
                    call=self.handle,
                    active=media.status == pj.PJSUA_CALL_MEDIA_ACTIVE,
                    dir=MEDIA_DIRECTIONS.get(media.dir, str(media.dir)),
                    status=MEDIA_STATUSES.get(media.status, str(media.status)),
                    codec=stream.codecName if stream is not None else None,
                    srtp=stream is not None and bool(stream.proto & pj.PJMEDIA_TP_PROFILE_SRTP),
                )
                break
        self.connect_media()

    @guarded
    def onCallTransferStatus(self, prm: pj.OnCallTransferStatusParam) -> None:  # noqa: N802 - pjsua2 API
        self.phone.channel.emit("xfer_status", call=self.handle, code=prm.statusCode, reason=prm.reason, final=prm.finalNotify)

    @guarded
    def onDtmfDigit(self, prm: pj.OnDtmfDigitParam) -> None:  # noqa: N802 - pjsua2 API
        self.phone.channel.emit("dtmf", call=self.handle, digit=prm.digit)

    @guarded
    def onCallTsxState(self, prm: pj.OnCallTsxStateParam) -> None:  # noqa: N802 - pjsua2 API
        if prm.e.type != pj.PJSIP_EVENT_TSX_STATE:
            return
        tsx = prm.e.body.tsxState.tsx
        if tsx.role == pj.PJSIP_ROLE_UAS and tsx.state == pj.PJSIP_TSX_STATE_TRYING:
            self.phone.channel.emit("request", call=self.handle, method=tsx.method)


def parse_mwi_notify(message: str) -> dict[str, Any]:
    """The fields of an ``mwi`` event from a whole NOTIFY as received."""
    head, _, body = message.replace("\r\n", "\n").partition("\n\n")
    headers: dict[str, str] = {}
    for line in head.split("\n")[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), value.strip())
    to = headers.get("to") or headers.get("t") or ""
    summary: dict[str, str] = {}
    for line in body.split("\n"):
        name, sep, value = line.partition(":")
        if sep:
            summary[name.strip().lower()] = value.strip()
    voice = summary.get("voice-message", "")
    counts = voice.split("(")[0].strip().split("/")
    new, old = (int(counts[0]), int(counts[1])) if len(counts) == 2 and all(c.isdigit() for c in counts) else (None, None)
    return {
        "in_dialog": ";tag=" in to.replace(" ", ""),
        "subscription_state": headers.get("subscription-state"),
        "body": body,
        "waiting": summary.get("messages-waiting", "").lower() == "yes",
        "account": summary.get("message-account"),
        "new": new,
        "old": old,
    }


@dataclass(eq=False)
class Deferred:
    """An action to run from the main loop once ``ready()`` is true."""

    ready: Callable[[], bool]
    action: Callable[[], None]


def after(seconds: float) -> Callable[[], bool]:
    """A readiness test that becomes true ``seconds`` from now."""
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() >= deadline


def wav_is_closed(path: str) -> bool:
    """Whether pjmedia has finished a WAV file: it fills in the lengths on close."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as wav:
            header = wav.read(WAV_HEADER_SIZE)
    except OSError:
        return False
    if len(header) < WAV_HEADER_SIZE:
        return False
    riff_length = int.from_bytes(header[4:8], "little")
    data_length = int.from_bytes(header[40:44], "little")
    return riff_length == size - 8 and data_length == size - WAV_HEADER_SIZE


@dataclass
class Recording:
    """A recorder attached to a call, and the WAV file it writes."""

    recorder: pj.AudioMediaRecorder
    path: str


class Reply:
    """Answers one command, either at once or later from a deferred action."""

    def __init__(self, channel: Channel, request_id: Any) -> None:
        self._channel = channel
        self._id = request_id

    def ok(self, result: Any = None) -> None:
        """Report success, with ``result`` for the caller."""
        self._channel.send({"reply": self._id, "ok": True, "result": result})

    def fail(self, message: str) -> None:
        """Report failure with an explanation."""
        self._channel.send({"reply": self._id, "ok": False, "error": message})


class PhoneProcess:
    """The pjsua2 endpoint, its single transport and account, and the command loop."""

    def __init__(
        self,
        *,
        name: str,
        transport: str,
        codecs: list[str],
        log_level: int,
        channel: Channel,
        srtp: str = "off",
        tls_cert: str | None = None,
        tls_key: str | None = None,
        session_timers: bool = True,
    ) -> None:
        self.name = name
        self.channel = channel
        self.transport = transport
        self.srtp = srtp
        self.session_timers = session_timers
        self.calls: dict[int, PhoneCall] = {}
        self.recordings: dict[int, Recording] = {}
        self.deferred: list[Deferred] = []
        self.next_handle = 1
        self.running = True

        self.ep = pj.Endpoint()
        self.ep.libCreate()
        self.ep.libInit(self._endpoint_config(log_level))
        transport_type = {"tcp": pj.PJSIP_TRANSPORT_TCP, "tls": pj.PJSIP_TRANSPORT_TLS}.get(transport, pj.PJSIP_TRANSPORT_UDP)
        transport_config = pj.TransportConfig()
        transport_config.boundAddress = "127.0.0.1"
        transport_config.port = 0
        if tls_cert is not None and tls_key is not None:
            transport_config.tlsConfig.certFile = tls_cert
            transport_config.tlsConfig.privKeyFile = tls_key
        self.transport_id = self.ep.transportCreate(transport_type, transport_config)
        self.sip_port = int(self.ep.transportGetInfo(self.transport_id).localName.rsplit(":", 1)[1])
        self.ep.libStart()
        self.ep.audDevManager().setNullDev()
        self._select_codecs(codecs)

        self.account = PhoneAccount(self)
        self.account.create(self._account_config(f"sip:{name}@127.0.0.1:{self.sip_port}"), True)

    @staticmethod
    def _endpoint_config(log_level: int) -> pj.EpConfig:
        config = pj.EpConfig()
        config.uaConfig.threadCnt = 0
        config.uaConfig.mainThreadOnly = True
        config.uaConfig.maxCalls = 4
        config.uaConfig.userAgent = "pbx-test-phone"
        config.logConfig.level = log_level
        config.logConfig.consoleLevel = log_level
        config.logConfig.msgLogging = log_level >= 4
        config.medConfig.clockRate = 8000
        config.medConfig.sndClockRate = 8000
        config.medConfig.channelCount = 1
        config.medConfig.ecTailLen = 0
        config.medConfig.noVad = True
        # Keep the (null) sound device, the clock that drives every stream,
        # running between calls: auto-closed, a call without a tone or
        # recorder attached stopped sending, DTMF included.
        config.medConfig.sndAutoCloseTime = -1
        return config

    def _select_codecs(self, wanted: list[str]) -> None:
        """Enable exactly the ``wanted`` codecs, in that order of preference."""
        available = [codec.codecId for codec in self.ep.codecEnum2()]
        priorities = dict.fromkeys(available, 0)
        for rank, name in enumerate(wanted):
            prefix = name.lower() + "/"
            matches = [c for c in available if c.lower() == name.lower() or c.lower().startswith(prefix)]
            if not matches:
                raise SystemExit(f"codec {name!r} is not available; have {available}")
            for codec_id in matches:
                priorities[codec_id] = 255 - rank
        for codec_id, priority in priorities.items():
            self.ep.codecSetPriority(codec_id, priority)

    def _account_config(self, id_uri: str, server: str | None = None) -> pj.AccountConfig:
        config = pj.AccountConfig()
        config.idUri = id_uri
        config.sipConfig.transportId = self.transport_id
        config.mediaConfig.transportConfig.boundAddress = "127.0.0.1"
        config.mediaConfig.transportConfig.port = 0
        if self.srtp != "off":
            config.mediaConfig.srtpUse = pj.PJMEDIA_SRTP_MANDATORY if self.srtp == "mandatory" else pj.PJMEDIA_SRTP_OPTIONAL
            # SDES keys only over a secure next hop (TLS), pjsua's default, unless SIP is plain on purpose.
            config.mediaConfig.srtpSecureSignaling = 1 if self.transport == "tls" else 0
        if not self.session_timers:
            config.callConfig.timerUse = pj.PJSUA_SIP_TIMER_INACTIVE
        if server is not None:
            params = f";transport={self.transport}" if self.transport != "udp" else ""
            config.regConfig.registrarUri = f"sip:{server}{params}"
            config.sipConfig.proxies.append(f"sip:{server}{params};lr")
        return config

    # -- deferred work -------------------------------------------------------

    def defer(self, ready: Callable[[], bool], action: Callable[[], None]) -> None:
        """Run ``action`` from the main loop once ``ready()`` is true."""
        self.deferred.append(Deferred(ready, action))

    def run_deferred(self) -> None:
        """Run the deferred actions that are ready (they may defer more)."""
        due = [item for item in self.deferred if item.ready()]
        self.deferred = [item for item in self.deferred if item not in due]
        for item in due:
            item.action()

    def bury(self, *objects: Any, then: Callable[[], None] | None = None) -> None:
        """Delete pjsua2 ``objects`` once the conference bridge has let go of them."""
        held = list(objects)

        def release() -> None:
            held.clear()
            if then is not None:
                then()

        self.defer(after(MEDIA_GRACE_SECONDS), release)

    # -- calls ---------------------------------------------------------------

    def add_call(self, factory: Callable[[int], PhoneCall]) -> PhoneCall:
        """Create a call under a fresh handle and keep a reference to it.

        The handle is assigned before the Call exists because pjsua2 invokes
        callbacks (e.g. the ``calling`` state) from within ``makeCall``.
        """
        handle = self.next_handle
        self.next_handle += 1
        call = factory(handle)
        self.calls[handle] = call
        return call

    def end_call(self, call: PhoneCall) -> None:
        """Forget a call whose media is gone; delete it and its tone later.

        Its recording stays until ``stop_record`` or shutdown, so the test
        decides when the WAV file is closed.
        """
        self.calls.pop(call.handle, None)
        tone, call.tone, call.recorder = call.tone, None, None
        self.bury(call, tone)

    def stop_recording(self, handle: int, then: Callable[[bool], None]) -> None:
        """Detach and delete a recorder; ``then(closed)`` runs when its WAV file is
        complete (``closed`` true) or after ``WAV_CLOSE_TIMEOUT`` (false)."""
        recording = self.recordings.pop(handle)
        call = self.calls.get(handle)
        if call is not None:
            call.recorder = None
            audio = call.audio_media()
            if audio is not None:
                audio.stopTransmit(recording.recorder)
        path = recording.path
        timed_out = after(MEDIA_GRACE_SECONDS + WAV_CLOSE_TIMEOUT)

        def wait_for_file() -> None:
            self.defer(lambda: wav_is_closed(path) or timed_out(), lambda: then(wav_is_closed(path)))

        # pjmedia writes the WAV lengths when the deleted recorder is finally
        # destroyed, asynchronously, on a later conference-bridge tick.
        self.bury(recording.recorder, then=wait_for_file)

    def _call(self, args: dict[str, Any]) -> PhoneCall:
        handle = args["call"]
        try:
            return self.calls[handle]
        except KeyError:
            raise CommandError(f"no active call {handle}") from None

    # -- commands --------------------------------------------------------------

    def handle_command(self, message: dict[str, Any]) -> None:
        """Run one command; it replies at once or, for ``stop_record``, later."""
        reply = Reply(self.channel, message.get("id"))
        try:
            handler = getattr(self, f"cmd_{message['cmd']}", None)
            if handler is None:
                raise CommandError(f"unknown command {message['cmd']!r}")
            handler(message.get("args", {}), reply)
        except (CommandError, pj.Error, KeyError, TypeError, ValueError) as exc:
            reply.fail(describe(exc))

    def cmd_register(self, args: dict[str, Any], reply: Reply) -> None:
        config = self._account_config(f"sip:{args['user']}@{args['domain']}", args["server"])
        config.sipConfig.authCreds.append(pj.AuthCredInfo("digest", "*", args["user"], 0, args["password"]))
        config.mwiConfig.enabled = bool(args.get("mwi", False))
        self.account.modify(config)
        reply.ok()

    def cmd_unregister(self, args: dict[str, Any], reply: Reply) -> None:
        self.account.setRegistration(False)
        reply.ok()

    def cmd_call(self, args: dict[str, Any], reply: Reply) -> None:
        call = self.add_call(lambda handle: PhoneCall(self, handle))
        try:
            call.makeCall(args["uri"], pj.CallOpParam(True))
        except pj.Error:
            self.end_call(call)
            raise
        reply.ok(call.handle)

    def cmd_answer(self, args: dict[str, Any], reply: Reply) -> None:
        prm = pj.CallOpParam(True)
        prm.statusCode = args.get("code", 200)
        self._call(args).answer(prm)
        reply.ok()

    def cmd_hangup(self, args: dict[str, Any], reply: Reply) -> None:
        prm = pj.CallOpParam(True)
        prm.statusCode = args.get("code", 0)
        self._call(args).hangup(prm)
        reply.ok()

    def _reinvite(self, call: PhoneCall, direction: int, flags: int) -> None:
        prm = pj.CallOpParam(True)
        prm.opt.flag |= pj.PJSUA_CALL_SET_MEDIA_DIR | flags
        prm.opt.mediaDir = pj.IntVector([direction])
        call.reinvite(prm)

    def cmd_hold(self, args: dict[str, Any], reply: Reply) -> None:
        self._reinvite(self._call(args), pj.PJMEDIA_DIR_ENCODING, 0)
        reply.ok()

    def cmd_unhold(self, args: dict[str, Any], reply: Reply) -> None:
        self._reinvite(self._call(args), pj.PJMEDIA_DIR_ENCODING_DECODING, pj.PJSUA_CALL_UNHOLD)
        reply.ok()

    def cmd_xfer(self, args: dict[str, Any], reply: Reply) -> None:
        self._call(args).xfer(args["uri"], pj.CallOpParam(True))
        reply.ok()

    def cmd_xfer_replaces(self, args: dict[str, Any], reply: Reply) -> None:
        other = self._call({"call": args["other"]})
        self._call(args).xferReplaces(other, pj.CallOpParam(True))
        reply.ok()

    def cmd_play_tone(self, args: dict[str, Any], reply: Reply) -> None:
        call = self._call(args)
        tone = pj.ToneGenerator()
        tone.createToneGenerator(8000, 1)
        desc = pj.ToneDesc()
        desc.freq1 = desc.freq2 = int(args["freq"])
        desc.on_msec = 10_000  # pjmedia_tone_desc fields are 16-bit: loop a 10 s tone
        desc.off_msec = 0
        tone.play(pj.ToneDescVector([desc]), True)
        self._stop_tone(call)
        call.tone = tone
        call.connect_media()
        reply.ok()

    def cmd_stop_tone(self, args: dict[str, Any], reply: Reply) -> None:
        self._stop_tone(self._call(args))
        reply.ok()

    def _stop_tone(self, call: PhoneCall) -> None:
        if call.tone is not None:
            audio = call.audio_media()
            if audio is not None:
                call.tone.stopTransmit(audio)
            self.bury(call.tone)
            call.tone = None

    def cmd_record(self, args: dict[str, Any], reply: Reply) -> None:
        call = self._call(args)
        if call.handle in self.recordings:
            raise CommandError(f"call {call.handle} is already being recorded")
        path = str(args["path"])
        recorder = pj.AudioMediaRecorder()
        recorder.createRecorder(path)
        self.recordings[call.handle] = Recording(recorder, path)
        call.recorder = recorder
        call.connect_media()
        reply.ok()

    def cmd_stop_record(self, args: dict[str, Any], reply: Reply) -> None:
        handle = args["call"]
        if handle not in self.recordings:
            raise CommandError(f"call {handle} is not being recorded")

        def finished(closed: bool) -> None:
            if closed:
                reply.ok()
            else:
                reply.fail(f"recording of call {handle} was not closed in time")

        self.stop_recording(handle, finished)

    def cmd_dtmf(self, args: dict[str, Any], reply: Reply) -> None:
        self._call(args).dialDtmf(str(args["digits"]))
        reply.ok()

    def cmd_quit(self, args: dict[str, Any], reply: Reply) -> None:
        self.shutdown()
        reply.ok()

    # -- main loop -----------------------------------------------------------

    def run(self) -> None:
        """Serve commands until ``quit`` or the end of stdin."""
        self.channel.emit("ready", sip_port=self.sip_port, transport=self.transport)
        while self.running:
            self.ep.libHandleEvents(POLL_MSEC)
            self.run_deferred()
            for message in self.channel.read_commands():
                self.handle_command(message)
            if self.channel.closed and self.running:
                self.shutdown()

    def _pump(self, seconds: float, until: Callable[[], bool]) -> None:
        """Handle pjsua2 events and deferred work until ``until()`` or timeout."""
        timed_out = after(seconds)
        while not until() and not timed_out():
            self.ep.libHandleEvents(POLL_MSEC)
            self.run_deferred()

    def shutdown(self) -> None:
        """End all calls, close recordings, delete every pjsua2 object, destroy the library."""
        self.running = False
        if self.calls:
            self.ep.hangupAllCalls()
            self._pump(HANGUP_WAIT_SECONDS, until=lambda: not self.calls)
        for handle in list(self.recordings):
            self.stop_recording(handle, then=lambda closed: None)
        for call in list(self.calls.values()):  # calls that did not end in time
            audio = call.audio_media()
            if audio is not None and call.tone is not None:
                call.tone.stopTransmit(audio)
            self.end_call(call)
        if self.account.getInfo().regIsActive:
            self.account.setRegistration(False)
        self._pump(
            max(UNREGISTER_WAIT_SECONDS, MEDIA_GRACE_SECONDS + WAV_CLOSE_TIMEOUT),
            until=lambda: not self.deferred and not self.account.getInfo().regIsActive,
        )
        self.deferred.clear()
        self.account.shutdown()
        del self.account
        # Everything has been answered already: skip libDestroy's fixed
        # one-second wait for late responses.
        self.ep.libDestroy(pj.PJSUA_DESTROY_NO_RX_MSG)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="phone", help="user part of the direct SIP URI")
    parser.add_argument("--transport", choices=("udp", "tcp", "tls"), default="udp")
    parser.add_argument("--srtp", choices=("off", "optional", "mandatory"), default="off")
    parser.add_argument("--tls-cert", help="PEM certificate the TLS listener shows")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--codecs", default="PCMU,PCMA", help="comma-separated, most preferred first")
    parser.add_argument("--log-level", type=int, default=1, help="pjsua2 log level (0-6) on stderr")
    parser.add_argument("--no-session-timers", action="store_true", help="turn RFC 4028 session timers off")
    options = parser.parse_args()

    # Keep the real stdout for the protocol and send everything else that
    # would go there (pjsua2's console log, stray prints) to stderr.
    protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    phone = PhoneProcess(
        name=options.name,
        transport=options.transport,
        codecs=[c for c in options.codecs.split(",") if c],
        log_level=options.log_level,
        channel=Channel(sys.stdin.fileno(), protocol_out),
        srtp=options.srtp,
        tls_cert=options.tls_cert,
        tls_key=options.tls_key,
        session_timers=not options.no_session_timers,
    )
    phone.run()


if __name__ == "__main__":
    main()
