"""Unit tests for pbx.ivr.flows, schema and nodes: loading flows, their FILE:LINE errors, hours, placeholders."""

from __future__ import annotations

import subprocess
import sys
from datetime import date, datetime
from pathlib import Path
from textwrap import dedent

import pytest

from pbx.config.load import load_config
from pbx.config.model import Config, ConfigError, Destination
from pbx.ivr.flows import load_flows
from pbx.ivr.nodes import (
    BranchNode,
    CollectNode,
    Flow,
    GotoNode,
    HangupNode,
    HoursNode,
    HttpNode,
    MenuNode,
    PlayNode,
    Prompt,
    RateNode,
    SetNode,
    expand,
)
from pbx.media.prompts import PromptLibrary
from pbx.schedule import parse_schedule

REPO = Path(__file__).resolve().parent.parent
BROKEN = REPO / "tests" / "flows_broken"
SOUNDS = ("welcome", "invalid", "closed", "enter-account")

CONFIG = """\
sounds: {dir: sounds, tts: %s}
ivr: {dir: flows}
http: {token: test-token}
extensions:
  "1001": {name: Alice, password: secret-1001, voicemail: {pin: "1234"}}
  "1002": {name: Bob, password: secret-1002}
trunks:
  provider: {host: sip.example.net}
outbound:
  - {match: "^[+]1555", trunk: provider}
queues:
  sales: {agents: ["1001"]}
  support: {agents: ["1002"]}
"""


def make_config(tmp_path: Path, tts: str = "espeak-ng") -> Config:
    (tmp_path / "flows").mkdir(exist_ok=True)
    sounds = tmp_path / "sounds"
    sounds.mkdir(exist_ok=True)
    for name in SOUNDS:
        (sounds / f"{name}.wav").touch()
    (sounds / "digits").mkdir(exist_ok=True)
    (sounds / "digits" / "1.mp3").touch()
    path = tmp_path / "pbx.yaml"
    path.write_text(CONFIG % tts)
    return load_config(path, env={})


def load(tmp_path: Path, flows: dict[str, str], tts: str = "espeak-ng") -> tuple[dict[str, Flow], list[str]]:
    """Write ``flows`` (name -> YAML) and load the folder: the valid flows and the issues as printed."""
    for name, text in flows.items():
        (tmp_path / "flows").mkdir(exist_ok=True)
        (tmp_path / "flows" / f"{name}.yaml").write_text(dedent(text))
    config = make_config(tmp_path, tts)
    prompts = PromptLibrary(config.sounds.dir, config.sounds.tts, tmp_path / "cache")
    loaded, issues = load_flows(config.ivr.dir, config, prompts.exists)
    return loaded, [str(issue) for issue in issues]


def errors(tmp_path: Path, text: str, tts: str = "espeak-ng") -> list[str]:
    """The issues of one flow that must fail, as ``LINE: message``."""
    loaded, issues = load(tmp_path, {"main": text}, tts)
    assert "main" not in loaded
    prefix = f"{tmp_path / 'flows' / 'main.yaml'}:"
    assert all(issue.startswith(prefix) for issue in issues), issues
    return [issue.removeprefix(prefix) for issue in issues]


EVERY_NODE = """\
start: office
nodes:
  office:
    type: hours
    open: "mon-fri 09:00-17:00; sat 10:00-12:00"
    holidays: [2026-12-25, "2027-01-01"]
    true: menu
    "false": closed
  menu:
    type: menu
    prompt: [welcome, "say:Hello {caller}", digits/1]
    options: {1: queue:sales, "2": queue:support, "0": extension:1001, "*": menu, "#": account, 9: vip}
    timeout: 4.5
    retries: 2
    invalid: invalid
    on_fail: voicemail:1001
  account:
    type: collect
    prompt: enter-account
    var: account
    max_digits: 8
    terminator: "*"
    next: lookup
    on_fail: menu
  lookup:
    type: http
    url: "https://crm.example.com/lookup?account={account}&caller={caller}"
    method: POST
    timeout: 1
    next: route
    on_error: menu
  route: {type: branch, var: vip, cases: {"true": queue:sales, "no": bye}, default: queue:support}
  vip: {type: set, vars: {vip: true, level: 3, greeting: "hi {caller}"}, next: back}
  back: {type: goto, next: menu}
  closed: {type: play, prompt: closed, next: out}
  out: {type: goto, to: external:+15550100@provider}
  bye: {type: hangup}
"""


