"""The typed config: what pbx.yaml says, as frozen dataclasses the server reads.

`pbx.config.load.load_config` builds a `Config` (or raises `ConfigError` with every
problem found); nothing here reads files. The constants are the values some
fields may take, which the section tables (`pbx.config.sections`) enforce.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pbx.errors import PbxError
from pbx.schedule import Schedule
from pbx.yamlfile import ConfigIssue

type Network = ipaddress.IPv4Network | ipaddress.IPv6Network

CODECS: Final = ("PCMU", "PCMA", "G722")
QUEUE_STRATEGIES: Final = ("ringall", "round-robin", "longest-idle", "fewest-calls", "random", "linear")
GROUP_STRATEGIES: Final = ("ringall", "hunt")
MIN_PASSWORD_LENGTH: Final = 8
SRTP_MODES: Final = ("optional", "mandatory", "off")


# --- Errors ---------------------------------------------------------------


class ConfigError(PbxError):
    """The config is unusable; ``issues`` lists every problem found, in file
    order (the API answers 422 ``invalid-config`` with each as ``FILE:LINE: ...``)."""

    status = 422
    code = "invalid-config"

    def __init__(self, issues: list[ConfigIssue]) -> None:
        super().__init__("\n".join(map(str, issues)), errors=[str(issue) for issue in issues])
        self.issues = issues


# --- The typed config -------------------------------------------------------


@dataclass(frozen=True)
class Listen:
    """A SIP listening socket, written ``udp:0.0.0.0:5060`` or ``tcp:[::1]:5060``."""

    transport: str  # "udp" | "tcp" | "tls"
    host: str  # IPv6 without brackets
    port: int


@dataclass(frozen=True)
class TlsConfig:
    """``sip.tls``: our certificate for ``tls:`` listeners, and whom we trust as a client."""

    cert: Path  # PEM certificate chain
    key: Path  # PEM private key
    ca: Path | None  # PEM bundle that trunks' certificates must chain to; None: the system's CAs


@dataclass(frozen=True)
class SipConfig:
    """``sip``: where SIP is served and how the PBX names itself."""

    listen: tuple[Listen, ...]
    domain: str
    external_ip: str | None
    user_agent: str
    ring_timeout: int = 30  # seconds an extension rings before the caller gets 480
    # Seconds a stopping server (SIGTERM) lets calls in progress finish before hanging them up.
    drain_timeout: int = 30
    # Digest algorithms offered in every challenge, in this order (RFC 8760).
    auth_algorithms: tuple[str, ...] = ("SHA-256", "MD5")
    tls: TlsConfig | None = None  # required when `listen` has a tls: address
    max_call_seconds: int = 14400  # a hard cap on any call, whatever its media does
    # RFC 4028 session interval we ask for and refresh at half of (0: no session timers);
    # our Min-SE is the smaller of it and 90 s, the RFC's floor.
    session_expires: int = 1800
    # Seconds between OPTIONS to each registered contact and trunk (0: none); a contact that does not answer is not rung.
    qualify_seconds: int = 60


@dataclass(frozen=True)
class RtpConfig:
    """``rtp``: media address, UDP port range and offered codecs."""

    ip: str
    port_min: int  # even: RTP takes even ports, RTCP the odd one above
    port_max: int
    codecs: tuple[str, ...]  # in order of preference
    srtp: str = "optional"  # SRTP_MODES: optional (on TLS legs) | mandatory | off
    # Seconds an answered leg may send no RTP before the call is ended (0: never);
    # hold_timeout applies while the call is on hold, when silence is normal.
    timeout: int = 60
    hold_timeout: int = 3600


@dataclass(frozen=True)
class Webhook:
    """One of ``webhooks``: where the events of the types in ``events`` are
    POSTed, signed with ``secret`` (pbx.live.webhooks)."""

    url: str
    events: tuple[str, ...]
    secret: str


@dataclass(frozen=True)
class HttpConfig:
    """``http``: the admin API's address and bearer token."""

    host: str
    port: int
    token: str  # never empty for `pbx check`, `serve` and reloads (load_config's require_token)


@dataclass(frozen=True)
class StorageConfig:
    """``storage``: the database and the folder holding recordings/ and voicemail/."""

    data_dir: Path  # recordings/ and voicemail/ live under it
    db: Path  # a relative storage.db resolves under data_dir, which the server may write


@dataclass(frozen=True)
class SoundsConfig:
    """``sounds``: prompt files and the text-to-speech command."""

    dir: Path
    tts: str | None  # TTS command; None disables `say:` prompts


@dataclass(frozen=True)
class IvrConfig:
    """``ivr``: the folder of IVR flows."""

    dir: Path  # every *.yaml in it is a flow named by its file


