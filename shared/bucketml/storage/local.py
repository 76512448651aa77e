"""A local folder with GCS semantics, so the whole platform runs without a cloud account.

Objects are plain files at `<root>/<name>`: a user can `cp` a CSV into `<root>/datasets/<model>/`
and it is an object like any other. The generation is the file's mtime in microseconds, so
files that never went through this API still have one. Bookkeeping lives in `<root>/.bucketml/`:

    meta/<name>.json   content type, custom metadata and md5 of one generation of <name>
    tmp/               files being written, published by link/rename once complete
    lock               flock'ed around every check-and-write, across processes
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import mimetypes
import os
import tempfile
import time
from pathlib import Path
from stat import S_ISREG
from typing import BinaryIO, Iterator

from bucketml.storage.base import (
    InvalidObjectName,
    NotFound,
    ObjectInfo,
    Storage,
    StorageError,
    check_object_name,
    precondition_failed,
    rfc3339,
)

log = logging.getLogger("bucketml.storage")

INTERNAL_DIR = ".bucketml"
# Each '/'-separated part of a name is one file name: 255 bytes on common file systems, less
# the '.json' its metadata file adds.
MAX_SEGMENT_BYTES = 250
COPY_BLOCK_BYTES = 1 << 20  # write_file streams in blocks of this size


class LocalStorage(Storage):
    def __init__(self, root: str | Path, bucket_name: str | None = None):
        self.root = Path(root).expanduser().resolve()
        self.bucket_name = bucket_name or self.root.name
        self.url = str(self.root)
        internal = self.root / INTERNAL_DIR
        self._meta_dir = internal / "meta"
        self._tmp_dir = internal / "tmp"
        self._lock_path = internal / "lock"
        self._refused: set[str] = set()  # names list() skipped and said so, once each
        for folder in (internal, self._meta_dir, self._tmp_dir):  # checked before mkdir creates anything
            if not _resolves_inside(folder, self.root):
                raise StorageError(
                    f"{folder} leads outside the bucket folder {self.root} (a symlink?); bucketml keeps its "
                    "bookkeeping inside the bucket folder only: remove the link"
                )
        self._meta_dir.mkdir(parents=True, exist_ok=True)
        self._tmp_dir.mkdir(parents=True, exist_ok=True)

    # -- the Storage interface -------------------------------------------------------------

    def stat(self, name: str) -> ObjectInfo:
        path = self._path(name)
        st = self._file_stat(name, path)
        meta = self._sidecar(name, st)
        if meta is None:
            # A file put there without this API, or an API write between our two looks. Under
            # the lock no API write is half-done, so a sidecar that still does not match never will.
            with self._locked():
                st = self._file_stat(name, path)
                meta = self._sidecar(name, st)
                if meta is None:
                    st, meta = self._describe_foreign_file(name, path)
        return self._info(name, st, meta)

    def read(self, name: str, *, generation: int | None = None) -> bytes:
        with self.open(name, generation=generation) as f:
            return f.read()

    def open(self, name: str, *, generation: int | None = None) -> BinaryIO:
        f = self._open_file(name, self._path(name))
        live = _generation(os.fstat(f.fileno()))  # of the very bytes this handle reads
        if generation is not None and live != generation:
            f.close()
            raise NotFound(
                f"{name} has no generation {generation} in bucket '{self.bucket_name}' "
                f"(the live one is {live}; a folder bucket keeps no older generations)"
            )
        return f

    def write(
        self,
        name: str,
        data: bytes,
        *,
        if_generation_match: int | None = None,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> ObjectInfo:
        path = self._path(name)
        with self._locked():
            current = self._live_generation(path)
            if if_generation_match is not None and (current or 0) != if_generation_match:
                raise precondition_failed(name, current, if_generation_match)
            tmp = self._write_temp(data, after=current)
            try:
                st, meta = self._publish_temp(name, path, tmp, _md5(data), content_type, metadata,
                                              create_only=if_generation_match == 0)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        return self._info(name, st, meta)

    def write_file(
        self,
        name: str,
        source: str | os.PathLike | BinaryIO,
        *,
        if_generation_match: int | None = None,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> ObjectInfo:
        path = self._path(name)
        # Copied outside the lock (a large file takes seconds; other writers must not wait for
        # it), then stamped with its generation and published under the lock like `write`.
        tmp, digest = self._copy_temp(source)
        try:
            with self._locked():
                current = self._live_generation(path)
                if if_generation_match is not None and (current or 0) != if_generation_match:
                    raise precondition_failed(name, current, if_generation_match)
                self._stamp(tmp, after=current)
                st, meta = self._publish_temp(name, path, tmp, digest, content_type, metadata,
                                              create_only=if_generation_match == 0)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return self._info(name, st, meta)

    def _publish_temp(self, name: str, path: Path, tmp: Path, digest: str, content_type: str,
                      metadata: dict[str, str] | None, *, create_only: bool) -> tuple[os.stat_result, dict]:
        """Make the stamped temporary file `tmp` the live object (under the lock); (its stat, its metadata)."""
        st = os.stat(tmp)
        meta = {
            "generation": _generation(st),
            "size": st.st_size,
            "md5": digest,
            "content_type": content_type,
            "metadata": dict(metadata or {}),
        }
        # Metadata first: whoever sees the new object must find its metadata too.
        self._write_sidecar(name, meta)
        self._publish(name, tmp, path, create_only=create_only)
        return st, meta

    def delete(self, name: str, *, if_generation_match: int | None = None) -> None:
        path = self._path(name)
        with self._locked():
            current = self._live_generation(path)
            if current is None:
                raise self._not_found(name)
            if if_generation_match is not None and current != if_generation_match:
                raise precondition_failed(name, current, if_generation_match)
            os.unlink(path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._sidecar_path(name))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for name in self._names(prefix):
            try:
                yield self.stat(name)
            except NotFound:  # removed meanwhile
                continue
            except InvalidObjectName as exc:  # a symlink leading outside, a name too long for a file
                if name not in self._refused:
                    self._refused.add(name)
                    log.warning("skipped %s: %s", name, exc)
                continue

    def children(self, prefix: str) -> list[str]:
        try:
            folder = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
            entries = list(os.scandir(folder))
        except (InvalidObjectName, FileNotFoundError, NotADirectoryError):
            if not self.root.is_dir():
                raise self._unreachable() from None
            return []
        # A folder counts once it holds an object (an empty folder is no object prefix in GCS).
        # A symlinked folder is no prefix: what it leads to may lie outside the bucket folder.
        return sorted(
            e.name for e in entries
            if e.is_dir(follow_symlinks=False) and not e.name.startswith(".") and _holds_a_file(e.path)
        )

    # -- names and paths -------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        check_object_name(name)
        for part in name.split("/"):
            if len(part.encode("utf-8")) > MAX_SEGMENT_BYTES:
                raise InvalidObjectName(
                    f"{name[:80]!r}...: a folder bucket stores each '/'-separated part of a name as a file name, "
                    f"at most {MAX_SEGMENT_BYTES} bytes of UTF-8; {part[:40]!r}... has {len(part.encode('utf-8'))}"
                )
        path = self.root / name
        # Defence in depth: a symlink inside the folder must not lead outside it.
        if not _resolves_inside(path, self.root):
            raise InvalidObjectName(f"{name} resolves to a path outside the bucket folder {self.root} (a symlink?)")
        return path

    def _sidecar_path(self, name: str) -> Path:
        path = self._meta_dir / f"{name}.json"
        if not _resolves_inside(path, self._meta_dir):  # a symlink planted in .bucketml/meta
            raise InvalidObjectName(f"the metadata of {name} resolves to a path outside {self._meta_dir} (a symlink?)")
        return path

    def _open_file(self, name: str, path: Path) -> BinaryIO:
        """`path` opened for reading, if it is a regular file inside the folder (NotFound otherwise)."""
        try:
            # O_NONBLOCK: a FIFO put under an object's name must not hang the reader (files ignore the flag).
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._not_found(name) from None
        f = os.fdopen(fd, "rb")
        try:
            if not S_ISREG(os.fstat(fd).st_mode):  # a folder, a FIFO, a device: not an object
                raise self._not_found(name)
            # Checked on what was opened, not on what the name resolved to a moment before: a
            # symlink swapped in between must not lead the read outside the folder.
            opened = _opened_path(fd)
            if opened is not None and not opened.is_relative_to(self.root):
                raise InvalidObjectName(f"{name} resolves to a path outside the bucket folder {self.root} (a symlink?)")
        except BaseException:
            f.close()
            raise
        return f

    def _names(self, prefix: str) -> list[str]:
        """Names of the files under root that are valid object names, in name order."""
        # Walk only the folder the prefix points into, when it names one.
        start = self.root
        folder = prefix.rpartition("/")[0]
        if folder:
            try:
                start = self._path(folder)
            except InvalidObjectName:
                return []
        names = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .bucketml, .git, ...
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for filename in filenames:
                name = filename if rel == "." else f"{rel}/{filename}"
                if name.startswith(prefix) and _valid(name):
                    names.append(name)
        return sorted(names)  # code point order == UTF-8 byte order, as GCS sorts

    # -- reading state ---------------------------------------------------------------------

    def _file_stat(self, name: str, path: Path) -> os.stat_result:
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise self._not_found(name) from None
        if not S_ISREG(st.st_mode):  # a folder is not an object
            raise self._not_found(name)
        return st

    def _live_generation(self, path: Path) -> int | None:
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return _generation(st) if S_ISREG(st.st_mode) else None

    def _sidecar(self, name: str, st: os.stat_result) -> dict | None:
        """The sidecar, if it describes this very file (not one `cp` put over it since)."""
        try:
            meta = json.loads(self._sidecar_path(name).read_text())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        if meta.get("generation") != _generation(st) or meta.get("size") != st.st_size:
            return None
        return meta

    def _describe_foreign_file(self, name: str, path: Path) -> tuple[os.stat_result, dict]:
        """Metadata for a file put there without this API, cached in its sidecar. Needs the lock."""
        with self._open_file(name, path) as f:
            st = os.fstat(f.fileno())  # of the very bytes we hash
            md5 = hashlib.md5()
            while block := f.read(COPY_BLOCK_BYTES):  # in blocks: a copied-in file may be larger than memory
                md5.update(block)
            digest = base64.b64encode(md5.digest()).decode("ascii")
        meta = {
            "generation": _generation(st),
            "size": st.st_size,
            "md5": digest,
            "content_type": mimetypes.guess_type(name)[0] or "application/octet-stream",
            "metadata": {},
        }
        self._write_sidecar(name, meta)
        return st, meta

    def _info(self, name: str, st: os.stat_result, meta: dict) -> ObjectInfo:
        when = rfc3339(datetime.datetime.fromtimestamp(st.st_mtime_ns / 1e9, datetime.timezone.utc))
        return ObjectInfo(
            bucket=self.bucket_name,
            name=name,
            generation=_generation(st),
            metageneration=1,
            size=st.st_size,
            md5_hash=meta["md5"],
            content_type=meta["content_type"],
            time_created=when,
            updated=when,
            metadata=dict(meta["metadata"]),
        )

    def _not_found(self, name: str) -> StorageError:
        """NotFound, unless the bucket folder itself is gone (moved, unmounted): that is the bucket
        being unreachable, which a retry may get past, as a GCS outage is."""
        if not self.root.is_dir():
            return self._unreachable()
        return NotFound(f"{name} does not exist in bucket '{self.bucket_name}'")

    def _unreachable(self) -> StorageError:
        return StorageError(f"the bucket folder {self.root} is not there (moved or unmounted?)")

    # -- writing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # A fresh open file per call: flock then excludes other threads as well as processes.
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write_temp(self, data: bytes, *, after: int | None) -> Path:
        """A complete, synced temp file whose mtime makes a generation newer than `after`."""
        fd, tmp = tempfile.mkstemp(dir=self._tmp_dir)
        try:
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide objects (reports, models) from other users
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                generation = max(time.time_ns() // 1000, (after or 0) + 1)
                os.utime(f.fileno(), ns=(generation * 1000, generation * 1000))
                os.fsync(f.fileno())
                if after is not None and _generation(os.fstat(f.fileno())) <= after:
                    raise StorageError(
                        f"the filesystem of {self.root} keeps file times too coarsely to order generations"
                    )
        except BaseException:
            os.unlink(tmp)
            raise
        return Path(tmp)

    def _copy_temp(self, source: str | os.PathLike | BinaryIO) -> tuple[Path, str]:
        """A copy of `source` in the temp folder, and the base64 MD5 of its bytes."""
        fd, tmp = tempfile.mkstemp(dir=self._tmp_dir)
        digest = hashlib.md5()
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as out, _opened(source) as f:
                while block := f.read(COPY_BLOCK_BYTES):
                    digest.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())  # here, not under the lock: syncing a large file takes a while
        except BaseException:
            os.unlink(tmp)
            raise
        return Path(tmp), base64.b64encode(digest.digest()).decode("ascii")

    def _stamp(self, tmp: Path, *, after: int | None) -> None:
        """Give a complete temp file an mtime that makes a generation newer than `after`, synced."""
        with open(tmp, "rb+") as f:
            generation = max(time.time_ns() // 1000, (after or 0) + 1)
            os.utime(f.fileno(), ns=(generation * 1000, generation * 1000))
            os.fsync(f.fileno())
            if after is not None and _generation(os.fstat(f.fileno())) <= after:
                raise StorageError(f"the filesystem of {self.root} keeps file times too coarsely to order generations")

    def _write_sidecar(self, name: str, meta: dict) -> None:
        path = self._sidecar_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._tmp_dir)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(meta, f)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _publish(self, name: str, tmp: Path, path: Path, *, create_only: bool) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if create_only:
                # link() refuses an existing target atomically, even one a user just copied in.
                os.link(tmp, path)
            else:
                os.replace(tmp, path)
        except FileExistsError:
            if create_only and path.is_file():
                raise precondition_failed(name, self._live_generation(path), 0) from None
            raise self._folder_clash(name) from None
        except (NotADirectoryError, IsADirectoryError):
            raise self._folder_clash(name) from None

    def _folder_clash(self, name: str) -> InvalidObjectName:
        return InvalidObjectName(
            f"{name} cannot be stored in the folder bucket {self.root}: one name cannot be both a file "
            "and a folder (like objects 'a' and 'a/b' together)"
        )


@contextlib.contextmanager
def _opened(source: str | os.PathLike | BinaryIO) -> Iterator[BinaryIO]:
    """A path opened for reading (and closed after), or a file object as given (left open)."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            yield f
    else:
        yield source


def _generation(st: os.stat_result) -> int:
    return st.st_mtime_ns // 1000  # microseconds, like GCS


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


def _resolves_inside(path: Path, folder: Path) -> bool:
    """Whether `path`, with every symlink along it followed, lies in `folder` (itself resolved)."""
    return Path(os.path.realpath(path)).is_relative_to(folder)


def _opened_path(fd: int) -> Path | None:
    """Where an open file really is (Linux's /proc), or None where the system cannot say."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def _valid(name: str) -> bool:
    try:
        check_object_name(name)
    except InvalidObjectName:
        return False
    return True


def _holds_a_file(folder: str) -> bool:
    """Whether any regular file lies below `folder` (hidden folders aside); stops at the first."""
    for _, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if filenames:
            return True
    return False