def test_a_flow_with_every_node_type_loads_into_dataclasses(tmp_path: Path) -> None:
    loaded, issues = load(tmp_path, {"main": EVERY_NODE})
    assert issues == []
    flow = loaded["main"]
    assert (flow.name, flow.path, flow.start) == ("main", tmp_path / "flows" / "main.yaml", "office")
    assert list(flow.nodes) == ["office", "menu", "account", "lookup", "route", "vip", "back", "closed", "out", "bye"]

    office = flow.node("office")
    assert isinstance(office, HoursNode)
    assert (office.id, office.line, office.if_open, office.if_closed) == ("office", 3, "menu", "closed")
    assert office.holidays == frozenset({date(2026, 12, 25), date(2027, 1, 1)})
    assert office.open.is_open(datetime(2026, 6, 1, 9, 0))  # a Monday

    assert flow.node("menu") == MenuNode(
        "menu",
        9,
        Prompt(("welcome", "say:Hello {caller}", "digits/1")),
        {
            "1": Destination("queue", "sales"),
            "2": Destination("queue", "support"),
            "0": Destination("extension", "1001"),
            "*": "menu",
            "#": "account",
            "9": "vip",
        },
        timeout=4.5,
        retries=2,
        invalid=Prompt(("invalid",)),
        on_fail=Destination("voicemail", "1001"),
    )
    assert flow.node("account") == CollectNode(
        "account", 17, Prompt(("enter-account",)), "account", "lookup",
        max_digits=8, terminator="*", timeout=5, on_fail="menu",
    )  # fmt: skip
    assert flow.node("lookup") == HttpNode(
        "lookup", 25, "https://crm.example.com/lookup?account={account}&caller={caller}", "route", "menu",
        method="POST", timeout=1,
    )  # fmt: skip
    assert flow.node("route") == BranchNode(
        "route", 32, "vip", {"true": Destination("queue", "sales"), "no": "bye"}, Destination("queue", "support")
    )
    assert flow.node("vip") == SetNode("vip", 33, {"vip": "true", "level": "3", "greeting": "hi {caller}"}, "back")
    assert flow.node("back") == GotoNode("back", 34, "menu")
    assert flow.node("closed") == PlayNode("closed", 35, Prompt(("closed",)), "out")
    assert flow.node("out") == GotoNode("out", 36, Destination("external", "+15550100", "provider"))
    assert flow.node("bye") == HangupNode("bye", 37)


def test_defaults_of_menu_collect_and_http(tmp_path: Path) -> None:
    loaded, issues = load(
        tmp_path,
        {
            "main": """\
            start: menu
            nodes:
              menu: {type: menu, prompt: welcome, options: {"1": account}}
              account: {type: collect, prompt: enter-account, var: account, next: lookup}
              lookup: {type: http, url: "http://crm/{account}", next: hangup, on_error: hangup}
            """
        },
    )
    assert issues == []
    menu, account, lookup = loaded["main"].nodes.values()
    assert isinstance(menu, MenuNode) and (menu.timeout, menu.retries, menu.invalid, menu.on_fail) == (5, 3, None, None)
    assert isinstance(account, CollectNode)
    assert (account.max_digits, account.terminator, account.timeout, account.on_fail) == (20, "#", 5, None)
    assert isinstance(lookup, HttpNode) and (lookup.method, lookup.timeout) == ("GET", 2)
    assert lookup.next == Destination("hangup", "")


