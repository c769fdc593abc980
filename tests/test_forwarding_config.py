"""pbx.yaml's forwarding (`extensions.N.forward`), ring groups (`groups`,
`group:NAME`) and their feature codes: read, defaulted, and refused with
FILE:LINE errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from pbx.config.destinations import parse_destination
from pbx.config.load import load_config
from pbx.config.model import Config, ConfigError, Destination, Forward, Group

HEAD = """\
extensions:
  "1001": {name: Alice, password: secret-1001}
  "1002": {name: Bob, password: secret-1002, voicemail: {}}
trunks:
  provider: {host: sip.example.net}
outbound:
  - {match: "^\\\\+49", trunk: provider, extensions: ["1002"]}
"""


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "pbx.yaml"
    path.write_text(text)
    return load_config(path, env={})


def errors(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    prefix = f"{tmp_path / 'pbx.yaml'}:"
    return [str(issue).removeprefix(prefix) for issue in caught.value.issues]


def test_forwarding_groups_and_codes_are_read_with_their_defaults(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        HEAD.replace("voicemail: {}}", "voicemail: {}, forward: {always: \"+4930123\", busy: \"1001\", no_answer: group:sales}}")
        + "groups:\n"
        + "  sales: {members: [\"1001\", \"1002\"]}\n"
        + "  night: {members: [\"1002\"], strategy: hunt, ring_timeout: 5, on_fail: voicemail:1002}\n"
        + "inbound: {\"600\": group:sales}\n",
    )
    assert config.extensions["1001"].forward == Forward()
    assert config.extensions["1002"].forward == Forward(
        Destination("external", "+4930123"), Destination("extension", "1001"), Destination("group", "sales")
    )
    assert config.groups["sales"] == Group("sales", ("1001", "1002"), "ringall", 20, None)
    assert config.groups["night"] == Group("night", ("1002",), "hunt", 5, Destination("voicemail", "1002"))
    assert config.inbound["600"] == Destination("group", "sales")
    features = config.features
    assert (features.forward_on, features.forward_off, features.dnd_on, features.dnd_off) == ("*72", "*73", "*78", "*79")
    assert features.sets_phone("*721002") and features.sets_phone("*79") and not features.sets_phone("*97")
    assert str(parse_destination("group:sales")) == "group:sales"


def test_bad_forwarding_is_reported_at_its_line(tmp_path: Path) -> None:
    text = HEAD + '  - {match: "^0900", trunk: provider}\n'
    text = text.replace(
        '"1001": {name: Alice, password: secret-1001}',
        '"1001": {name: Alice, password: secret-1001,\n           forward: {always: "+4930123", busy: "1001", no_answer: "sales", when: x}}',
    )
    assert errors(tmp_path, text) == [
        "3: unknown key 'when' in extensions.1001.forward",
        "3: extensions.1001.forward.no_answer must be a number or a destination like voicemail:1001, not 'sales'",
    ]
    text = text.replace('no_answer: "sales", when: x', "no_answer: voicemail:1001")
    assert errors(tmp_path, text) == [
        "3: extension 1001 forwards to itself",
        "3: extensions.1001.forward.no_answer: there is no mailbox '1001' (extension 1001 has no voicemail section)",
    ]
    text = text.replace('busy: "1001"', 'busy: "0900123"').replace("no_answer: voicemail:1001", "no_answer: null")
    # Forwarded numbers are dialed for the extension: the rule for +49 serves only 1002.
    assert errors(tmp_path, text) == ["3: extensions.1001.forward.always: no outbound rule lets extension 1001 dial '+4930123'"]


def test_bad_groups_are_reported_at_their_lines(tmp_path: Path) -> None:
    text = HEAD + """\
groups:
  sales: {members: ["1001", "1009"], strategy: random, ring_timeout: 0, on_fail: group:nope}
  empty: {members: []}
  "bad name": {members: ["1001"]}
inbound:
  "600": group:missing
  "601": "group:"
"""
    assert errors(tmp_path, text) == [
        "9: groups.sales.strategy must be one of ringall, hunt, not 'random'",
        "9: groups.sales.ring_timeout must be between 1 and 600, not 0",
        "9: groups.sales.members[1]: there is no extension '1009'",
        "9: groups.sales.on_fail: there is no ring group 'nope'",
        "10: groups.empty.members must not be empty",
        "11: groups.bad name must be a name of letters, digits, '_', '.' or '-', not 'bad name'",
        "13: inbound.600: there is no ring group 'missing'",
        "14: inbound.601: destination 'group:' needs a target after 'group:'",
    ]


def test_forwarding_codes_must_differ_from_the_others(tmp_path: Path) -> None:
    assert errors(tmp_path, HEAD + 'features: {forward_on: "*72", dnd_on: "*45"}\n') == [
        "8: features.dnd_on uses '*45', like features.agent_login"
    ]
