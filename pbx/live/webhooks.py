"""Webhooks: each event of the feed (pbx.live.feed) POSTed to the URLs of
``webhooks`` that ask for its type, signed, retried, never in a call's way.

A delivery is the event's JSON with these headers:

- ``X-Pbx-Event``: its type; ``X-Pbx-Delivery``: its id;
- ``X-Pbx-Timestamp``: Unix seconds when this attempt was signed;
- ``X-Pbx-Signature: sha256=HEX``, the HMAC-SHA256 under the webhook's
  ``secret`` of ``TIMESTAMP.BODY``. A receiver recomputes it, compares in
  constant time and refuses old timestamps: a captured delivery cannot be
  replayed later, nor a forged one pass.

Any 2xx answer delivers it. Anything else (another status, no answer within
:data:`TIMEOUT`, no connection) counts a failure (``webhook_failed``, which
pbx_webhook_failures_total counts) and is tried again after 1, 2, 4 ... up
to 60 s, :data:`ATTEMPTS` times in all, then dropped with an ERROR line.
Events reach each URL in order; a URL that is down holds its own events
(up to :data:`BACKLOG`, past which the oldest are dropped and counted as
failures), never anyone else's, and never a call: the feed only queues them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections import deque
from collections.abc import Callable

import aiohttp

from pbx.config.model import Config, Webhook
from pbx.events import EventBus
from pbx.live.feed import Event, EventFeed
from pbx.tasks import Background

logger = logging.getLogger(__name__)

TIMEOUT = 10.0  # seconds a receiver has to answer one attempt
ATTEMPTS = 8  # 1+2+4+8+16+32+60 s of back-off: about two minutes of outage bridged
MAX_BACKOFF = 60.0
BACKLOG = 10_000  # events waiting for one URL


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The X-Pbx-Signature value of ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


class Webhooks:
    """One delivery queue and sender per webhook URL."""

    def __init__(self, *, config: Callable[[], Config], feed: EventFeed, events: EventBus, http: Callable[[], aiohttp.ClientSession]) -> None:
        self.config = config
        self.events = events
        self.http = http
        self._pending: dict[str, deque[Event]] = {}  # by URL
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks = Background("webhook")
        feed.listen(self._take)

    async def stop(self) -> None:
        left = sum(map(len, self._pending.values()))
        if left:
            logger.warning("stopping with %d webhook deliveries undelivered", left)
        await self._tasks.close()

    def _take(self, event: Event) -> None:
        for hook in self.config().webhooks:
            if event["type"] not in hook.events:
                continue
            pending = self._pending.get(hook.url)
            if pending is None:
                pending = self._pending[hook.url] = deque()
                self._wake[hook.url] = asyncio.Event()
                self._tasks.spawn(self._send_all(hook.url))
            if len(pending) >= BACKLOG:
                dropped = pending.popleft()
                logger.error("webhook %s: %d events waiting; dropped event %d (%s)", hook.url, BACKLOG, dropped["id"], dropped["type"])
                self.events.emit("webhook_failed", url=hook.url)
            pending.append(event)
            self._wake[hook.url].set()

    async def _send_all(self, url: str) -> None:
        pending, wake = self._pending[url], self._wake[url]
        while True:
            await wake.wait()
            wake.clear()
            while pending:
                await self._deliver(url, pending[0])
                if pending:  # unless the backlog dropped it meanwhile
                    pending.popleft()

    async def _deliver(self, url: str, event: Event) -> None:
        body = json.dumps(event, separators=(",", ":")).encode()
        backoff = 1.0
        for attempt in range(1, ATTEMPTS + 1):
            hook = self._hook(url)
            if hook is None:  # a reload took the webhook away
                return
            problem = await self._post(hook, event, body)
            if problem is None:
                return
            self.events.emit("webhook_failed", url=url)
            if attempt == ATTEMPTS:
                logger.error("webhook %s: event %d (%s) dropped after %d attempts: %s", url, event["id"], event["type"], attempt, problem)
                return
            logger.warning("webhook %s: event %d (%s) attempt %d failed: %s; again in %.0f s", url, event["id"], event["type"], attempt, problem, backoff)
            await asyncio.sleep(backoff)  # the back-off itself: nothing to await but the clock
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _post(self, hook: Webhook, event: Event, body: bytes) -> str | None:
        """None once delivered, else what went wrong."""
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-Pbx-Event": event["type"],
            "X-Pbx-Delivery": str(event["id"]),
            "X-Pbx-Timestamp": timestamp,
            "X-Pbx-Signature": signature(hook.secret, timestamp, body),
        }
        try:
            async with self.http().post(hook.url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as response:
                if 200 <= response.status < 300:
                    return None
                return f"answered {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"

    def _hook(self, url: str) -> Webhook | None:
        return next((hook for hook in self.config().webhooks if hook.url == url), None)
