"""Session timers (RFC 4028): a dialog nobody refreshes ends.

Each leg agrees on its own session interval with its peer, as a B2BUA does:
the Session-Expires of an INVITE or UPDATE and of its 2xx say how long the
session lives without a refresh and who refreshes it (``refresher=uac`` or
``uas``: roles in the transaction that said so). The refresher sends a
re-INVITE or UPDATE at half the interval; the other side, when none has
arrived by the interval minus min(32 s, a third of it), takes its peer for
gone (§10). A request that asks for less than our Min-SE gets 422 with it.

We refresh whenever the peer shows no support: a caller without ``Supported:
timer``, as §9 says, and also a callee whose 2xx has no Session-Expires. §7.2
would let that session run unwatched; a server that must notice phones that
vanished refreshes it anyway (a refresh that fails ends the call), as pjsip's
"always" mode and Asterisk's ``session-timers=originate`` do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from aiosipua import SipMessage, SipResponse

MIN_SE = 90  # RFC 4028 §4: the smallest Min-SE there is; ours is lower only when sip.session_expires is


@dataclass(frozen=True)
class SessionExpires:
    """A Session-Expires header: the interval, and who refreshes if it says ("uac" or "uas")."""

    seconds: int
    refresher: str | None


def session_expires(msg: SipMessage) -> SessionExpires | None:
    """The message's Session-Expires (compact form ``x``); None when it has none that reads."""
    raw = msg.headers.get_first("session-expires") or msg.headers.get_first("x")
    if raw is None:
        return None
    value, *params = raw.split(";")
    try:
        seconds = int(value.strip())
    except ValueError:
        return None
    refresher = None
    for param in params:
        name, _, given = param.partition("=")
        if name.strip().lower() == "refresher" and given.strip().lower() in ("uac", "uas"):
            refresher = given.strip().lower()
    return SessionExpires(seconds, refresher) if seconds > 0 else None


def min_se(msg: SipMessage) -> int:
    """The message's Min-SE; 0 when it has none that reads."""
    raw = (msg.headers.get_first("min-se") or "").split(";")[0].strip()
    return int(raw) if raw.isdigit() else 0


def listed(msg: SipMessage, header: str) -> set[str]:
    """The tokens of a comma-separated header (Supported, Require, Allow), in upper case."""
    return {token.strip().upper() for value in msg.headers.get(header) for token in value.split(",") if token.strip()}


