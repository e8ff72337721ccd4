"""Local files: a path as the shell reads it, this node's cache (and a copy in it named by its s3:// URI), and files
and folders written whole get the mode a plain `open()` or `mkdir()` would have given them.

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


def node_cache_dir() -> Path:
    """This node's cache of dataset copies and indexes: $TL_CACHE_DIR, default ~/.cache/tl-finetune."""
    return user_path(os.environ.get("TL_CACHE_DIR") or Path.home() / ".cache" / "tl-finetune")


def _node_copies() -> Path:
    return node_cache_dir() / "s3"


def node_copy_path(bucket: str, key: str) -> Path:
    """Where this node keeps its copy of the S3 object or prefix s3://BUCKET/KEY (cluster.storage.cache fills it)."""
    return _node_copies() / bucket / key


def as_given(path: str | Path) -> str:
    """`path` as a user named it: a node's copy of something on S3 as its s3:// URI (what the config said), any
    other path as it is. For messages: a log line or an error about a copy names what the user knows."""
    try:
        bucket, _, key = Path(path).relative_to(_node_copies()).as_posix().partition("/")
    except ValueError:
        return str(path)
    return f"s3://{bucket}/{key}"
