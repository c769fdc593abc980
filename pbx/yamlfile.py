"""YAML files that report problems as ``FILE:LINE: message``: pbx.yaml and the IVR flows.

The YAML is composed into `YamlNode`s (not constructed into plain objects) so
that each value keeps the line it came from. A `Reader` turns nodes into typed
values through converters (``Convert``), collecting every issue in one pass so
an admin fixes a file in one go; `Field` tables read through `section` say,
per mapping, which keys exist, how each value is read and what it defaults to.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import yaml

# --- Issues -------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file; prints as ``FILE:LINE: message`` (line 0: the file as a whole)."""

    file: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


# --- Reading YAML nodes with their lines ---------------------------------------


@dataclass(frozen=True)
class YamlNode:
    """A YAML value with where it came from."""

    value: Any  # a scalar, dict[str, YamlNode] or list[YamlNode]
    line: int  # 1-based line where the value starts
    path: str  # "queues.support.agents[1]": names the value in messages
    key: str = ""  # the mapping key naming this value
    key_line: int = 0  # line of that key: where "missing key" and "unknown key" point
    text: str | None = None  # a scalar as written: keeps "+1555" and "0123" that YAML reads as numbers
    from_env: bool = False  # the value came out of ${...} expansion

    @property
    def name(self) -> str:
        return self.path or "the top level"

    def line_of(self, key: str) -> int:
        """Line of child ``key``, or of this mapping's own key when the child is absent."""
        child = self.value.get(key) if isinstance(self.value, dict) else None
        return child.line if child is not None else self.key_line

    def written(self) -> str | None:
        """A string, or a number as the admin wrote it; None for anything else."""
        if isinstance(self.value, str):
            return self.value
        if isinstance(self.value, int) and not isinstance(self.value, bool):
            return self.text if self.text is not None else str(self.value)
        return None