def test_a_rate_node_takes_the_menu_fields_and_scores_one_key_each(tmp_path: Path) -> None:
    loaded, issues = load(
        tmp_path,
        {
            "main": """\
            start: ask
            nodes:
              ask: {type: rate, prompt: "say:Rate us from 1 to 5", next: thanks}
              three:
                type: rate
                prompt: welcome
                keys: "1-3"
                timeout: 2
                retries: 1
                invalid: invalid
                next: hangup
                on_fail: voicemail:1001
              thanks: {type: play, prompt: closed, next: three}
            """
        },
    )
    assert issues == []
    ask, three, _ = loaded["main"].nodes.values()
    assert ask == RateNode("ask", 3, Prompt(("say:Rate us from 1 to 5",)), "thanks")
    assert (ask.keys, ask.timeout, ask.retries, ask.invalid, ask.on_fail) == (range(1, 6), 5, 3, None, None)
    assert three == RateNode(
        "three", 4, Prompt(("welcome",)), Destination("hangup", ""), keys=range(1, 4), timeout=2, retries=1,
        invalid=Prompt(("invalid",)), on_fail=Destination("voicemail", "1001"),
    )  # fmt: skip
    assert [three.score(key) for key in ("0", "1", "3", "4", "*", "#")] == [None, 1, 3, None, None, None]


def test_a_queue_survey_names_a_flow_that_exists(tmp_path: Path) -> None:
    make_config(tmp_path)
    (tmp_path / "flows" / "csat.yaml").write_text("start: r\nnodes:\n  r: {type: rate, prompt: welcome, next: hangup}\n")
    path = tmp_path / "pbx.yaml"
    path.write_text(path.read_text().replace('sales: {agents: ["1001"]}', 'sales: {agents: ["1001"], survey: csat}')
                    .replace('support: {agents: ["1002"]}', 'support: {agents: ["1002"], survey: cast}'))  # fmt: skip
    with pytest.raises(ConfigError) as failed:
        load_config(path, env={})
    assert [str(issue) for issue in failed.value.issues] == [
        f"{path}:13: queues.support.survey: there is no IVR flow 'cast' (no file {tmp_path / 'flows' / 'cast.yaml'})"
    ]
    path.write_text(path.read_text().replace("survey: cast", "survey: null"))
    queues = load_config(path, env={}).queues
    assert (queues["sales"].survey, queues["support"].survey) == ("csat", None)


def test_a_broken_flow_is_left_out_and_a_valid_one_beside_it_loads(tmp_path: Path) -> None:
    loaded, issues = load(
        tmp_path,
        {
            "good": "start: a\nnodes:\n  a: {type: play, prompt: welcome, next: ivr:bad}\n",
            "bad": "start: a\nnodes:\n  a: {type: play, prompt: welcome, next: b}\n",
        },
    )
    assert list(loaded) == ["good"]
    assert issues == [f"{tmp_path / 'flows' / 'bad.yaml'}:3: nodes.a.next: there is no node 'b'"]