class SessionTimer:
    """One leg's session timer: the interval agreed with its peer, who
    refreshes, and the one timer handle that either sends our refresh or
    ends the leg. ``wanted`` is sip.session_expires when the leg began (0:
    no session timer); ``refresh(on_answer, by_invite)`` sends a refresh
    (a re-INVITE if ``by_invite``, else as the leg prefers) whose answers go
    to ``on_answer``; ``expire`` ends the leg."""

    def __init__(self, wanted: int, refresh: Callable[[Callable[[SipResponse], None], bool], None], expire: Callable[[], None]) -> None:
        self.wanted = wanted
        self.min_se = min(MIN_SE, wanted)
        self.interval = 0  # agreed seconds; 0 until a 2xx settles it
        self.we_refresh = False
        self._refresh = refresh
        self._expire = expire
        self._handle: asyncio.TimerHandle | None = None

    def too_brief(self, request: SipMessage) -> int | None:
        """Our Min-SE when ``request`` (INVITE or UPDATE) asks for a shorter
        interval: it gets 422 with it (§9) and may ask again."""
        asked = session_expires(request)
        return self.min_se if self.wanted and asked is not None and asked.seconds < self.min_se else None

    def request_headers(self) -> dict[str, str]:
        """The headers of an INVITE or UPDATE we send: the interval we want
        or, once agreed, the agreed one and who refreshes (we are this new
        transaction's uac)."""
        if not self.wanted:
            return {}
        value = f"{self.interval};refresher={'uac' if self.we_refresh else 'uas'}" if self.interval else str(self.wanted)
        return {"Supported": "timer", "Session-Expires": value, "Min-SE": str(self.min_se)}

    def answer(self, request: SipMessage) -> dict[str, str]:
        """The headers of our 2xx to ``request``, an INVITE or UPDATE (first
        or refresh) that :meth:`too_brief` let through, and the timer they
        start: its interval shortened to ours, not below either Min-SE; the
        refresher it names, else as before, else the peer when it supports
        timers and we when it does not."""
        if not self.wanted:
            return {}
        asked = session_expires(request)
        supported = "TIMER" in listed(request, "supported") | listed(request, "require")
        floor = max(self.min_se, min_se(request))
        if asked is not None:
            interval = max(min(asked.seconds, self.wanted), floor)
        else:
            interval = self.interval or max(self.wanted, floor)
        if not supported:
            we_refresh = True
        elif asked is not None and asked.refresher is not None:
            we_refresh = asked.refresher == "uas"
        else:
            we_refresh = self.we_refresh if self.interval else False
        self._start(interval, we_refresh)
        headers = {"Supported": "timer", "Session-Expires": f"{interval};refresher={'uas' if we_refresh else 'uac'}"}
        if supported:
            headers["Require"] = "timer"
        return headers

    def follow(self, response: SipMessage) -> None:
        """The 2xx to an INVITE or UPDATE we sent: the interval and refresher
        it names (not below our Min-SE, so no peer makes us refresh in a
        loop); when it names none, we refresh what we asked for."""
        if not self.wanted:
            return
        agreed = session_expires(response)
        if agreed is None:
            self._start(self.interval or self.wanted, True)
        else:
            self._start(max(agreed.seconds, self.min_se), agreed.refresher != "uas")

    def raise_to(self, response: SipMessage) -> bool:
        """A 422 to our request: ask for its Min-SE from now on. False when
        it names none above what we asked for (asking again would not help)."""
        floor = min_se(response)
        if not self.wanted or floor <= (self.interval or self.wanted):
            return False
        self.min_se = max(self.min_se, floor)
        if self.interval:
            self.interval = floor
        else:
            self.wanted = floor
        return True

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def end(self) -> None:
        """The leg has ended: no timer from now on (an answer to a refresh
        still on its way starts none), and no hold on the leg's methods, a
        cycle that kept every ended leg, its dialog and its messages for the
        garbage collector's full collections."""
        self.stop()
        self.wanted = 0
        self._refresh = self._expire = _ended

    def _start(self, interval: int, we_refresh: bool) -> None:
        self.interval, self.we_refresh = interval, we_refresh
        if we_refresh:
            self._schedule(interval / 2, self._refresh_due)
        else:
            self._schedule(interval - min(32, interval / 3), self._expire)

    def _refresh_due(self) -> None:
        # The session ends when its interval is up unless the refresh's 2xx restarts the timer first.
        self._schedule(self.interval / 2, self._expire)
        self._refresh(self._refreshed, False)

    def _refreshed(self, response: SipResponse) -> None:
        """An answer to our refresh. A 2xx restarts the timer; 408 (no
        answer at all comes as a 408 too) and 481 end the session at once
        (§10); a 422 asks again with the peer's Min-SE; an UPDATE refused
        though allowed is tried as a re-INVITE. Any other refusal (a
        challenge, 491, 500) still shows the peer is there: the next refresh
        is due as after a 2xx, rather than a live call ended for it."""
        status = response.status_code
        method = response.cseq.method.upper() if response.cseq is not None else ""
        if status < 200:
            return
        if status < 300:
            self.follow(response)
        elif status in (408, 481):
            self.stop()
            self._expire()
        elif status == 422 and self.raise_to(response):
            self._refresh(self._refreshed, method == "INVITE")
        elif method == "UPDATE":
            self._refresh(self._refreshed, True)
        else:
            self._start(self.interval, True)

    def _schedule(self, delay: float, action: Callable[[], None]) -> None:
        self.stop()
        if not self.wanted:
            return
        self._handle = asyncio.get_running_loop().call_later(delay, action)


def _ended(*_: object) -> None:
    """What an ended leg's timer calls in place of the leg."""
