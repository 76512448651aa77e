"""The reference distributions of a new version, from its training rows (monitoring.reference)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from bucketml.monitoring.reference import Reference, category_bins, number_bins


def build_reference(schema: dict[str, Any], features: pd.DataFrame, target: pd.Series) -> Reference:
    """Bins for every number, string and boolean input column and for the target."""
    bins = []
    for column in schema["columns"]:
        name, kind = column["name"], column["type"]
        if name not in features.columns or kind == "datetime":
            continue
        values = features[name]
        if kind == "number":
            bins.append(number_bins(name, pd.to_numeric(values, errors="coerce").to_numpy(dtype="float64")))
        else:
            bins.append(category_bins(name, values.tolist()))
    if schema["task"] == "classification":
        target_bins = category_bins(schema["target"], target.tolist())
    else:
        target_bins = number_bins(schema["target"], target.to_numpy(dtype="float64"))
    return Reference(rows=len(features), features=bins, target=target_bins)