def test_a_missing_flow_folder_holds_no_flows(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assert load_flows(tmp_path / "nowhere", config, lambda name: True) == ({}, [])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", ["1: the top level is missing 'start'", "1: the top level is missing 'nodes'"], id="empty"),
        pytest.param(
            "start: a\nnodes:\n  a: {type: hangup}\nversion: 2\n",
            ["4: unknown key 'version' at the top level"],
            id="unknown-top-level-key",
        ),
        pytest.param(
            "start: b\nnodes:\n  a: {type: hangup}\n",
            ["1: start: there is no node 'b'"],
            id="start-not-a-node",
        ),
        pytest.param(
            "start: a\nnodes:\n  a: {type: dial}\n",
            ["3: nodes.a: unknown node type 'dial' (expected one of play, menu, collect, rate, hours, branch, set, "
             "http, goto, hangup)"],
            id="unknown-type",
        ),  # fmt: skip
        pytest.param(
            "start: a\nnodes:\n  a: {type: paly, prompt: welcome, next: hangup}\n",
            ["3: nodes.a: unknown node type 'paly' (did you mean 'play'?)"],
            id="misspelt-type",
        ),
        pytest.param(
            "start: a\nnodes:\n  a:\n    prompt: welcome\n",
            ["3: nodes.a is missing 'type' (one of play, menu, collect, rate, hours, branch, set, http, goto, hangup)"],
            id="missing-type",
        ),
        pytest.param(
            "start: a\nnodes:\n  a:\n    type: play\n    prompt: welcome\n",
            ["3: nodes.a is missing 'next'"],
            id="missing-key",
        ),
        pytest.param(
            "start: a\nnodes:\n  a:\n    type: play\n    prompt: welcome\n    next: hangup\n    nxet: b\n",
            ["7: unknown key 'nxet' in nodes.a (did you mean 'next'?)"],
            id="unknown-key",
        ),
        pytest.param(
            "start: a\nnodes:\n  a: {type: play, prompt: welcome, next: menu}\n  mneu: {type: hangup}\n",
            ["3: nodes.a.next: there is no node 'menu' (did you mean 'mneu'?)", "4: node 'mneu' is unreachable: "
             "no path leads to it from start 'a'"],
            id="unknown-node-id",
        ),  # fmt: skip
        pytest.param(
            "start: a\nnodes:\n  a: {type: hangup}\n  b: {type: play, prompt: welcome, next: a}\n",
            ["4: node 'b' is unreachable: no path leads to it from start 'a'"],
            id="unreachable",
        ),
        pytest.param(
            "start: a\nnodes:\n  a: {type: play, prompt: welcome, next: hangup}\n  hangup: {type: hangup}\n",
            ["4: node id 'hangup' is the hangup destination"],
            id="hangup-is-no-node-id",
        ),
        pytest.param(
            "start: a\nnodes:\n  a: {type: play, prompt: welcome, next: 'queue:'}\n",
            ["3: nodes.a.next: destination 'queue:' needs a target after 'queue:'"],
            id="bad-destination",
        ),
        pytest.param(
            "start: a\nnodes:\n  a: {type: goto, to: queue:nosuch}\n",
            ["3: nodes.a.to: there is no queue 'nosuch'"],
            id="unknown-queue",
        ),
        pytest.param(
            "start: a\nnodes:\n  a: {type: goto, to: extension:1009}\n",
            ["3: nodes.a.to: there is no extension '1009'"],
            id="unknown-extension",
        ),
        pytest.param(
            "start: a\nnodes:\n  a: {type: goto, to: voicemail:1003}\n",
            ["3: nodes.a.to: there is no mailbox '1003'"],
            id="unknown-mailbox",
        ),
        pytest.param(
            "start: a\nnodes:\n  a: {type: goto, to: external:+1555@acme}\n",
            ["3: nodes.a.to: there is no trunk 'acme'"],
            id="unknown-trunk",
        ),
        pytest.param(
            "start: a\nnodes:\n  a: {type: goto, to: ivr:other}\n",
            ["3: nodes.a.to: there is no IVR flow 'other' (no file {flows}/other.yaml)"],
            id="unknown-flow",
        ),
        pytest.param(
            "start: a\nnodes:\n  a: {type: goto, to: menu, next: menu}\n  menu: {type: hangup}\n",
            ["3: nodes.a takes 'to' or 'next', not both"],
            id="goto-twice",
        ),
        pytest.param(
            "start: a\nnodes:\n  a: {type: play, prompt: nosuch, next: hangup}\n",
            ["3: nodes.a.prompt: there is no sound 'nosuch' in {sounds}"],
            id="missing-prompt",
        ),
        pytest.param(
            "start: a\nnodes:\n  a:\n    type: play\n    prompt:\n      - welcome\n      - nosuch\n    next: hangup\n",
            ["7: nodes.a.prompt[1]: there is no sound 'nosuch' in {sounds}"],
            id="missing-prompt-in-list",
        ),
        pytest.param(
            "start: a\nnodes:\n  a: {type: play, prompt: [], next: hangup}\n",
            ["3: nodes.a.prompt must not be empty"],
            id="empty-prompt",
        ),
        pytest.param(
            "start: a\nnodes:\n  a: {type: play, prompt: '../etc/passwd', next: hangup}\n",
            ["3: nodes.a.prompt: sound '../etc/passwd' must be a name under sounds.dir"],
            id="prompt-outside-sounds",
        ),
        pytest.param(
            "start: a\nnodes:\n  a: {type: play, prompt: 'say:', next: hangup}\n",
            ["3: nodes.a.prompt: 'say:' needs the text to speak after it"],
            id="say-without-text",
        ),
        pytest.param(
            "start: a\nnodes:\n  a: {type: play, prompt: 'hello {caller', next: hangup}\n",
            ["3: nodes.a.prompt: a lone '{' in 'hello {caller' (write '{{' for a brace)"],
            id="lone-brace",
        ),
        pytest.param(
            "start: a\nnodes:\n  a: {type: play, prompt: 'say:hi {the caller}', next: hangup}\n",
            ["3: nodes.a.prompt: '{the caller}' in 'say:hi {the caller}' is not a variable name "
             "(letters, digits and _)"],
            id="bad-placeholder",
        ),  # fmt: skip
        pytest.param(
            "start: m\nnodes:\n  m:\n    type: menu\n    prompt: welcome\n"
            "    options:\n      1: hangup\n      12: hangup\n",
            ["8: nodes.m.options: '12' is not one DTMF key: use 0-9, \"*\" or \"#\" (in quotes)"],
            id="bad-menu-key",
        ),
        pytest.param(
            "start: m\nnodes:\n  m:\n    type: menu\n    prompt: welcome\n    options: {}\n",
            ["6: nodes.m.options must be a mapping of DTMF keys to targets, like {\"1\": queue:sales}"],
            id="no-menu-options",
        ),
        pytest.param(
            "start: m\nnodes:\n  m:\n    type: menu\n    prompt: welcome\n    options:\n      *: hangup\n",
            ["7: invalid YAML: expected alphabetic or numeric character, but found ':' (while scanning an alias): "
             "a value or key starting with \"*\" must be in quotes, like \"*\""],
            id="unquoted-star",
        ),  # fmt: skip
        pytest.param(
            "start: m\nnodes:\n  m:\n    type: menu\n    prompt: welcome\n    options:\n      1: hangup\n      #: m\n",
            ["8: an unquoted # starts a YAML comment: write \"#\" in quotes for the # key"],
            id="unquoted-hash-key",
        ),
        pytest.param(
            "start: m\nnodes:\n  m:\n    type: menu\n    prompt: welcome\n    options: {1: hangup}\n    timeout: -1\n"
            "    retries: 50\n",
            ["7: nodes.m.timeout must be more than 0 and at most 120 seconds, not -1",
             "8: nodes.m.retries must be between 0 and 20, not 50"],
            id="menu-ranges",
        ),  # fmt: skip
        pytest.param(
            "start: c\nnodes:\n  c:\n    type: collect\n    prompt: enter-account\n    var: call_id\n"
            "    terminator: 5\n    max_digits: 0\n    next: hangup\n",
            ["6: nodes.c.var: 'call_id' is a built-in variable and cannot be set",
             "7: nodes.c.terminator must be \"#\" or \"*\", not 5",
             "8: nodes.c.max_digits must be between 1 and 64, not 0"],
            id="collect",
        ),  # fmt: skip
        pytest.param(
            "start: c\nnodes:\n  c:\n    type: collect\n    prompt: enter-account\n    var: 2fa\n"
            "    terminator: #\n    next: hangup\n",
            ["6: nodes.c.var must be a variable name of letters, digits and _, not '2fa'",
             "7: nodes.c.terminator must be \"#\" or \"*\", in quotes: an unquoted # starts a comment"],
            id="collect-var-and-hash",
        ),  # fmt: skip
        pytest.param(
            "start: r\nnodes:\n  r:\n    type: rate\n    keys: 5-1\n    next: hangup\n",
            ["3: nodes.r is missing 'prompt'",
             "5: nodes.r.keys must be the lowest and highest score, one key 0-9 each, like \"1-5\", not '5-1'"],
            id="rate-without-prompt-and-keys-backwards",
        ),  # fmt: skip
        pytest.param(
            "start: r\nnodes:\n  r:\n    type: rate\n    prompt: welcome\n    keys: 1-10\n    retries: 21\n"
            "    next: thanks\n",
            ["6: nodes.r.keys must be the lowest and highest score, one key 0-9 each, like \"1-5\", not '1-10'",
             "7: nodes.r.retries must be between 0 and 20, not 21",
             "8: nodes.r.next: there is no node 'thanks'"],
            id="rate-keys-past-one-key",
        ),  # fmt: skip
        pytest.param(
            "start: h\nnodes:\n  h:\n    type: hours\n    open: 'mon-fri 9:00-17:60'\n    true: hangup\n"
            "    false: hangup\n",
            ["5: nodes.h.open: bad time '17:60' in 'mon-fri 9:00-17:60': use HH:MM from 00:00 to 24:00"],
            id="bad-time",
        ),  # fmt: skip
        pytest.param(
            "start: h\nnodes:\n  h:\n    type: hours\n    open: 'mon-fir 09:00-17:00'\n    true: hangup\n"
            "    false: hangup\n",
            ["5: nodes.h.open: unknown day 'fir' in 'mon-fir 09:00-17:00': use mon, tue, wed, thu, fri, sat, sun"],
            id="bad-day",
        ),  # fmt: skip
        pytest.param(
            "start: h\nnodes:\n  h:\n    type: hours\n    open: 'mon-fri 17:00-09:00'\n    true: hangup\n"
            "    false: hangup\n",
            ["5: nodes.h.open: '17:00-09:00' in 'mon-fri 17:00-09:00': the end must be after the start "
             "(split a range past midnight, like 'fri 22:00-24:00; sat 00:00-02:00')"],
            id="end-before-start",
        ),  # fmt: skip
        pytest.param(
            "start: h\nnodes:\n  h:\n    type: hours\n    open: 'mon-fri 09:00-17:00'\n"
            "    holidays: [2026-12-25, 2026-02-30, '12/25', 2026-12-24 10:00:00]\n    'true': hangup\n",
            ["3: nodes.h is missing 'false'",
             "6: nodes.h.holidays[1]: '2026-02-30' is not a date like 2026-12-25 (day is out of range for month)",
             "6: nodes.h.holidays[2]: '12/25' is not a date like 2026-12-25 (Invalid isoformat string: '12/25')",
             "6: nodes.h.holidays[3] must be a date like 2026-12-25, without a time"],
            id="holidays",
        ),  # fmt: skip
        pytest.param(
            "start: s\nnodes:\n  s:\n    type: set\n    vars:\n      caller: x\n      a b: y\n      c: null\n"
            "    next: hangup\n",
            ["6: nodes.s.vars: 'caller' is a built-in variable and cannot be set",
             "7: nodes.s.vars: 'a b' is not a variable name of letters, digits and _",
             "8: nodes.s.vars.c must be text, not None"],
            id="set",
        ),  # fmt: skip
        pytest.param(
            "start: b\nnodes:\n  b: {type: branch, var: '{x}', cases: {'1': hangup}, default: hangup}\n",
            ["3: nodes.b.var must be a variable name of letters, digits and _, not '{x}'"],
            id="branch-var",
        ),
        pytest.param(
            "start: h\nnodes:\n  h:\n    type: http\n    url: 'ftp://crm/{caller}'\n    next: hangup\n"
            "    on_error: hangup\n    timeout: 0\n",
            ["5: nodes.h.url must be an http:// or https:// URL, not 'ftp://crm/{caller}'",
             "8: nodes.h.timeout must be more than 0 and at most 30 seconds, not 0"],
            id="http",
        ),  # fmt: skip
        pytest.param(
            "start: a\nnodes:\n  a: {type: goto, to: b}\n  b: {type: set, vars: {x: '1'}, next: c}\n"
            "  c: {type: goto, next: a}\n",
            ["3: nodes a -> b -> c -> a loop forever without the caller (add a play, menu or collect node)"],
            id="silent-loop",
        ),  # fmt: skip
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, text: str, expected: list[str]) -> None:
    flows, sounds = tmp_path / "flows", tmp_path / "sounds"
    wanted = [line.replace("{flows}", str(flows)).replace("{sounds}", str(sounds)) for line in expected]
    assert errors(tmp_path, text) == wanted


