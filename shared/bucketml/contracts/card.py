"""The model card: `models/<model>/versions/<n>/card.json`, typed.

The train step writes the card and the registry stores it (JSON, sorted keys); the CLI and the
report read it. The JSON is a public contract (docs/architecture.md), so the models here only
describe it, they never reshape it:

- every model allows extra keys, so a card written by an older or newer trainer keeps what it has;
- numbers are `int | float` in strict form, so 600 stays 600 and 0.5 stays 0.5 (never `True`);
- `to_json_dict()` dumps only the keys the card had (`exclude_unset`), so an absent key stays
  absent and a null stays null.

The predict path does not use this module: serving reads card dicts itself, because importing
pydantic there would cost every cold start.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, model_serializer, model_validator

Number = StrictInt | StrictFloat
Scalar = Number | str | None  # a profile's min/max: numbers, or ISO text for dates


class CardPart(BaseModel):
    """A part of the card: keeps keys it does not name; dumps with the card's own key names."""

    model_config = ConfigDict(extra="allow", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON object this part was read from (or built as), key for key."""
        return self.model_dump(mode="json", exclude_unset=True)


# --- the columns a client sends ------------------------------------------------------------------


class SchemaColumn(CardPart):
    """One input column of the served model (written by training/column_types.py and export.py)."""

    name: str
    type: str  # number, string, boolean, datetime
    input: str | None = None  # the ONNX input of a one-input column
    inputs: dict[str, str] | None = None  # datetime part -> its ONNX input
    parts: list[str] | None = None  # the datetime parts the model uses (year, month, ...)
    categories: list[str] | None = None  # the categories training saw (string and boolean columns)


class ModelSchema(CardPart):
    """What the model takes and answers: card["schema"], also stamped into model.onnx."""

    task: str
    target: str
    columns: list[SchemaColumn] = Field(default_factory=list)
    classes: list[str] = Field(default_factory=list)


# --- the data profile (prepared/<model>/<run>/profile.json, copied into the card) ----------------


class TopValue(CardPart):
    value: str
    count: int


@dataclasses.dataclass(frozen=True)
class SummaryStyle:
    """How a column summary reads in one medium (the CLI's plain text, the report's HTML)."""

    number: Callable[[Any], str]  # a statistic as text
    shorten: Callable[[str], str]  # a long value cut for a one-line summary
    top: int  # most frequent values shown
    more: str  # after a list that was cut
    through: str  # between the ends of a date range
    quartiles: bool  # p25/p50/p75, or only the median


class ColumnProfile(CardPart):
    """One uploaded column as preprocess saw it (a feature, or a dropped column)."""

    name: str
    type: str | None = None  # number, string, boolean, datetime, dropped
    missing_share: Number | None = None
    distinct: int | None = None
    min: Scalar = None
    max: Scalar = None
    mean: Number | None = None
    std: Number | None = None
    p25: Number | None = None
    p50: Number | None = None
    p75: Number | None = None
    top: list[TopValue] | None = None
    examples: list[str] | None = None
    parts: list[str] | None = None
    unparsed: int | None = None
    dropped: str | None = None  # why it was dropped

    def summary(self, style: SummaryStyle) -> str:
        """One line about the values: the date range, the statistics, the most frequent values or
        examples; the one summary `bucketml profile` and report.html both show."""
        if self.type == "datetime":
            text = f"{self.min}{style.through}{self.max}; parts {', '.join(self.parts or [])}"
            return text + (f"; {self.unparsed} not dates" if self.unparsed else "")
        if "mean" in self.model_fields_set:
            n = style.number
            text = f"min {n(self.min)}, max {n(self.max)}, mean {n(self.mean)}, std {n(self.std)}, "
            if style.quartiles:
                return text + f"p25/p50/p75 {n(self.p25)}/{n(self.p50)}/{n(self.p75)}"
            return text + f"median {n(self.p50)}"
        if self.top:
            shown = ", ".join(f"{style.shorten(t.value)} ({t.count})" for t in self.top[: style.top])
            return shown + (style.more if len(self.top) > style.top else "")
        if self.examples:
            return "e.g. " + ", ".join(style.shorten(e) for e in self.examples)
        return ""


class TargetProfile(ColumnProfile):
    """The target: class counts (classification) or the statistics of a column (regression)."""

    name: str | None = None  # type: ignore[assignment]  # old profiles may lack it
    task: str | None = None
    origin: str | None = None
    classes: dict[str, int] | None = None
    imbalance_ratio: Number | None = None
    training_only_classes: list[str] | None = None


class RowCounts(CardPart):
    uploaded: int | None = None
    used: int | None = None
    train: int | None = None
    test: int | None = None


class DroppedColumn(CardPart):
    column: str
    reason: str | None = None
    kind: str | None = None


class Profile(CardPart):
    rows: RowCounts | None = None
    target: TargetProfile | None = None
    columns: list[ColumnProfile] = Field(default_factory=list)
    dropped: list[DroppedColumn] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)


class DataSummary(CardPart):
    """card["data"]: what preprocess kept of the upload (cards made before profiles have only this)."""

    rows: RowCounts | None = None
    dropped: list[DroppedColumn] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    target_origin: str | None = None


# --- candidates and the choice ------------------------------------------------------------------


class ConfusionMatrix(CardPart):
    labels: list[str]
    matrix: list[list[int]]
    rows: str | None = None  # what the rows are ("true class")
    columns: str | None = None


class SearchTrial(CardPart):
    """One setting tried in a candidate's cross-validated search."""

    params: dict[str, Any] = Field(default_factory=dict)
    cv_score: Number | None = None
    cv_std: Number | None = None
    fold_scores: list[Number | None] | None = None
    rows: int | None = None
    seconds: Number | None = None
    same_as: dict[str, Any] | None = None  # a setting that fits the same model: not refitted
    error: str | None = None


class Candidate(CardPart):
    """A fitted algorithm: how it searched, how it scored, how long it took."""

    name: str
    metrics: dict[str, Any] = Field(default_factory=dict)  # numbers; older cards may hold lists too
    confusion_matrix: ConfusionMatrix | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    cv_score: Number | None = None
    cv_std: Number | None = None
    cv_rows: int | None = None
    search: list[SearchTrial] = Field(default_factory=list)
    search_seconds: Number | None = None
    search_stopped: str | None = None
    untried: list[Any] = Field(default_factory=list)
    fit_seconds: Number | None = None
    notes: list[str] = Field(default_factory=list)

    @property
    def cross_validated(self) -> bool:
        """Whether the card records a cross-validation score for it (cards before selection do not)."""
        return "cv_score" in self.model_fields_set

    @property
    def scalar_metrics(self) -> dict[str, float]:
        return scalar_metrics(self.metrics)

    @property
    def seconds(self) -> float:
        """Search and fit time together."""
        return float(self.search_seconds or 0.0) + float(self.fit_seconds or 0.0)


class CandidateFailure(BaseModel):
    """An algorithm that failed or whose ONNX export was refused. Stored in card.json as the
    text "name: why" (training/search.py and steps/train.py write it so); parsed here once."""

    name: str
    reason: str | None = None  # None for a text without "name: " in front (kept as it was)

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            name, separator, reason = value.partition(": ")
            return {"name": name, "reason": reason} if separator else {"name": value, "reason": None}
        return value

    @model_serializer
    def _to_text(self) -> str:
        return str(self)

    def __str__(self) -> str:
        return self.name if self.reason is None else f"{self.name}: {self.reason}"

    @property
    def why(self) -> str:
        return self.reason if self.reason is not None else self.name


class Skipped(CardPart):
    """An algorithm not tried (the time budget ran out)."""

    name: str
    reason: str | None = None


class Ranked(CardPart):
    name: str
    cv_score: Number | None = None


class Selection(CardPart):
    """How the candidates were compared (cross-validation on the training rows)."""

    method: str | None = None
    metric: str | None = None
    folds: int | None = None
    cv_rows: int | None = None
    train_rows: int | None = None
    test_rows: int | None = None
    ranking: list[Ranked] = Field(default_factory=list)
    budget_seconds: Number | None = None
    seconds: Number | None = None
    settings_planned: int | None = None
    settings_tried: int | None = None
    search_stopped: str | None = None


# --- checks, promotion, provenance ----------------------------------------------------------------


class Parity(CardPart):
    """The ONNX-vs-sklearn check the version passed before it was registered."""

    passed: bool | None = None
    rows: int | None = None
    edge_rows: int | None = None
    tolerance: Number | None = None
    label_mismatches: int | None = None  # classification
    max_probability_difference: Number | None = None  # classification
    max_relative_difference: Number | None = None  # regression

    def other_facts(self) -> dict[str, Any]:
        """Keys a newer check added that the fields above do not name."""
        return dict(self.model_extra or {})


class Promotion(CardPart):
    policy: str | None = None
    metric: str | None = None
    promoted: bool | None = None
    reason: str | None = None
    current_version: int | None = None
    current_score: Number | None = None
    new_score: Number | None = None
    # if_better (see steps.train.decide_promotion): both versions on the current version's test
    # rows, the trivial baseline on the new rows, and the tolerance the scores were held to.
    current_rows: str | None = None
    current_rows_score_new: Number | None = None
    current_rows_score_current: Number | None = None
    baseline_score: Number | None = None
    tolerance: Number | None = None
    tolerance_kind: str | None = None  # "absolute" (scores) or "relative" (rmse, mae, log_loss)
    canary_percent: int | None = None  # canary: the share of unpinned requests it started with


class Upload(CardPart):
    """The object the version was trained from."""

    bucket: str | None = None
    name: str | None = None
    generation: str | int | None = None
    md5_hash: str | None = Field(default=None, alias="md5Hash")


class Lineage(CardPart):
    upload: Upload = Field(default_factory=Upload)
    run: str | None = None
    prepared: str | None = None


class Artifact(CardPart):
    sha256: str | None = None
    bytes: int | None = None
    model_md5: str | None = None


# --- the card -----------------------------------------------------------------------------------


class ModelCard(CardPart):
    """card.json of one version."""

    model: str | None = None  # model, version and created are added by the registry
    version: int | None = None
    created: str | None = None
    # Every card training writes has task and target; a card registered by hand (a test's, an
    # operator's) may name them only in its schema, and is still a version the registry can announce.
    task: str | None = None
    target: str | None = None
    algorithm: str
    metric: str
    metrics: dict[str, Any] = Field(default_factory=dict)  # held-out rows; the chosen metric may be null
    confusion_matrix: ConfusionMatrix | None = None
    selection: Selection | None = None
    candidates: list[Candidate] = Field(default_factory=list)
    candidate_failures: list[CandidateFailure] = Field(default_factory=list)
    skipped: list[Skipped] = Field(default_factory=list)
    spec: dict[str, Any] | None = None  # the dataset spec in effect (contracts/spec.py)
    promotion: Promotion | None = None
    model_schema: ModelSchema | None = Field(default=None, alias="schema")
    data: DataSummary | None = None
    profile: Profile | None = None
    parity: Parity | None = None
    lineage: Lineage = Field(default_factory=Lineage)
    libraries: dict[str, str] = Field(default_factory=dict)
    training_seconds: Number | None = None
    artifact: Artifact | None = None
    report: str | None = None  # the object name of report.html
    report_error: str | None = None  # why report.html could not be rendered

    model_config = ConfigDict(protected_namespaces=())

    @property
    def score(self) -> Any:
        """The chosen metric on the held-out rows (None when undefined there)."""
        return self.metrics.get(self.metric)

    @property
    def chosen(self) -> Candidate | None:
        return next((c for c in self.candidates if c.name == self.algorithm), None)

    @property
    def schema_columns(self) -> list[SchemaColumn]:
        return self.model_schema.columns if self.model_schema else []

    @property
    def rows(self) -> RowCounts | None:
        """Row counts from the profile, else from the data summary (cards before profiles)."""
        if self.profile is not None and self.profile.rows is not None:
            return self.profile.rows
        return self.data.rows if self.data is not None else None


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics that are single numbers (a confusion matrix or per-class lists are not)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
