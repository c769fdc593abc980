"""Unit tests for pbx.config: defaults, ${ENV}, and FILE:LINE errors."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from pbx.config.destinations import parse_destination
from pbx.config.load import load_config
from pbx.config.model import Config, ConfigError, Destination, Listen
from pbx.yamlfile import ConfigIssue

REPO = Path(__file__).resolve().parent.parent

# Enough for a config whose references resolve: two extensions, a trunk, a queue.
BASE = """\
extensions:
  "1001": {name: Alice, password: secret-1001}
  "1002": {name: Bob, password: secret-1002}
trunks:
  provider: {host: sip.example.net, inbound_from: [203.0.113.0/24]}
queues:
  support: {agents: ["1001"]}
"""


def write(tmp_path: Path, text: str, name: str = "pbx.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), env=env or {})


def errors(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    """The issues of a config that must fail, as printed."""
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, env)
    return [str(issue) for issue in caught.value.issues]


def test_empty_file_gives_contract_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, "")

    assert config.sip.listen == (Listen("udp", "0.0.0.0", 5060), Listen("tcp", "0.0.0.0", 5060))
    assert (config.sip.domain, config.sip.external_ip, config.sip.user_agent) == ("pbx.local", None, "pbx")
    assert config.sip.ring_timeout == 30
    assert (config.rtp.ip, config.rtp.port_min, config.rtp.port_max) == ("0.0.0.0", 10000, 20000)
    assert config.rtp.codecs == ("PCMU", "PCMA", "G722")
    assert (config.rtp.timeout, config.rtp.hold_timeout, config.sip.max_call_seconds) == (60, 3600, 14400)
    assert (config.http.host, config.http.port, config.http.token) == ("127.0.0.1", 8080, "")
    assert config.storage.data_dir == tmp_path
    assert config.storage.db == tmp_path / "pbx.db"
    assert config.sounds.dir == tmp_path / "config" / "sounds"
    assert config.sounds.tts == "espeak-ng"
    assert config.ivr.dir == tmp_path / "ivr_flows"
    assert config.timezone == "UTC"
    assert (config.extensions, config.trunks, config.inbound, config.queues) == ({}, {}, {}, {})
    assert config.outbound == ()
    assert (config.recording.format, config.recording.stereo, config.recording.retention_days) == ("wav", True, 90)
    assert (config.voicemail.max_seconds, config.voicemail.min_seconds) == (180, 1)
    assert config.voicemail.greeting == "vm-greeting"
    assert (config.features.voicemail_main, config.features.agent_login, config.features.agent_pause) == (
        "*97",
        "*45",
        "*46",
    )


def test_queue_defaults(tmp_path: Path) -> None:
    queue = load(tmp_path, BASE).queues["support"]

    assert (queue.name, queue.strategy, queue.agents) == ("support", "longest-idle", ("1001",))
    assert (queue.ring_timeout, queue.wrapup, queue.max_wait, queue.service_level) == (15, 10, 900, 20)
    assert (queue.on_timeout, queue.on_no_agents, queue.moh, queue.record) == (None, None, "default", True)
    assert (queue.announce.position, queue.announce.wait_time, queue.announce.every) == (True, True, 30)
    callback = queue.callback
    assert (callback.enabled, callback.offer_after, callback.digit) == (True, 45, "1")
    assert (callback.retries, callback.retry_interval, callback.hours) == (3, 120, None)


def test_default_http_token_comes_from_the_environment(tmp_path: Path) -> None:
    assert load(tmp_path, "", env={"PBX_ADMIN_TOKEN": "t0ken"}).http.token == "t0ken"


def test_env_expansion_with_and_without_default(tmp_path: Path) -> None:
    text = """\
sip:
  domain: ${PBX_DOMAIN}
  user_agent: "${UA:-pbx-test} v1"
  ring_timeout: ${RING:-45}
"""
    config = load(tmp_path, text, env={"PBX_DOMAIN": "example.org"})
    assert config.sip.domain == "example.org"
    assert config.sip.user_agent == "pbx-test v1"
    assert config.sip.ring_timeout == 45  # text from the environment can fill a number

    config = load(tmp_path, text, env={"PBX_DOMAIN": "example.org", "UA": "custom", "RING": "20"})
    assert (config.sip.user_agent, config.sip.ring_timeout) == ("custom v1", 20)


def test_unset_variable_is_an_error_at_its_line(tmp_path: Path) -> None:
    text = """\