def test_say_prompts_need_tts(tmp_path: Path) -> None:
    text = "start: a\nnodes:\n  a: {type: play, prompt: [welcome, 'say:Hello'], next: hangup}\n"
    assert errors(tmp_path, text, tts="null") == [
        f"3: nodes.a.prompt[1]: say: prompts need sounds.tts (it is null in {tmp_path / 'pbx.yaml'})"
    ]


def test_sounds_named_with_placeholders_are_not_looked_up(tmp_path: Path) -> None:
    text = "start: a\nnodes:\n  a: {type: play, prompt: ['{lang}/welcome', 'digits/1'], next: hangup}\n"
    loaded, issues = load(tmp_path, {"main": text})
    assert issues == [] and "main" in loaded


def test_hours_take_bare_and_quoted_true_false_keys(tmp_path: Path) -> None:
    text = """\
    start: h
    nodes:
      h: {type: hours, open: "mon-sun 00:00-24:00", true: a, "false": b}
      a: {type: hangup}
      b: {type: hangup}
    """
    loaded, issues = load(tmp_path, {"main": text})
    assert issues == []
    node = loaded["main"].node("h")
    assert isinstance(node, HoursNode) and (node.if_open, node.if_closed) == ("a", "b")


def test_hours_node_is_closed_on_holidays(tmp_path: Path) -> None:
    text = """\
    start: h
    nodes:
      h: {type: hours, open: "09:00-17:00", holidays: [2026-12-25], true: hangup, false: hangup}
    """
    loaded, issues = load(tmp_path, {"main": text})
    assert issues == []
    node = loaded["main"].node("h")
    assert isinstance(node, HoursNode)
    assert node.is_open(datetime(2026, 12, 24, 10, 0)) and not node.is_open(datetime(2026, 12, 25, 10, 0))


