"""Model versions in the bucket: create-only versions, a compare-and-swap current pointer.

Layout (docs/architecture.md, "Bucket layout"):
    models/<model>/versions/<n>/model.onnx   written first, create-only (claims number n)
    models/<model>/versions/<n>/report.html  extra files (`register(artifacts=)`), create-only, before the card
    models/<model>/uploads/<key>.json        the registration of one upload (`register(upload=)`): the
                                             version it made, its card, and whether the pointer step is done;
                                             create-only, just before the card: one version per upload
    models/<model>/versions/<n>/card.json    written last, create-only: the version is complete
    models/<model>/current.json              {"version": n, ...}, moved only with if_generation_match

A version without card.json is an unfinished write (a crash) and is invisible to readers, so
no reader ever sees a half-written version. Two trainers of the same upload (a redelivery
while the first still runs) race for the upload record: the loser removes its unfinished
version and answers with the winner's. A crash after the record and before the card, or before
the pointer moved, is finished by the next delivery of the same upload (`complete_upload`).
Used by train, predict and the CLI; imports no machine-learning library.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import TYPE_CHECKING, Any, Callable

from cloudevents.http import CloudEvent

from bucketml.contracts import events
from bucketml.timestamps import utc_now
from bucketml.storage import NotFound, PreconditionFailed, Storage, StorageError

if TYPE_CHECKING:  # the typed card and event data are imported where they are used, never by the predict path
    from bucketml.contracts.card import ModelCard
    from bucketml.contracts.event_data import ModelTrained

CANARY = "canary"  # the pointer's key for a canary: {"version": n, "percent": p, "started": time}
SHADOW = "shadow"  # the pointer's key for a shadow: {"version": n, "started": time}
DECIDED = "decided"  # the last step the monitor took: {"id", "type", "data"} of its event, until announced
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class RegistryError(Exception):
    pass


class UploadRegistered(RegistryError):
    """Another registration of the same upload won: `version` is the one it made."""

    def __init__(self, version: int):
        super().__init__(f"this upload is already version {version}")
        self.version = version


class RolloutRefused(RegistryError, ValueError):
    """A canary that cannot start or end as asked (the message says what to do instead)."""


class InvalidModelName(RegistryError, ValueError):
    """A model name or version that could not be a folder of its own under models/."""


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):  # match() lets "x\n" through
        raise InvalidModelName(
            f"invalid model name {name!r}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def check_version(version: int) -> int:
    # Only what register() can have made: bool is an int, and -1 would still make a path.
    if isinstance(version, bool) or not isinstance(version, int) or not 0 < version < 2**63:
        raise InvalidModelName(f"invalid version {version!r}: versions are whole numbers from 1")
    return version


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


class Registry:
    def __init__(self, storage: Storage):
        self.storage = storage

    # --- paths: every object name built from a model name or version goes through these ----
    @staticmethod
    def model_prefix(model: str) -> str:
        """`models/<model>/`; refuses a name that could reach another model's files ('../x', 'a/b')."""
        return f"models/{check_model_name(model)}/"

    @staticmethod
    def version_prefix(model: str, version: int) -> str:
        return f"{Registry.model_prefix(model)}versions/{check_version(version)}/"

    @staticmethod
    def pointer_name(model: str) -> str:
        return Registry.model_prefix(model) + "current.json"

    # --- reading -----------------------------------------------------------------------
    def models(self) -> list[str]:
        """Model names (folders under models/): one delimited listing, cheap enough to poll.
        A folder whose name is no model name (put there by hand) is not a model."""
        return [name for name in self.storage.children("models/") if MODEL_NAME.fullmatch(name)]

    def versions(self, model: str) -> list[int]:
        """Complete versions (with a card), oldest first."""
        found = []
        for info in self.storage.list(self.model_prefix(model) + "versions/"):
            parts = info.name.split("/")
            if len(parts) == 5 and parts[4] == "card.json" and parts[3].isdigit():
                found.append(int(parts[3]))
        return sorted(found)

    def card(self, model: str, version: int) -> dict[str, Any]:
        """card.json as stored. The predict path reads cards this way: the typed card
        (`model_card`) needs pydantic, which predict does not load (cold start)."""
        try:
            return json.loads(self.storage.read(self.version_prefix(model, version) + "card.json"))
        except NotFound:
            raise NotFound(f"model '{model}' has no version {version}") from None

    def model_card(self, model: str, version: int) -> ModelCard:
        """card.json as the typed card (contracts/card.py), for the train step, the CLI and the report."""
        from bucketml.contracts.card import ModelCard  # pydantic: not loaded on the predict path

        return ModelCard.model_validate(self.card(model, version))

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

    @staticmethod
    def canary_of(pointer: Pointer) -> tuple[int, int] | None:
        """(version, percent) of the pointer's canary, or None. The predict path reads it this way:
        a hand-edited pointer with a malformed canary has none rather than breaking serving."""
        canary = pointer.data.get(CANARY)
        if not isinstance(canary, dict):
            return None
        version, percent = canary.get("version"), canary.get("percent")
        if any(isinstance(x, bool) or not isinstance(x, int) for x in (version, percent)) or not 0 < percent < 100:
            return None
        return version, percent

    @staticmethod
    def shadow_of(pointer: Pointer) -> int | None:
        """The version of the pointer's shadow, or None (a malformed one too, as for canaries)."""
        shadow = pointer.data.get(SHADOW)
        version = shadow.get("version") if isinstance(shadow, dict) else None
        return version if isinstance(version, int) and not isinstance(version, bool) and version > 0 else None

    def pointer_generation(self, model: str) -> int:
        """Cheap check for 'did the pointer move?' (metadata only)."""
        try:
            return self.storage.stat(self.pointer_name(model)).generation
        except NotFound:
            return 0

    def find_by_upload(self, model: str, upload: dict[str, Any]) -> int | None:
        """The version already made from this upload (bucket, name, generation), if any; a
        registration that crashed between its upload record and its card is completed first."""
        record = self.upload_record(model, upload)
        if record is not None:
            return self.complete_upload(model, record[0])
        key = (upload["bucket"], upload["name"], str(upload["generation"]))  # versions made before upload records
        for version in reversed(self.versions(model)):
            # The raw card: one hand-edited or very old card must not stop training of the model.
            lineage = self.card(model, version).get("lineage", {}).get("upload", {})
            if (lineage.get("bucket"), lineage.get("name"), str(lineage.get("generation"))) == key:
                return version
        return None

    @classmethod
    def upload_record_name(cls, model: str, upload: dict[str, Any]) -> str:
        key = f"{upload['bucket']}\n{upload['name']}\n{upload['generation']}".encode()
        return f"{cls.model_prefix(model)}uploads/{hashlib.sha256(key).hexdigest()[:32]}.json"

    def upload_record(self, model: str, upload: dict[str, Any]) -> tuple[dict[str, Any], int] | None:
        """(record, generation) of the registration of `upload`, or None."""
        name = self.upload_record_name(model, upload)
        try:
            info = self.storage.stat(name)
            return json.loads(self.storage.read(name, generation=info.generation)), info.generation
        except NotFound:
            return None

    def complete_upload(self, model: str, record: dict[str, Any]) -> int:
        """Write the card the record holds if a crash left it unwritten; the version number."""
        version = record["version"]
        prefix = self.version_prefix(model, version)
        if not self.storage.exists(prefix + "card.json"):
            try:
                self.storage.write(prefix + "card.json", _json(record["card"]), if_generation_match=0,
                                   content_type="application/json")
            except PreconditionFailed:
                pass  # its first writer was only slow
        return version

    def pointer_pending(self, model: str, upload: dict[str, Any]) -> bool:
        """Whether the version of `upload` is to become current and that step is not done yet."""
        found = self.upload_record(model, upload)
        return found is not None and found[0].get("pointer") == "pending"

    def pointer_settled(self, model: str, upload: dict[str, Any]) -> None:
        """Record that the pointer step of `upload` is done (moved, or a newer version was current),
        so a later redelivery does not move it again (after a rollback, say)."""
        found = self.upload_record(model, upload)
        if found is None or found[0].get("pointer") != "pending":
            return
        record, generation = found
        try:
            self.storage.write(self.upload_record_name(model, upload), _json(dict(record, pointer="done")),
                               if_generation_match=generation, content_type="application/json")
        except PreconditionFailed:
            pass  # a concurrent redelivery settled it

    def version_events(self, model: str, version: int, function: str) -> list[CloudEvent]:
        """What a version announces: model.trained always, then model.published if it is current.

        Ids are stable, so a duplicate delivery re-announces with the same ids (consumers can
        tell): `trained-<model>-<n>`, and for published the pointer's generation, so the same
        pointer move always yields the same id while a new move (a rollback to a version
        published before) gets a new one."""
        card, current = self.model_card(model, version), self.current(model)
        data = self._version_data(model, version, card, current)
        trained = data
        if card.promotion is not None and card.promotion.promoted is not None:  # model.trained only
            promotion = {"promoted": card.promotion.promoted, "reason": card.promotion.reason}
            if card.promotion.canary_percent is not None:  # promotion: canary, started as the canary
                promotion["canary_percent"] = card.promotion.canary_percent
            trained = type(data).model_validate(dict(data.to_data(), promotion=promotion))
        announced = [events.platform_event(events.MODEL_TRAINED, function, model, trained.to_data(),
                                           id_=f"trained-{model}-{version}")]
        if current.version == version:
            announced.append(self._published(model, version, function, data, current))
        return announced

    def published_event(self, model: str, function: str) -> CloudEvent:
        """model.published for the model's current version (after a promote or rollback)."""
        current = self.current(model)
        if current.version is None:
            raise NotFound(f"model '{model}' has no current version")
        data = self._version_data(model, current.version, self.model_card(model, current.version), current)
        return self._published(model, current.version, function, data, current)

    def _version_data(self, model: str, version: int, card: ModelCard, current: Pointer) -> ModelTrained:
        # pydantic, imported here: only train and the CLI announce versions, never the predict path.
        from bucketml.contracts.event_data import ModelTrained

        data = {
            "model": model,
            "version": version,
            "current_version": current.version,
            "algorithm": card.algorithm,
            "metric": card.metric,
            "metrics": card.metrics,
            "model_object": self.version_prefix(model, version) + "model.onnx",
            "card_object": self.version_prefix(model, version) + "card.json",
            "upload": card.lineage.upload.to_json_dict(),  # as the card has it, key for key
        }
        if card.report:  # versions made before reports, or whose report failed, have none
            data["report_object"] = card.report
        return ModelTrained.model_validate(data)

    @staticmethod
    def _published(model: str, version: int, function: str, trained: ModelTrained, current: Pointer) -> CloudEvent:
        from bucketml.contracts.event_data import ModelPublished

        data = ModelPublished.model_validate(
            dict(trained.to_data(), previous_version=current.data.get("previous"), reason=current.data.get("reason"))
        )
        event_id = f"published-{model}-{version}-{current.generation}"
        return events.platform_event(events.MODEL_PUBLISHED, function, model, data.to_data(), id_=event_id)

    # --- writing -----------------------------------------------------------------------
    def register(
        self,
        model: str,
        build_model: Callable[[int], bytes],
        card: dict[str, Any],
        *,
        artifacts: dict[str, Callable[[int], bytes | None]] | None = None,
        upload: dict[str, Any] | None = None,
        promote: bool = False,
    ) -> int:
        """Store a new version create-only and return its number.

        With `upload` (bucket, name, generation), at most one version is ever made from that
        upload: its record is written create-only before the card, and the registration that
        finds one already there removes its own unfinished files and raises UploadRegistered
        with the version the record names (completing that version's card if needed).
        `promote` marks the pointer step as pending in the record (see `pointer_settled`).

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
        card = dict(card, model=model, version=version, created=utc_now("seconds"))
        # The card describes the stored file (build_model stamps the version into it).
        card["artifact"] = dict(
            card.get("artifact") or {},
            sha256=hashlib.sha256(onnx_bytes).hexdigest(),
            bytes=len(onnx_bytes),
            model_md5=info.md5_hash,
        )
        if upload is not None:
            record = {"upload": upload, "version": version, "pointer": "pending" if promote else "none", "card": card}
            try:
                self.storage.write(self.upload_record_name(model, upload), _json(record), if_generation_match=0,
                                   content_type="application/json")
            except PreconditionFailed:
                self._abandon(prefix, ["model.onnx", *(artifacts or {})])
                found = self.upload_record(model, upload)
                if found is None:  # removed by hand meanwhile: let the retry start over
                    raise
                raise UploadRegistered(self.complete_upload(model, found[0])) from None
        try:
            self.storage.write(prefix + "card.json", _json(card), if_generation_match=0, content_type="application/json")
        except PreconditionFailed:
            if upload is None:
                raise
            # A duplicate delivery found our record first and wrote this card from it.
        return version

    def _abandon(self, prefix: str, filenames: list[str]) -> None:
        """Remove the files of a version that will never get a card (best effort: without a card
        nobody reads them; the number stays claimed while any of them is left)."""
        for filename in reversed(filenames):  # model.onnx, which claims the number, last
            try:
                self.storage.delete(prefix + filename)
            except StorageError:
                pass

    def _claimed_numbers(self, model: str) -> list[int]:
        numbers = set()
        for info in self.storage.list(self.model_prefix(model) + "versions/"):
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
            data = {"model": model, "version": version, "previous": pointer.version, "reason": reason, "updated": utc_now("seconds")}
            # A canary or shadow outlives a new current version (a training that publishes meanwhile),
            # unless it is that version: then its rollout is over and the pointer must not name it twice.
            for key in (CANARY, SHADOW):
                named = pointer.data.get(key)
                if named and named.get("version") != version:
                    data[key] = named
            if self._swap(model, pointer, data):
                return True, pointer.version

    # --- canary rollouts: a second version answering a share of unpinned requests -------------
    def start_canary(self, model: str, version: int, percent: int) -> Pointer:
        """Name `version` the canary of `model` for `percent` % of unpinned requests (compare-and-swap);
        returns the pointer written. A canary already there is replaced (or its share changed)."""
        if isinstance(percent, bool) or not isinstance(percent, int) or not 1 <= percent <= 99:
            raise RolloutRefused(f"a canary's percent must be a whole number from 1 to 99, got {percent!r}; "
                                 "for 100 promote the version, for 0 roll the canary back")
        return self._name_beside(model, version, CANARY, "for a canary to share requests with", percent=percent)

    def end_canary(self, model: str) -> tuple[int, int]:
        """Remove the canary, leaving the current version as it is (a rollback of the rollout);
        returns (canary version, current version)."""
        found, pointer = self._remove(model, CANARY, lambda p: (self.canary_of(p) or (None,))[0], "no canary to roll back")
        return found, pointer.version

    def finish_canary(self, model: str, pointer: Pointer, *, promote: bool, decided: dict[str, Any]) -> bool:
        """End the canary `pointer` names, as the monitor decided: make it current (`promote`) or
        remove it. One compare-and-swap against `pointer`: False when the pointer moved since (the
        decision is made again on what is there now). `decided` (the announcement of the step) is
        kept in the pointer until it is announced, so a crash in between loses no announcement."""
        canary = self.canary_of(pointer)
        if canary is None:
            return False
        if promote:
            data = {"model": model, "version": canary[0], "previous": pointer.version,
                    "reason": f"canary version {canary[0]} promoted by the monitor", "updated": utc_now("seconds")}
            shadow = pointer.data.get(SHADOW)
            if shadow and shadow.get("version") != canary[0]:
                data[SHADOW] = shadow
        else:
            data = self._without(pointer, CANARY)
        data[DECIDED] = decided
        return self._swap(model, pointer, data)

    def start_shadow(self, model: str, version: int) -> Pointer:
        """Name `version` the shadow of `model` (compare-and-swap): it scores a copy of unpinned
        requests, never answering them. A shadow already there is replaced."""
        return self._name_beside(model, version, SHADOW, "for a shadow to be compared with")

    def end_shadow(self, model: str) -> tuple[int, Pointer]:
        """Remove the shadow; returns (its version, the pointer as it was with it)."""
        return self._remove(model, SHADOW, self.shadow_of, "no shadow to stop")

    def _name_beside(self, model: str, version: int, key: str, purpose: str, **fields: Any) -> Pointer:
        """Write `key` (canary or shadow) = `version` into the pointer beside the current version."""
        self.card(model, version)  # NotFound (naming the version) for one that is not complete
        while True:
            pointer = self.current(model)
            if pointer.version is None:
                raise RolloutRefused(f"model '{model}' has no current version {purpose}; promote version {version} instead")
            if pointer.version == version:
                raise RolloutRefused(f"version {version} is already the current version of '{model}'; "
                                     f"name another version as the {key}")
            entry = {"version": version, **fields, "started": utc_now("seconds")}
            if self._swap(model, pointer, dict(pointer.data, **{key: entry}, updated=utc_now("seconds"))):
                return self.current(model)

    def _remove(self, model: str, key: str, version_of: Callable[[Pointer], int | None], missing: str) -> tuple[int, Pointer]:
        """Take `key` (canary or shadow) out of the pointer; (its version, the pointer as it was)."""
        while True:
            pointer = self.current(model)
            found = version_of(pointer) if pointer.version is not None else None
            if found is None:
                raise RolloutRefused(f"model '{model}' has {missing}")
            if self._swap(model, pointer, self._without(pointer, key)):
                return found, pointer

    @staticmethod
    def _without(pointer: Pointer, key: str) -> dict[str, Any]:
        data = {name: value for name, value in pointer.data.items() if name != key}
        data["updated"] = utc_now("seconds")
        return data

    def _swap(self, model: str, pointer: Pointer, data: dict[str, Any]) -> bool:
        """Write the pointer if it is still at `pointer.generation`; False when someone moved it first."""
        try:
            self.storage.write(self.pointer_name(model), _json(data), if_generation_match=pointer.generation,
                               content_type="application/json")
            return True
        except PreconditionFailed:
            return False  # decide again on what is there now
