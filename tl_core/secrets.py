"""The one rule for credentials: they come only from the AWS chain (environment, profile, instance role) and
never appear in a config, a file name, a log line, a report or an error message.

A config may not reference an environment variable named like a credential (`${AWS_SECRET_ACCESS_KEY}`), and
no config value may contain the value of one; errors name the field, never the value. `redact` is the last
line of defence for any text shown to a user.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator

#: Environment variable names that hold credentials (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, HF_TOKEN, DB_PASSWORD,
#: OPENAI_API_KEY), but not those that only point at one (RAY_AUTH_TOKEN_PATH, AWS_SHARED_CREDENTIALS_FILE).
CREDENTIAL_NAME = re.compile(r"(^|_)(SECRET|PASSWORD|PASSWD|TOKEN|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?)(_[A-Z0-9]+)*$", re.IGNORECASE)
_POINTER = re.compile(r"_(PATH|FILE|DIR|URL|URI|MODE|ENABLED|TYPE)$", re.IGNORECASE)
_MIN_LENGTH = 6  # shorter values ("0", "true") are too common to be told apart from ordinary text
#: A password written into a URL (`https://user:password@host`, `s3://KEY:SECRET@bucket`): a credential wherever it
#: comes from.
URL_PASSWORD = re.compile(r"(://[^/@\s:]*:)[^/@\s]+@")


def is_credential_name(name: str) -> bool:
    return bool(CREDENTIAL_NAME.search(name)) and not _POINTER.search(name)


def credential_values() -> list[str]:
    """The values of this process's credential-named environment variables, longest first."""
    values = {v for k, v in os.environ.items() if is_credential_name(k) and len(v) >= _MIN_LENGTH}
    return sorted(values, key=len, reverse=True)


def find_credential(data: Any, where: tuple = ()) -> str | None:
    """The dotted path of the first string in `data` that contains a credential from the environment or a password
    in a URL, or None."""
    secrets = credential_values()
    for path, text in _strings(data, where):
        if any(secret in text for secret in secrets) or URL_PASSWORD.search(text):
            return ".".join(map(str, path)) or "config"
    return None


def redact(text: str) -> str:
    """`text` with every credential value from the environment, and every password in a URL, replaced by ***."""
    for secret in credential_values():
        text = text.replace(secret, "***")
    return URL_PASSWORD.sub(r"\1***@", text)


def _strings(data: Any, where: tuple) -> Iterator[tuple[tuple, str]]:
    if isinstance(data, dict):
        for k, v in data.items():
            yield where, str(k)
            yield from _strings(v, (*where, k))
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            yield from _strings(v, (*where, i))
    elif isinstance(data, str):
        yield where, data
