"""Google Cloud Storage (or fake-gcs-server) through the official client.

Only `open_storage` imports this module, and only for gs:// URLs: google.cloud.storage takes a
quarter of a second to import, which the predict function must not pay when serving locally.
"""

from __future__ import annotations

import contextlib
import os
from typing import BinaryIO, Iterator

import requests
from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from bucketml import settings
from bucketml.storage.base import (
    NotFound,
    ObjectInfo,
    Storage,
    StorageError,
    check_object_name,
    precondition_failed,
    rfc3339,
)

EMULATOR_PROJECT = "bucketml-local"  # the emulator needs some project name; any will do


class GCSStorage(Storage):
    def __init__(
        self,
        bucket_name: str,
        client: storage.Client | None = None,
        endpoint: str | None = None,
        project: str | None = None,
    ):
        self.bucket_name = bucket_name
        self.url = f"gs://{bucket_name}"
        if client is None:
            endpoint = endpoint or settings.platform().storage_emulator_host
            if endpoint:
                if "://" not in endpoint:  # STORAGE_EMULATOR_HOST is often just host:port
                    endpoint = f"http://{endpoint}"
                client = storage.Client(
                    project=project or EMULATOR_PROJECT,
                    credentials=AnonymousCredentials(),
                    client_options={"api_endpoint": endpoint},
                )
            else:
                with self._translated("connecting"):
                    client = storage.Client(project=project)
        self.client = client
        self._bucket = client.bucket(bucket_name)

    def stat(self, name: str) -> ObjectInfo:
        with self._translated(name):
            blob = self._bucket.get_blob(check_object_name(name))
        if blob is None:
            raise self._not_found(name)
        return self._info(blob)

    def read(self, name: str, *, generation: int | None = None) -> bytes:
        blob = self._bucket.blob(check_object_name(name), generation=generation)
        try:
            with self._translated(name):
                return blob.download_as_bytes()
        except gexc.NotFound:
            if generation is None:
                raise self._not_found(name) from None
            raise NotFound(f"{name} has no generation {generation} in bucket '{self.bucket_name}'") from None

    def open(self, name: str, *, generation: int | None = None) -> BinaryIO:
        blob = self._bucket.blob(check_object_name(name), generation=generation)
        try:
            with self._translated(name):
                blob.reload()  # NotFound now, not in the middle of the caller's reading
        except gexc.NotFound:
            raise self._not_found(name) from None
        # Streams in chunks; the generation pins every chunk to the same object version.
        return blob.open("rb", chunk_size=8 << 20)

    def write(
        self,
        name: str,
        data: bytes,
        *,
        if_generation_match: int | None = None,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> ObjectInfo:
        blob = self._bucket.blob(check_object_name(name))
        blob.metadata = dict(metadata or {})
        try:
            with self._translated(name):
                blob.upload_from_string(data, content_type=content_type, if_generation_match=if_generation_match)
        except gexc.PreconditionFailed:
            raise precondition_failed(name, self._live_generation(name), if_generation_match) from None
        return self._info(blob)

    def write_file(
        self,
        name: str,
        source: str | os.PathLike | BinaryIO,
        *,
        if_generation_match: int | None = None,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> ObjectInfo:
        # The client uploads a large file in resumable chunks; GCS makes the object exist only
        # when the last chunk is in, so a failed upload leaves nothing behind.
        blob = self._bucket.blob(check_object_name(name))
        blob.metadata = dict(metadata or {})
        if if_generation_match is not None:
            # Checked here as well as by GCS: a doomed upload fails before its bytes are sent, and
            # fake-gcs-server ignores ifGenerationMatch on resumable uploads (files over 8 MiB).
            current = self._live_generation(name)
            if (current or 0) != if_generation_match:
                raise precondition_failed(name, current, if_generation_match)
        try:
            with self._translated(name):
                if isinstance(source, (str, os.PathLike)):
                    blob.upload_from_filename(os.fspath(source), content_type=content_type,
                                              if_generation_match=if_generation_match)
                else:
                    blob.upload_from_file(source, content_type=content_type, if_generation_match=if_generation_match)
        except gexc.PreconditionFailed:
            raise precondition_failed(name, self._live_generation(name), if_generation_match) from None
        return self._info(blob)

    def delete(self, name: str, *, if_generation_match: int | None = None) -> None:
        blob = self._bucket.blob(check_object_name(name))
        if if_generation_match is not None:
            # Checked here as well as by GCS: the error can name the live generation, and
            # fake-gcs-server (up to at least v1.54) ignores ifGenerationMatch on DELETE.
            current = self._live_generation(name)
            if current != if_generation_match:
                raise precondition_failed(name, current, if_generation_match)
        try:
            with self._translated(name):
                blob.delete(if_generation_match=if_generation_match)
        except gexc.NotFound:
            raise self._not_found(name) from None
        except gexc.PreconditionFailed:
            raise precondition_failed(name, self._live_generation(name), if_generation_match) from None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._translated(f"listing {prefix or '/'}"):
            blobs = list(self.client.list_blobs(self._bucket, prefix=prefix or None))
        for blob in blobs:
            yield self._info(blob)

    def children(self, prefix: str) -> list[str]:
        # One delimited listing: the folder names come back as prefixes, not every object below.
        with self._translated(f"listing {prefix}"):
            pages = self.client.list_blobs(self._bucket, prefix=prefix, delimiter="/")
            for _ in pages:  # prefixes fill in as the pages are read
                pass
        return sorted(p[len(prefix):].rstrip("/") for p in pages.prefixes)

    def _live_generation(self, name: str) -> int | None:
        with self._translated(name):
            blob = self._bucket.get_blob(name)
        return None if blob is None else blob.generation

    @contextlib.contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        """Faults of the service, the network or credentials become StorageError (a retryable
        503 in the functions; one line in the CLI). NotFound and PreconditionFailed pass through
        to the callers, which turn them into their own errors."""
        try:
            yield
        except (gexc.NotFound, gexc.PreconditionFailed):
            raise
        except auth_exceptions.DefaultCredentialsError:
            raise StorageError(
                f"no Google Cloud credentials for bucket '{self.bucket_name}': run "
                "`gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
            ) from None
        except (gexc.GoogleAPICallError, auth_exceptions.GoogleAuthError, requests.RequestException) as exc:
            raise StorageError(f"Google Cloud Storage failed on {what} in bucket '{self.bucket_name}': {exc}") from None

    def _info(self, blob: storage.Blob) -> ObjectInfo:
        return ObjectInfo(
            bucket=self.bucket_name,
            name=blob.name,
            generation=blob.generation,
            metageneration=blob.metageneration,
            size=blob.size,
            md5_hash=blob.md5_hash,
            content_type=blob.content_type,
            time_created=rfc3339(blob.time_created),
            updated=rfc3339(blob.updated),
            metadata=dict(blob.metadata or {}),
        )

    def _not_found(self, name: str) -> NotFound:
        return NotFound(f"{name} does not exist in bucket '{self.bucket_name}'")