# --- Opening hours -------------------------------------------------------------

MON, TUE, WED, THU, FRI, SAT, SUN = (datetime(2026, 6, d) for d in range(1, 8))  # 2026-06-01 is a Monday


def at(day: datetime, hhmm: str, second: int = 0) -> datetime:
    hours, minutes = map(int, hhmm.split(":"))
    return day.replace(hour=hours, minute=minutes, second=second)


def test_schedule_ranges_and_boundaries() -> None:
    schedule = parse_schedule("mon-fri 09:00-12:30; mon-thu 13:30-17:00, sat 10:00-12:00")
    assert not schedule.is_open(at(MON, "08:59", 59))
    assert schedule.is_open(at(MON, "09:00"))  # the start is open
    assert schedule.is_open(at(MON, "12:29", 59))
    assert not schedule.is_open(at(MON, "12:30"))  # the end is closed
    assert schedule.is_open(at(THU, "16:59"))
    assert not schedule.is_open(at(FRI, "14:00"))  # the afternoon range ends on Thursday
    assert schedule.is_open(at(FRI, "10:00"))
    assert schedule.is_open(at(SAT, "11:00")) and not schedule.is_open(at(SAT, "12:00"))
    assert not schedule.is_open(at(SUN, "11:00"))


def test_schedule_days_wrap_around_the_week() -> None:
    schedule = parse_schedule("fri-mon 10:00-14:00")
    assert [schedule.is_open(at(day, "11:00")) for day in (MON, TUE, WED, THU, FRI, SAT, SUN)] == [
        True, False, False, False, True, True, True,
    ]  # fmt: skip
    assert parse_schedule("sun-sun 10:00-11:00").is_open(at(SUN, "10:30"))


