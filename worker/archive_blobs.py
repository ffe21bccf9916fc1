"""Where archive segments live: a local directory (durable renames) or an S3-compatible bucket."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from .errors import ArchiveError, ConfigError


class BlobStore(Protocol):
    """Where segments live. Every put is atomic (all or nothing) and durable on return."""

    def put_file(self, key: str, path: Path) -> None:
        """Publish the content of local file ``path`` (a scratch file, consumed) at ``key``."""

    def put_bytes(self, key: str, data: bytes) -> None:
        """Publish ``data`` at ``key``."""

    def get_bytes(self, key: str) -> bytes:
        """The object at ``key``; :class:`FileNotFoundError` if there is none."""

    def list(self, prefix: str) -> list[str]:
        """Keys directly under ``prefix`` (a workspace folder, or "" for workspaces)."""

    def delete(self, key: str) -> None:
        """Remove ``key`` if present."""

    def scratch(self, workspace: str) -> Path:
        """A local folder for spooling, on the same filesystem as the data if local."""

    def lock(self, workspace: str) -> contextlib.AbstractContextManager[None]:
        """Exclusive writer access to a workspace's chain."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBlobStore:
    """A directory: writes go to a scratch file, fsync, rename, fsync the directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts):
            raise ArchiveError(f"bad archive key {key!r}")
        return self.root.joinpath(*parts)

    def _ensure_dir(self, folder: Path) -> None:
        if folder.is_dir():
            return
        self._ensure_dir(folder.parent)
        folder.mkdir(exist_ok=True)
        _fsync_dir(folder.parent)

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        self._ensure_dir(target.parent)
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(path, target)
        _fsync_dir(target.parent)

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        self._ensure_dir(target.parent)
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)

    def get_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def list(self, prefix: str) -> list[str]:
        folder = self._path(prefix) if prefix else self.root
        if not folder.is_dir():
            return []
        base = f"{prefix}/" if prefix else ""
        return sorted(base + p.name for p in folder.iterdir() if not p.name.startswith("."))

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            _fsync_dir(path.parent)

    def scratch(self, workspace: str) -> Path:
        folder = self.root / ".tmp" / workspace
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @contextlib.contextmanager
    def lock(self, workspace: str) -> Iterator[None]:
        import fcntl

        folder = self.root / ".locks"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{workspace}.lock", "a+b") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ArchiveError(
                    f"another process is archiving workspace {workspace!r}"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class S3BlobStore:
    """An S3-compatible bucket (AWS S3, MinIO, Ceph, R2, ...) through boto3.

    ``s3://bucket/prefix`` names it. Credentials and region come from boto3's usual
    chain (environment, config files, instance roles); ``AUDIT_S3_ENDPOINT_URL`` (or
    boto3's own ``AWS_ENDPOINT_URL``) points it at a non-AWS endpoint. An object is
    written whole by one request (``upload_file`` completes a multipart upload only at
    the end), so every put is atomic. There is no cross-process lock on a bucket: run
    one retention job per workspace at a time.
    """

    def __init__(self, bucket: str, prefix: str = "", *, client: Any = None,
                 scratch_root: str | Path | None = None) -> None:
        if client is None:
            try:
                import boto3  # type: ignore[import-untyped,import-not-found,unused-ignore]
            except ImportError:
                raise ConfigError(
                    "S3 archives need boto3: pip install 'audit-fleet[s3]'"
                ) from None
            endpoint = os.environ.get("AUDIT_S3_ENDPOINT_URL") or None
            client = boto3.client("s3", endpoint_url=endpoint)
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        root = scratch_root or os.environ.get("AUDIT_ARCHIVE_SCRATCH")
        self._scratch = Path(root) if root else Path(tempfile.gettempdir()) / "audit-archive"

    def _key(self, key: str) -> str:
        if not key or any(p in ("", ".", "..") for p in key.split("/")):
            raise ArchiveError(f"bad archive key {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key))
        path.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_bytes(self, key: str) -> bytes:
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(key) from None
        data: bytes = reply["Body"].read()
        return data

    def list(self, prefix: str) -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        folder = f"{base}{prefix}/" if prefix else base
        out: list[str] = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=folder, Delimiter="/")
        for page in pages:
            for item in page.get("CommonPrefixes") or ():
                name = item["Prefix"][len(folder):].rstrip("/")
                if name and not name.startswith("."):
                    out.append(f"{prefix}/{name}" if prefix else name)
            for item in page.get("Contents") or ():
                name = item["Key"][len(folder):]
                if name and "/" not in name and not name.startswith("."):
                    out.append(f"{prefix}/{name}" if prefix else name)
        return sorted(out)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def scratch(self, workspace: str) -> Path:
        folder = self._scratch / self.bucket / workspace
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @contextlib.contextmanager
    def lock(self, workspace: str) -> Iterator[None]:
        yield
