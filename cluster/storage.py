"""Where runs live: `storage.root` is a local path or `s3://bucket/prefix`.

Credentials come only from the standard AWS chain (environment, profile, instance role); the endpoint
from `storage.endpoint_url` or `AWS_ENDPOINT_URL`. Nothing here ever logs or stores a key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs

from tl_core.errors import StorageError


@dataclass(frozen=True)
class Location:
    """A parsed storage root: `bucket` and `path` ("bucket/prefix") for S3, an absolute `path` locally."""

    uri: str
    is_s3: bool
    path: str
    bucket: str | None = None
    endpoint_url: str | None = None


def parse(root: str, endpoint_url: str | None = None) -> Location:
    if root.startswith("s3://"):
        parts = urlsplit(root)
        bucket, prefix = parts.netloc, parts.path.strip("/")
        if len(bucket) < 3:
            raise StorageError(f"storage.root: {root} names no valid bucket (expected s3://bucket/prefix)")
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        return Location(root, True, f"{bucket}/{prefix}".rstrip("/"), bucket, endpoint)
    if "://" in root:
        raise StorageError(f"storage.root: {root} is neither a local path nor s3://bucket/prefix")
    return Location(root, False, str(Path(root).expanduser().resolve()))


def filesystem(location: Location) -> pyarrow.fs.FileSystem:
    """The pyarrow filesystem Ray Train writes through (`RunConfig(storage_filesystem=...)`)."""
    if not location.is_s3:
        return pyarrow.fs.LocalFileSystem()
    kwargs = {"region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"}
    if location.endpoint_url:
        parts = urlsplit(location.endpoint_url)
        kwargs.update(endpoint_override=parts.netloc, scheme=parts.scheme or "https")
    return pyarrow.fs.S3FileSystem(**kwargs)  # credentials: the default AWS chain


def s3_client(location: Location):
    import boto3

    # A fresh session reads the credential chain now; boto3's default session caches what it found first.
    return boto3.session.Session().client("s3", endpoint_url=location.endpoint_url)


def check_access(location: Location) -> None:
    """Fail with one line, before any training, when the bucket is missing, the credentials are refused,
    or the endpoint cannot be reached. Never names a key."""
    if not location.is_s3:
        return
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    where = location.endpoint_url or "AWS S3"
    try:
        # A listing, not HeadBucket: some S3 servers answer HEAD without checking the signature.
        s3_client(location).list_objects_v2(Bucket=location.bucket, MaxKeys=1)
    except EndpointConnectionError:
        raise StorageError(f"storage.endpoint_url: cannot reach {where}") from None
    except NoCredentialsError:
        raise StorageError("storage.root: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                           "a profile, or an instance role)") from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise StorageError(f"storage.root: bucket {location.bucket} does not exist at {where}") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"):
            raise StorageError(f"storage.root: {where} refused the credentials for bucket {location.bucket} "
                               "(check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)") from None
        raise StorageError(f"storage.root: {where} answered {code} for bucket {location.bucket}") from None
    except BotoCoreError as exc:
        raise StorageError(f"storage.endpoint_url: cannot reach {where} ({type(exc).__name__})") from None