def _child_path(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def _synthetic(value: Any, parent: YamlNode, key: str) -> YamlNode:
    """A node for a default value, placed at the key line of the mapping that lacks it."""
    line = parent.key_line
    node = YamlNode(None, line, _child_path(parent.path, key), key, line)
    if isinstance(value, dict):
        return replace(node, value={k: _synthetic(v, node, k) for k, v in value.items()})
    if isinstance(value, list):
        return replace(node, value=[YamlNode(v, line, f"{node.path}[{i}]", key_line=line) for i, v in enumerate(value)])
    return replace(node, value=value)


class _Loader(yaml.SafeLoader):
    """A SafeLoader that composes the document into `YamlNode`s carrying line numbers.

    Structural problems it can see while doing so (duplicate keys, complex keys,
    recursive aliases) go to ``issues``; syntax errors raise as usual.
    """

    def __init__(self, text: str, file: Path) -> None:
        super().__init__(text)
        self.file = file
        self.issues: list[ConfigIssue] = []

    def located_root(self) -> YamlNode:
        root = self.get_single_node()
        if root is None:  # an empty file: all defaults
            return YamlNode({}, 1, "", key_line=1)
        return self._located(root, "", "", root.start_mark.line + 1, ())

    def _located(
        self, node: yaml.Node, path: str, key: str, key_line: int, parents: tuple[yaml.Node, ...]
    ) -> YamlNode:
        line = node.start_mark.line + 1
        if node in parents:
            self._report(line, f"{path or 'the document'} refers to itself through an alias")
            return YamlNode(None, line, path, key, key_line)
        parents += (node,)
        if isinstance(node, yaml.ScalarNode):
            try:
                value = self.construct_object(node)
            except ValueError:
                # A plain scalar that looks like a date but is none, like 2026-13-01:
                # keep the text, so that the value's converter says what is wrong with it.
                self.recursive_objects.pop(node, None)
                value = node.value
            return YamlNode(value, line, path, key, key_line, text=node.value)
        if isinstance(node, yaml.SequenceNode):
            items = [
                self._located(item, f"{path}[{i}]", "", item.start_mark.line + 1, parents)
                for i, item in enumerate(node.value)
            ]
            return YamlNode(items, line, path, key, key_line)
        assert isinstance(node, yaml.MappingNode)
        where = path or "the top level"
        first_seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                at = key_node.start_mark.line + 1
                if key_node.value in first_seen:
                    self._report(
                        at, f"duplicate key {key_node.value!r} in {where} (first at line {first_seen[key_node.value]})"
                    )
                first_seen.setdefault(key_node.value, at)
        self.flatten_mapping(node)  # applies `<<: *anchor` merges; the mapping's own keys win
        children: dict[str, YamlNode] = {}
        for key_node, value_node in node.value:
            at = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                self._report(at, f"keys in {where} must be plain values")
                continue
            # Keys stay as written: `1001:` and `"1001":` both name extension "1001",
            # and a bare `true:` stays the string "true".
            name = key_node.value
            children[name] = self._located(value_node, _child_path(path, name), name, at, parents)
        return YamlNode(children, line, path, key, key_line)

    def _report(self, line: int, message: str) -> None:
        self.issues.append(ConfigIssue(self.file, line, message))


def load_yaml(path: Path) -> tuple[YamlNode | None, list[ConfigIssue]]:
    """The document's root node, or None with the issue that stopped reading it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, [ConfigIssue(path, 0, "file not found")]
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        return None, [ConfigIssue(path, line, "file is not valid UTF-8")]
    except OSError as exc:
        return None, [ConfigIssue(path, 0, f"cannot read file: {exc.strerror or exc}")]
    try:
        loader = _Loader(text, path)
    except yaml.reader.ReaderError as exc:
        # The reader refuses control characters in the whole text before parsing.
        line = text[: exc.position].count("\n") + 1
        return None, [ConfigIssue(path, line, f"invalid YAML: character U+{exc.character:04X} is not allowed")]
    try:
        return loader.located_root(), loader.issues
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        detail = f" ({exc.context})" if exc.context and exc.problem else ""
        if exc.context == "while scanning an alias" or str(exc.problem).startswith("found undefined alias"):
            # `*97` or a menu key `*` left unquoted: YAML reads an alias
            detail += ': a value or key starting with "*" must be in quotes, like "*"'
        return None, [ConfigIssue(path, line, f"invalid YAML: {exc.problem or exc.context}{detail}")]
    except yaml.YAMLError as exc:
        return None, [ConfigIssue(path, 0, f"invalid YAML: {exc}")]
    finally:
        loader.dispose()


# --- Converting nodes: the reader and its converters ------------------------------


class Invalid(Exception):
    """A converter's complaint about one value; ``line`` defaults to the value's own."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


class Reported(Exception):
    """A value was invalid and its issues are already recorded: skip whatever needs it."""


class Reader:
    """Turns nodes into values, collecting issues and the references to check at the end.

    ``reference_kinds`` maps each kind a converter may `refer` to (the key in
    ``declared`` holding the names of that kind, the noun used in messages).
    Subclasses may rewrite scalars before conversion (`expand`) and explain a
    missing name (`missing_hint`).
    """

    def __init__(
        self,
        file: Path,
        issues: list[ConfigIssue] | None = None,
        *,
        base_dir: Path | None = None,
        reference_kinds: Mapping[str, tuple[str, str]] | None = None,
    ) -> None:
        self.file = file
        self.base_dir = file.parent.resolve() if base_dir is None else base_dir  # relative paths start here
        self.issues: list[ConfigIssue] = [] if issues is None else issues
        self.declared: dict[str, set[str]] = {}
        self.refs: list[tuple[str, str | None, YamlNode]] = []
        self.reference_kinds: Mapping[str, tuple[str, str]] = reference_kinds or {}

    def report(self, line: int, message: str) -> None:
        self.issues.append(ConfigIssue(self.file, line, message))

    def read[T](self, convert: Convert[T], node: YamlNode) -> T:
        """``convert(node)`` after `expand`; on failure record why and raise Reported."""
        try:
            return convert(self, self.expand(node))
        except Invalid as exc:
            self.report(node.line if exc.line is None else exc.line, exc.message)
            raise Reported from None

    def read_all[T](self, convert: Convert[T], nodes: Iterable[YamlNode]) -> list[T]:
        """Read every node, reporting each failure, then raise Reported if any failed."""
        values: list[T] = []
        failed = False
        for node in nodes:
            try:
                values.append(self.read(convert, node))
            except Reported:
                failed = True
        if failed:
            raise Reported
        return values

    def refer(self, kind: str, name: str | None, node: YamlNode) -> None:
        """Note that ``node`` names a ``kind`` (None: any one of them), checked once all is read."""
        self.refs.append((kind, name, node))

    def check_references(self) -> None:
        for kind, name, node in self.refs:
            declared_as, noun = self.reference_kinds[kind]
            known = self.declared.get(declared_as)
            if known is None:  # its section failed to load and has been reported
                continue
            if name is None:
                if not known:
                    self.report(node.line, f"{node.path}: {node.value!r} needs at least one {noun}")
            elif name not in known:
                self.report(node.line, f"{node.path}: there is no {noun} {name!r}{self.missing_hint(kind, name)}")

    def expand(self, node: YamlNode) -> YamlNode:
        """The node a converter sees; this one as it is."""
        return node

    def missing_hint(self, kind: str, name: str) -> str:
        """Text appended to "there is no KIND NAME"."""
        return ""


type Convert[T] = Callable[[Reader, YamlNode], T]


def typed(node: YamlNode) -> Any:
    """The node's value; text from ${ENV} is read as YAML, so `port: ${PORT}` can be a number."""
    if node.from_env:
        try:
            return yaml.safe_load(node.value)
        except yaml.YAMLError:
            return node.value
    return node.value


def string(r: Reader, node: YamlNode) -> str:
    if not isinstance(node.value, str):
        hint = " (put it in quotes)" if isinstance(node.value, int | float) else ""
        raise Invalid(f"{node.name} must be a string{hint}")
    return node.value


def text(r: Reader, node: YamlNode) -> str:
    """A non-empty string."""
    value = string(r, node)
    if not value.strip():
        raise Invalid(f"{node.name} must not be empty")
    return value


def matching(pattern: str, what: str) -> Convert[str]:
    """A string or number, as written, that fully matches ``pattern``."""

    def convert(r: Reader, node: YamlNode) -> str:
        value = node.written()
        if value is None or not re.fullmatch(pattern, value):
            shown = value if value is not None else node.value
            raise Invalid(f"{node.name} must be {what}, not {shown!r}")
        return value

    return convert


def integer(low: int, high: int) -> Convert[int]:
    def convert(r: Reader, node: YamlNode) -> int:
        value = typed(node)
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"{node.name} must be a whole number")
        if not low <= value <= high:
            raise Invalid(f"{node.name} must be between {low} and {high}, not {value}")
        return value

    return convert


