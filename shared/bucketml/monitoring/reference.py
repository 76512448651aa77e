"""Reference distributions: how each input column (and the target) was spread in the training
rows, as bins that served values are later counted in (`reference.json` of a version).

Numbers: up to NUMBER_BINS bins cut at the training values' quantiles, plus one bin for missing
values. Categories (string and boolean columns): the MAX_CATEGORIES most frequent ones, one bin
for every other value and one for missing values. Datetime columns have no reference (their
spread moves with time by nature). The same bins serve both sides: training fills `shares`,
predict counts served values into them (`counts`), and the population stability index compares
the two (`psi`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Literal, Sequence

import numpy as np

NUMBER_BINS = 10
MAX_CATEGORIES = 20
REFERENCE_FILE = "reference.json"  # in the version's folder, beside card.json
# A share of 0 makes the index infinite; both sides are floored at this share (a common choice).
SHARE_FLOOR = 1e-4


@dataclasses.dataclass(frozen=True)
class Bins:
    """One column's bins and the training rows' share in each (the last bin: missing values).
    (A dataclass, not pydantic: the predict function loads this module and stays without pydantic.)"""

    name: str
    kind: Literal["number", "category"]
    edges: list[float] | None = None  # number: the cut points; bin i is (edges[i-1], edges[i]]
    categories: list[str] | None = None  # category: one bin each, then "any other", then missing
    shares: list[float] = dataclasses.field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Bins:
        kind = data["kind"]
        if kind not in ("number", "category"):
            raise ValueError(f"bins of kind {kind!r}: expected 'number' or 'category'")
        edges = [float(e) for e in data["edges"]] if data.get("edges") is not None else None
        categories = [str(c) for c in data["categories"]] if data.get("categories") is not None else None
        bins = cls(str(data["name"]), kind, edges, categories, [float(s) for s in data["shares"]])
        expected = (len(edges or []) + 2) if kind == "number" else (len(categories or []) + 2)
        if len(bins.shares) != expected:
            raise ValueError(f"bins of {bins.name!r} have {len(bins.shares)} shares, expected {expected}")
        return bins

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {key: value for key, value in data.items() if value is not None}

    @property
    def size(self) -> int:
        return len(self.shares)

    def labels(self) -> list[str]:
        """A readable name per bin, for tables."""
        if self.kind == "number":
            edges = self.edges or []
            cuts = [f"<= {_short(edges[0])}"] if edges else ["all"]
            cuts += [f"({_short(a)}, {_short(b)}]" for a, b in zip(edges, edges[1:])]
            cuts += [f"> {_short(edges[-1])}"] if edges else []
            return cuts + ["missing"]
        return [*(self.categories or []), "other", "missing"]

    def counts(self, values: Sequence[Any] | np.ndarray) -> np.ndarray:
        """How many of `values` fall in each bin."""
        if self.kind == "number":
            numbers = _floats(values)
            missing = np.isnan(numbers)
            index = np.searchsorted(np.asarray(self.edges or [], dtype=np.float64), numbers[~missing], side="left")
            counts = np.bincount(index, minlength=self.size - 1).astype(np.int64)
            return np.append(counts, int(missing.sum()))
        position = {category: i for i, category in enumerate(self.categories or [])}
        other, missing = self.size - 2, self.size - 1
        counts = np.zeros(self.size, dtype=np.int64)
        for value in values:
            counts[missing if _is_missing(value) else position.get(category_of(value), other)] += 1
        return counts


@dataclasses.dataclass(frozen=True)
class Reference:
    """A version's reference: its input columns' bins and its target's (the predictions are
    compared with the target's spread in the training rows)."""

    rows: int
    features: list[Bins]
    target: Bins

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Reference:
        """Raises KeyError, TypeError or ValueError for a file that is not a reference."""
        return cls(int(data["rows"]), [Bins.from_dict(f) for f in data["features"]], Bins.from_dict(data["target"]))

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "features": [f.to_dict() for f in self.features], "target": self.target.to_dict()}

    def feature(self, name: str) -> Bins | None:
        return next((bins for bins in self.features if bins.name == name), None)


def category_of(value: Any) -> str:
    """The category a value counts as: JSON true/false and Python booleans alike."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def _floats(values: Sequence[Any] | np.ndarray) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):  # text in a number column (refused by predict): count it as missing
        return np.array([_float_or_nan(v) for v in values], dtype=np.float64)


def _float_or_nan(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _short(value: float) -> str:
    return f"{value:.4g}"


def number_bins(name: str, values: Iterable[Any]) -> Bins:
    """Bins cut at the deciles of the non-missing values (repeated cuts merged)."""
    numbers = _floats(list(values))
    present = numbers[~np.isnan(numbers)]
    edges: list[float] = []
    if present.size:
        cuts = np.quantile(present, np.linspace(0, 1, NUMBER_BINS + 1)[1:-1])
        edges = sorted({float(c) for c in cuts})
    bins = Bins(name, "number", edges=edges, shares=[0.0] * (len(edges) + 2))
    return dataclasses.replace(bins, shares=_shares(bins.counts(numbers)))


def category_bins(name: str, values: Iterable[Any]) -> Bins:
    """Bins for the most frequent categories, then any other value, then missing."""
    values = list(values)
    tally: dict[str, int] = {}
    for value in values:
        if not _is_missing(value):
            key = category_of(value)
            tally[key] = tally.get(key, 0) + 1
    top = sorted(tally, key=lambda k: (-tally[k], k))[:MAX_CATEGORIES]
    bins = Bins(name, "category", categories=top, shares=[0.0] * (len(top) + 2))
    return dataclasses.replace(bins, shares=_shares(bins.counts(values)))


def _shares(counts: np.ndarray) -> list[float]:
    total = int(counts.sum())
    return [round(float(c) / total, 6) if total else 0.0 for c in counts]


def psi(expected_shares: Sequence[float], actual_counts: Sequence[int]) -> float | None:
    """Population stability index of served counts against reference shares: sum over bins of
    (actual - expected) * ln(actual / expected), shares floored at SHARE_FLOOR. None without
    served values. Rule of thumb: under 0.1 stable, 0.1-0.2 a moderate shift, above 0.2 a
    significant one."""
    counts = np.asarray(actual_counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0 or len(counts) != len(expected_shares):
        return None
    actual = np.maximum(counts / total, SHARE_FLOOR)
    expected = np.maximum(np.asarray(expected_shares, dtype=np.float64), SHARE_FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def psi_between(counts_a: Sequence[int], counts_b: Sequence[int]) -> float | None:
    """The index between two sets of counts over the same bins (a canary's predictions against
    the stable version's); None when either side has none."""
    a = np.asarray(counts_a, dtype=np.float64)
    if a.sum() <= 0:
        return None
    return psi((a / a.sum()).tolist(), counts_b)
