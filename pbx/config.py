"""pbx.yaml (CONTRACT §2): loaded once, validated, handed out as frozen dataclasses.

Every problem is reported as ``FILE:LINE: message`` and all of them are
collected in one pass, so an admin fixes a file in one go. The YAML is composed
into nodes (not constructed into plain objects) so that each value keeps the
line it came from (`pbx.yamlfile`, shared with the IVR flows); the ``_*_FIELDS``
tables below then say, per section, which keys exist, how each value is read
and what it defaults to.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# The generic machinery, under this module's names for its own helpers.
from pbx.schedule import Schedule, parse_schedule
from pbx.yamlfile import ConfigIssue as ConfigIssue
from pbx.yamlfile import Convert as Convert
from pbx.yamlfile import Field as _Field
from pbx.yamlfile import Invalid as _Invalid
from pbx.yamlfile import Reader as _Reader
from pbx.yamlfile import Reported as _Reported
from pbx.yamlfile import YamlNode as _Node
from pbx.yamlfile import boolean as _boolean
from pbx.yamlfile import choice as _choice
from pbx.yamlfile import fields_of as _fields_of
from pbx.yamlfile import integer as _integer
from pbx.yamlfile import list_of as _list_of
from pbx.yamlfile import load_yaml as _load_yaml
from pbx.yamlfile import matching as _matching
from pbx.yamlfile import optional as _optional
from pbx.yamlfile import section as _section
from pbx.yamlfile import string as _string
from pbx.yamlfile import table as _table
from pbx.yamlfile import text as _text

type Network = ipaddress.IPv4Network | ipaddress.IPv6Network

CODECS: Final = ("PCMU", "PCMA", "G722")
QUEUE_STRATEGIES: Final = ("ringall", "round-robin", "longest-idle", "fewest-calls", "random", "linear")
DESTINATION_KINDS: Final = ("ivr", "queue", "extension", "voicemail", "external", "hangup")
MIN_PASSWORD_LENGTH: Final = 8
SRTP_MODES: Final = ("optional", "mandatory", "off")


# --- Errors ---------------------------------------------------------------


class ConfigError(Exception):
    """The config is unusable; ``issues`` lists every problem found, in file order."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        super().__init__("\n".join(map(str, issues)))
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