extensions:
  "1001":
    name: Alice
    password: ${PBX_PASSWORD_1001}
"""
    assert errors(tmp_path, text) == [f"{tmp_path / 'pbx.yaml'}:4: PBX_PASSWORD_1001 is not set"]


def test_unknown_key_points_at_the_key(tmp_path: Path) -> None:
    text = """\
sip:
  domain: pbx.local
  foo: 1
"""
    assert errors(tmp_path, text) == [f"{tmp_path / 'pbx.yaml'}:3: unknown key 'foo' in sip"]


def test_unknown_key_suggests_a_close_one(tmp_path: Path) -> None:
    text = "sip: {ring_timout: 5}\nqueus: {}\n"
    assert errors(tmp_path, text) == [
        f"{tmp_path / 'pbx.yaml'}:1: unknown key 'ring_timout' in sip (did you mean 'ring_timeout'?)",
        f"{tmp_path / 'pbx.yaml'}:2: unknown key 'queus' at the top level (did you mean 'queues'?)",
    ]


def test_short_password_points_at_the_password(tmp_path: Path) -> None:
    text = """\
extensions:
  1001:
    name: Alice
    password: short
"""
    assert errors(tmp_path, text) == [
        f"{tmp_path / 'pbx.yaml'}:4: password of extension 1001 is shorter than 8 characters"
    ]


def test_bad_listen_string(tmp_path: Path) -> None:
    text = """\
sip:
  listen:
    - "udp:0.0.0.0:5060"
    - "sctp:0.0.0.0:5061"
    - "tcp:::1:5060"
"""
    issues = errors(tmp_path, text)
    prefix = f"{tmp_path / 'pbx.yaml'}"
    assert [issue.split(" bad listen")[0] for issue in issues] == [
        f"{prefix}:4: sip.listen[1]:",
        f"{prefix}:5: sip.listen[2]:",
    ]
    assert "transport must be udp, tcp or tls, not 'sctp'" in issues[0]


def test_listen_accepts_bracketed_ipv6(tmp_path: Path) -> None:
    config = load(tmp_path, 'sip: {listen: ["tcp:[::1]:5070"]}')
    assert config.sip.listen == (Listen("tcp", "::1", 5070),)


def test_bad_regex(tmp_path: Path) -> None:
    text = BASE + 'outbound:\n  - {match: "^(+", trunk: provider}\n'
    [issue] = errors(tmp_path, text)
    assert issue.startswith(f"{tmp_path / 'pbx.yaml'}:9: outbound[0].match: invalid regular expression '^(+'")


def test_callback_hours_are_opening_hours(tmp_path: Path) -> None:
    good = load(tmp_path, BASE + '  q: {agents: ["1001"], callback: {hours: "mon-fri 09:00-17:00"}}\n')
    hours = good.queues["q"].callback.hours
    assert hours is not None and str(hours) == "mon-fri 09:00-17:00"
    text = BASE + '  q:\n    agents: ["1001"]\n    callback: {hours: "mon-fry 09:00-17:00"}\n'
    [issue] = errors(tmp_path, text)
    assert issue.startswith(f"{tmp_path / 'pbx.yaml'}:10: queues.q.callback.hours: unknown day 'fry'")


def test_unknown_trunk_in_outbound(tmp_path: Path) -> None:
    text = BASE + 'outbound:\n  - {match: "^[0-9]+$", trunk: nope}\n'
    assert errors(tmp_path, text) == [f"{tmp_path / 'pbx.yaml'}:9: outbound[0].trunk: there is no trunk 'nope'"]


def test_bad_destination(tmp_path: Path) -> None:
    text = BASE + 'inbound:\n  "8000": sales\n  "8001": extension:1009\n  "8002": external:555@nope\n'
    prefix = f"{tmp_path / 'pbx.yaml'}"
    assert errors(tmp_path, text) == [
        f"{prefix}:9: inbound.8000: unknown destination 'sales':"
        " expected one of ivr, queue, extension, group, voicemail, external, hangup",
        f"{prefix}:10: inbound.8001: there is no extension '1009'",
        f"{prefix}:11: inbound.8002: there is no trunk 'nope'",
    ]


def test_ivr_destination_needs_a_flow_file(tmp_path: Path) -> None:
    text = 'inbound:\n  "8000": ivr:main\n'
    [issue] = errors(tmp_path, text)
    assert issue.startswith(f"{tmp_path / 'pbx.yaml'}:2: inbound.8000: there is no IVR flow 'main'")

    (tmp_path / "ivr_flows").mkdir()
    (tmp_path / "ivr_flows" / "main.yaml").write_text("start: x\n")
    assert load(tmp_path, text).inbound["8000"] == Destination("ivr", "main")


def test_yaml_syntax_error_line(tmp_path: Path) -> None:
    text = "sip:\n  domain: pbx.local\n  listen: [udp:0.0.0.0:5060\nrtp: {}\n"
    [issue] = errors(tmp_path, text)
    assert issue.startswith(f"{tmp_path / 'pbx.yaml'}:4: invalid YAML: ")


def test_missing_file_is_line_zero(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.yaml")
    assert [str(issue) for issue in caught.value.issues] == [f"{tmp_path / 'absent.yaml'}:0: file not found"]


def test_all_errors_reported_together_in_file_order(tmp_path: Path) -> None:
    text = """\
