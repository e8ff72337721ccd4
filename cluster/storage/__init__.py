"""Where runs live: `storage.root` is a local path or `s3://bucket/prefix`.

Credentials come only from the standard AWS chain (environment, profile, instance role); the endpoint
from `storage.endpoint_url` or `AWS_ENDPOINT_URL`. Nothing here ever logs or stores a key.

Every S3 request made here goes through botocore's standard retry mode: transient errors (connection
refused, throttling, 5xx) are retried with exponential backoff and jitter, `AWS_MAX_ATTEMPTS` times in all
(default 6), before the error reaches the caller.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import urlsplit

import pyarrow.fs

from tl_core.errors import StorageError
from tl_core.files import as_created, user_path

DEFAULT_MAX_ATTEMPTS = 6
PROBE_READ_TIMEOUT_S = 8
TRANSFER_THREADS = 8  # concurrent object transfers: datasets are many small files


@dataclass(frozen=True)
class Location:
    """A local directory or an S3 prefix. `path` is what pyarrow takes ("bucket/prefix" for S3, an
    absolute path locally); `uri` is what users read and configs hold."""

    uri: str
    is_s3: bool
    path: str
    bucket: str | None = None
    endpoint_url: str | None = None

    @property
    def key(self) -> str:
        """The S3 key prefix inside the bucket ("" at the bucket's top)."""
        return self.path.partition("/")[2] if self.is_s3 else self.path

    def child(self, *parts: str) -> Location:
        tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
        if not tail:
            return self
        return Location(f"{self.uri.rstrip('/')}/{tail}", self.is_s3, f"{self.path.rstrip('/')}/{tail}",
                        self.bucket, self.endpoint_url)


def parse(root: str, endpoint_url: str | None = None, field: str = "storage.root") -> Location:
    if not root.strip():  # "" resolves to the working directory: a job would read or write the folder it was started in
        raise StorageError(f"{field}: empty; give a local path or s3://bucket/prefix")
    if root.startswith("s3://"):
        parts = urlsplit(root)
        bucket, prefix = parts.netloc, parts.path.strip("/")
        if "@" in bucket:
            raise StorageError(f"{field}: an s3:// URI names a bucket and a prefix, never credentials (user:password@); "
                               "they come from the AWS chain")
        if len(bucket) < 3:
            raise StorageError(f"{field}: {root} names no valid bucket (expected s3://bucket/prefix)")
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        uri = f"s3://{bucket}/{prefix}".rstrip("/")
        return Location(uri, True, f"{bucket}/{prefix}".rstrip("/"), bucket, endpoint)
    if "://" in root:
        raise StorageError(f"{field}: {root} is neither a local path nor s3://bucket/prefix")
    path = str(user_path(root).resolve())
    return Location(path, False, path)


def is_uri(value: str | None) -> bool:
    return bool(value) and "://" in value


def filesystem(location: Location) -> pyarrow.fs.FileSystem:
    """The pyarrow filesystem Ray Train writes through (`RunConfig(storage_filesystem=...)`)."""
    if not location.is_s3:
        return pyarrow.fs.LocalFileSystem()
    return _s3_filesystem(location.endpoint_url, _region())


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint_url: str | None, region: str) -> pyarrow.fs.S3FileSystem:
    kwargs = {"region": region}
    if endpoint_url:
        parts = urlsplit(endpoint_url)
        kwargs.update(endpoint_override=parts.netloc, scheme=parts.scheme or "https")
    return pyarrow.fs.S3FileSystem(connect_timeout=5, request_timeout=60, **kwargs)  # credentials: the default AWS chain


def _region() -> str:
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"


def s3_client(location: Location, probe: bool = False):
    """A boto3 client with standard-mode retries (exponential backoff with jitter). A `probe` (the pre-flight check)
    gives up within seconds, so that an endpoint that accepts connections and never answers is one line, not a hang."""
    import boto3
    from botocore.config import Config

    attempts = 2 if probe else int(os.environ.get("AWS_MAX_ATTEMPTS") or DEFAULT_MAX_ATTEMPTS)
    config = Config(retries={"mode": "standard", "total_max_attempts": max(attempts, 1)},
                    connect_timeout=5, read_timeout=PROBE_READ_TIMEOUT_S if probe else 60, max_pool_connections=4 * TRANSFER_THREADS)
    # A fresh session reads the credential chain now; boto3's default session caches what it found first.
    return boto3.session.Session().client("s3", endpoint_url=location.endpoint_url, region_name=_region(),
                                          config=config)


