"""IVR flows (CONTRACT §3): ``ivr_flows/NAME.yaml`` read, validated and frozen.

A flow is a mapping of node ids to nodes plus the id of the first one. Each
file is read with the same located YAML machinery as pbx.yaml (`pbx.yamlfile`),
so every problem is a `ConfigIssue` with file and line, and all of a file's
problems are found in one pass. A flow with any problem is left out: a broken
flow never goes live, and `pbx check` lists everything to fix.

Targets (where a node goes next) are node ids of the same flow, or destinations
(`pbx.config.parse_destination`) checked against pbx.yaml like its own ones.
"""

from __future__ import annotations

import difflib
import re
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import date, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit

from pbx.config import (
    REFERENCE_KINDS,
    Config,
    Destination,
    DestinationReader,
    mailbox_hint,
    parse_destination,
    read_destination,
)
from pbx.schedule import Schedule, parse_schedule
from pbx.yamlfile import (
    ConfigIssue,
    Convert,
    Field,
    Invalid,
    Reader,
    Reported,
    YamlNode,
    choice,
    integer,
    list_of,
    load_yaml,
    optional,
    section,
    text,
)

BUILTIN_VARIABLES: Final = frozenset({"caller", "called", "call_id"})
NODE_TYPES: Final = ("play", "menu", "collect", "hours", "branch", "set", "http", "goto", "hangup")
HTTP_METHODS: Final = ("GET", "POST")

_NODE_ID = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_VARIABLE = r"[A-Za-z_][A-Za-z0-9_]*"
_FLOW_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"  # what `ivr:NAME` accepts

# --- The typed flow -----------------------------------------------------------

Target = str | Destination  # a node id of the same flow, or a destination


@dataclass(frozen=True)
class Prompt:
    """What a node plays: sound names (files under ``sounds.dir``) and ``say:TEXT`` parts, in order.

    Parts may hold ``{var}`` placeholders, filled in with `expand` when played.
    """

    parts: tuple[str, ...]


@dataclass(frozen=True)
class PlayNode:
    """Play a prompt, then go on."""

    id: str
    line: int
    prompt: Prompt
    next: Target


@dataclass(frozen=True)
class MenuNode:
    """Play a prompt and go where the key pressed says; replay on no or a wrong key."""

    id: str
    line: int
    prompt: Prompt
    options: Mapping[str, Target]  # DTMF key ("0"-"9", "*", "#") -> target
    timeout: float = 5  # seconds to wait for a key after the prompt
    retries: int = 3  # replays after no or an invalid key
    invalid: Prompt | None = None  # played after a key that is no option
    on_fail: Target | None = None  # after the last retry; None: hang up


@dataclass(frozen=True)
class CollectNode:
    """Read several keys into variable ``var``, up to ``max_digits`` or the terminator."""

    id: str
    line: int
    prompt: Prompt
    var: str
    next: Target
    max_digits: int = 20
    terminator: str = "#"
    timeout: float = 5  # seconds to wait for each key
    on_fail: Target | None = None  # when no key at all was pressed; None: `next` with an empty var


@dataclass(frozen=True)
class HoursNode:
    """Go to ``if_open`` within the schedule and outside holidays, else to ``if_closed``."""

    id: str
    line: int
    open: Schedule
    holidays: frozenset[date]
    if_open: Target  # YAML key "true"
    if_closed: Target  # YAML key "false"

    def is_open(self, when: datetime) -> bool:
        """Whether ``when`` (already in the configured time zone) is in opening hours."""
        return when.date() not in self.holidays and self.open.is_open(when)


@dataclass(frozen=True)
class BranchNode:
    """Go to the case matching the value of variable ``var``, else to ``default``."""

    id: str
    line: int
    var: str
    cases: Mapping[str, Target]
    default: Target


@dataclass(frozen=True)
class SetNode:
    """Set variables (YAML key ``vars``); values may hold ``{var}`` placeholders."""

    id: str
    line: int
    values: Mapping[str, str]
    next: Target


@dataclass(frozen=True)
class HttpNode:
    """Request ``url`` (placeholders expanded); the fields of a JSON object reply become variables."""

    id: str
    line: int
    url: str
    next: Target
    on_error: Target  # on a network error, timeout, error status or a reply that is no JSON object
    method: str = "GET"
    timeout: float = 2


@dataclass(frozen=True)
class GotoNode:
    """Go to a destination or another node (YAML key ``to``, or ``next``)."""

    id: str
    line: int
    target: Destination | str


@dataclass(frozen=True)
class HangupNode:
    """End the call."""

    id: str
    line: int


Node = PlayNode | MenuNode | CollectNode | HoursNode | BranchNode | SetNode | HttpNode | GotoNode | HangupNode


@dataclass(frozen=True)
class Flow:
    """A valid flow; ``name`` is its file name without ``.yaml``."""

    name: str
    path: Path
    start: str
    nodes: Mapping[str, Node]

    def node(self, id: str) -> Node:
        """The node called ``id``; KeyError if there is none."""
        return self.nodes[id]


# --- Placeholders -------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{(" + _VARIABLE + r")\}")
_BRACES = re.compile(r"\{\{|\}\}|\{[^{}]*\}|[{}]")


