"""Object storage behind one small interface: a local directory or `s3://bucket/prefix`.

S3 goes through boto3 and honours `S3_ENDPOINT_URL` (MinIO, Ceph, GCS interop, AWS); credentials come
only from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or an instance role).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

# Files a stage writes are read by other processes and users: honour the umask like any other file
# (tempfile's private 0600 would leave a shared output unreadable).
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


class StorageError(RuntimeError):
    """The object store could not be reached or refused the request; the message says which URI (and
    never a credential: an endpoint URL with a password in it is redacted, here and in the cause)."""

    def __init__(self, message: str) -> None:
        from commoncanvas.redact import redact_text

        super().__init__(redact_text(message))


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


class Storage(ABC):
    """Keys are '/'-separated paths relative to the storage root."""

    uri: str

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomic: readers see the old object or the new one, never a part."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist yet, atomically; False when it already did. The one
        primitive behind claims and markers: of two writers racing for a key, exactly one wins."""

    @abstractmethod
    def upload_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def download_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> Iterator[str]:
        """Keys under `prefix` (recursive), in lexicographic order."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int: ...

    def local_path(self, key: str) -> Path | None:
        """The file system path of `key` when this storage is a local directory, else None."""
        return None

    def child(self, prefix: str) -> Storage:
        return open_storage(self.url(prefix))

    def url(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key.strip('/')}" if key.strip("/") else self.uri

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))


class LocalStorage(Storage):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key.strip("/") if key.strip("/") else self.root

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url(key)} does not exist") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as tmp:
            tmp.write(data)
        os.chmod(tmp.name, _FILE_MODE)
        os.replace(tmp.name, target)

    def create(self, key: str, data: bytes) -> bool:
        # Write a temporary file, then link it into place: link(2) fails if the target exists (O_EXCL's
        # guarantee) and readers never see a partial file.
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as tmp:
            tmp.write(data)
        try:
            os.chmod(tmp.name, _FILE_MODE)
            os.link(tmp.name, target)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp.name)
        return True

    def upload_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)

    def download_file(self, key: str, path: Path) -> None:
        shutil.copyfile(self._path(key), path)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def list(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix)
        if not base.exists():
            return iter(())
        files = base.rglob("*") if base.is_dir() else iter([base])
        return iter(
            sorted(
                p.relative_to(self.root).as_posix()
                for p in files
                if p.is_file() and not p.name.startswith(".")
            )
        )

    def delete_prefix(self, prefix: str) -> int:
        base = self._path(prefix)
        if not base.exists():
            return 0
        count = sum(1 for p in base.rglob("*") if p.is_file()) if base.is_dir() else 1
        shutil.rmtree(base) if base.is_dir() else base.unlink()
        return count


def endpoint_name() -> str:
    """The object store as errors name it: S3_ENDPOINT_URL less any credentials in it."""
    from commoncanvas.redact import redact_url

    endpoint = os.environ.get("S3_ENDPOINT_URL")
    return redact_url(endpoint) if endpoint else "the default AWS endpoint"


@cache
def s3_client() -> Any:
    """One client per process; endpoint from S3_ENDPOINT_URL, bounded retries and timeouts."""
    config = Config(
        retries={
            "max_attempts": int(os.environ.get("COMMONCANVAS_S3_MAX_ATTEMPTS", "5")),
            "mode": "standard",
        },
        connect_timeout=float(os.environ.get("COMMONCANVAS_S3_CONNECT_TIMEOUT", "5")),
        read_timeout=60,
        s3={"addressing_style": "path"},
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None, config=config
    )


class S3Storage(Storage):
    def __init__(self, uri: str) -> None:
        rest = uri.removeprefix("s3://")
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise ValueError(f"{uri!r} names no bucket; expected s3://BUCKET/PREFIX")
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, key: str) -> str:
        return join(self.prefix, key)

    def _call(self, what: str, key: str, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"{self.url(key)} does not exist") from None
            raise StorageError(f"{what} {self.url(key)} failed: {code or exc}") from exc
        except BotoCoreError as exc:
            endpoint = endpoint_name()
            raise StorageError(f"{what} {self.url(key)} failed: cannot reach {endpoint} ({exc})") from exc

    def read_bytes(self, key: str) -> bytes:
        body = self._call("reading", key, s3_client().get_object, Key=self._key(key))["Body"]
        return bytes(body.read())

    def write_bytes(self, key: str, data: bytes) -> None:
        # A single PUT is atomic in S3: readers never see a partial object.
        self._call("writing", key, s3_client().put_object, Key=self._key(key), Body=data)

    def create(self, key: str, data: bytes) -> bool:
        # A conditional PUT (If-None-Match: *), which AWS S3 and MinIO honour: 412 when the key exists.
        # 409 is a concurrent conditional write to the same key still in flight: the other writer wins.
        try:
            s3_client().put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return False
            raise StorageError(f"creating {self.url(key)} failed: {code or exc}") from exc
        except BotoCoreError as exc:
            endpoint = endpoint_name()
            raise StorageError(f"creating {self.url(key)} failed: cannot reach {endpoint} ({exc})") from exc
        return True

    def upload_file(self, key: str, path: Path) -> None:
        # boto3's transfer manager: multipart above 8 MB, so objects beyond a single PUT's 5 GB work.
        try:
            s3_client().upload_file(str(path), self.bucket, self._key(key))
        except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
            endpoint = endpoint_name()
            raise StorageError(f"uploading {self.url(key)} to {endpoint} failed: {exc}") from exc

    def download_file(self, key: str, path: Path) -> None:
        try:
            s3_client().download_file(self.bucket, self._key(key), str(path))
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"downloading {self.url(key)} failed: {exc}") from exc

    def exists(self, key: str) -> bool:
        try:
            self._call("checking", key, s3_client().head_object, Key=self._key(key))
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str) -> Iterator[str]:
        full = self._key(prefix)
        pages = (
            s3_client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=self.bucket, Prefix=f"{full}/" if full else "")
        )
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            keys = [obj["Key"][strip:] for page in pages for obj in page.get("Contents", [])]
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"listing {self.url(prefix)} failed: {exc}") from exc
        return iter(sorted(keys))

    def delete_prefix(self, prefix: str) -> int:
        keys = list(self.list(prefix))
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
            self._call("deleting", prefix, s3_client().delete_objects, Delete={"Objects": batch})
        return len(keys)


class InvalidURI(ValueError):
    """A storage URI that names no place: the message says what is wrong and what to write."""


# S3's bucket names (MinIO's too): lowercase letters, digits, dots and hyphens, at most 63 characters.
_BUCKET = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def check_uri(uri: str | Path) -> None:
    """Raise InvalidURI unless `uri` is a local path, file://PATH or s3://BUCKET[/PREFIX]. No I/O."""
    text = str(uri)
    usage = "use a local path or s3://BUCKET/PREFIX"
    if not text.strip():
        raise InvalidURI(f"the storage URI is empty; {usage}")
    if text.startswith("s3://"):
        bucket = text.removeprefix("s3://").partition("/")[0]
        if not bucket:
            raise InvalidURI(f"{text!r} names no bucket; {usage}")
        if not _BUCKET.match(bucket):
            raise InvalidURI(
                f"{text!r}: {bucket!r} is not a bucket name (lowercase letters, digits, '.' and '-', "
                f"at most 63); {usage}"
            )
        return
    if text.startswith("file://"):
        if not text.removeprefix("file://"):
            raise InvalidURI(f"{text!r} names no path; {usage}")
        return
    scheme = _SCHEME.match(text)
    if scheme and "://" in text:
        raise InvalidURI(f"{text!r}: the scheme {scheme.group(1)}:// is not supported; {usage}")
    if scheme and scheme.group(1).lower() == "s3":
        raise InvalidURI(f"{text!r} is not an s3:// URI (two slashes); {usage}")


def open_storage(uri: str | Path) -> Storage:
    check_uri(uri)
    text = str(uri)
    if text.startswith("s3://"):
        return S3Storage(text)
    return LocalStorage(text.removeprefix("file://"))