def test_schedule_whole_days_several_ranges_and_every_day() -> None:
    schedule = parse_schedule("sat 00:00-24:00; mon 08:00-10:00 15:00-16:00")
    assert schedule.is_open(at(SAT, "00:00")) and schedule.is_open(at(SAT, "23:59", 59))
    assert not schedule.is_open(at(SUN, "00:00"))
    assert schedule.is_open(at(MON, "15:30")) and not schedule.is_open(at(MON, "12:00"))
    every_day = parse_schedule("07:30 - 08:00")
    assert all(every_day.is_open(at(day, "07:45")) for day in (MON, WED, SUN))
    assert parse_schedule("MON 09:00-10:00").is_open(at(MON, "09:00"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "opening hours are empty"),
        ("mon-fri", "'mon-fri' has no time range like 09:00-17:00"),
        ("mon-fri 9-17", "bad time '9' in 'mon-fri 9-17'"),
        ("mon-fri 09:00", "'09:00' in 'mon-fri 09:00' is not a time range"),
        ("mon-fri 24:00-24:00", "a range cannot start at 24:00"),
        ("mon 10:00-10:00", "the end must be after the start"),
        ("mon 09:00-10:00 tue", "write the days first, then times"),
        ("monday 09:00-10:00", "unknown day 'monday'"),
    ],
)
def test_parse_schedule_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_schedule(text)


