"""Destinations as files write them: ``ivr:FLOW``, ``queue:NAME``, ``extension:NUM``,
``group:NAME``, ``voicemail:MAILBOX``, ``external:NUMBER[@TRUNK]`` or ``hangup``.

pbx.yaml and the IVR flows (`pbx.ivr.schema`) hold them alike, so both read
them here: `read_destination` parses one and refers to what it names, the
`DestinationReader` keeps the ``external:`` ones to check against the
outbound rules once the whole config is known.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from pbx.config.model import Config, Destination
from pbx.yamlfile import ConfigIssue, Invalid, Reader, YamlNode

DESTINATION_KINDS: Final = ("ivr", "queue", "extension", "group", "voicemail", "external", "hangup")

# How names (flows, queues, trunks) and extension numbers are written; the
# section tables (`pbx.config.sections`) read their keys with the same patterns.
NAME: Final = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
DIGITS: Final = r"[0-9]+"
DIAL_NUMBER: Final = r"\+?[0-9*#]+"
_TARGET_RULES: Final = {
    "ivr": (NAME, "a flow name"),
    "queue": (NAME, "a queue name"),
    "extension": (DIGITS, "an extension number"),
    "group": (NAME, "a ring group name"),
    "voicemail": (rf"{DIGITS}|main", "a mailbox number, or main (ask for the mailbox and PIN)"),
    "external": (rf"{DIAL_NUMBER}(@{NAME})?", "a number, optionally followed by @TRUNK"),
}

# What `Reader.refer` may name: kind -> (key in `Reader.declared` holding the names, noun
# for messages). IVR flows check their destinations against the same kinds.
REFERENCE_KINDS: Final = {
    "extension": ("extension", "extension"),
    "mailbox": ("mailbox", "mailbox"),  # extensions with a `voicemail` section
    "queue": ("queue", "queue"),
    "group": ("group", "ring group"),
    "trunk": ("trunk", "trunk"),
    "ivr": ("ivr", "IVR flow"),
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


class DestinationReader(Reader):
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
        # Each ``external:`` destination, and the extension it is dialed for (None: the server).
        self.external: list[tuple[Destination, YamlNode, str | None]] = []

    def check_dialable(self, config: Config) -> None:
        """Report every ``external:`` destination whose number no outbound rule
        lets its party dial (the server, or the extension that forwards there):
        the call would be refused when it got there."""
        for destination, node, party in self.external:
            if destination.trunk is not None and destination.trunk not in config.trunks:
                continue  # reported as an unknown trunk
            if config.route_outbound(destination.target, party) is None:
                who, why = (f"extension {party}", "") if party else ("the server", " (rules with an `extensions` list serve only those extensions)")
                self.report(node.line, f"{node.path}: no outbound rule lets {who} dial {destination.target!r}{why}")


def read_destination(r: Reader, node: YamlNode) -> Destination:
    """Converter for a destination; what it names is checked against ``REFERENCE_KINDS``.

    The reader's ``declared`` must hold the extensions, queues, trunks and IVR flows.
    """
    if not isinstance(node.value, str):
        raise Invalid(f"{node.name} must be a destination like extension:1001, not {node.value!r}")
    try:
        destination = parse_destination(node.value)
    except ValueError as exc:
        raise Invalid(f"{node.name}: {exc}") from None
    _refer_to(r, destination, node, None)
    return destination


def read_forward(r: Reader, node: YamlNode) -> Destination:
    """Converter for where an extension forwards (``extensions.N.forward.*``):
    a destination, or a number as the extension would dial it (an extension,
    else a number outside, which must pass the outbound rules of extension N)."""
    written = node.written()
    if written is None or not (re.fullmatch(DIAL_NUMBER, written) or ":" in written or written == "hangup"):
        raise Invalid(f"{node.name} must be a number or a destination like voicemail:1001, not {node.value!r}")
    if re.fullmatch(DIAL_NUMBER, written):
        destination = Destination("extension" if written in r.declared.get("extension", set()) else "external", written)
    else:
        try:
            destination = parse_destination(written)
        except ValueError as exc:
            raise Invalid(f"{node.name}: {exc}") from None
    party = node.path.split(".")[1]  # extensions.N.forward.KEY: a forwarded call is dialed for N
    _refer_to(r, destination, node, party)
    return destination


def _refer_to(r: Reader, destination: Destination, node: YamlNode, party: str | None) -> None:
    """Check what ``destination`` names once everything is read; an outside
    number, that some outbound rule lets ``party`` dial it."""
    match destination.kind:
        case "ivr" | "queue" | "extension" | "group":
            r.refer(destination.kind, destination.target, node)
        case "voicemail" if destination.target != "main":
            r.refer("mailbox", destination.target, node)
        case "external":
            r.refer("trunk", destination.trunk, node)
            if isinstance(r, DestinationReader):
                r.external.append((destination, node, party))


def mailbox_hint(kind: str, name: str, extensions: set[str]) -> str:
    """Why ``voicemail:NAME`` names no mailbox when NAME is an extension."""
    return f" (extension {name} has no voicemail section)" if kind == "mailbox" and name in extensions else ""