sip: {ring_timeout: 0}
rtp: {ports: [10001, 20000], codecs: [PCMU, OPUS]}
http: {listen: "0.0.0.0:8080", token: ""}
timezone: Mars/Olympus
extensions:
  "1001": {name: Alice, password: short}
  "1002": {name: Bob, password: "${MISSING}"}
queues:
  support: {strategy: fifo, agents: ["1001", "1003"], on_timeout: voicemail:1003}
"""
    prefix = f"{tmp_path / 'pbx.yaml'}"
    assert errors(tmp_path, text) == [
        f"{prefix}:1: sip.ring_timeout must be between 1 and 600, not 0",
        f"{prefix}:2: rtp.ports: the first port must be even (RTP uses even ports, RTCP the odd one above)",
        f"{prefix}:2: rtp.codecs[1] must be one of PCMU, PCMA, G722, not 'OPUS'",
        f"{prefix}:4: timezone: unknown time zone 'Mars/Olympus'",
        f"{prefix}:6: password of extension 1001 is shorter than 8 characters",
        f"{prefix}:7: MISSING is not set",
        f"{prefix}:9: queues.support.strategy must be one of ringall, round-robin, longest-idle,"
        " fewest-calls, random, linear, not 'fifo'",
        f"{prefix}:9: queues.support.agents[1]: there is no extension '1003'",
        f"{prefix}:9: queues.support.on_timeout: there is no mailbox '1003'",
    ]


def test_missing_required_key_and_duplicate_key(tmp_path: Path) -> None:
    text = """\
extensions:
  "1001":
    password: secret-1001
trunks:
  provider: {host: a.example}
  provider: {host: b.example}
"""
    prefix = f"{tmp_path / 'pbx.yaml'}"
    assert errors(tmp_path, text) == [
        f"{prefix}:2: extensions.1001 is missing 'name'",
        f"{prefix}:6: duplicate key 'provider' in trunks (first at line 5)",
    ]


def test_numbers_keep_the_form_they_were_written_in(tmp_path: Path) -> None:
    text = """\
extensions:
  1001: {name: Alice, password: secret-1001, voicemail: {pin: 0123}}
trunks:
  provider: {host: "[2001:db8::1]:5080", caller_id: +15550100}
outbound:
  - {match: "^[+]49", trunk: provider}
inbound:
  +15551234567: external:+4930123
"""
    config = load(tmp_path, text)
    assert config.extensions["1001"].number == "1001"
    assert config.extensions["1001"].voicemail is not None
    assert config.extensions["1001"].voicemail.pin == "0123"
    trunk = config.trunks["provider"]
    assert (trunk.host, trunk.port, trunk.caller_id) == ("2001:db8::1", 5080, "+15550100")
    assert config.inbound["+15551234567"] == Destination("external", "+4930123")


def test_routing_helpers(tmp_path: Path) -> None:
    text = """\
trunks:
  provider: {host: sip.example.net, inbound_from: [203.0.113.0/24]}
  other: {host: "sip.other.net:5070", inbound_from: ["2001:db8::/32", 198.51.100.7]}
outbound:
  - {match: "^00", trunk: other}
  - {match: "^\\\\+?[0-9]{7,15}$", trunk: provider}
