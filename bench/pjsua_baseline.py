"""The IVR benchmark's baseline: pjsua2's C engine playing a prompt to every call.

bench/ivr.py starts ten of this program (bench/pjsua_driver.py), places 4
SIPp calls to each and measures their CPU. It answers every INVITE at once
(200 OK, PCMU or whatever pjsua picks from the offer) and, once a call has
audio, connects a looping ``AudioMediaPlayer`` of ``--wav`` (8 kHz 16-bit
mono) to it, one player per call, so each caller
hears the prompt from its beginning as the PBX's callers do. RFC 4733 keys are
decoded by pjsua and counted.

    python bench/pjsua_baseline.py --wav prompt.wav --sip-port 5080 --rtp-port 40000

Output on stdout, one JSON object a line: ``{"event": "ready", "sip_port": P}``
once it listens; at the end ``{"event": "stats", "answered": A, "ended": E,
"digits": D, "players": P}``. It ends on ``quit`` on stdin, at the end of stdin,
on SIGTERM or SIGINT, and after ``--max-seconds`` at the latest.

pjsua2 rules from /work/shared/ENGINE.md: one endpoint, at most 4 calls, no SIP
worker threads (``threadCnt = 0``), callbacks on the main thread
(``mainThreadOnly``) which polls ``libHandleEvents``, the null sound device,
8 kHz clocks; Call and player objects stay referenced until deleted, a while
after their call ended (the conference bridge lets go asynchronously), and all
before ``libDestroy``. pjsua's log goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import sys
import time
from typing import Any

import pjsua2 as pj

# libHandleEvents returns as soon as SIP traffic or a timer is due, so a long
# poll delays nothing; a short one would only add idle wake-ups of Python.
POLL_MSEC = 100
GRACE_SECONDS = 0.3  # a player or call is deleted this long after its call ended
HANGUP_WAIT_SECONDS = 3.0


class Baseline:
    """The endpoint, its account, the calls and their players."""

    def __init__(self, wav: str, sip_port: int, rtp_port: int, rtp_range: int, log_level: int, out: Any) -> None:
        self.wav = wav
        self.out = out
        self.calls: dict[int, BaselineCall] = {}  # pjsua call id -> call
        self.graveyard: list[tuple[float, Any]] = []  # (delete after, object)
        self.answered = self.ended = self.digits = self.players = 0
        self.running = True

        self.ep = pj.Endpoint()
        self.ep.libCreate()
        config = pj.EpConfig()
        config.uaConfig.threadCnt = 0
        config.uaConfig.mainThreadOnly = True
        config.uaConfig.maxCalls = 4
        config.uaConfig.userAgent = "pbx-bench-pjsua-baseline"
        config.logConfig.level = log_level
        config.logConfig.consoleLevel = log_level
        config.logConfig.msgLogging = False
        config.medConfig.clockRate = 8000
        config.medConfig.sndClockRate = 8000
        config.medConfig.channelCount = 1
        config.medConfig.ecTailLen = 0
        config.medConfig.noVad = True
        self.ep.libInit(config)
        transport = pj.TransportConfig()
        transport.boundAddress = "127.0.0.1"
        transport.port = sip_port
        self.transport_id = self.ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, transport)
        self.sip_port = int(self.ep.transportGetInfo(self.transport_id).localName.rsplit(":", 1)[1])
        self.ep.libStart()
        self.ep.audDevManager().setNullDev()

        account = pj.AccountConfig()
        account.idUri = f"sip:ivr@127.0.0.1:{self.sip_port}"
        account.sipConfig.transportId = self.transport_id
        account.mediaConfig.transportConfig.boundAddress = "127.0.0.1"
        account.mediaConfig.transportConfig.port = rtp_port
        account.mediaConfig.transportConfig.portRange = rtp_range
        self.account = BaselineAccount(self)
        self.account.create(account, True)

    def emit(self, event: str, **fields: Any) -> None:
        self.out.write(json.dumps({"event": event, **fields}) + "\n")
        self.out.flush()

    def bury(self, *objects: Any) -> None:
        """Delete ``objects`` once the conference bridge has surely let go of them."""
        due = time.monotonic() + GRACE_SECONDS
        self.graveyard.extend((due, obj) for obj in objects if obj is not None)

    def sweep(self, everything: bool = False) -> None:
        now = time.monotonic()
        self.graveyard = [] if everything else [(due, obj) for due, obj in self.graveyard if due > now]

    def pump(self, seconds: float, until: Any = lambda: False) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not until():
            self.ep.libHandleEvents(POLL_MSEC)
            self.sweep()

    def run(self, max_seconds: float) -> None:
        self.emit("ready", sip_port=self.sip_port)
        deadline = time.monotonic() + max_seconds
        selector = selectors.DefaultSelector()
        stdin = sys.stdin.fileno()
        try:
            selector.register(stdin, selectors.EVENT_READ)
            os.set_blocking(stdin, False)
            commands = True
        except (OSError, ValueError):  # a file such as /dev/null: no commands then
            commands = False
        pending = b""
        while self.running and time.monotonic() < deadline:
            self.ep.libHandleEvents(POLL_MSEC)
            self.sweep()
            if commands and selector.select(0):
                chunk = os.read(stdin, 4096)
                pending += chunk
                if not chunk or b"quit" in pending:
                    break
        self.shutdown()

    def shutdown(self) -> None:
        if self.calls:
            self.ep.hangupAllCalls()
            self.pump(HANGUP_WAIT_SECONDS, until=lambda: not self.calls)
        for call in list(self.calls.values()):
            call.release()
        self.pump(GRACE_SECONDS * 2)
        self.sweep(everything=True)
        self.emit("stats", answered=self.answered, ended=self.ended, digits=self.digits, players=self.players)
        self.account.shutdown()
        del self.account
        self.ep.libDestroy(pj.PJSUA_DESTROY_NO_RX_MSG)


class BaselineAccount(pj.Account):
    def __init__(self, baseline: Baseline) -> None:
        super().__init__()
        self.baseline = baseline

    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:  # noqa: N802 - pjsua2 API
        try:
            call = BaselineCall(self.baseline, prm.callId)
            self.baseline.calls[prm.callId] = call
            answer = pj.CallOpParam(True)
            answer.statusCode = 200
            call.answer(answer)
            self.baseline.answered += 1
        except Exception as exc:  # noqa: BLE001 - never into pjsua's C++
            print(f"onIncomingCall: {exc}", file=sys.stderr)


class BaselineCall(pj.Call):
    def __init__(self, baseline: Baseline, call_id: int) -> None:
        super().__init__(baseline.account, call_id)
        self.baseline = baseline
        self.call_id = call_id
        self.player: pj.AudioMediaPlayer | None = None

    def onCallMediaState(self, prm: pj.OnCallMediaStateParam) -> None:  # noqa: N802 - pjsua2 API
        try:
            info = self.getInfo()  # info.media points into info: keep it referenced
            for media in info.media:
                if media.type != pj.PJMEDIA_TYPE_AUDIO or media.status != pj.PJSUA_CALL_MEDIA_ACTIVE:
                    continue
                if self.player is None:
                    self.player = pj.AudioMediaPlayer()
                    self.player.createPlayer(self.baseline.wav)  # loops by default
                    self.baseline.players += 1
                self.player.startTransmit(self.getAudioMedia(media.index))
                break
        except Exception as exc:  # noqa: BLE001
            print(f"onCallMediaState: {exc}", file=sys.stderr)

    def onCallState(self, prm: pj.OnCallStateParam) -> None:  # noqa: N802 - pjsua2 API
        try:
            if self.getInfo().state == pj.PJSIP_INV_STATE_DISCONNECTED:
                self.baseline.ended += 1
                self.release()
        except Exception as exc:  # noqa: BLE001
            print(f"onCallState: {exc}", file=sys.stderr)

    def onDtmfDigit(self, prm: pj.OnDtmfDigitParam) -> None:  # noqa: N802 - pjsua2 API
        self.baseline.digits += 1

    def release(self) -> None:
        """Forget this call; delete it and its player a little later."""
        if self.baseline.calls.pop(self.call_id, None) is not None:
            player, self.player = self.player, None
            self.baseline.bury(self, player)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wav", required=True, help="the prompt: a WAV file pjmedia reads (8 kHz 16-bit mono)")
    parser.add_argument("--sip-port", type=int, default=0, help="UDP port on 127.0.0.1 (0: any)")
    parser.add_argument("--rtp-port", type=int, default=40000, help="first RTP port")
    parser.add_argument("--rtp-range", type=int, default=40, help="RTP ports to try from --rtp-port")
    parser.add_argument("--max-seconds", type=float, default=600, help="end by itself after this long")
    parser.add_argument("--log-level", type=int, default=1, help="pjsua log level (0-6) on stderr")
    options = parser.parse_args()

    # stdout is for the JSON lines: pjsua's console log and stray prints go to stderr.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    baseline = Baseline(options.wav, options.sip_port, options.rtp_port, options.rtp_range, options.log_level, out)

    def stop(signum: int, frame: object) -> None:
        baseline.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    baseline.run(options.max_seconds)


if __name__ == "__main__":
    main()
