"""What the admin API works with: the running services, handed over by the
composition root (pbx.app builds :class:`AdminServices`), so that no handler
needs the application object itself and nothing here imports pbx.app.

Values that a reload replaces (the config, the flows, the prompt library)
are getters: a handler reads the one in force when it runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from pbx.calls.click_to_call import ClickToCalls
from pbx.calls.forwarding import Forwarding
from pbx.calls.journal import CallJournal
from pbx.calls.model import Call
from pbx.calls.monitor import Monitors
from pbx.calls.recording import CallRecording
from pbx.calls.transfer import Transfers
from pbx.config.model import Config, Destination
from pbx.ivr.nodes import Flow
from pbx.live.feed import EventFeed
from pbx.media.prompts import PromptLibrary
from pbx.queues.service import QueueService
from pbx.recordings.recorder import Recorder
from pbx.sip.registrar import Registrar
from pbx.store.db import Store
from pbx.voicemail.service import VoicemailService
from pbx.yamlfile import ConfigIssue


class AdminCalls(Protocol):
    """What the admin API does with calls: list them, hang one up, check
    what a click-to-call may dial, record. The call service implements it."""

    @property
    def calls(self) -> Mapping[str, Call]:
        """The calls in progress, by id."""

    @property
    def recording(self) -> CallRecording:
        """Starts, stops, pauses and resumes the recording of a bridged call."""

    @property
    def draining(self) -> bool:
        """Whether the server is stopping: no new calls."""

    @property
    def journal(self) -> CallJournal:
        """The calls' rows: an answer that promises one awaits :meth:`CallJournal.stored` first."""

    @property
    def transfers(self) -> Transfers:
        """Transfers a bridged call's party elsewhere."""

    @property
    def monitors(self) -> Monitors:
        """Supervisors listening in on bridged calls."""

    @property
    def forwarding(self) -> Forwarding:
        """Each extension's do-not-disturb and forwarding."""

    def hang_up(self, call: Call) -> None:
        """End ``call`` from the server's side."""

    def destination_for(self, text: str, party: str, *, src: str = "-") -> Destination:
        """Where ``text`` leads when extension ``party`` asks for it: BadRequest
        when it leads nowhere, DialRefused when ``party`` may not dial it now."""

    def extension_busy(self, extension: str) -> bool:
        """Whether ``extension`` is on a call or being rung."""


@dataclass(frozen=True)
class AdminServices:
    """The services behind the admin API's routes."""

    config: Callable[[], Config]
    calls: AdminCalls
    click_to_call: ClickToCalls
    registrar: Registrar
    queues: QueueService
    voicemail: VoicemailService
    recorder: Recorder
    store: Store
    prompts: Callable[[], PromptLibrary]
    flows: Callable[[], Mapping[str, Flow]]
    reload: Callable[[], Awaitable[list[ConfigIssue]]]  # the issues that kept the running config; none: it took
    feed: EventFeed


SERVICES = web.AppKey("services", AdminServices)
