"""Destinations as files write them: ``ivr:FLOW``, ``queue:NAME``, ``extension:NUM``,
``voicemail:MAILBOX``, ``external:NUMBER[@TRUNK]`` or ``hangup``.

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

DESTINATION_KINDS: Final = ("ivr", "queue", "extension", "voicemail", "external", "hangup")

# How names (flows, queues, trunks) and extension numbers are written; the
# section tables (`pbx.config.sections`) read their keys with the same patterns.
NAME: Final = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
DIGITS: Final = r"[0-9]+"
_DIAL_NUMBER = r"\+?[0-9*#]+"
_TARGET_RULES: Final = {
    "ivr": (NAME, "a flow name"),
    "queue": (NAME, "a queue name"),
    "extension": (DIGITS, "an extension number"),
    "voicemail": (rf"{DIGITS}|main", "a mailbox number, or main (ask for the mailbox and PIN)"),
    "external": (rf"{_DIAL_NUMBER}(@{NAME})?", "a number, optionally followed by @TRUNK"),
}

# What `Reader.refer` may name: kind -> (key in `Reader.declared` holding the names, noun
# for messages). IVR flows check their destinations against the same kinds.
REFERENCE_KINDS: Final = {
    "extension": ("extension", "extension"),
    "mailbox": ("mailbox", "mailbox"),  # extensions with a `voicemail` section
    "queue": ("queue", "queue"),
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
        self.external: list[tuple[Destination, YamlNode]] = []

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


def mailbox_hint(kind: str, name: str, extensions: set[str]) -> str:
    """Why ``voicemail:NAME`` names no mailbox when NAME is an extension."""
    return f" (extension {name} has no voicemail section)" if kind == "mailbox" and name in extensions else ""