def expand(template: str, variables: Mapping[str, str]) -> str:
    """Fill ``{var}`` placeholders from ``variables``; unknown ones become ""; ``{{`` and ``}}`` are braces."""

    def substitute(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "{{":
            return "{"
        if token == "}}":
            return "}"
        return variables.get(match.group(1), "")

    return _PLACEHOLDER.sub(substitute, template)


def placeholders(template: str) -> list[str]:
    """The variable names ``template`` refers to, in order."""
    return [m.group(1) for m in _PLACEHOLDER.finditer(template) if m.group(1)]


def _check_braces(template: str) -> str | None:
    """What is wrong with the braces in ``template``, or None."""
    for match in _BRACES.finditer(template):
        token = match.group(0)
        if token in ("{{", "}}"):
            continue
        if token in ("{", "}"):
            return f"a lone {token!r} in {template!r} (write {token * 2!r} for a brace)"
        if not re.fullmatch(_VARIABLE, token[1:-1]):
            return f"{token!r} in {template!r} is not a variable name (letters, digits and _)"
    return None


# --- Opening hours ------------------------------------------------------------

# --- Reading a flow file ----------------------------------------------------------


class _FlowReader(DestinationReader):
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


def _flow(r: Reader) -> _FlowReader:
    assert isinstance(r, _FlowReader)
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
    problem = _check_braces(value)
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
        if name is None or not re.fullmatch(_VARIABLE, name):
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
    if not re.fullmatch(_VARIABLE, key):
        return f"{key!r} is not a variable name of letters, digits and _"
    if key in BUILTIN_VARIABLES:
        return f"{key!r} is a built-in variable and cannot be set"
    return None


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


_FLOW_FIELDS = (Field("start", _start), Field("nodes", _nodes))


def _check_reachable(flow: _FlowReader, start: str) -> None:
    """Every node can be reached from ``start``; skipped when some node's targets are unknown."""
    if flow.opaque or start not in flow.node_lines:
        return
    following: dict[str, set[str]] = defaultdict(set)
    for source, target in flow.edges:
        following[source].add(target)
    seen, todo = {start}, [start]
    while todo:
        for target in following[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    for node_id, line in flow.node_lines.items():
        if node_id not in seen:
            flow.report(line, f"node {node_id!r} is unreachable: no path leads to it from start {start!r}")


def _check_silent_loops(flow: _FlowReader) -> None:
    """Chains of goto and set nodes that lead back to themselves would spin forever."""
    def step(node_id: str) -> str | None:
        node = flow.built.get(node_id)
        if isinstance(node, GotoNode) and isinstance(node.target, str):
            return node.target
        if isinstance(node, SetNode) and isinstance(node.next, str):
            return node.next
        return None

    reported: set[str] = set()
    for first in flow.built:
        path: list[str] = []
        node_id: str | None = first
        while node_id is not None and node_id not in path and node_id not in reported:
            path.append(node_id)
            node_id = step(node_id)
        if node_id is not None and node_id in path:
            loop = path[path.index(node_id):]
            reported.update(loop)
            shown = " -> ".join([*loop, node_id])
            line = min(flow.built[n].line for n in loop)
            flow.report(line, f"nodes {shown} loop forever without the caller (add a play, menu or collect node)")


def _hash_key_lines(path: Path) -> list[int]:
    """Lines whose `#:` looks like a menu key but is a YAML comment, so the option silently vanished."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    return [number for number, line in enumerate(lines, 1) if re.match(r"\s*#:(\s|$)", line)]


def load_flow(
    path: Path, config: Config, prompt_exists: Callable[[str], bool], flow_names: set[str] | None = None
) -> tuple[Flow | None, list[ConfigIssue]]:
    """Read one flow file: the flow, or None when it has issues, and all its issues in line order.

    ``flow_names`` are the flows `ivr:` destinations may name (default: the
    *.yaml files next to ``path``).
    """
    path = Path(path)
    if flow_names is None:
        flow_names = {p.stem for p in path.parent.glob("*.yaml")}
    reader = _FlowReader(path, config, flow_names, prompt_exists)
    if not re.fullmatch(_FLOW_NAME, path.stem):
        reader.report(0, f"flow name {path.stem!r} cannot be used in ivr: destinations (letters, digits, _ . -)")
    for line in _hash_key_lines(path):
        reader.report(line, 'an unquoted # starts a YAML comment: write "#" in quotes for the # key')
    root, issues = load_yaml(path)
    reader.issues.extend(issues)
    if root is None:
        return None, sorted(reader.issues, key=lambda issue: issue.line)
    values: dict[str, Any] | None
    try:
        values = reader.read(section(_FLOW_FIELDS, lambda n, v: v), root)
    except Reported:
        values = None
    reader.check_references()
    reader.check_dialable(config)
    start = root.value.get("start") if isinstance(root.value, dict) else None
    if start is not None and isinstance(start.value, str):
        _check_reachable(reader, start.value)
    _check_silent_loops(reader)
    issues = sorted(reader.issues, key=lambda issue: issue.line)
    if values is None or issues:
        return None, issues
    return Flow(path.stem, path, values["start"], MappingProxyType(values["nodes"])), []


def flow_files(directory: Path) -> list[Path]:
    """The flow files in ``directory`` (``*.yaml``, not hidden), sorted; none when it is missing."""
    return sorted(p for p in directory.glob("*.yaml") if not p.name.startswith(".")) if directory.is_dir() else []


def load_flows(
    directory: Path, config: Config, prompt_exists: Callable[[str], bool]
) -> tuple[dict[str, Flow], list[ConfigIssue]]:
    """Every ``*.yaml`` in ``directory`` as a flow named by its file; a missing folder holds none.

    Returns the valid flows and the issues of all files (by file, then line);
    a flow with any issue is left out. ``prompt_exists(name)`` says whether a
    sound name can be played; names holding ``{var}`` are not checked.
    """
    files = flow_files(Path(directory))
    names = {p.stem for p in files}
    flows: dict[str, Flow] = {}
    issues: list[ConfigIssue] = []
    for path in files:
        flow, found = load_flow(path, config, prompt_exists, names)
        issues.extend(found)
        if flow is not None:
            flows[flow.name] = flow
    return flows, issues