@dataclass(frozen=True)
class VoicemailBox:
    """An extension's mailbox: optional PIN and notification address; with
    ``queue``, its messages are that queue's work (pbx.queues.voicemail_work)."""

    pin: str | None
    email: str | None
    queue: str | None = None  # the queue whose agents hear each message and call its caller back
    respond_within: int | None = None  # seconds after which a message not yet handled is overdue


@dataclass(frozen=True)
class Forward:
    """``extensions.N.forward``: where the extension's calls go instead of
    ringing it (``always``), when it is busy or in do-not-disturb (``busy``),
    and when it does not answer or is not registered (``no_answer``); None:
    the default (the extension's mailbox for busy and no_answer, when it has one)."""

    always: Destination | None = None
    busy: Destination | None = None
    no_answer: Destination | None = None


@dataclass(frozen=True)
class Extension:
    """A phone account; ``number`` is its key in ``extensions``."""

    number: str
    name: str
    password: str
    voicemail: VoicemailBox | None
    record: bool  # record its answered calls, in and out
    max_contacts: int  # registered bindings at most; a REGISTER beyond it is refused
    max_calls: int  # calls it may be in at once; the next one it places is refused (toll fraud)
    forward: Forward = Forward()  # what a phone sets with feature codes overrides `always` (pbx.calls.settings)
    # Digest algorithms its REGISTERs and calls are challenged with, in order; None: sip.auth_algorithms.
    auth_algorithms: tuple[str, ...] | None = None
    pickup_group: str | None = None  # features.pickup answers calls ringing the extensions of this group


@dataclass(frozen=True)
class TrunkRegister:
    """Credentials for registering with a provider."""

    username: str
    password: str
    expires: int


@dataclass(frozen=True)
class Trunk:
    """A SIP provider: outbound target and trusted inbound sources."""

    name: str
    host: str
    port: int
    inbound_from: tuple[Network, ...]  # source networks trusted for inbound calls
    register: TrunkRegister | None
    caller_id: str | None
    max_calls: int | None = None  # calls through it at once; None: no limit
    transport: str = "udp"  # "udp" | "tls" (host written with ;transport=tls)
    # Digest algorithms the server may answer the provider's challenges with (Asterisk's supported_algorithms_uac).
    auth_algorithms: tuple[str, ...] = ("SHA-256", "MD5")


@dataclass(frozen=True)
class OutboundRule:
    """Dialed numbers matching ``pattern`` (``re.search``) leave through ``trunk``;
    ``extensions`` are the only ones that may use the rule (None: every
    extension, and the calls the server places itself)."""

    pattern: re.Pattern[str]
    trunk: str
    extensions: frozenset[str] | None = None

    def allows(self, number: str, party: str | None) -> bool:
        """Whether ``party`` (an extension; None: the server) may dial ``number`` by this rule."""
        if self.extensions is not None and party not in self.extensions:
            return False
        return self.pattern.search(number) is not None


@dataclass(frozen=True)
class Destination:
    """Where a call goes: ``ivr:FLOW``, ``queue:NAME``, ``extension:NUM``,
    ``group:NAME``, ``voicemail:MAILBOX``, ``external:NUMBER[@TRUNK]`` or ``hangup``."""

    kind: str
    target: str  # "" for hangup
    trunk: str | None = None  # only for external; None: the trunk of the first outbound rule that allows the number

    def __str__(self) -> str:
        if self.kind == "hangup":
            return "hangup"
        suffix = f"@{self.trunk}" if self.trunk else ""
        return f"{self.kind}:{self.target}{suffix}"


@dataclass(frozen=True)
class QueueAnnounce:
    """What waiting callers are told, and how often."""

    position: bool
    wait_time: bool
    every: int  # seconds between announcements


@dataclass(frozen=True)
class QueueCallback:
    """Offering waiting callers a call back instead."""

    enabled: bool
    offer_after: int  # seconds of waiting before the callback is offered
    digit: str  # DTMF digit that accepts the offer
    retries: int
    retry_interval: int  # seconds
    hours: Schedule | None  # when callbacks are placed; None: any time


@dataclass(frozen=True)
class Queue:
    """A call queue; ``name`` is its key in ``queues``."""

    name: str
    strategy: str
    agents: tuple[str, ...]
    ring_timeout: int
    wrapup: int
    max_wait: int
    on_timeout: Destination | None  # None: hang up after max_wait
    on_no_agents: Destination | None  # None: keep waiting
    moh: str
    announce: QueueAnnounce
    service_level: int
    record: bool
    callback: QueueCallback
    survey: str | None  # the flow a caller enters when the agent hangs up first; None: no survey


