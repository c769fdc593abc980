"""How pbx.yaml's values are read: the `ConfigReader` and the converters that
the section tables (`pbx.config.sections`) name for paths, addresses, ports,
time zones, schedules and references.

A converter takes the reader and a node and returns the typed value, or raises
`Invalid` with a message that names the key (`pbx.yamlfile`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pbx.config.destinations import REFERENCE_KINDS, DestinationReader, mailbox_hint
from pbx.config.model import SRTP_MODES, Listen, Network
from pbx.schedule import Schedule, parse_schedule
from pbx.yamlfile import ConfigIssue, Convert, Invalid, Reader, YamlNode, choice, integer, list_of, text

_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigReader(DestinationReader):
    """Reads pbx.yaml: ${ENV} expansion, and the IVR folder for `ivr:` hints."""

    def __init__(self, file: Path, base_dir: Path, env: Mapping[str, str], issues: list[ConfigIssue]) -> None:
        super().__init__(file, issues, base_dir=base_dir, reference_kinds=REFERENCE_KINDS)
        self.env = env
        self.flow_dir: Path | None = None

    def missing_hint(self, kind: str, name: str) -> str:
        if kind == "ivr" and self.flow_dir:
            return f" (no file {self.flow_dir / f'{name}.yaml'})"
        return mailbox_hint(kind, name, self.declared.get("extension", set()))

    def expand(self, node: YamlNode) -> YamlNode:
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
                raise Invalid(f"{name} is not set")
            return value

        expanded, count = _ENV_VAR.subn(substitute, node.value)
        return replace(node, value=expanded, from_env=True) if count else node


def user_path(r: Reader, node: YamlNode) -> Path:
    """A path as written, with ``~`` expanded; relative ones stay relative."""
    written = text(r, node)
    try:
        return Path(written).expanduser()
    except RuntimeError:  # ~name of no user
        raise Invalid(f"{node.name}: {written!r} names the home of an unknown user") from None


def resolved_path(r: Reader, node: YamlNode) -> Path:
    """A path; a relative one resolves against the folder holding pbx.yaml."""
    return r.base_dir / user_path(r, node)


def flow_dir(r: Reader, node: YamlNode) -> Path:
    """The IVR folder; its *.yaml files declare the flow names `ivr:` may use."""
    path = resolved_path(r, node)
    assert isinstance(r, ConfigReader)
    r.flow_dir = path
    r.declared["ivr"] = {flow.stem for flow in path.glob("*.yaml")}
    return path


def time_zone(r: Reader, node: YamlNode) -> str:
    """An IANA time zone name, like Europe/Paris."""
    name = text(r, node)
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise Invalid(f"{node.name}: unknown time zone {name!r}") from None
    return name


def hours(r: Reader, node: YamlNode) -> Schedule:
    """Opening hours (`pbx.schedule`)."""
    try:
        return parse_schedule(text(r, node))
    except ValueError as exc:
        raise Invalid(f"{node.name}: {exc}") from None


def ip_address(r: Reader, node: YamlNode) -> str:
    """An IPv4 or IPv6 address, kept as written."""
    value = text(r, node)
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise Invalid(f"{node.name} must be an IP address, not {value!r}") from None
    return value


def network(r: Reader, node: YamlNode) -> Network:
    """A network like 203.0.113.0/24; a bare address is a network of one."""
    value = node.written() or ""
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise Invalid(f"{node.name} must be a network like 203.0.113.0/24, not {node.value!r}") from None


_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
_HOST_PORT = re.compile(r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+))(?::(?P<port>[0-9]+))?")


def _split_host_port(written: str, default_port: int | None) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (port optional when there is a default); ValueError if bad."""
    match = _HOST_PORT.fullmatch(written)
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


def host_port(default_port: int | None, example: str) -> Convert[tuple[str, int]]:
    """``host:port`` (the port may go when there is a default); ``example`` shows it in messages."""

    def convert(r: Reader, node: YamlNode) -> tuple[str, int]:
        try:
            return _split_host_port(text(r, node), default_port)
        except ValueError as exc:
            raise Invalid(f"{node.name}: {exc} (like {example})") from None

    return convert