@dataclass(frozen=True)
class RtpConfig:
    """``rtp``: media address, UDP port range and offered codecs."""

    ip: str
    port_min: int  # even: RTP takes even ports, RTCP the odd one above
    port_max: int
    codecs: tuple[str, ...]  # in order of preference
    srtp: str = "optional"  # SRTP_MODES: optional (on TLS legs) | mandatory | off


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
    """An extension's mailbox: optional PIN and notification address."""

    pin: str | None
    email: str | None


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
    ``voicemail:MAILBOX``, ``external:NUMBER[@TRUNK]`` or ``hangup``."""

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


# --- Destinations -----------------------------------------------------------

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_DIGITS = r"[0-9]+"
_DIAL_NUMBER = r"\+?[0-9*#]+"
_TARGET_RULES: Final = {
    "ivr": (_NAME, "a flow name"),
    "queue": (_NAME, "a queue name"),
    "extension": (_DIGITS, "an extension number"),
    "voicemail": (rf"{_DIGITS}|main", "a mailbox number, or main (ask for the mailbox and PIN)"),
    "external": (rf"{_DIAL_NUMBER}(@{_NAME})?", "a number, optionally followed by @TRUNK"),
}


def parse_destination(text: str) -> Destination:
    """Parse ``KIND:TARGET`` or ``hangup``; raise ValueError saying what is wrong."""
    if text == "hangup":
        return Destination("hangup", "")
    kind, colon, target = text.partition(":")
    if kind == "hangup":
        raise ValueError(f"destination {text!r}: hangup takes no target")
    if kind not in _TARGET_RULES:
        raise ValueError(f"unknown destination {text!r}: expected one of {', '.join(DESTINATION_KINDS)}")
    if not colon or not target:
        raise ValueError(f"destination {text!r} needs a target after '{kind}:'")
    pattern, what = _TARGET_RULES[kind]
    if not re.fullmatch(pattern, target):
        raise ValueError(f"destination {text!r}: {target!r} is not {what}")
    if kind == "external" and "@" in target:
        number, trunk = target.split("@")
        return Destination(kind, number, trunk)
    return Destination(kind, target)


_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# What `Reader.refer` may name: kind -> (key in `Reader.declared` holding the names, noun
# for messages). IVR flows check their destinations against the same kinds.
REFERENCE_KINDS: Final = {
    "extension": ("extension", "extension"),
    "mailbox": ("mailbox", "mailbox"),  # extensions with a `voicemail` section
    "queue": ("queue", "queue"),
    "trunk": ("trunk", "trunk"),
    "ivr": ("ivr", "IVR flow"),
}


class DestinationReader(_Reader):
    """A reader of files holding destinations (pbx.yaml, IVR flows): it keeps
    the ``external:`` ones, whose numbers must pass the outbound rules."""

    def __init__(
        self,
        file: Path,
        issues: list[ConfigIssue] | None = None,
        *,
        base_dir: Path | None = None,
        reference_kinds: Mapping[str, tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(file, issues, base_dir=base_dir, reference_kinds=reference_kinds)
        self.external: list[tuple[Destination, _Node]] = []

    def check_dialable(self, config: Config) -> None:
        """Report every ``external:`` destination whose number no outbound rule
        lets the server dial: the call would be refused when it got there."""
        for destination, node in self.external:
            if destination.trunk is not None and destination.trunk not in config.trunks:
                continue  # reported as an unknown trunk
            if config.route_outbound(destination.target) is None:
                self.report(
                    node.line,
                    f"{node.path}: no outbound rule lets the server dial {destination.target!r} "
                    "(rules with an `extensions` list serve only those extensions)",
                )


class _ConfigReader(DestinationReader):
    """Reads pbx.yaml: ${ENV} expansion, and the IVR folder for `ivr:` hints."""

    def __init__(self, file: Path, base_dir: Path, env: Mapping[str, str], issues: list[ConfigIssue]) -> None:
        super().__init__(file, issues, base_dir=base_dir, reference_kinds=REFERENCE_KINDS)
        self.env = env
        self.flow_dir: Path | None = None

    def missing_hint(self, kind: str, name: str) -> str:
        if kind == "ivr" and self.flow_dir:
            return f" (no file {self.flow_dir / f'{name}.yaml'})"
        return mailbox_hint(kind, name, self.declared.get("extension", set()))

    def expand(self, node: _Node) -> _Node:
        if not isinstance(node.value, str):
            return node

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = self.env.get(name)
            if value:
                return value
            if default is not None:
                return default
            if value is None:
                raise _Invalid(f"{name} is not set")
            return value

        expanded, count = _ENV_VAR.subn(substitute, node.value)
        return replace(node, value=expanded, from_env=True) if count else node


def _user_path(r: _Reader, node: _Node) -> Path:
    """A path as written, with ``~`` expanded; relative ones stay relative."""
    text = _text(r, node)
    try:
        return Path(text).expanduser()
    except RuntimeError:  # ~name of no user
        raise _Invalid(f"{node.name}: {text!r} names the home of an unknown user") from None


def _path(r: _Reader, node: _Node) -> Path:
    return r.base_dir / _user_path(r, node)


def _flow_dir(r: _Reader, node: _Node) -> Path:
    """The IVR folder; its *.yaml files declare the flow names `ivr:` may use."""
    path = _path(r, node)
    assert isinstance(r, _ConfigReader)
    r.flow_dir = path
    r.declared["ivr"] = {flow.stem for flow in path.glob("*.yaml")}
    return path


def _timezone(r: _Reader, node: _Node) -> str:
    name = _text(r, node)
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise _Invalid(f"{node.name}: unknown time zone {name!r}") from None
    return name


def _hours(r: _Reader, node: _Node) -> Schedule:
    try:
        return parse_schedule(_text(r, node))
    except ValueError as exc:
        raise _Invalid(f"{node.name}: {exc}") from None


def _ip_address(r: _Reader, node: _Node) -> str:
    value = _text(r, node)
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise _Invalid(f"{node.name} must be an IP address, not {value!r}") from None
    return value


def _network(r: _Reader, node: _Node) -> Network:
    value = node.written() or ""
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise _Invalid(f"{node.name} must be a network like 203.0.113.0/24, not {node.value!r}") from None


_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
_HOST_PORT = re.compile(r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+))(?::(?P<port>[0-9]+))?")


def _split_host_port(text: str, default_port: int | None) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (port optional when there is a default); ValueError if bad."""
    match = _HOST_PORT.fullmatch(text)
    if not match or (match["port"] is None and default_port is None):
        raise ValueError("expected HOST:PORT, with an IPv6 address in brackets")
    host = match["v6"] or match["host"]
    if match["v6"]:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    elif not _is_ipv4(host) and (not _HOSTNAME.fullmatch(host) or re.fullmatch(r"[0-9.]+", host)):
        raise ValueError(f"{host!r} is not a host name or IPv4 address")
    port = int(match["port"]) if match["port"] else default_port
    assert port is not None
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not within 1..65535")
    return host, port


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _host_port(default_port: int | None, example: str) -> Convert[tuple[str, int]]:
    def convert(r: _Reader, node: _Node) -> tuple[str, int]:
        try:
            return _split_host_port(_text(r, node), default_port)
        except ValueError as exc:
            raise _Invalid(f"{node.name}: {exc} (like {example})") from None

    return convert


