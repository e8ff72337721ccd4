"""Config files: YAML read safely, `${VAR}` / `${VAR:-default}` expanded from the environment, then validated
as a `RunConfig` (tl_core.config) with `--set a.b=c` overrides."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from tl_core.config import RunConfig, from_dict, parse_yaml
from tl_core.errors import ConfigError
from tl_core.files import as_given
from tl_core.secrets import is_credential_name


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a run config from YAML, expand `${VAR}` / `${VAR:-default}` in its strings from the
    environment, apply `a.b=c` overrides, validate."""
    raw = read_config_file(path)
    name = as_given(path)  # a node's copy of an s3:// config by its URI
    if "search" in raw:  # a sweep file (jobs.sweep_config): a run config plus its search section
        raise ConfigError(f"{name}: search: this is a sweep file; run it with python -m jobs.sweep --config {name}")
    return from_dict(raw, overrides, source=name)


MAX_CONFIG_BYTES = 1 << 20
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, source: str, where: tuple) -> Any:
    """Environment references in string values, so that one config serves a laptop and a cluster
    (`storage.root: ${TL_STORAGE_ROOT:-./runs}`)."""
    if isinstance(value, dict):
        return {k: _expand_env(v, source, (*where, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, source, (*where, i)) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if is_credential_name(name):
            raise ConfigError(f"{source}: {'.'.join(map(str, where))}: ${{{name}}} names a credential; credentials come "
                              "only from the AWS chain (environment, profile, instance role), never from a config")
        found = os.environ.get(name) or default
        if found is None:
            raise ConfigError(f"{source}: {'.'.join(map(str, where))}: environment variable {name} is not set "
                              f"(write ${{{name}:-default}} to give a default)")
        return found

    return _ENV_REF.sub(substitute, value)


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    name = as_given(path)  # a node's copy of an s3:// config by its URI
    if not path.is_file():  # a FIFO or a device would block or never end: only a regular file is read
        what = "is a directory" if path.is_dir() else "is not a regular file" if path.exists() else "not found"
        raise ConfigError(f"{name}: config file {what}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{name}: {path.stat().st_size} bytes is too large for a config (at most {MAX_CONFIG_BYTES})")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 text (byte {exc.start} cannot be decoded)") from None
    data = parse_yaml(text, name)
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping of config sections at the top level")
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a config file, environment references expanded, not yet validated."""
    return _expand_env(_read_yaml(path), as_given(path), ())
