"""pbx.yaml's sections, one table of fields each: which keys exist, how each
value is read and what it defaults to, and the builders that check what spans
several keys and make the typed config (`pbx.config.model`).

`CONFIG_FIELDS` is the top level; `pbx.config.load.load_config` reads it.
"""

from __future__ import annotations

import ssl
from typing import Any

from pbx.config.destinations import DIGITS, NAME, read_destination, read_forward
from pbx.config.model import (
    CODECS,
    GROUP_STRATEGIES,
    MIN_PASSWORD_LENGTH,
    QUEUE_STRATEGIES,
    Destination,
    Extension,
    FeaturesConfig,
    Forward,
    Group,
    HttpConfig,
    IvrConfig,
    OutboundRule,
    ParkConfig,
    Queue,
    QueueAnnounce,
    QueueCallback,
    RecordingConfig,
    RtpConfig,
    SipConfig,
    SmtpConfig,
    SoundsConfig,
    StorageConfig,
    TlsConfig,
    Trunk,
    TrunkRegister,
    VoicemailBox,
    VoicemailConfig,
    Webhook,
)
from pbx.events import EVENT_TYPES
from pbx.config.reader import (
    existing_file,
    flow_dir,
    host_port,
    hours,
    duration,
    ip_address,
    listen_address,
    network,
    port_range,
    reference,
    regex,
    resolved_path,
    srtp_mode,
    time_zone,
    trunk_host,
    user_path,
)
from pbx.yamlfile import (
    Field,
    Invalid,
    Reader,
    YamlNode,
    boolean,
    choice,
    fields_of,
    integer,
    list_of,
    matching,
    optional,
    section,
    string,
    table,
    text,
)