def listen_address(r: Reader, node: YamlNode) -> Listen:
    """A `Listen` address; its transport declares what trunks may use."""
    written = text(r, node)
    transport, _, address = written.partition(":")
    try:
        if transport not in ("udp", "tcp", "tls"):
            raise ValueError(f"transport must be udp, tcp or tls, not {transport!r}")
        listen = Listen(transport, *_split_host_port(address, None))
    except ValueError as exc:
        example = "like udp:0.0.0.0:5060, tcp:[::1]:5060 or tls:0.0.0.0:5061"
        raise Invalid(f"{node.name}: bad listen address {written!r}: {exc} ({example})") from None

    # Trunks (read after sip) may use ;transport=tls only when a TLS listener exists.
    r.declared.setdefault("transport", set()).add(transport)
    return listen


def trunk_host(r: Reader, node: YamlNode) -> tuple[str, int, str]:
    """``host[:port][;transport=udp|tls]``; TLS defaults to port 5061 and needs a tls: listener."""
    written = text(r, node)
    address, _, params = written.partition(";")
    transport = "udp"
    if params:
        name, _, value = params.partition("=")
        if name.strip().lower() != "transport" or value.strip().lower() not in ("udp", "tls"):
            raise Invalid(f"{node.name}: bad parameter {params!r}: only ;transport=udp or ;transport=tls")
        transport = value.strip().lower()
    if transport == "tls" and "tls" not in r.declared.get("transport", set()):
        raise Invalid(f"{node.name}: ;transport=tls needs a tls: address in sip.listen (and sip.tls)")
    try:
        host, port = _split_host_port(address, 5061 if transport == "tls" else 5060)
    except ValueError as exc:
        raise Invalid(f"{node.name}: {exc} (like sip.example.net:5060 or sip.example.net:5061;transport=tls)") from None
    return host, port, transport


def existing_file(r: Reader, node: YamlNode) -> Path:
    """A path to a file that exists now."""
    path = resolved_path(r, node)
    if not path.is_file():
        raise Invalid(f"{node.name}: no file {path}")
    return path


def srtp_mode(r: Reader, node: YamlNode) -> str:
    """One of `SRTP_MODES`."""
    if node.value is False:  # YAML 1.1 reads a bare `off` as false
        return "off"
    return choice(*SRTP_MODES)(r, node)


def port_range(r: Reader, node: YamlNode) -> tuple[int, int]:
    """``[min, max]`` of RTP ports: an even start and room for two streams at least."""
    ports = list_of(integer(1024, 65535))(r, node)
    if len(ports) != 2:
        raise Invalid(f"{node.name} must be two port numbers: [min, max]")
    low, high = ports
    if low % 2:
        raise Invalid(f"{node.name}: the first port must be even (RTP uses even ports, RTCP the odd one above)")
    if high - low + 1 < 4:
        raise Invalid(f"{node.name}: [{low}, {high}] must span at least 4 ports, lowest first")
    return low, high


def regex(r: Reader, node: YamlNode) -> re.Pattern[str]:
    """A regular expression, compiled."""
    written = text(r, node)
    try:
        return re.compile(written)
    except re.error as exc:
        raise Invalid(f"{node.name}: invalid regular expression {written!r}: {exc}") from None


_DURATION = re.compile(r"([0-9]+) *([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(low: int, high: int) -> Convert[int]:
    """Seconds, written as a number of them or with a unit: 90, "30m", "4h", "1d"."""

    def convert(r: Reader, node: YamlNode) -> int:
        written = node.written()
        match = _DURATION.fullmatch(written.strip()) if written is not None else None
        if match is None:
            raise Invalid(f"{node.name} must be a duration like 30m, 4h, 1d or a number of seconds, not {node.value!r}")
        seconds = int(match[1]) * _UNIT_SECONDS[match[2]]
        if not low <= seconds <= high:
            raise Invalid(f"{node.name} must be between {low} and {high} seconds, not {seconds}")
        return seconds

    return convert


def reference(kind: str, convert: Convert[str]) -> Convert[str]:
    """A name of a ``kind`` defined elsewhere in the file; checked once everything is read."""

    def refer(r: Reader, node: YamlNode) -> str:
        name = convert(r, node)
        r.refer(kind, name, node)
        return name

    return refer