def _listen(r: _Reader, node: _Node) -> Listen:
    text = _text(r, node)
    transport, _, address = text.partition(":")
    try:
        if transport not in ("udp", "tcp", "tls"):
            raise ValueError(f"transport must be udp, tcp or tls, not {transport!r}")
        listen = Listen(transport, *_split_host_port(address, None))
    except ValueError as exc:
        example = "like udp:0.0.0.0:5060, tcp:[::1]:5060 or tls:0.0.0.0:5061"
        raise _Invalid(f"{node.name}: bad listen address {text!r}: {exc} ({example})") from None


    # Trunks (read after sip) may use ;transport=tls only when a TLS listener exists.
    r.declared.setdefault("transport", set()).add(transport)
    return listen


def _trunk_host(r: _Reader, node: _Node) -> tuple[str, int, str]:
    """``host[:port][;transport=udp|tls]``; TLS defaults to port 5061 and needs a tls: listener."""
    text = _text(r, node)
    address, _, params = text.partition(";")
    transport = "udp"
    if params:
        name, _, value = params.partition("=")
        if name.strip().lower() != "transport" or value.strip().lower() not in ("udp", "tls"):
            raise _Invalid(f"{node.name}: bad parameter {params!r}: only ;transport=udp or ;transport=tls")
        transport = value.strip().lower()
    if transport == "tls" and "tls" not in r.declared.get("transport", set()):
        raise _Invalid(f"{node.name}: ;transport=tls needs a tls: address in sip.listen (and sip.tls)")
    try:
        host, port = _split_host_port(address, 5061 if transport == "tls" else 5060)
    except ValueError as exc:
        raise _Invalid(f"{node.name}: {exc} (like sip.example.net:5060 or sip.example.net:5061;transport=tls)") from None
    return host, port, transport


def _existing_file(r: _Reader, node: _Node) -> Path:
    path = _path(r, node)
    if not path.is_file():
        raise _Invalid(f"{node.name}: no file {path}")
    return path


