"""Model versions in the bucket: create-only versions, a compare-and-swap current pointer.

Layout (design.md §3):
    models/<model>/versions/<n>/model.onnx   written first, create-only (claims number n)
    models/<model>/versions/<n>/report.html  extra files (`register(artifacts=)`), create-only, before the card
    models/<model>/versions/<n>/card.json    written last, create-only: the version is complete
    models/<model>/current.json              {"version": n, ...}, moved only with if_generation_match

A version without card.json is an unfinished write (a crash) and is invisible to readers, so
no reader ever sees a half-written version. Used by train, predict and the CLI; imports no
machine-learning library.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import re
from typing import Any, Callable

from cloudevents.http import CloudEvent

from . import events
from .storage import NotFound, PreconditionFailed, Storage

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class RegistryError(Exception):
    pass


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):  # match() lets "x\n" through
        raise RegistryError(
            f"invalid model name {name!r}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


@dataclasses.dataclass(frozen=True)
class Pointer:
    version: int | None
    generation: int  # 0 when the model has no current version yet (for if_generation_match)
    data: dict[str, Any]


def _json(data: Any) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True).encode("utf-8")


def _content_type(filename: str) -> str:
    kinds = {".html": "text/html; charset=utf-8", ".json": "application/json", ".svg": "image/svg+xml"}
    return next((kind for ending, kind in kinds.items() if filename.endswith(ending)), "application/octet-stream")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class Registry:
    def __init__(self, storage: Storage):
        self.storage = storage

    # --- paths -------------------------------------------------------------------------
    @staticmethod
    def version_prefix(model: str, version: int) -> str:
        return f"models/{model}/versions/{version}/"

    @staticmethod
    def pointer_name(model: str) -> str:
        return f"models/{model}/current.json"

    # --- reading -----------------------------------------------------------------------
    def models(self) -> list[str]:
        """Model names (folders under models/): one delimited listing, cheap enough to poll."""
        return self.storage.children("models/")

    def versions(self, model: str) -> list[int]:
        """Complete versions (with a card), oldest first."""
        found = []
        for info in self.storage.list(f"models/{model}/versions/"):
            parts = info.name.split("/")
            if len(parts) == 5 and parts[4] == "card.json" and parts[3].isdigit():
                found.append(int(parts[3]))
        return sorted(found)

    def card(self, model: str, version: int) -> dict[str, Any]:
        try:
            return json.loads(self.storage.read(self.version_prefix(model, version) + "card.json"))
        except NotFound:
            raise NotFound(f"model '{model}' has no version {version}") from None

    def model_bytes(self, model: str, version: int) -> bytes:
        return self.storage.read(self.version_prefix(model, version) + "model.onnx")

    def current(self, model: str) -> Pointer:
        name = self.pointer_name(model)
        try:
            info = self.storage.stat(name)
            data = json.loads(self.storage.read(name, generation=info.generation))
        except NotFound:
            return Pointer(None, 0, {})
        return Pointer(int(data["version"]), info.generation, data)

    def pointer_generation(self, model: str) -> int:
        """Cheap check for 'did the pointer move?' (metadata only)."""
        try:
            return self.storage.stat(self.pointer_name(model)).generation
        except NotFound:
            return 0

    def find_by_upload(self, model: str, upload: dict[str, Any]) -> int | None:
        """The version already made from this upload (bucket, name, generation), if any."""
        key = (upload["bucket"], upload["name"], str(upload["generation"]))
        for version in reversed(self.versions(model)):
            lineage = self.card(model, version).get("lineage", {}).get("upload", {})
            if (lineage.get("bucket"), lineage.get("name"), str(lineage.get("generation"))) == key:
                return version
        return None

    def version_events(self, model: str, version: int, function: str) -> list[CloudEvent]:
        """What a version announces: model.trained always, then model.published if it is current.

        Ids are stable, so a duplicate delivery re-announces with the same ids (consumers can
        tell): `trained-<model>-<n>`, and for published the pointer's generation, so the same
        pointer move always yields the same id while a new move (a rollback to a version
        published before) gets a new one."""
        card, current = self.card(model, version), self.current(model)
        data = self._version_data(model, version, card, current)
        announced = [events.platform_event(events.MODEL_TRAINED, function, model, data, id_=f"trained-{model}-{version}")]
        if current.version == version:
            announced.append(self._published(model, version, function, data, current))
        return announced

    def published_event(self, model: str, function: str) -> CloudEvent:
        """model.published for the model's current version (after a promote or rollback)."""
        current = self.current(model)
        if current.version is None:
            raise NotFound(f"model '{model}' has no current version")
        data = self._version_data(model, current.version, self.card(model, current.version), current)
        return self._published(model, current.version, function, data, current)

    def _version_data(self, model: str, version: int, card: dict[str, Any], current: Pointer) -> dict[str, Any]:
        data = {
            "model": model,
            "version": version,
            "current_version": current.version,
            "algorithm": card["algorithm"],
            "metric": card["metric"],
            "metrics": card["metrics"],
            "model_object": self.version_prefix(model, version) + "model.onnx",
            "card_object": self.version_prefix(model, version) + "card.json",
            "upload": card["lineage"]["upload"],
        }
        if card.get("report"):  # versions made before reports, or whose report failed, have none
            data["report_object"] = card["report"]
        return data

    @staticmethod
    def _published(model: str, version: int, function: str, data: dict[str, Any], current: Pointer) -> CloudEvent:
        data = dict(data, previous_version=current.data.get("previous"), reason=current.data.get("reason"))
        event_id = f"published-{model}-{version}-{current.generation}"
        return events.platform_event(events.MODEL_PUBLISHED, function, model, data, id_=event_id)

    # --- writing -----------------------------------------------------------------------
    def register(
        self,
        model: str,
        build_model: Callable[[int], bytes],
        card: dict[str, Any],
        *,
        artifacts: dict[str, Callable[[int], bytes | None]] | None = None,
    ) -> int:
        """Store a new version create-only and return its number.

        `build_model(n)` returns the ONNX bytes for version n (the number is inside the file's
        metadata); if another writer took n first, the next number is tried.
        `artifacts` {file name: build(n)} are extra files of the version (report.html), built
        once n is claimed and written create-only in order, BEFORE card.json (the card, written
        last, marks the version complete). A build that returns None writes nothing. The card
        is copied after the builds, so a build may still add to `card` (the trainer records
        the report's object name, or why it could not be rendered).
        """
        check_model_name(model)
        existing = self._claimed_numbers(model)
        version = max(existing, default=0) + 1
        while True:
            prefix = self.version_prefix(model, version)
            onnx_bytes = build_model(version)
            try:
                info = self.storage.write(
                    prefix + "model.onnx", onnx_bytes, if_generation_match=0, content_type="application/octet-stream"
                )
                break
            except PreconditionFailed:
                version += 1
        for filename, build in (artifacts or {}).items():
            if "/" in filename or filename in ("model.onnx", "card.json"):
                raise RegistryError(f"invalid artifact name {filename!r}")
            data = build(version)
            if data is not None:
                self.storage.write(prefix + filename, data, if_generation_match=0, content_type=_content_type(filename))
        card = dict(card, model=model, version=version, created=_now())
        # The card describes the stored file (build_model stamps the version into it).
        card["artifact"] = dict(
            card.get("artifact") or {},
            sha256=hashlib.sha256(onnx_bytes).hexdigest(),
            bytes=len(onnx_bytes),
            model_md5=info.md5_hash,
        )
        self.storage.write(prefix + "card.json", _json(card), if_generation_match=0, content_type="application/json")
        return version

    def _claimed_numbers(self, model: str) -> list[int]:
        numbers = set()
        for info in self.storage.list(f"models/{model}/versions/"):
            part = info.name.split("/")[3]
            if part.isdigit():
                numbers.add(int(part))
        return sorted(numbers)

    def move_pointer(self, model: str, version: int, *, reason: str, only_if_newer: bool = False) -> tuple[bool, int | None]:
        """Point `current` at `version` with compare-and-swap; returns (moved, previous version).

        With `only_if_newer`, a slower trainer never replaces a newer version someone else
        already published.
        """
        self.card(model, version)  # refuse to point at a version that is not complete
        while True:
            pointer = self.current(model)
            if pointer.version == version:
                return False, pointer.version
            if only_if_newer and pointer.version is not None and pointer.version > version:
                return False, pointer.version
            data = {"model": model, "version": version, "previous": pointer.version, "reason": reason, "updated": _now()}
            try:
                self.storage.write(
                    self.pointer_name(model), _json(data), if_generation_match=pointer.generation, content_type="application/json"
                )
                return True, pointer.version
            except PreconditionFailed:
                continue  # someone moved it meanwhile: decide again on what is there now
