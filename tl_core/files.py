"""Local files: a path as the shell reads it, and files and folders written whole get the mode a plain `open()` or
`mkdir()` would have given them.

`tempfile` makes its files 0600 and its folders 0700: right while they are written under a temporary name, wrong
once they are renamed into place. A checkpoint, a run's result.json or an exported model that only its writer can
read is lost to everyone else on a shared file system, whatever their umask says.
"""

from __future__ import annotations

import os
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put back at once
    os.umask(mask)
    return mask


UMASK = _umask()


def as_created(path: str | os.PathLike) -> None:
    """Give `path` (a file, or a folder; not what is inside it) the mode the process's umask gives a new one."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~UMASK)


def user_path(text: str | os.PathLike) -> Path:
    """A local path as the shell reads it: `~` and `~user` expanded, `~name` of no user on this machine left as written
    (pathlib's `expanduser` raises RuntimeError there: a traceback for a typo)."""
    return Path(os.path.expanduser(text))
