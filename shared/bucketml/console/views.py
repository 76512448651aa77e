"""What each console page shows, read from the bucket (registry, outcome records, the monitor's
state) into plain rows for the templates. No HTTP here: the pages are app.py's."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from bucketml.contracts.card import ModelCard
from bucketml.local.client import format_score
from bucketml.contracts.rejections import OUTCOME_FOLDERS
from bucketml.registry.model_registry import MODEL_NAME, Pointer, Registry
from bucketml.registry.outcomes import outcome_records
from bucketml.steps.monitor import state_name
from bucketml.storage import NotFound, StorageError

REJECTED, FAILED = "rejected uploads", "failed trainings"
CARDS_CACHED = 20_000


class Cards:
    """The versions of a model with their typed cards, read through a cache: a card.json is
    written create-only, once per version (registry.register), so a parsed card never goes
    stale while its version exists. Version numbers come from one delimited listing of
    `versions/` (a folder per number), not a listing of every file in it: with 50 models of
    20 versions the models page went from a median of 650 ms to 60 (docs/benchmarks.md)."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self._cards: dict[tuple[str, int], ModelCard] = {}

    def numbers(self, model: str) -> list[int]:
        """The version numbers claimed (a folder each), oldest first; one may still lack its card."""
        return sorted(int(n) for n in self.registry.storage.children(Registry.model_prefix(model) + "versions/")
                      if n.isdigit())

    def newest(self, model: str, numbers: list[int]) -> tuple[int, ModelCard] | None:
        """The newest complete version and its card."""
        for number in reversed(numbers):
            card = self.card(model, number)
            if card is not None:
                return number, card
        return None

    def of(self, model: str) -> dict[int, ModelCard]:
        """Complete versions (those with a card), oldest first."""
        found = {}
        for number in self.numbers(model):
            card = self.card(model, number)
            if card is not None:
                found[number] = card
        return found

    def card(self, model: str, version: int) -> ModelCard | None:
        """None for a version with no card yet (being registered, or abandoned)."""
        key = (model, version)
        card = self._cards.get(key)
        if card is None:
            try:
                card = self.registry.model_card(model, version)
            except NotFound:
                return None
            if len(self._cards) >= CARDS_CACHED:
                self._cards.clear()
            self._cards[key] = card
        return card


@dataclasses.dataclass
class ModelRow:
    """One line of the models page."""

    name: str
    versions: int  # version numbers claimed (one being registered counts too)
    current: int | None
    algorithm: str = ""
    score: str = ""
    rows: int | None = None
    last_upload: str = ""
    last_upload_time: str = ""
    last_outcome: str = ""
    rejected: int = 0
    failed: int = 0
    canary: tuple[int, int] | None = None
    shadow: int | None = None
    drift: str = ""


@dataclasses.dataclass
class VersionRow:
    version: int
    created: str
    algorithm: str
    score: str
    metrics: dict[str, str]
    rows: int | None
    upload: str
    promotion: str
    has_report: bool
    report_error: str | None


def score_text(card: ModelCard) -> str:
    return f"{card.metric}={format_score(card.score)}"


def _train_rows(card: ModelCard) -> int | None:
    counts = card.rows
    return counts.train if counts is not None else None


def drift_text(registry: Registry, model: str, pointer: Pointer) -> str:
    """The monitor's drift episode of the current version, when one is open (monitoring/<model>/state.json)."""
    try:
        state = json.loads(registry.storage.read(state_name(model)))
    except (StorageError, ValueError):
        return ""
    episode = state.get("drift") if isinstance(state, dict) else None
    if not isinstance(episode, dict) or episode.get("version") != pointer.version:
        return ""
    if episode.get("open"):
        return "drifting: " + ", ".join(str(c) for c in episode.get("columns") or [])
    return "no drift"