def boolean(r: Reader, node: YamlNode) -> bool:
    value = typed(node)
    if not isinstance(value, bool):
        raise Invalid(f"{node.name} must be true or false")
    return value


def choice(*options: str) -> Convert[str]:
    def convert(r: Reader, node: YamlNode) -> str:
        if node.value not in options:
            raise Invalid(f"{node.name} must be one of {', '.join(options)}, not {node.value!r}")
        return str(node.value)

    return convert


def optional[T](convert: Convert[T]) -> Convert[T | None]:
    """``null`` (or an empty ${ENV}) means None; anything else goes to ``convert``."""

    def optional(r: Reader, node: YamlNode) -> T | None:
        return None if typed(node) is None else convert(r, node)

    return optional


def list_of[T](item: Convert[T], *, non_empty: bool = False, unique: bool = False) -> Convert[tuple[T, ...]]:
    def convert(r: Reader, node: YamlNode) -> tuple[T, ...]:
        items = [] if node.value is None else node.value
        if not isinstance(items, list):
            raise Invalid(f"{node.name} must be a list")
        if non_empty and not items:
            raise Invalid(f"{node.name} must not be empty")
        values = r.read_all(item, items)
        if unique:
            for index, (value, child) in enumerate(zip(values, items)):
                if value in values[:index]:
                    raise Invalid(f"{node.name} lists {child.value!r} twice", child.line)
        return tuple(values)

    return convert


# --- Sections: one table of fields each ------------------------------------------


REQUIRED: Final = object()


@dataclass(frozen=True)
class Field:
    """One key of a section: how its value is read, and its default as it would be written in YAML."""

    name: str
    convert: Convert[Any]
    default: Any = REQUIRED


def section[T](fields: Sequence[Field], build: Callable[[YamlNode, dict[str, Any]], T]) -> Convert[T]:
    """A mapping whose keys are ``fields``; ``build(node, values)`` makes the result or raises Invalid."""
    by_name = {f.name: f for f in fields}

    def convert(r: Reader, node: YamlNode) -> T:
        if node.value is None:  # a section left empty, e.g. with all its keys commented out
            node = replace(node, value={})
        if not isinstance(node.value, dict):
            raise Invalid(f"{node.name} must be a mapping")
        failed = False
        for key, child in node.value.items():
            if key not in by_name:
                where = f"in {node.path}" if node.path else "at the top level"
                close = difflib.get_close_matches(key, by_name, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                r.report(child.key_line, f"unknown key {key!r} {where}{hint}")
                failed = True
        values: dict[str, Any] = {}
        for f in fields:
            child = node.value.get(f.name)
            if child is None:
                if f.default is REQUIRED:
                    r.report(node.key_line, f"{node.name} is missing {f.name!r}")
                    failed = True
                    continue
                child = _synthetic(f.default, node, f.name)
            try:
                values[f.name] = r.read(f.convert, child)
            except Reported:
                failed = True
        if failed:
            raise Reported
        return build(node, values)

    return convert


def fields_of[T](cls: Callable[..., T]) -> Callable[[YamlNode, dict[str, Any]], T]:
    """Build ``cls`` from values named like its fields."""
    return lambda node, values: cls(**values)


def table[T](declares: str | None, key: Convert[str], value: Convert[T]) -> Convert[dict[str, T]]:
    """A mapping of names (checked by ``key``) to values; ``declares`` records the names for references."""

    def convert(r: Reader, node: YamlNode) -> dict[str, T]:
        entries = {} if node.value is None else node.value
        if not isinstance(entries, dict):
            raise Invalid(f"{node.name} must be a mapping")
        if declares:
            r.declared[declares] = set(entries)
        result: dict[str, T] = {}
        failed = False
        for name, child in entries.items():
            try:
                key(r, YamlNode(name, child.key_line, child.path, text=name))
            except Invalid as exc:  # keys are not `expand`ed, so not read through r.read
                r.report(child.key_line, exc.message)
                failed = True
            try:
                result[name] = r.read(value, child)
            except Reported:
                failed = True
        if failed:
            raise Reported
        return result

    return convert
