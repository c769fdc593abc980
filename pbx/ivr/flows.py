"""IVR flow files (CONTRACT §3): ``ivr_flows/NAME.yaml`` read, validated and frozen.

A flow is a mapping of node ids to nodes plus the id of the first one; its
fields are `pbx.ivr.schema`'s, and this module adds what only a whole file
shows: its name, keys YAML swallowed as comments, references between nodes,
nodes no path reaches and loops that never wait for the caller. A flow with
any problem is left out: a broken flow never goes live, and `pbx check` lists
everything to fix.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pbx.config.model import Config
from pbx.ivr.nodes import Flow, GotoNode, SetNode
from pbx.ivr.schema import FLOW_FIELDS, FlowReader
from pbx.yamlfile import ConfigIssue, Reported, load_yaml, section

_FLOW_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"  # what `ivr:NAME` accepts


def _check_reachable(flow: FlowReader, start: str) -> None:
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


def _check_silent_loops(flow: FlowReader) -> None:
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
    reader = FlowReader(path, config, flow_names, prompt_exists)
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
        values = reader.read(section(FLOW_FIELDS, lambda n, v: v), root)
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

