"""What an IVR flow file may say (CONTRACT §3): its fields, each node type's fields, their checks.

One table (`_NODE_FIELDS`) names every node type's fields with their
converters and defaults, read with the same located YAML machinery as
pbx.yaml (`pbx.yamlfile`), so every problem is a `ConfigIssue` with file and
line and all of a file's problems are found in one pass. `FlowReader`
gathers, while the nodes are read, what the checks of a whole flow
(`pbx.ivr.flows`) need: the edges between nodes and each node's line.

Targets (where a node goes next) are node ids of the same flow, or destinations
(`pbx.config.destinations.parse_destination`) checked against pbx.yaml like its own ones.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import date, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit

from pbx.config.destinations import (
    REFERENCE_KINDS,
    DestinationReader,
    mailbox_hint,
    parse_destination,
    read_destination,
)
from pbx.config.model import Config
from pbx.ivr.nodes import (
    VARIABLE_NAME,
    BranchNode,
    CollectNode,
    GotoNode,
    HangupNode,
    HoursNode,
    HttpNode,
    MenuNode,
    Node,
    PlayNode,
    Prompt,
    RateNode,
    SetNode,
    Target,
    brace_problem,
    expand,
    placeholders,
)
from pbx.schedule import Schedule, parse_schedule
from pbx.yamlfile import (
    Convert,
    Field,
    Invalid,
    Reader,
    Reported,
    YamlNode,
    choice,
    integer,
    list_of,
    optional,
    section,
    text,
)

BUILTIN_VARIABLES: Final = frozenset({"caller", "called", "call_id"})
NODE_TYPES: Final = ("play", "menu", "collect", "rate", "hours", "branch", "set", "http", "goto", "hangup")
HTTP_METHODS: Final = ("GET", "POST")

_NODE_ID = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"


class FlowReader(DestinationReader):
    """Reads one flow file; destinations are looked up in ``config`` and the flow folder."""

    def __init__(
        self, file: Path, config: Config, flow_names: set[str], prompt_exists: Callable[[str], bool]
    ) -> None:
        super().__init__(file, reference_kinds={**REFERENCE_KINDS, "node": ("node", "node")})
        self.config = config
        self.prompt_exists = prompt_exists
        self.declared.update(
            extension=set(config.extensions),
            mailbox={number for number, ext in config.extensions.items() if ext.voicemail is not None},
            queue=set(config.queues),
            group=set(config.groups),
            trunk=set(config.trunks),
            ivr=flow_names,
        )
        self.current = ""  # id of the node being read: the source of the edges below
        self.edges: list[tuple[str, str]] = []  # (node id, node id it may go to)
        self.node_lines: dict[str, int] = {}  # line of each well-named node
        self.opaque: set[str] = set()  # nodes whose targets could not be read: reachability is unknown
        self.built: dict[str, Node] = {}

    def missing_hint(self, kind: str, name: str) -> str:
        if kind == "ivr":
            return f" (no file {self.file.parent / f'{name}.yaml'})"
        if kind == "node":
            close = difflib.get_close_matches(name, self.declared.get("node", ()), n=1)
            return f" (did you mean {close[0]!r}?)" if close else ""
        return mailbox_hint(kind, name, self.declared["extension"])


def _flow(r: Reader) -> FlowReader:
    assert isinstance(r, FlowReader)
    return r


def _target(r: Reader, node: YamlNode) -> Target:
    """A node id of this flow or a destination; node ids are checked once the whole flow is read."""
    written = node.written()
    if written is None or not written.strip():
        raise Invalid(f"{node.name} must be a node id or a destination like queue:support, not {node.value!r}")
    try:
        parse_destination(written)
    except ValueError as exc:
        if ":" in written:
            raise Invalid(f"{node.name}: {exc}") from None
        if not re.fullmatch(_NODE_ID, written):
            raise Invalid(f"{node.name}: {written!r} is neither a node id nor a destination") from None
        flow = _flow(r)
        flow.refer("node", written, node)
        flow.edges.append((flow.current, written))
        return written
    return read_destination(r, node)


def _start(r: Reader, node: YamlNode) -> str:
    written = node.written()
    if written is None or not re.fullmatch(_NODE_ID, written):
        raise Invalid(f"start must be the id of a node, not {node.value!r}")
    r.refer("node", written, node)
    return written


def _template(r: Reader, node: YamlNode) -> str:
    """A string (or a number, as written) whose ``{var}`` placeholders are well formed."""
    value = node.written()
    if value is None:
        raise Invalid(f"{node.name} must be text, not {node.value!r}")
    problem = brace_problem(value)
    if problem:
        raise Invalid(f"{node.name}: {problem}")
    return value


def _prompt_part(r: Reader, node: YamlNode) -> str:
    part = _template(r, node)
    flow = _flow(r)
    if part.startswith("say:"):
        if not part[4:].strip():
            raise Invalid(f"{node.name}: 'say:' needs the text to speak after it")
        if flow.config.sounds.tts is None:
            raise Invalid(f"{node.name}: say: prompts need sounds.tts (it is null in {flow.config.path})")
        return part
    if not part.strip():
        raise Invalid(f"{node.name} must be a sound name or \"say:TEXT\"")
    if part.startswith("/") or ".." in part.split("/"):
        raise Invalid(f"{node.name}: sound {part!r} must be a name under sounds.dir")
    if not placeholders(part) and not flow.prompt_exists(part):
        raise Invalid(f"{node.name}: there is no sound {part!r} in {flow.config.sounds.dir}")
    return part


def _prompt(r: Reader, node: YamlNode) -> Prompt:
    """A sound name, ``say:TEXT``, or a non-empty list of them."""
    if isinstance(node.value, list):
        if not node.value:
            raise Invalid(f"{node.name} must not be empty")
        return Prompt(tuple(r.read_all(_prompt_part, node.value)))
    return Prompt((r.read(_prompt_part, node),))


def _seconds(high: float) -> Convert[float]:
    def convert(r: Reader, node: YamlNode) -> float:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Invalid(f"{node.name} must be a number of seconds")
        if not 0 < value <= high:
            raise Invalid(f"{node.name} must be more than 0 and at most {high:g} seconds, not {value}")
        return float(value)

    return convert


def _variable(settable: bool) -> Convert[str]:
    def convert(r: Reader, node: YamlNode) -> str:
        name = node.written()
        if name is None or not re.fullmatch(VARIABLE_NAME, name):
            raise Invalid(f"{node.name} must be a variable name of letters, digits and _, not {node.value!r}")
        if settable and name in BUILTIN_VARIABLES:
            raise Invalid(f"{node.name}: {name!r} is a built-in variable and cannot be set")
        return name

    return convert


def _keyed[T](check_key: Callable[[str], str | None], value: Convert[T], what: str) -> Convert[Mapping[str, T]]:
    """A non-empty mapping whose keys pass ``check_key`` (None, or what is wrong) and values ``value``."""

    def convert(r: Reader, node: YamlNode) -> Mapping[str, T]:
        if not isinstance(node.value, dict) or not node.value:
            raise Invalid(f"{node.name} must be a mapping of {what}")
        result: dict[str, T] = {}
        failed = False
        for key, child in node.value.items():
            problem = check_key(key)
            if problem:
                r.report(child.key_line, f"{node.name}: {problem}")
                failed = True
            try:
                result[key] = r.read(value, child)
            except Reported:
                failed = True
        if failed:
            raise Reported
        return MappingProxyType(result)

    return convert


def _dtmf_key(key: str) -> str | None:
    if re.fullmatch(r"[0-9*#]", key):
        return None
    return f"{key!r} is not one DTMF key: use 0-9, \"*\" or \"#\" (in quotes)"


def _settable_name(key: str) -> str | None:
    if not re.fullmatch(VARIABLE_NAME, key):
        return f"{key!r} is not a variable name of letters, digits and _"
    if key in BUILTIN_VARIABLES:
        return f"{key!r} is a built-in variable and cannot be set"
    return None


def _score_keys(r: Reader, node: YamlNode) -> range:
    """The scores a rate node takes, one key each: the lowest and highest, like "1-5"."""
    match = re.fullmatch(r"([0-9])-([0-9])", node.written() or "")
    if match is None or int(match[1]) >= int(match[2]):
        raise Invalid(f'{node.name} must be the lowest and highest score, one key 0-9 each, like "1-5", not {node.value!r}')
    return range(int(match[1]), int(match[2]) + 1)


def _terminator(r: Reader, node: YamlNode) -> str:
    if node.value is None:  # `terminator: #` is a comment, so YAML reads null
        raise Invalid(f'{node.name} must be "#" or "*", in quotes: an unquoted # starts a comment')
    if node.value not in ("#", "*"):
        raise Invalid(f'{node.name} must be "#" or "*", not {node.value!r}')
    return str(node.value)


def _schedule(r: Reader, node: YamlNode) -> Schedule:
    written = text(r, node)
    try:
        return parse_schedule(written)
    except ValueError as exc:
        raise Invalid(f"{node.name}: {exc}") from None


def _holiday(r: Reader, node: YamlNode) -> date:
    value = node.value
    if isinstance(value, datetime):
        raise Invalid(f"{node.name} must be a date like 2026-12-25, without a time")
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value)
        except ValueError as exc:
            raise Invalid(f"{node.name}: {value!r} is not a date like 2026-12-25 ({exc})") from None
    raise Invalid(f"{node.name} must be a date like 2026-12-25, not {value!r}")


def _set_value(r: Reader, node: YamlNode) -> str:
    if isinstance(node.value, bool | float) and node.text is not None:
        return node.text  # `vip: true` sets the text "true", as written
    return _template(r, node)


def _url(r: Reader, node: YamlNode) -> str:
    url = _template(r, node)
    probe = urlsplit(expand(url, {name: "x" for name in placeholders(url)}))
    if probe.scheme not in ("http", "https") or not probe.netloc:
        raise Invalid(f"{node.name} must be an http:// or https:// URL, not {url!r}")
    return url


def _node_id(node: YamlNode) -> tuple[str, int]:
    return node.key, node.key_line


def _build_goto(node: YamlNode, values: dict[str, Any]) -> GotoNode:
    to, next_ = values["to"], values["next"]
    if (to is None) == (next_ is None):
        problem = "needs 'to' (a destination or node id)" if to is None else "takes 'to' or 'next', not both"
        raise Invalid(f"{node.name} {problem}", node.key_line)
    return GotoNode(*_node_id(node), to if to is not None else next_)


_PROMPT = Field("prompt", _prompt)
_NEXT = Field("next", _target)
_ON_FAIL = Field("on_fail", optional(_target), None)

_NODE_FIELDS: Final[dict[str, tuple[tuple[Field, ...], Callable[[YamlNode, dict[str, Any]], Node]]]] = {
    "play": ((_PROMPT, _NEXT), lambda n, v: PlayNode(*_node_id(n), **v)),
    "menu": (
        (
            _PROMPT,
            Field("options", _keyed(_dtmf_key, _target, "DTMF keys to targets, like {\"1\": queue:sales}")),
            Field("timeout", _seconds(120), 5),
            Field("retries", integer(0, 20), 3),
            Field("invalid", optional(_prompt), None),
            _ON_FAIL,
        ),
        lambda n, v: MenuNode(*_node_id(n), **v),
    ),
    "collect": (
        (
            _PROMPT,
            Field("var", _variable(settable=True)),
            Field("max_digits", integer(1, 64), 20),
            Field("terminator", _terminator, "#"),
            Field("timeout", _seconds(120), 5),
            _NEXT,
            _ON_FAIL,
        ),
        lambda n, v: CollectNode(*_node_id(n), **v),
    ),
    "rate": (
        (
            _PROMPT,
            Field("keys", _score_keys, "1-5"),
            Field("timeout", _seconds(120), 5),
            Field("retries", integer(0, 20), 3),
            Field("invalid", optional(_prompt), None),
            _NEXT,
            _ON_FAIL,
        ),
        lambda n, v: RateNode(*_node_id(n), **v),
    ),
    "hours": (
        (
            Field("open", _schedule),
            Field("holidays", list_of(_holiday), []),
            Field("true", _target),
            Field("false", _target),
        ),
        lambda n, v: HoursNode(*_node_id(n), v["open"], frozenset(v["holidays"]), v["true"], v["false"]),
    ),
    "branch": (
        (
            Field("var", _variable(settable=False)),
            Field("cases", _keyed(lambda key: None, _target, "values to targets, like {\"true\": queue:vip}")),
            Field("default", _target),
        ),
        lambda n, v: BranchNode(*_node_id(n), **v),
    ),
    "set": (
        (Field("vars", _keyed(_settable_name, _set_value, "variable names to values")), _NEXT),
        lambda n, v: SetNode(*_node_id(n), v["vars"], v["next"]),
    ),
    "http": (
        (
            Field("url", _url),
            Field("method", choice(*HTTP_METHODS), "GET"),
            Field("timeout", _seconds(30), 2),
            _NEXT,
            Field("on_error", _target),
        ),
        lambda n, v: HttpNode(*_node_id(n), **v),
    ),
    "goto": ((Field("to", optional(_target), None), Field("next", optional(_target), None)), _build_goto),
    "hangup": ((), lambda n, v: HangupNode(*_node_id(n))),
}


def _node(r: Reader, node: YamlNode) -> Node:
    flow = _flow(r)
    if not isinstance(node.value, dict):
        flow.opaque.add(node.key)
        raise Invalid(f"{node.name} must be a mapping with a type, like {{type: play, prompt: welcome, next: menu}}")
    kind_node = node.value.get("type")
    if kind_node is None:
        flow.opaque.add(node.key)
        raise Invalid(f"{node.name} is missing 'type' (one of {', '.join(NODE_TYPES)})", node.key_line)
    kind = kind_node.value
    if not isinstance(kind, str) or kind not in _NODE_FIELDS:  # a list or mapping is unhashable
        flow.opaque.add(node.key)
        close = difflib.get_close_matches(str(kind), NODE_TYPES, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(NODE_TYPES)}"
        raise Invalid(f"{node.name}: unknown node type {kind!r} ({hint})", kind_node.line)
    fields, build = _NODE_FIELDS[kind]
    rest = {key: child for key, child in node.value.items() if key != "type"}
    return section(fields, build)(r, replace(node, value=rest))


def _nodes(r: Reader, node: YamlNode) -> dict[str, Node]:
    flow = _flow(r)
    if not isinstance(node.value, dict) or not node.value:
        raise Invalid(f"{node.name} must be a mapping of node ids to nodes")
    flow.declared["node"] = set(node.value)
    failed = False
    for node_id, child in node.value.items():
        if not re.fullmatch(_NODE_ID, node_id) or node_id == "hangup":
            reason = "is the hangup destination" if node_id == "hangup" else "must be letters, digits, _, . or -"
            r.report(child.key_line, f"node id {node_id!r} {reason}")
            failed = True
        else:
            flow.node_lines[node_id] = child.key_line
        flow.current = node_id
        try:
            flow.built[node_id] = r.read(_node, child)
        except Reported:
            failed = True
    flow.current = ""
    if failed:
        raise Reported
    return dict(flow.built)


# The top level of a flow file; `pbx.ivr.flows.load_flow` reads it and checks the whole.
FLOW_FIELDS = (Field("start", _start), Field("nodes", _nodes))