"""
    config = load(tmp_path, text)
    assert config.trunks["other"].inbound_from == (
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("198.51.100.7/32"),
    )
    assert config.route_outbound("004930123456") is config.trunks["other"]
    assert config.route_outbound("+15551234567") is config.trunks["provider"]
    assert config.route_outbound("900") is None
    assert config.trunk_for_source("203.0.113.9") is config.trunks["provider"]
    assert config.trunk_for_source("::ffff:203.0.113.9") is config.trunks["provider"]
    assert config.trunk_for_source("2001:db8::5") is config.trunks["other"]
    assert config.trunk_for_source("192.0.2.1") is None
    assert config.trunk_for_source("not-an-ip") is None


@pytest.mark.parametrize(
    "text",
    ["hangup", "ivr:main", "queue:support", "extension:1001", "voicemail:1001", "voicemail:main", "external:+15551234567",
     "external:0049301234@provider"],
)
def test_parse_destination_round_trips(text: str) -> None:
    assert str(parse_destination(text)) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sales", "unknown destination 'sales'"),
        ("queue:", "needs a target"),
        ("extension:abc", "'abc' is not an extension number"),
        ("external:555@", "is not a number, optionally followed by @TRUNK"),
        ("hangup:now", "hangup takes no target"),
    ],
)
def test_parse_destination_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_destination(text)


def test_voicemail_main_needs_no_mailbox_and_smtp_and_record_are_read(tmp_path: Path) -> None:
    text = BASE.replace("{name: Bob, password: secret-1002}", "{name: Bob, password: secret-1002, record: true}")
    text += 'inbound:\n  "8600": voicemail:main\n  "8601": voicemail:1002\n'
    text += "smtp: {host: mail.example.com, username: pbx, password: mailpass, from: pbx@example.com}\n"
    prefix = f"{tmp_path / 'pbx.yaml'}"
    assert errors(tmp_path, text) == [
        f"{prefix}:10: inbound.8601: there is no mailbox '1002' (extension 1002 has no voicemail section)"
    ]
    config = load(tmp_path, text.replace('  "8601": voicemail:1002\n', ""))
    assert config.inbound["8600"] == Destination("voicemail", "main")
    assert config.extensions["1002"].record and not config.extensions["1001"].record
    assert config.smtp is not None
    assert (config.smtp.host, config.smtp.port, config.smtp.sender, config.smtp.starttls) == (
        "mail.example.com", 587, "pbx@example.com", True,
    )  # fmt: skip
    assert load(tmp_path, BASE).smtp is None


def test_issue_prints_as_file_line_message() -> None:
    assert str(ConfigIssue(Path("pbx.yaml"), 12, "oops")) == "pbx.yaml:12: oops"


def test_shipped_config_loads(tmp_path: Path) -> None:
    env = {f"PBX_PASSWORD_{n}": f"random-password-{n}" for n in (1001, 1002, 1003)}
    config = load_config(REPO / "pbx.yaml", env=env)

    assert set(config.extensions) == {"1001", "1002", "1003"}
    assert config.extensions["1002"].password == "random-password-1002"
    assert config.http.token == ""
    assert config.route_outbound("+15557654321") is config.trunks["provider"]
    assert config.inbound["+15551234567"] == Destination("ivr", "main")
    assert config.queues["support"].on_timeout == Destination("voicemail", "1001")


def test_shipped_config_needs_the_passwords() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(REPO / "pbx.yaml", env={})
    assert [issue.message for issue in caught.value.issues] == [
        f"PBX_PASSWORD_{n} is not set" for n in (1001, 1002, 1003)
    ]


def test_auth_algorithms_default_to_sha256_first_and_reject_others(tmp_path: Path) -> None:
    assert load(tmp_path, "").sip.auth_algorithms == ("SHA-256", "MD5")
    assert load(tmp_path, "sip:\n  auth_algorithms: [MD5]\n").sip.auth_algorithms == ("MD5",)
    [issue] = errors(tmp_path, "sip:\n  auth_algorithms: [MD5, SHA-1]\n")
    assert issue.startswith(f"{tmp_path / 'pbx.yaml'}:2: ") and "SHA-1" in issue


def test_call_timeouts_are_checked(tmp_path: Path) -> None:
    problems = errors(tmp_path, "sip:\n  max_call_seconds: 0\nrtp:\n  timeout: -1\n  hold_timeout: x\n")
    assert [problem.split(": ")[0] for problem in problems] == [f"{tmp_path / 'pbx.yaml'}:{line}" for line in (2, 4, 5)]
    assert "max_call_seconds" in problems[0] and "rtp.timeout" in problems[1] and "rtp.hold_timeout" in problems[2]
