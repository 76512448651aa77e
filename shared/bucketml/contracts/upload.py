"""What an upload carries besides its bytes: the dataset spec fields set for that one upload,
stored as the object's custom metadata (where they take precedence over the model's
bucketml.yaml). Shared by `bucketml upload` and the console's upload form, so both refuse the
same mistakes before anything is uploaded."""

from __future__ import annotations

import difflib
from typing import Iterable

from bucketml.contracts.rejections import Rejection
from bucketml.contracts.spec import FIELDS, spec_from_metadata


class UploadSpecError(ValueError):
    """A spec field for an upload that cannot work; the message says which and what is expected."""


def upload_metadata(target: str | None, task: str | None, settings: Iterable[str],
                    target_label: str = "--target", task_label: str = "--task", set_label: str = "--set") -> dict[str, str]:
    """Object metadata from a target, a task and KEY=VALUE spec settings, validated with the
    dataset spec's schema. The labels name the fields in messages (the CLI's options, the form's fields)."""
    metadata: dict[str, str] = {}

    def put(key: str, value: str, option: str) -> None:
        if key in metadata and metadata[key] != value:
            raise UploadSpecError(f"{option} contradicts an earlier value for '{key}' ({metadata[key]!r})")
        metadata[key] = value

    if target:
        put("target", target, target_label)
    if task:
        put("task", task, task_label)
    for item in settings:
        key, sep, value = item.partition("=")
        field = key.strip().lower().replace("-", "_")
        if not sep or not field:
            raise UploadSpecError(f"{set_label} expects KEY=VALUE, got {item!r}")
        if field not in FIELDS:
            close = difflib.get_close_matches(field, FIELDS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UploadSpecError(f"{set_label} {key.strip()}: not a dataset spec field; {hint}the fields are {', '.join(FIELDS)}")
        if value.strip():  # an empty value means "not set"
            put(field, value.strip(), f"{set_label} {item}")
    try:
        spec_from_metadata(metadata)
    except Rejection as exc:
        raise UploadSpecError(exc.message) from None
    return metadata