def _build_tls(node: YamlNode, values: dict[str, Any]) -> TlsConfig:
    tls = TlsConfig(values["cert"], values["key"], values["ca"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (ssl.SSLError, OSError) as exc:
        raise Invalid(f"sip.tls: cannot use {tls.cert} with {tls.key}: {exc}", node.line_of("cert")) from None
    if tls.ca is not None:
        try:
            context.load_verify_locations(tls.ca)
        except (ssl.SSLError, OSError) as exc:
            raise Invalid(f"sip.tls.ca: {tls.ca} is no PEM bundle of certificates: {exc}", node.line_of("ca")) from None
    return tls


def _build_sip(node: YamlNode, values: dict[str, Any]) -> SipConfig:
    if values["tls"] is None and any(listen.transport == "tls" for listen in values["listen"]):
        raise Invalid("sip.listen has a tls: address but sip.tls (cert and key) is missing", node.line_of("listen"))
    return SipConfig(**values)


def _build_rtp(node: YamlNode, values: dict[str, Any]) -> RtpConfig:
    port_min, port_max = values["ports"]
    return RtpConfig(
        values["ip"], port_min, port_max, values["codecs"], srtp=values["srtp"], timeout=values["timeout"], hold_timeout=values["hold_timeout"]
    )


def _build_http(node: YamlNode, values: dict[str, Any]) -> HttpConfig:
    host, port = values["listen"]
    return HttpConfig(host, port, values["token"])


def _build_storage(node: YamlNode, values: dict[str, Any]) -> StorageConfig:
    # The database lives with the rest of the data (the systemd unit lets the
    # server write only data_dir), unless storage.db is an absolute path.
    return StorageConfig(values["data_dir"], values["data_dir"] / values["db"])


def _build_extension(node: YamlNode, values: dict[str, Any]) -> Extension:
    if len(values["password"]) < MIN_PASSWORD_LENGTH:
        raise Invalid(
            f"password of extension {node.key} is shorter than {MIN_PASSWORD_LENGTH} characters",
            node.line_of("password"),
        )
    forward: Forward = values["forward"]
    for key in ("always", "busy", "no_answer"):
        if getattr(forward, key) == Destination("extension", node.key):
            raise Invalid(f"extension {node.key} forwards to itself", node.value["forward"].line_of(key))
    return Extension(node.key, **values)


def _build_trunk(node: YamlNode, values: dict[str, Any]) -> Trunk:
    host, port, transport = values["host"]
    return Trunk(
        node.key, host, port, values["inbound_from"], values["register"], values["caller_id"], max_calls=values["max_calls"],
        transport=transport, auth_algorithms=values["auth_algorithms"],
    )


def _build_outbound_rule(node: YamlNode, values: dict[str, Any]) -> OutboundRule:
    extensions = frozenset(values["extensions"]) if values["extensions"] is not None else None
    return OutboundRule(values["match"], values["trunk"], extensions)


def _build_voicemail(node: YamlNode, values: dict[str, Any]) -> VoicemailConfig:
    if values["min_seconds"] >= values["max_seconds"]:
        raise Invalid("voicemail.min_seconds must be below voicemail.max_seconds", node.line_of("min_seconds"))
    return VoicemailConfig(**values)


def _build_mailbox(node: YamlNode, values: dict[str, Any]) -> VoicemailBox:
    if values["respond_within"] is not None and values["queue"] is None:
        raise Invalid(f"{node.name}.respond_within needs a queue to respond", node.line_of("respond_within"))
    return VoicemailBox(**values)


def _extensions(r: Reader, node: YamlNode) -> dict[str, Extension]:
    """The extensions; those with a ``voicemail`` section declare the mailboxes
    (as written, so references are checked even when an extension is broken)."""
    if isinstance(node.value, dict):
        r.declared["mailbox"] = {
            number
            for number, child in node.value.items()
            if isinstance(child.value, dict) and "voicemail" in child.value and child.value["voicemail"].value is not None
        }
    return table("extension", _number, section(_EXTENSION_FIELDS, _build_extension))(r, node)


def _build_group(node: YamlNode, values: dict[str, Any]) -> Group:
    return Group(node.key, values["members"], values["strategy"], values["ring_timeout"], values["on_fail"])


def _build_park(node: YamlNode, values: dict[str, Any]) -> ParkConfig:
    slots = values["slots"]
    if len(slots) != 2 or slots[0] > slots[1]:
        raise Invalid(f"park.slots must be the first and last slot number, like [71, 79], not {list(slots)}", node.line_of("slots"))
    return ParkConfig(slots[0], slots[1], values["timeout"])


def _park(r: Reader, node: YamlNode) -> ParkConfig:
    """The park section; a slot must not be an extension's number (dialing it retrieves the parked call)."""
    park = section(_PARK_FIELDS, _build_park)(r, node)
    clashes = sorted(r.declared.get("extension", set()) & {str(slot) for slot in park.slots})
    if clashes:
        raise Invalid(f"park.slots {park.first}-{park.last} hold extension {clashes[0]}'s number", node.line_of("slots"))
    return park


def _build_smtp(node: YamlNode, values: dict[str, Any]) -> SmtpConfig:
    host, port = values["host"]
    return SmtpConfig(host, port, values["username"], values["password"], values["from"], values["starttls"])


def _build_features(node: YamlNode, values: dict[str, Any]) -> FeaturesConfig:
    seen: dict[str, str] = {}
    for name, code in values.items():
        if code in seen:
            raise Invalid(f"features.{name} uses {code!r}, like features.{seen[code]}", node.line_of(name))
        seen[code] = name
    blind, attended = values["blind_transfer"], values["attended_transfer"]
    if blind.startswith(attended) or attended.startswith(blind):  # keys in a call: which one is pressed must be clear
        raise Invalid(f"features.blind_transfer {blind!r} and attended_transfer {attended!r} start alike", node.line_of("attended_transfer"))
    return FeaturesConfig(**values)


_number = matching(DIGITS, "an extension number (digits)")
_name = matching(NAME, "a name of letters, digits, '_', '.' or '-'")
_dtmf_digit = matching(r"[0-9*#]", "one DTMF key (0-9, * or #)")
_feature_code = matching(r"[0-9*#]+", "a code of DTMF keys, like \"*97\"")
_digest_algorithms = list_of(choice("SHA-256", "MD5"), non_empty=True, unique=True)

_TLS_FIELDS = (
    Field("cert", existing_file),
    Field("key", existing_file),
    Field("ca", optional(existing_file), None),
)
_SIP_FIELDS = (
    Field("listen", list_of(listen_address, non_empty=True, unique=True), ["udp:0.0.0.0:5060", "tcp:0.0.0.0:5060"]),
    Field("domain", text, "pbx.local"),
    Field("external_ip", optional(ip_address), None),
    Field("user_agent", text, "pbx"),
    Field("ring_timeout", integer(1, 600), 30),
    Field("drain_timeout", integer(0, 3600), 30),
    Field("auth_algorithms", _digest_algorithms, ["SHA-256", "MD5"]),
    Field("tls", optional(section(_TLS_FIELDS, _build_tls)), None),
    Field("max_call_seconds", integer(1, 604800), 14400),
    Field("session_expires", integer(0, 86400), 1800),
    Field("qualify_seconds", integer(0, 3600), 60),
)
_RTP_FIELDS = (
    Field("ip", ip_address, "0.0.0.0"),
    Field("ports", port_range, [10000, 20000]),
    Field("codecs", list_of(choice(*CODECS), non_empty=True, unique=True), list(CODECS)),
    Field("srtp", srtp_mode, "optional"),
    Field("timeout", integer(0, 86400), 60),
    Field("hold_timeout", integer(0, 86400), 3600),
)
_HTTP_FIELDS = (
    Field("listen", host_port(None, "127.0.0.1:8080"), "127.0.0.1:8080"),
    Field("token", string, "${PBX_ADMIN_TOKEN:-}"),
)
_STORAGE_FIELDS = (
    Field("data_dir", resolved_path, "."),
    Field("db", user_path, "pbx.db"),  # under data_dir when relative
)
_SOUNDS_FIELDS = (Field("dir", resolved_path, "config/sounds"), Field("tts", optional(text), "espeak-ng"))
_IVR_FIELDS = (Field("dir", flow_dir, "ivr_flows"),)
_MAILBOX_FIELDS = (
    Field("pin", optional(matching(r"[0-9]{4,}", "a PIN of at least 4 digits, in quotes")), None),
    Field("email", optional(matching(r"[^@\s]+@[^@\s]+", "an email address")), None),
    Field("queue", optional(reference("queue", _name)), None),
    Field("respond_within", optional(duration(1, 365 * 86400)), None),
)
_FORWARD_FIELDS = (
    Field("always", optional(read_forward), None),
    Field("busy", optional(read_forward), None),
    Field("no_answer", optional(read_forward), None),
)
_EXTENSION_FIELDS = (
    Field("name", text),
    Field("password", string),
    Field("voicemail", optional(section(_MAILBOX_FIELDS, _build_mailbox)), None),
    Field("record", boolean, False),
    Field("max_contacts", integer(1, 100), 10),
    Field("max_calls", integer(1, 1000), 4),
    Field("forward", section(_FORWARD_FIELDS, fields_of(Forward)), {}),
    Field("auth_algorithms", optional(_digest_algorithms), None),  # None: sip.auth_algorithms
    Field("pickup_group", optional(_name), None),
)
_REGISTER_FIELDS = (
    Field("username", text),
    Field("password", text),
    Field("expires", integer(60, 86400), 300),
)
_TRUNK_FIELDS = (
    Field("host", trunk_host),
    Field("inbound_from", list_of(network), []),
    Field("register", optional(section(_REGISTER_FIELDS, fields_of(TrunkRegister))), None),
    Field("caller_id", optional(matching(r"\+?[0-9]+", "a phone number like \"+15550100\"")), None),
    Field("max_calls", optional(integer(1, 100000)), None),
    Field("auth_algorithms", _digest_algorithms, ["SHA-256", "MD5"]),
)
_OUTBOUND_FIELDS = (
    Field("match", regex),
    Field("trunk", reference("trunk", _name)),
    Field("extensions", optional(list_of(reference("extension", _number), non_empty=True, unique=True)), None),
)
_ANNOUNCE_FIELDS = (
    Field("position", boolean, True),
    Field("wait_time", boolean, True),
    Field("every", integer(5, 3600), 30),
)
_CALLBACK_FIELDS = (
    Field("enabled", boolean, True),
    Field("offer_after", integer(0, 86400), 45),
    Field("digit", _dtmf_digit, "1"),
    Field("retries", integer(0, 20), 3),
    Field("retry_interval", integer(10, 86400), 120),
    Field("hours", optional(hours), None),
)
_QUEUE_FIELDS = (
    Field("strategy", choice(*QUEUE_STRATEGIES), "longest-idle"),
    Field("agents", list_of(reference("extension", _number), unique=True), []),
    Field("ring_timeout", integer(1, 600), 15),
    Field("wrapup", integer(0, 3600), 10),
    Field("max_wait", integer(1, 86400), 900),
    Field("on_timeout", optional(read_destination), None),
    Field("on_no_agents", optional(read_destination), None),
    Field("moh", _name, "default"),
    Field("announce", section(_ANNOUNCE_FIELDS, fields_of(QueueAnnounce)), {}),
    Field("service_level", integer(1, 3600), 20),
    Field("record", boolean, True),
    Field("callback", section(_CALLBACK_FIELDS, fields_of(QueueCallback)), {}),
    Field("survey", optional(reference("ivr", _name)), None),
)
_GROUP_FIELDS = (
    Field("members", list_of(reference("extension", _number), non_empty=True, unique=True)),
    Field("strategy", choice(*GROUP_STRATEGIES), "ringall"),
    Field("ring_timeout", integer(1, 600), 20),
    Field("on_fail", optional(read_destination), None),
)
_RECORDING_FIELDS = (
    Field("format", choice("wav"), "wav"),
    Field("stereo", boolean, True),
    Field("retention_days", integer(0, 36500), 90),
)
_VOICEMAIL_FIELDS = (
    Field("max_seconds", integer(1, 3600), 180),
    Field("min_seconds", integer(0, 60), 1),
    Field("greeting", text, "vm-greeting"),
)
_SMTP_FIELDS = (
    Field("host", host_port(587, "smtp.example.com:587")),
    Field("username", optional(text), None),
    Field("password", optional(string), None),
    Field("from", matching(r"[^@\s]+@[^@\s]+", "an email address"), "pbx@localhost"),
    Field("starttls", boolean, True),
)
_FEATURES_FIELDS = (
    Field("voicemail_main", _feature_code, "*97"),
    Field("agent_login", _feature_code, "*45"),
    Field("agent_pause", _feature_code, "*46"),
    Field("forward_on", _feature_code, "*72"),
    Field("forward_off", _feature_code, "*73"),
    Field("dnd_on", _feature_code, "*78"),
    Field("dnd_off", _feature_code, "*79"),
    Field("pickup", _feature_code, "*8"),
    Field("directed_pickup", _feature_code, "**"),
    Field("park", _feature_code, "70"),
    Field("blind_transfer", _feature_code, "##"),
    Field("attended_transfer", _feature_code, "*2"),
)
_PARK_FIELDS = (
    Field("slots", list_of(integer(1, 999999)), [71, 79]),
    Field("timeout", integer(1, 86400), 120),
)
_WEBHOOK_FIELDS = (
    Field("url", matching(r"https?://[^\s/]+(/\S*)?", "an http:// or https:// URL")),
    Field("events", list_of(choice(*EVENT_TYPES), non_empty=True, unique=True), list(EVENT_TYPES)),
    Field("secret", text),  # every delivery is signed: a receiver can tell ours from a forger's
)
CONFIG_FIELDS = (
    Field("sip", section(_SIP_FIELDS, _build_sip), {}),
    Field("rtp", section(_RTP_FIELDS, _build_rtp), {}),
    Field("http", section(_HTTP_FIELDS, _build_http), {}),
    Field("storage", section(_STORAGE_FIELDS, _build_storage), {}),
    Field("sounds", section(_SOUNDS_FIELDS, fields_of(SoundsConfig)), {}),
    Field("ivr", section(_IVR_FIELDS, fields_of(IvrConfig)), {}),
    Field("timezone", time_zone, "UTC"),
    Field("extensions", _extensions, {}),
    Field("trunks", table("trunk", _name, section(_TRUNK_FIELDS, _build_trunk)), {}),
    Field("outbound", list_of(section(_OUTBOUND_FIELDS, _build_outbound_rule)), []),
    Field("inbound", table(None, matching(r"[^\s:@]+", "a number or SIP user"), read_destination), {}),
    Field("queues", table("queue", _name, section(_QUEUE_FIELDS, lambda n, v: Queue(n.key, **v))), {}),
    Field("recording", section(_RECORDING_FIELDS, fields_of(RecordingConfig)), {}),
    Field("voicemail", section(_VOICEMAIL_FIELDS, _build_voicemail), {}),
    Field("smtp", optional(section(_SMTP_FIELDS, _build_smtp)), None),
    Field("features", section(_FEATURES_FIELDS, _build_features), {}),
    Field("groups", table("group", _name, section(_GROUP_FIELDS, _build_group)), {}),
    Field("park", _park, {}),
    Field("webhooks", list_of(section(_WEBHOOK_FIELDS, fields_of(Webhook))), []),
)
