"""`load_config`: pbx.yaml from file to `Config`, every problem reported at once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pbx.config.model import Config, ConfigError
from pbx.config.reader import ConfigReader
from pbx.config.sections import CONFIG_FIELDS
from pbx.yamlfile import ConfigIssue, Reported, load_yaml, section


def load_config(path: Path, env: Mapping[str, str] | None = None, *, require_token: bool = False) -> Config:
    """Read and validate pbx.yaml; raise ConfigError listing every problem.

    ``${VAR}`` and ``${VAR:-default}`` in string values are taken from ``env``
    (default ``os.environ``); the default applies when VAR is unset or empty.
    Relative paths resolve against the folder holding ``path``, but a relative
    ``storage.db`` resolves under ``storage.data_dir``. ``require_token``
    (`pbx check`, `serve` and reloads) makes an empty ``http.token`` an error:
    the admin API answers nothing without one, on loopback too.
    """
    path = Path(path)
    root, issues = load_yaml(path)
    if root is None:
        raise ConfigError(issues)
    reader = ConfigReader(path, path.parent.resolve(), os.environ if env is None else env, issues)
    try:
        values = reader.read(section(CONFIG_FIELDS, lambda n, v: v), root)
    except Reported:
        values = None
    reader.check_references()
    if require_token and values is not None and "http" in values and not values["http"].token:
        http = root.value.get("http") if isinstance(root.value, dict) else None
        line = http.line_of("token") if http is not None else 0
        message = "http.token is empty: the admin API needs a token on every address (`make run` writes PBX_ADMIN_TOKEN to .env)"
        reader.issues.append(ConfigIssue(path, line, message))
    if values is None or reader.issues:
        raise ConfigError(sorted(reader.issues, key=lambda issue: issue.line))
    config = Config(path=path, **values)
    reader.check_dialable(config)
    if reader.issues:
        raise ConfigError(sorted(reader.issues, key=lambda issue: issue.line))
    return config