def check_access(location: Location, field: str = "storage.root") -> None:
    """Fail with one line naming `field`, before any training, when the bucket is missing, the credentials are
    refused, or the endpoint cannot be reached. Never names a key."""
    if not location.is_s3:
        return
    with s3_errors(location, field):
        # A listing, not HeadBucket: some S3 servers answer HEAD without checking the signature.
        s3_client(location, probe=True).list_objects_v2(Bucket=location.bucket, MaxKeys=1)


def check_creatable(location: Location, field: str) -> None:
    """One line naming `field` when a local `location` cannot be created: a file (or a link to one) stands where one
    of its folders would be, or the nearest folder that exists takes no new entry (no permission, a read-only or
    virtual file system: tried with an empty folder, removed at once). S3 keys have no folders to block."""
    if location.is_s3:
        return
    path = Path(location.path)
    for folder in ([path] if path.is_dir() else []) + list(path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise StorageError(f"{field}: {folder} is a file, so {location.uri} cannot be created under it")
            try:
                os.rmdir(tempfile.mkdtemp(prefix=".tl-write-check-", dir=folder))
            except OSError as exc:
                raise StorageError(f"{field}: cannot write in {folder} ({exc.strerror or exc}), so {location.uri} cannot be "
                                   "created; choose a folder you can write to") from None
            return


@contextlib.contextmanager
def s3_errors(location: Location, field: str) -> Iterator[None]:
    """Turn boto3's exceptions into one-line StorageErrors naming `field` and the bucket, never a key."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    where, bucket = location.endpoint_url or "AWS S3", location.bucket
    try:
        yield
    except EndpointConnectionError:
        raise StorageError(f"storage.endpoint_url: cannot reach {where} (for {field} {location.uri})") from None
    except NoCredentialsError:
        raise StorageError(f"{field}: no AWS credentials found for {location.uri} (set AWS_ACCESS_KEY_ID/"
                           "AWS_SECRET_ACCESS_KEY, a profile, or an instance role)") from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket" or (code in ("404", "NotFound") and not location.key):
            raise StorageError(f"{field}: bucket {bucket} does not exist at {where}") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"):
            raise StorageError(f"{field}: {where} refused the credentials for bucket {bucket} "
                               "(check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)") from None
        raise StorageError(f"{field}: {where} answered {code} for {location.uri}") from None
    except BotoCoreError as exc:
        raise StorageError(f"storage.endpoint_url: cannot reach {where} (for {field} {location.uri}: "
                           f"{type(exc).__name__})") from None


def exists(location: Location, field: str = "storage.root") -> bool:
    """Whether anything (a file, a directory, an object or a prefix) is at `location`."""
    if not location.is_s3:
        return Path(location.path).exists()
    with s3_errors(location, field):
        found = s3_client(location).list_objects_v2(Bucket=location.bucket, Prefix=location.key.rstrip("/") + "/", MaxKeys=20)
        if not found.get("Contents"):
            found = s3_client(location).list_objects_v2(Bucket=location.bucket, Prefix=location.key, MaxKeys=1)
    # A key ending in "/" is a directory marker (pyarrow leaves them), not content.
    return any((o["Key"] == location.key or o["Key"].startswith(location.key + "/")) and not o["Key"].endswith("/")
               for o in found.get("Contents", []))


def has_content(location: Location, field: str = "storage") -> bool:
    """Whether a file, an object, or a folder or prefix with anything in it is at `location` (an empty local folder,
    like an S3 prefix without objects, has none)."""
    if not location.is_s3 and Path(location.path).is_dir():
        return any(Path(location.path).iterdir())
    return exists(location, field)


def is_dir(location: Location) -> bool:
    """Whether `location` can hold a run: a local directory, or an S3 prefix that is not itself an object."""
    if not location.is_s3:
        return Path(location.path).is_dir()
    return not location.key or not is_object(location, "storage.root")


def is_object(location: Location, field: str = "storage") -> bool:
    """Whether `location` is one S3 object (as opposed to a prefix, or nothing)."""
    return head_object(location, field) is not None


def head_object(location: Location, field: str = "storage") -> dict | None:
    """The S3 object `location`'s metadata (ContentLength, ETag, ...); None when it is no object (a prefix, or nothing)."""
    from botocore.exceptions import ClientError

    with s3_errors(location, field):  # missing credentials, an unreachable endpoint: one line, like every other call
        try:
            return s3_client(location).head_object(Bucket=location.bucket, Key=location.key)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise


def _listing_pages(location: Location, field: str, top_level: bool) -> Iterator[tuple[str, dict]]:
    """(the prefix of `location`, each page of list_objects_v2 under it); with `top_level`, S3's delimiter: the
    "folders" below are named (CommonPrefixes), not walked."""
    prefix = location.key.rstrip("/") + "/" if location.key else ""
    delimiter = {"Delimiter": "/"} if top_level else {}
    with s3_errors(location, field):
        for page in s3_client(location).get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=prefix, **delimiter):
            yield prefix, page


