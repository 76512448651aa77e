"""The uploads of a model that made no version: its rejected uploads (written by preprocess) and
failed trainings (written by train), read by `bucketml models NAME` and the console."""

from __future__ import annotations

import json

from bucketml.contracts.rejections import OUTCOME_FOLDERS
from bucketml.registry.model_registry import check_model_name
from bucketml.storage import Storage, StorageError


def outcome_records(storage: Storage, model: str) -> dict[str, list[dict]]:
    """The model's rejected uploads and failed trainings, oldest first (their records in the bucket),
    keyed by title ("rejected uploads", "failed trainings")."""
    found: dict[str, list[dict]] = {}
    for title, folder in OUTCOME_FOLDERS.items():
        records = []
        for info in storage.list(f"{folder}/{check_model_name(model)}/"):
            try:
                records.append(json.loads(storage.read(info.name)))
            except (StorageError, ValueError):
                continue  # removed meanwhile, or not a record
        found[title] = sorted(records, key=lambda r: str(r.get("time", "")))
    return found