def _build_tls(node: _Node, values: dict[str, Any]) -> TlsConfig:
    tls = TlsConfig(values["cert"], values["key"], values["ca"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (ssl.SSLError, OSError) as exc:
        raise _Invalid(f"sip.tls: cannot use {tls.cert} with {tls.key}: {exc}", node.line_of("cert")) from None
    if tls.ca is not None:
        try:
            context.load_verify_locations(tls.ca)
        except (ssl.SSLError, OSError) as exc:
            raise _Invalid(f"sip.tls.ca: {tls.ca} is no PEM bundle of certificates: {exc}", node.line_of("ca")) from None
    return tls


def _build_sip(node: _Node, values: dict[str, Any]) -> SipConfig:
    if values["tls"] is None and any(listen.transport == "tls" for listen in values["listen"]):
        raise _Invalid("sip.listen has a tls: address but sip.tls (cert and key) is missing", node.line_of("listen"))
    return SipConfig(**values)


def _srtp_mode(r: _Reader, node: _Node) -> str:
    if node.value is False:  # YAML 1.1 reads a bare `off` as false
        return "off"
    return _choice(*SRTP_MODES)(r, node)


def _port_range(r: _Reader, node: _Node) -> tuple[int, int]:
    ports = _list_of(_integer(1024, 65535))(r, node)
    if len(ports) != 2:
        raise _Invalid(f"{node.name} must be two port numbers: [min, max]")
    low, high = ports
    if low % 2:
        raise _Invalid(f"{node.name}: the first port must be even (RTP uses even ports, RTCP the odd one above)")
    if high - low + 1 < 4:
        raise _Invalid(f"{node.name}: [{low}, {high}] must span at least 4 ports, lowest first")
    return low, high


def _regex(r: _Reader, node: _Node) -> re.Pattern[str]:
    text = _text(r, node)
    try:
        return re.compile(text)
    except re.error as exc:
        raise _Invalid(f"{node.name}: invalid regular expression {text!r}: {exc}") from None


def _reference(kind: str, convert: Convert[str]) -> Convert[str]:
    """A name of a ``kind`` defined elsewhere in the file; checked once everything is read."""

    def reference(r: _Reader, node: _Node) -> str:
        name = convert(r, node)
        r.refer(kind, name, node)
        return name

    return reference


def read_destination(r: _Reader, node: _Node) -> Destination:
    """Converter for a destination; what it names is checked against ``REFERENCE_KINDS``.

    The reader's ``declared`` must hold the extensions, queues, trunks and IVR flows.
    """
    if not isinstance(node.value, str):
        raise _Invalid(f"{node.name} must be a destination like extension:1001, not {node.value!r}")
    try:
        destination = parse_destination(node.value)
    except ValueError as exc:
        raise _Invalid(f"{node.name}: {exc}") from None
    match destination.kind:
        case "ivr" | "queue" | "extension":
            r.refer(destination.kind, destination.target, node)
        case "voicemail" if destination.target != "main":
            r.refer("mailbox", destination.target, node)
        case "external":
            r.refer("trunk", destination.trunk, node)
            if isinstance(r, DestinationReader):
                r.external.append((destination, node))
    return destination


# --- Sections: one table of fields each ------------------------------------------


def _build_rtp(node: _Node, values: dict[str, Any]) -> RtpConfig:
    port_min, port_max = values["ports"]
    return RtpConfig(values["ip"], port_min, port_max, values["codecs"], srtp=values["srtp"])


def _build_http(node: _Node, values: dict[str, Any]) -> HttpConfig:
    host, port = values["listen"]
    return HttpConfig(host, port, values["token"])


def _build_storage(node: _Node, values: dict[str, Any]) -> StorageConfig:
    # The database lives with the rest of the data (the systemd unit lets the
    # server write only data_dir), unless storage.db is an absolute path.
    return StorageConfig(values["data_dir"], values["data_dir"] / values["db"])


def _build_extension(node: _Node, values: dict[str, Any]) -> Extension:
    if len(values["password"]) < MIN_PASSWORD_LENGTH:
        raise _Invalid(
            f"password of extension {node.key} is shorter than {MIN_PASSWORD_LENGTH} characters",
            node.line_of("password"),
        )
    return Extension(node.key, **values)


def _build_trunk(node: _Node, values: dict[str, Any]) -> Trunk:
    host, port, transport = values["host"]
    return Trunk(
        node.key, host, port, values["inbound_from"], values["register"], values["caller_id"], max_calls=values["max_calls"],
        transport=transport,
    )


def _build_outbound_rule(node: _Node, values: dict[str, Any]) -> OutboundRule:
    extensions = frozenset(values["extensions"]) if values["extensions"] is not None else None
    return OutboundRule(values["match"], values["trunk"], extensions)


def _build_voicemail(node: _Node, values: dict[str, Any]) -> VoicemailConfig:
    if values["min_seconds"] >= values["max_seconds"]:
        raise _Invalid("voicemail.min_seconds must be below voicemail.max_seconds", node.line_of("min_seconds"))
    return VoicemailConfig(**values)


def _extensions(r: _Reader, node: _Node) -> dict[str, Extension]:
    """The extensions; those with a ``voicemail`` section declare the mailboxes
    (as written, so references are checked even when an extension is broken)."""
    if isinstance(node.value, dict):
        r.declared["mailbox"] = {
            number
            for number, child in node.value.items()
            if isinstance(child.value, dict) and "voicemail" in child.value and child.value["voicemail"].value is not None
        }
    return _table("extension", _number, _section(_EXTENSION_FIELDS, _build_extension))(r, node)


def mailbox_hint(kind: str, name: str, extensions: set[str]) -> str:
    """Why ``voicemail:NAME`` names no mailbox when NAME is an extension."""
    return f" (extension {name} has no voicemail section)" if kind == "mailbox" and name in extensions else ""


def _build_smtp(node: _Node, values: dict[str, Any]) -> SmtpConfig:
    host, port = values["host"]
    return SmtpConfig(host, port, values["username"], values["password"], values["from"], values["starttls"])


def _build_features(node: _Node, values: dict[str, Any]) -> FeaturesConfig:
    seen: dict[str, str] = {}
    for name, code in values.items():
        if code in seen:
            raise _Invalid(f"features.{name} uses {code!r}, like features.{seen[code]}", node.line_of(name))
        seen[code] = name
    return FeaturesConfig(**values)


_number = _matching(_DIGITS, "an extension number (digits)")
_name = _matching(_NAME, "a name of letters, digits, '_', '.' or '-'")
_dtmf_digit = _matching(r"[0-9*#]", "one DTMF key (0-9, * or #)")
_feature_code = _matching(r"[0-9*#]+", "a code of DTMF keys, like \"*97\"")

_TLS_FIELDS = (
    _Field("cert", _existing_file),
    _Field("key", _existing_file),
    _Field("ca", _optional(_existing_file), None),
)
_SIP_FIELDS = (
    _Field("listen", _list_of(_listen, non_empty=True, unique=True), ["udp:0.0.0.0:5060", "tcp:0.0.0.0:5060"]),
    _Field("domain", _text, "pbx.local"),
    _Field("external_ip", _optional(_ip_address), None),
    _Field("user_agent", _text, "pbx"),
    _Field("ring_timeout", _integer(1, 600), 30),
    _Field("drain_timeout", _integer(0, 3600), 30),
    _Field("auth_algorithms", _list_of(_choice("SHA-256", "MD5"), non_empty=True, unique=True), ["SHA-256", "MD5"]),
    _Field("tls", _optional(_section(_TLS_FIELDS, _build_tls)), None),
)
_RTP_FIELDS = (
    _Field("ip", _ip_address, "0.0.0.0"),
    _Field("ports", _port_range, [10000, 20000]),
    _Field("codecs", _list_of(_choice(*CODECS), non_empty=True, unique=True), list(CODECS)),
    _Field("srtp", _srtp_mode, "optional"),
)
_HTTP_FIELDS = (
    _Field("listen", _host_port(None, "127.0.0.1:8080"), "127.0.0.1:8080"),
    _Field("token", _string, "${PBX_ADMIN_TOKEN:-}"),
)
_STORAGE_FIELDS = (
    _Field("data_dir", _path, "."),
    _Field("db", _user_path, "pbx.db"),  # under data_dir when relative
)
_SOUNDS_FIELDS = (_Field("dir", _path, "config/sounds"), _Field("tts", _optional(_text), "espeak-ng"))
_IVR_FIELDS = (_Field("dir", _flow_dir, "ivr_flows"),)
_MAILBOX_FIELDS = (
    _Field("pin", _optional(_matching(r"[0-9]{4,}", "a PIN of at least 4 digits, in quotes")), None),
    _Field("email", _optional(_matching(r"[^@\s]+@[^@\s]+", "an email address")), None),
)
_EXTENSION_FIELDS = (
    _Field("name", _text),
    _Field("password", _string),
    _Field("voicemail", _optional(_section(_MAILBOX_FIELDS, _fields_of(VoicemailBox))), None),
    _Field("record", _boolean, False),
    _Field("max_contacts", _integer(1, 100), 10),
    _Field("max_calls", _integer(1, 1000), 4),
)
_REGISTER_FIELDS = (
    _Field("username", _text),
    _Field("password", _text),
    _Field("expires", _integer(60, 86400), 300),
)
_TRUNK_FIELDS = (
    _Field("host", _trunk_host),
    _Field("inbound_from", _list_of(_network), []),
    _Field("register", _optional(_section(_REGISTER_FIELDS, _fields_of(TrunkRegister))), None),
    _Field("caller_id", _optional(_matching(r"\+?[0-9]+", "a phone number like \"+15550100\"")), None),
    _Field("max_calls", _optional(_integer(1, 100000)), None),
)
_OUTBOUND_FIELDS = (
    _Field("match", _regex),
    _Field("trunk", _reference("trunk", _name)),
    _Field("extensions", _optional(_list_of(_reference("extension", _number), non_empty=True, unique=True)), None),
)
_ANNOUNCE_FIELDS = (
    _Field("position", _boolean, True),
    _Field("wait_time", _boolean, True),
    _Field("every", _integer(5, 3600), 30),
)
_CALLBACK_FIELDS = (
    _Field("enabled", _boolean, True),
    _Field("offer_after", _integer(0, 86400), 45),
    _Field("digit", _dtmf_digit, "1"),
    _Field("retries", _integer(0, 20), 3),
    _Field("retry_interval", _integer(10, 86400), 120),
    _Field("hours", _optional(_hours), None),
)
_QUEUE_FIELDS = (
    _Field("strategy", _choice(*QUEUE_STRATEGIES), "longest-idle"),
    _Field("agents", _list_of(_reference("extension", _number), unique=True), []),
    _Field("ring_timeout", _integer(1, 600), 15),
    _Field("wrapup", _integer(0, 3600), 10),
    _Field("max_wait", _integer(1, 86400), 900),
    _Field("on_timeout", _optional(read_destination), None),
    _Field("on_no_agents", _optional(read_destination), None),
    _Field("moh", _name, "default"),
    _Field("announce", _section(_ANNOUNCE_FIELDS, _fields_of(QueueAnnounce)), {}),
    _Field("service_level", _integer(1, 3600), 20),
    _Field("record", _boolean, True),
    _Field("callback", _section(_CALLBACK_FIELDS, _fields_of(QueueCallback)), {}),
)
_RECORDING_FIELDS = (
    _Field("format", _choice("wav"), "wav"),
    _Field("stereo", _boolean, True),
    _Field("retention_days", _integer(0, 36500), 90),
)
_VOICEMAIL_FIELDS = (
    _Field("max_seconds", _integer(1, 3600), 180),
    _Field("min_seconds", _integer(0, 60), 1),
    _Field("greeting", _text, "vm-greeting"),
)
_SMTP_FIELDS = (
    _Field("host", _host_port(587, "smtp.example.com:587")),
    _Field("username", _optional(_text), None),
    _Field("password", _optional(_string), None),
    _Field("from", _matching(r"[^@\s]+@[^@\s]+", "an email address"), "pbx@localhost"),
    _Field("starttls", _boolean, True),
)
_FEATURES_FIELDS = (
    _Field("voicemail_main", _feature_code, "*97"),
    _Field("agent_login", _feature_code, "*45"),
    _Field("agent_pause", _feature_code, "*46"),
)
_CONFIG_FIELDS = (
    _Field("sip", _section(_SIP_FIELDS, _build_sip), {}),
    _Field("rtp", _section(_RTP_FIELDS, _build_rtp), {}),
    _Field("http", _section(_HTTP_FIELDS, _build_http), {}),
    _Field("storage", _section(_STORAGE_FIELDS, _build_storage), {}),
    _Field("sounds", _section(_SOUNDS_FIELDS, _fields_of(SoundsConfig)), {}),
    _Field("ivr", _section(_IVR_FIELDS, _fields_of(IvrConfig)), {}),
    _Field("timezone", _timezone, "UTC"),
    _Field("extensions", _extensions, {}),
    _Field("trunks", _table("trunk", _name, _section(_TRUNK_FIELDS, _build_trunk)), {}),
    _Field("outbound", _list_of(_section(_OUTBOUND_FIELDS, _build_outbound_rule)), []),
    _Field("inbound", _table(None, _matching(r"[^\s:@]+", "a number or SIP user"), read_destination), {}),
    _Field("queues", _table("queue", _name, _section(_QUEUE_FIELDS, lambda n, v: Queue(n.key, **v))), {}),
    _Field("recording", _section(_RECORDING_FIELDS, _fields_of(RecordingConfig)), {}),
    _Field("voicemail", _section(_VOICEMAIL_FIELDS, _build_voicemail), {}),
    _Field("smtp", _optional(_section(_SMTP_FIELDS, _build_smtp)), None),
    _Field("features", _section(_FEATURES_FIELDS, _build_features), {}),
)


def load_config(path: Path, env: Mapping[str, str] | None = None, *, require_token: bool = False) -> Config:
    """Read and validate pbx.yaml; raise ConfigError listing every problem.

    ``${VAR}`` and ``${VAR:-default}`` in string values are taken from ``env``
    (default ``os.environ``); the default applies when VAR is unset or empty.
    Relative paths resolve against the folder holding ``path``, but a relative
    ``storage.db`` resolves under ``storage.data_dir``. ``require_token``
    (`pbx check`, `serve` and reloads) makes an empty ``http.token`` an error:
    the admin API answers nothing without one, on loopback too.
    """
    path = Path(path)
    root, issues = _load_yaml(path)
    if root is None:
        raise ConfigError(issues)
    reader = _ConfigReader(path, path.parent.resolve(), os.environ if env is None else env, issues)
    try:
        values = reader.read(_section(_CONFIG_FIELDS, lambda n, v: v), root)
    except _Reported:
        values = None
    reader.check_references()
    if require_token and values is not None and "http" in values and not values["http"].token:
        http = root.value.get("http") if isinstance(root.value, dict) else None
        line = http.line_of("token") if http is not None else 0
        message = "http.token is empty: the admin API needs a token on every address (`make run` writes PBX_ADMIN_TOKEN to .env)"
        reader.issues.append(ConfigIssue(path, line, message))
    if values is None or reader.issues:
        raise ConfigError(sorted(reader.issues, key=lambda issue: issue.line))
    config = Config(path=path, **values)
    reader.check_dialable(config)
    if reader.issues:
        raise ConfigError(sorted(reader.issues, key=lambda issue: issue.line))
    return config