# --- Placeholders ------------------------------------------------------------------


def test_expand() -> None:
    variables = {"caller": "1001", "account": "42"}
    assert expand("acct={account}&from={caller}", variables) == "acct=42&from=1001"
    assert expand("{unknown}x", variables) == "x"
    assert expand("{{caller}} is {caller}", variables) == "{caller} is 1001"
    assert expand("{{{caller}}}", variables) == "{1001}"
    assert expand("no placeholders", variables) == "no placeholders"
    assert expand("{not a var} {", variables) == "{not a var} {"


# --- pbx check ----------------------------------------------------------------------

# Every FILE:LINE that `pbx check` prints for tests/flows_broken, in order.
BROKEN_LINES = [
    ("destinations.yaml", 6),  # say: without sounds.tts
    ("destinations.yaml", 8),  # no extension 1009
    ("destinations.yaml", 9),  # no mailbox 1002
    ("destinations.yaml", 10),  # no flow "nowhere"
    ("destinations.yaml", 11),  # no trunk acme
    ("destinations.yaml", 14),  # `#:` is a comment
    ("destinations.yaml", 15),  # timeout 0
    ("destinations.yaml", 16),  # orphan is unreachable
    ("destinations.yaml", 17),  # goto -> set -> goto loop
    ("hours.yaml", 6),  # 25:00
    ("hours.yaml", 7),  # 2026-13-01
    ("hours.yaml", 13),  # var: caller
    ("hours.yaml", 14),  # terminator: # (a comment)
    ("hours.yaml", 18),  # no sound nosuchsound
    ("http.yaml", 4),  # missing on_error
    ("http.yaml", 6),  # url not http(s)
    ("http.yaml", 7),  # method DELETE
    ("http.yaml", 8),  # timeout 60
    ("http.yaml", 10),  # set: called is built in
    ("http.yaml", 10),  # set: "bad name"
    ("http.yaml", 10),  # set: lone {
    ("http.yaml", 11),  # goto without to
    ("structure.yaml", 7),  # no node mneu
    ("structure.yaml", 8),  # unknown key colour
    ("structure.yaml", 9),  # menu without prompt
    ("structure.yaml", 11),  # key 12
    ("structure.yaml", 11),  # no queue nosuch
    ("structure.yaml", 12),  # unknown node type dial
    ("syntax.yaml", 8),  # unquoted * key
]


def pbx(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pbx.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=REPO)


def test_check_and_serve_report_every_broken_flow_with_file_and_line(tmp_path: Path) -> None:
    sounds = tmp_path / "sounds"
    sounds.mkdir()
    for name in ("welcome", "closed", "enter-account"):
        (sounds / f"{name}.wav").touch()
    config = tmp_path / "pbx.yaml"
    config.write_text(
        f"ivr: {{dir: {BROKEN}}}\n"
        "sounds: {dir: sounds, tts: null}\n"
        "http: {token: test-token}\n"
        "extensions:\n  '1001': {name: Alice, password: long-enough-1001}\n"
        "queues:\n  support: {agents: ['1001']}\n"
    )
    check = pbx("check", "--config", str(config))
    assert check.returncode == 1, check.stderr
    printed = [line.split(": ", 1)[0] for line in check.stderr.splitlines()]
    assert printed == [f"{BROKEN / name}:{line}" for name, line in BROKEN_LINES], check.stderr
    assert "Traceback" not in check.stderr

    serve = pbx("serve", "--config", str(config))
    assert serve.returncode == 2
    assert serve.stderr.splitlines() == check.stderr.splitlines()


def test_check_accepts_valid_flows(tmp_path: Path) -> None:
    load(tmp_path, {"main": EVERY_NODE, "other": "start: a\nnodes:\n  a: {type: goto, to: ivr:main}\n"})
    result = pbx("check", "--config", str(tmp_path / "pbx.yaml"))
    assert result.returncode == 0, result.stderr
