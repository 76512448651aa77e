"""Why an upload can be refused. Each reason is a stable, machine-readable code (part of the
`bucketml.dataset.rejected.v1` contract); docs/datasets.md shows an example of each."""

from __future__ import annotations

REASONS = {
    "empty_file": "the file has no bytes, or only whitespace",
    "header_only": "a header row but no data rows",
    "not_csv": "binary content, or text that does not parse as delimited rows",
    "undecodable_text": "text in an encoding other than UTF-8, UTF-16 (with BOM) or Latin-1",
    "no_target": "no target column: none named, or the named one is not in the file",
    "target_missing": "the target column has no values",
    "one_class": "a classification target with a single class",
    "too_few_rows": "too few usable rows to train and test",
    "no_features": "no usable feature column remains after dropping",
    "too_many_columns": "more columns than the limit",
    "file_too_large": "the upload (or its decompressed content) is over the size limit",
    "spec_invalid": "the dataset spec (bucketml.yaml or object metadata) is invalid",
    "invalid_model_name": "the folder under datasets/ is not a valid model name",
}


class Rejection(Exception):
    """An upload the platform cannot use: `reason` is a code from REASONS, `message` says
    what is wrong and what to do about it."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message


# Where the outcome of an upload that made no version is kept: one record per upload generation,
# written by preprocess (rejected) or train (failed), read by `bucketml models NAME`.
OUTCOME_FOLDERS = {"rejected uploads": "rejected", "failed trainings": "failed"}


def outcome_object(folder: str, model: str, filename: str, generation: int | str) -> str:
    """`<folder>/<model>/<file>.<generation>.json` (folder: rejected or failed)."""
    return f"{folder}/{model}/{filename}.{generation}.json"
