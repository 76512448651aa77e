"""The bucket interface every part of bucketml uses, with GCS semantics.

Two backends implement it: a local folder (`local.py`) and Google Cloud Storage (`gcs.py`).
Semantics follow GCS: each write of an object gets a new, larger `generation`; writes can be
made conditional with `if_generation_match` (0 means "only if the object does not exist"),
and a failed condition raises `PreconditionFailed` without touching what is stored.
"""

from __future__ import annotations

import abc
import dataclasses
import io
import os
from typing import BinaryIO, Iterator

from bucketml import timestamps


class StorageError(Exception):
    """Base class of storage errors; the message is meant for a user."""


class NotFound(StorageError):
    pass


class PreconditionFailed(StorageError):
    pass


class InvalidObjectName(StorageError, ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    bucket: str
    name: str
    generation: int
    metageneration: int
    size: int
    md5_hash: str  # base64 of the MD5 digest, as GCS reports it
    content_type: str
    time_created: str  # RFC 3339
    updated: str  # RFC 3339
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)

    def event_data(self) -> dict:
        """StorageObjectData as GCS notifications carry it (numbers as strings)."""
        data = {
            "kind": "storage#object",
            "id": f"{self.bucket}/{self.name}/{self.generation}",
            "bucket": self.bucket,
            "name": self.name,
            "generation": str(self.generation),
            "metageneration": str(self.metageneration),
            "contentType": self.content_type,
            "size": str(self.size),
            "md5Hash": self.md5_hash,
            "timeCreated": self.time_created,
            "updated": self.updated,
            "storageClass": "STANDARD",
        }
        if self.metadata:
            data["metadata"] = dict(self.metadata)
        return data


MAX_NAME_BYTES = 1024  # GCS's limit, in UTF-8 bytes


def check_object_name(name: str) -> str:
    """Refuse names that GCS refuses or that could escape a local folder. The same rules hold
    for both backends, so a name that works locally works on GCS and the other way round."""
    if not isinstance(name, str) or not name:
        raise InvalidObjectName(f"object name must be a non-empty string, got {name!r}")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate, e.g. from JSON "\udc80": no UTF-8 spelling, no GCS name
        raise InvalidObjectName(f"object name is not valid Unicode (it has a lone surrogate): {name!r}") from None
    if size > MAX_NAME_BYTES:
        raise InvalidObjectName(f"object name is {size} bytes long; the limit is {MAX_NAME_BYTES} bytes of UTF-8: {name[:60]!r}...")
    # C0 controls, DEL and the C1 controls (GCS forbids CR/LF and advises against the rest).
    if any(ord(c) < 32 or 127 <= ord(c) <= 159 for c in name):
        raise InvalidObjectName(f"object name contains a control character (NUL, newline, ...): {name!r}")
    if "\\" in name:  # a path separator on Windows and for some tools: the name would mean two things
        raise InvalidObjectName(f"object name contains a backslash; use '/' to separate its parts: {name!r}")
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise InvalidObjectName(f"object name has an empty, '.' or '..' segment or is absolute: {name!r}")
    if any(p.startswith(".") for p in parts):
        raise InvalidObjectName(f"object names with a segment starting with '.' are reserved: {name!r}")
    return name


def precondition_failed(name: str, current: int | None, required: int) -> PreconditionFailed:
    """The error both backends raise when `if_generation_match` does not hold."""
    if current is None:
        return PreconditionFailed(f"{name}: the object does not exist, but generation {required} was required")
    if required == 0:
        return PreconditionFailed(
            f"{name}: already exists (generation {current}) and was only to be created if missing"
        )
    return PreconditionFailed(
        f"{name}: generation {current} does not match the required {required} (someone else wrote it first)"
    )


# A UTC timestamp the way GCS prints it (2024-05-01T10:00:00.123Z): milliseconds, the default.
rfc3339 = timestamps.rfc3339


class Storage(abc.ABC):
    """A bucket. Object names use '/' as separator; there are no directories."""

    bucket_name: str
    url: str  # how to open it again: a folder path or gs://bucket

    @abc.abstractmethod
    def stat(self, name: str) -> ObjectInfo:
        """Metadata of the live object; raises NotFound."""

    @abc.abstractmethod
    def read(self, name: str, *, generation: int | None = None) -> bytes:
        """The object's bytes; with `generation`, only that generation (NotFound otherwise)."""

    @abc.abstractmethod
    def write(
        self,
        name: str,
        data: bytes,
        *,
        if_generation_match: int | None = None,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> ObjectInfo:
        """Create or replace the object atomically; readers see the old or the new bytes."""

    @abc.abstractmethod
    def write_file(
        self,
        name: str,
        source: str | os.PathLike | BinaryIO,
        *,
        if_generation_match: int | None = None,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> ObjectInfo:
        """`write` for an object too large to hold in memory: the bytes of the file at path
        `source` (or of the binary file object, read from its current position to its end),
        streamed. The same guarantees: atomic, and with `if_generation_match` nothing is stored
        unless the condition holds."""

    @abc.abstractmethod
    def delete(self, name: str, *, if_generation_match: int | None = None) -> None:
        """Remove the object; raises NotFound or PreconditionFailed."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Live objects whose names start with `prefix`, in name order."""

    def children(self, prefix: str) -> list[str]:
        """Sorted names of the 'folders' directly under `prefix` (which ends in '/'): `models/`
        gives the model names. Backends override this to avoid listing every object below."""
        found = set()
        for info in self.list(prefix):
            head, slash, _ = info.name[len(prefix):].partition("/")
            if slash:
                found.add(head)
        return sorted(found)

    def open(self, name: str, *, generation: int | None = None) -> BinaryIO:
        """A readable binary stream of the object, for objects too large to hold whole.
        Raises NotFound like `read`. Backends that can stream override this."""
        return io.BytesIO(self.read(name, generation=generation))

    def exists(self, name: str) -> bool:
        try:
            self.stat(name)
            return True
        except NotFound:
            return False