@dataclass(frozen=True)
class Group:
    """A ring group; ``name`` is its key in ``groups`` and ``group:NAME`` reaches it."""

    name: str
    members: tuple[str, ...]  # extensions
    strategy: str  # GROUP_STRATEGIES: ringall (every member at once) | hunt (one after another)
    ring_timeout: int  # seconds the group rings (ringall), or each member rings (hunt)
    on_fail: Destination | None  # where the call goes when nobody answered; None: the caller gets the failure


@dataclass(frozen=True)
class RecordingConfig:
    """``recording``: file format and retention of call recordings."""

    format: str
    stereo: bool
    retention_days: int  # 0 keeps recordings forever


@dataclass(frozen=True)
class VoicemailConfig:
    """``voicemail``: message length limits and the greeting prompt."""

    max_seconds: int
    min_seconds: int
    greeting: str


@dataclass(frozen=True)
class SmtpConfig:
    """``smtp``: the mail server voicemail notifications go through."""

    host: str
    port: int
    username: str | None
    password: str | None
    sender: str  # the From address (key ``from``)
    starttls: bool


@dataclass(frozen=True)
class FeaturesConfig:
    """``features``: codes an extension dials for built-in services."""

    voicemail_main: str
    agent_login: str
    agent_pause: str
    forward_on: str = "*72"  # followed by the number: forward every call there
    forward_off: str = "*73"
    dnd_on: str = "*78"
    dnd_off: str = "*79"
    pickup: str = "*8"  # answer the oldest call ringing an extension of the caller's pickup_group
    directed_pickup: str = "**"  # followed by an extension: answer the call ringing it
    park: str = "70"  # a transfer here parks the caller in the lowest free park slot
    # Keys an extension presses in a bridged call, then a number (pbx.calls.feature_keys).
    blind_transfer: str = "##"
    attended_transfer: str = "*2"

    def picks_up(self, number: str) -> bool:
        """Whether dialing ``number`` picks up a call ringing someone else."""
        return number == self.pickup or (number.startswith(self.directed_pickup) and number[len(self.directed_pickup) :].isdigit())

    def sets_phone(self, number: str) -> bool:
        """Whether dialing ``number`` changes the caller's own do-not-disturb or forwarding."""
        return number in (self.forward_off, self.dnd_on, self.dnd_off) or number.startswith(self.forward_on)


@dataclass(frozen=True)
class ParkConfig:
    """``park``: the slots parked calls wait in (``slots: [first, last]``;
    dialing one retrieves its call), and the seconds a parked call waits
    before it rings whoever parked it again."""

    first: int = 71
    last: int = 79
    timeout: int = 120

    @property
    def slots(self) -> range:
        return range(self.first, self.last + 1)

    def holds(self, number: str) -> bool:
        """Whether ``number`` is a park slot's."""
        return number.isdigit() and not number.startswith("0") and int(number) in self.slots


@dataclass(frozen=True)
class Config:
    """The whole of pbx.yaml; paths in it are absolute."""

    path: Path
    sip: SipConfig
    rtp: RtpConfig
    http: HttpConfig
    storage: StorageConfig
    sounds: SoundsConfig
    ivr: IvrConfig
    timezone: str
    extensions: dict[str, Extension]
    trunks: dict[str, Trunk]
    outbound: tuple[OutboundRule, ...]
    inbound: dict[str, Destination]
    queues: dict[str, Queue]
    recording: RecordingConfig
    voicemail: VoicemailConfig
    smtp: SmtpConfig | None  # None: voicemail is not e-mailed
    features: FeaturesConfig
    groups: dict[str, Group]
    park: ParkConfig = ParkConfig()
    webhooks: tuple[Webhook, ...] = ()

    def mailbox(self, number: str) -> VoicemailBox | None:
        """The mailbox of extension ``number``; None when it has no voicemail section or is no extension."""
        ext = self.extensions.get(number)
        return ext.voicemail if ext is not None else None

    def route_outbound(self, number: str, party: str | None = None) -> Trunk | None:
        """The trunk of the first outbound rule that matches ``number`` and that
        ``party`` may use; None: refuse the call. ``party`` is the extension
        dialing (itself, or by click-to-call); None is the server placing a
        call of its own (callbacks, flows, queue exits), which may use only
        the rules without an ``extensions`` list."""
        for rule in self.outbound:
            if rule.allows(number, party):
                return self.trunks[rule.trunk]
        return None

    def trunk_for_source(self, ip: str) -> Trunk | None:
        """The first trunk whose ``inbound_from`` holds address ``ip``; None: not a trunk."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
        for trunk in self.trunks.values():
            if any(address in network for network in trunk.inbound_from):
                return trunk
        return None