def list_objects(location: Location, field: str = "storage", top_level: bool = False) -> Iterator[dict]:
    """Every object under the prefix `location` ({"Key", "Size", "ETag", ...}), keys relative to it; with `top_level`,
    only those directly under it (S3's delimiter: the "folders" below are not walked)."""
    for prefix, page in _listing_pages(location, field, top_level):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):
                yield {**obj, "Key": obj["Key"][len(prefix):]}


def top_level_names(location: Location, field: str = "storage") -> list[str]:
    """The names directly under a local folder or S3 prefix: files and objects by name, folders (S3's common
    prefixes) as "name/"."""
    if not location.is_s3:
        return sorted(f"{e.name}/" if e.is_dir() else e.name for e in os.scandir(location.path))
    names = []
    for prefix, page in _listing_pages(location, field, top_level=True):
        names += [o["Key"][len(prefix):] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        names += [p["Prefix"][len(prefix):] for p in page.get("CommonPrefixes", [])]
    return sorted(names)


def top_level_name(key: str) -> str:
    """The top-level name (as `top_level_names` gives it) of a relative key or path: "a/" for "a/b.png"."""
    first, slash, _ = key.partition("/")
    return first + slash


def top_level_of(keys: Iterable[str]) -> set[str]:
    """The top-level names of relative keys or paths."""
    return {top_level_name(key) for key in keys}


def read_text(location: Location, field: str = "storage") -> str:
    if not location.is_s3:
        return Path(location.path).read_text()
    with s3_errors(location, field):
        return s3_client(location).get_object(Bucket=location.bucket, Key=location.key)["Body"].read().decode()


def write_text(location: Location, text: str) -> None:
    """Write a whole file: a local file is renamed into place, an S3 PUT is atomic by itself."""
    if location.is_s3:
        with s3_errors(location, "storage.root"):
            s3_client(location).put_object(Bucket=location.bucket, Key=location.key, Body=text.encode())
        return
    path = Path(location.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    as_created(tmp)
    os.replace(tmp, path)


def upload_dir(local_dir: str | Path, location: Location, last: str | None = None, skip: frozenset[str] = frozenset()) -> None:
    """Upload every file of `local_dir` under the prefix `location` (in parallel, each retried with backoff),
    the file named `last` after all others, so that its presence means the upload is complete; `skip`: relative
    paths already there."""
    local_dir = Path(local_dir)
    files = [p for p in sorted(local_dir.rglob("*")) if p.is_file() and p.relative_to(local_dir).as_posix() not in skip]
    first, final = [p for p in files if p.name != last], [p for p in files if p.name == last]
    client = s3_client(location)

    def put(path: Path) -> None:
        client.upload_file(str(path), location.bucket, f"{location.key}/{path.relative_to(local_dir).as_posix()}".lstrip("/"))

    with s3_errors(location, "storage.root"):
        with ThreadPoolExecutor(max_workers=TRANSFER_THREADS) as pool:
            list(pool.map(put, first))
        for path in final:
            put(path)


class UploadStream:
    """A best-effort copy of bytes, as they are produced, to the object at `location` (pyarrow's S3 output stream:
    parts upload in the background while the writer goes on). It never raises: a failure is remembered, and
    `finish()` says whether the object is complete, so the caller can upload the file the usual way instead."""

    def __init__(self, location: Location):
        self.size, self.error = 0, None
        try:
            self.stream = filesystem(location).open_output_stream(location.path)
        except Exception as exc:  # noqa: BLE001 - the copy is an optimisation: the caller falls back to an upload
            self.stream, self.error = None, exc

    def write(self, data) -> None:
        if self.error is None:
            try:
                self.stream.write(data)
                self.size += memoryview(data).nbytes
            except Exception as exc:  # noqa: BLE001
                self.error = exc

    def finish(self) -> bool:
        if self.stream is not None and not self.stream.closed:
            try:
                self.stream.close()  # waits for the last parts
            except Exception as exc:  # noqa: BLE001
                self.error = self.error or exc
        return self.error is None


def upload_file(local_file: str | Path, location: Location) -> None:
    """One local file to `location`, whole or not at all (a local copy is renamed into place)."""
    if location.is_s3:
        with s3_errors(location, "storage.root"):
            s3_client(location).upload_file(str(local_file), location.bucket, location.key)
        return
    path = Path(location.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        shutil.copyfile(local_file, tmp)
        as_created(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def download(location: Location, target: str | Path, field: str = "storage", client=None) -> None:
    """One object to a local file, written under a temporary name and renamed into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        with s3_errors(location, field):
            (client or s3_client(location)).download_file(location.bucket, location.key, tmp)
        as_created(tmp)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def delete(location: Location) -> None:
    """Remove everything at `location` (a run directory or an S3 prefix, directory markers included)."""
    if not location.is_s3:
        if Path(location.path).exists():
            pyarrow.fs.LocalFileSystem().delete_dir(location.path)
        return
    client = s3_client(location)
    prefix = location.key.rstrip("/") + "/"
    with s3_errors(location, "storage.root"):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=prefix):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=location.bucket, Delete={"Objects": keys, "Quiet": True})


def move(source: Location, destination: Location) -> None:
    """Move a directory or S3 prefix: a rename locally; on S3 a server-side copy of every object, then the delete."""
    if not source.is_s3:
        Path(destination.path).parent.mkdir(parents=True, exist_ok=True)
        os.replace(source.path, destination.path)
        return
    client = s3_client(source)
    with s3_errors(source, "storage.root"):
        if is_object(source):  # one file
            client.copy_object(Bucket=destination.bucket, Key=destination.key, CopySource={"Bucket": source.bucket, "Key": source.key})
            client.delete_object(Bucket=source.bucket, Key=source.key)
            return
        for obj in list_objects(source):
            client.copy_object(Bucket=destination.bucket, Key=f"{destination.key}/{obj['Key']}",
                               CopySource={"Bucket": source.bucket, "Key": f"{source.key}/{obj['Key']}"})
    delete(source)


def create_exclusive(location: Location, text: str) -> bool:
    """Write a small file only if nothing is there yet, atomically (O_EXCL locally, a conditional PUT with
    If-None-Match on S3): True when this call created it, False when it already existed."""
    from botocore.exceptions import ClientError

    if not location.is_s3:
        path = Path(location.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    with s3_errors(location, "storage.root"):
        try:
            s3_client(location).put_object(Bucket=location.bucket, Key=location.key, Body=text.encode(), IfNoneMatch="*")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
    return True


def remove_file(location: Location) -> None:
    """Delete one file or object; nothing happens if it is gone already."""
    if not location.is_s3:
        Path(location.path).unlink(missing_ok=True)
        return
    with s3_errors(location, "storage.root"):
        s3_client(location).delete_object(Bucket=location.bucket, Key=location.key)
