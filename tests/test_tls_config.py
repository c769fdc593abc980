"""pbx.yaml for encrypted calls: `tls:` listeners, sip.tls, rtp.srtp, trunks over TLS."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pbx.config.load import load_config
from pbx.config.model import ConfigError, Listen

EXTENSIONS = """\
extensions:
  "1001": {name: Alice, password: secret-1001}
"""


def make_cert(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def errors(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "pbx.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    return [str(issue) for issue in caught.value.issues]


def test_tls_listener_with_certificate_and_srtp_default(tmp_path: Path) -> None:
    make_cert(tmp_path, "pbx")
    path = tmp_path / "pbx.yaml"
    path.write_text(
        'sip:\n  listen: ["udp:0.0.0.0:5060", "tls:0.0.0.0:5061"]\n  tls: {cert: pbx.crt, key: pbx.key}\n'
        'trunks:\n  provider: {host: "sip.example.net;transport=tls"}\n' + EXTENSIONS
    )
    config = load_config(path, env={})
    assert config.sip.listen[1] == Listen("tls", "0.0.0.0", 5061)
    assert config.sip.tls is not None and config.sip.tls.cert == tmp_path / "pbx.crt" and config.sip.tls.ca is None
    assert config.rtp.srtp == "optional"
    trunk = config.trunks["provider"]
    assert (trunk.host, trunk.port, trunk.transport) == ("sip.example.net", 5061, "tls")


def test_tls_listener_without_certificate_is_an_error_at_its_line(tmp_path: Path) -> None:
    issues = errors(tmp_path, 'sip:\n  listen: ["udp:0.0.0.0:5060", "tls:0.0.0.0:5061"]\n' + EXTENSIONS)
    assert issues == [f"{tmp_path / 'pbx.yaml'}:2: sip.listen has a tls: address but sip.tls (cert and key) is missing"]


def test_srtp_takes_three_values(tmp_path: Path) -> None:
    issues = errors(tmp_path, "rtp:\n  srtp: sometimes\n" + EXTENSIONS)
    assert issues == [f"{tmp_path / 'pbx.yaml'}:2: rtp.srtp must be one of optional, mandatory, off, not 'sometimes'"]
    path = tmp_path / "pbx.yaml"
    path.write_text("rtp:\n  srtp: off\n" + EXTENSIONS)  # YAML 1.1 reads a bare off as false
    assert load_config(path, env={}).rtp.srtp == "off"


def test_certificate_problems_are_reported_with_file_and_line(tmp_path: Path) -> None:
    make_cert(tmp_path, "one")
    make_cert(tmp_path, "two")
    head = 'sip:\n  listen: ["tls:0.0.0.0:5061"]\n'
    issues = errors(tmp_path, head + "  tls: {cert: missing.crt, key: one.key}\n" + EXTENSIONS)
    assert issues == [f"{tmp_path / 'pbx.yaml'}:3: sip.tls.cert: no file {tmp_path / 'missing.crt'}"]
    issues = errors(tmp_path, head + "  tls:\n    cert: one.crt\n    key: two.key\n" + EXTENSIONS)
    assert len(issues) == 1 and issues[0].startswith(f"{tmp_path / 'pbx.yaml'}:4: sip.tls: cannot use ")


def test_trunk_over_tls_needs_a_tls_listener_and_a_known_transport(tmp_path: Path) -> None:
    issues = errors(tmp_path, 'trunks:\n  provider: {host: "sip.example.net:5061;transport=tls"}\n' + EXTENSIONS)
    assert issues == [
        f"{tmp_path / 'pbx.yaml'}:2: trunks.provider.host: ;transport=tls needs a tls: address in sip.listen (and sip.tls)"
    ]
    issues = errors(tmp_path, 'trunks:\n  provider: {host: "sip.example.net;transport=sctp"}\n' + EXTENSIONS)
    assert issues == [
        f"{tmp_path / 'pbx.yaml'}:2: trunks.provider.host: bad parameter 'transport=sctp': only ;transport=udp or ;transport=tls"
    ]