def model_row(cards: Cards, name: str) -> ModelRow:
    registry = cards.registry
    numbers = cards.numbers(name)  # the models page reads two cards per model, not every version's
    pointer = registry.current(name)
    refused = outcome_records(registry.storage, name)
    row = ModelRow(name, len(numbers), pointer.version, rejected=len(refused[REJECTED]), failed=len(refused[FAILED]),
                   canary=Registry.canary_of(pointer), shadow=Registry.shadow_of(pointer))
    if pointer.version is not None:
        card = cards.card(name, pointer.version) or registry.model_card(name, pointer.version)
        row.algorithm, row.score, row.rows = card.algorithm, score_text(card), _train_rows(card)
        row.drift = drift_text(registry, name, pointer)
    # The last upload: the newest of the newest version's and the refused ones, by time.
    candidates: list[tuple[str, str, str]] = []
    found = cards.newest(name, numbers)
    if found is not None:
        number, newest = found
        promoted = "current" if number == pointer.version else "not current"
        candidates.append((newest.created or "", str(newest.lineage.upload.name or ""), f"version {number} ({promoted})"))
    for title, verb in ((REJECTED, "rejected"), (FAILED, "failed")):
        for record in refused[title][-1:]:
            upload = record.get("upload") or {}
            candidates.append((str(record.get("time") or ""), str(upload.get("name") or ""),
                               f"{verb}: {record.get('reason')}"))
    if candidates:
        row.last_upload_time, row.last_upload, row.last_outcome = max(candidates, key=lambda c: c[0])
    return row


def model_names(registry: Registry) -> list[str]:
    """Models with a version, and those whose every upload so far was rejected or failed (so a
    first upload that was refused shows, with its reason a click away)."""
    names = set(registry.models())
    for folder in OUTCOME_FOLDERS.values():
        names.update(name for name in registry.storage.children(f"{folder}/") if MODEL_NAME.fullmatch(name))
    return sorted(names)


def model_rows(cards: Cards) -> list[ModelRow]:
    return [model_row(cards, name) for name in model_names(cards.registry)]


@dataclasses.dataclass
class ModelPage:
    name: str
    pointer: Pointer
    versions: list[VersionRow]
    refused: dict[str, list[dict]]
    schema: list[dict[str, Any]]  # the current version's input columns
    task: str | None
    classes: list[str]
    canary: tuple[int, int] | None
    shadow: int | None
    drift: str


def model_page(cards: Cards, name: str) -> ModelPage:
    """NotFound when the model has no version and no refused upload."""
    registry = cards.registry
    by_version = cards.of(name)
    numbers = list(by_version)
    refused = outcome_records(registry.storage, name)
    if not numbers and not any(refused.values()):
        raise NotFound(f"model '{name}' has no versions, and no upload of it was rejected or failed")
    pointer = registry.current(name)
    rows, current_card = [], None
    for number in reversed(numbers):  # newest first
        card = by_version[number]
        if number == pointer.version:
            current_card = card
        promotion = card.promotion
        rows.append(VersionRow(
            version=number, created=card.created or "", algorithm=card.algorithm, score=score_text(card),
            metrics={k: f"{v:.4f}" for k, v in card.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
            rows=_train_rows(card), upload=str(card.lineage.upload.name or ""),
            promotion=(promotion.reason or "") if promotion is not None else "",
            has_report=bool(card.report), report_error=card.report_error,
        ))
    schema = []
    if current_card is not None and current_card.model_schema is not None:
        for column in current_card.model_schema.columns:
            schema.append({"name": column.name, "type": column.type, "categories": column.categories or []})
    return ModelPage(
        name=name, pointer=pointer, versions=rows, refused=refused, schema=schema,
        task=current_card.task if current_card is not None else None,
        classes=list(current_card.model_schema.classes) if current_card is not None and current_card.model_schema else [],
        canary=Registry.canary_of(pointer), shadow=Registry.shadow_of(pointer),
        drift=drift_text(registry, name, pointer) if pointer.version is not None else "",
    )


def try_record(schema: list[dict[str, Any]], values: list[str]) -> dict[str, Any]:
    """The record the try-it form sends to predict: an empty field is null (imputed as in
    training), a number column's text a number when it reads as one (else sent as typed, for
    predict to say what is wrong)."""
    record: dict[str, Any] = {}
    for column, text in zip(schema, values):
        text = text.strip()
        if text == "":
            record[column["name"]] = None
        elif column["type"] == "number":
            try:
                record[column["name"]] = float(text)
            except ValueError:
                record[column["name"]] = text
        else:
            record[column["name"]] = text
    return record
