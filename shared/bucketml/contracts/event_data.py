"""The data of each event in the catalog (docs/architecture.md, "Event catalog"), typed.

The steps parse what they receive into these models (`parse`: a MalformedEvent, answered with
400, naming the field) and build what they send from them (`to_data`: exactly the JSON object
the catalog describes). The JSON is a public contract, so the models describe it and never
reshape it:

- strict types: "1" stays a string and 1 an integer (an upload's generation keeps the form it
  arrived in), and True is never a number;
- extra keys are kept (GCS sends more than preprocess reads; a newer sender may add fields);
- `to_data()` dumps only the keys that were given, so an absent key (`report_object` of a
  version without a report) stays absent and a null stays null.

Kept apart from contracts/events.py on purpose: the predict function imports that module and
the registry, and its cold start must not pay for importing pydantic. The steps import this
module; the registry imports it only inside the functions that announce versions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_serializer,
)
from pydantic_core import PydanticCustomError

from bucketml.contracts.events import MalformedEvent

# GCS sends int64 values as strings of digits; int() alone would also take 1.9, True or " 7".
MAX_INT64_DIGITS = 19
Number = StrictInt | float  # metrics: an integer stays an integer


class EventData(BaseModel):
    """Base of every event's data: strict, keeps unknown keys, dumps with the catalog's key names."""

    model_config = ConfigDict(strict=True, extra="allow", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    def to_data(self) -> dict[str, Any]:
        """The event's `data` object, key for key as it was given."""
        return self.model_dump(exclude_unset=True)

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Self:
        """The data a step received; MalformedEvent (a 400) naming the field that is wrong."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise MalformedEvent(cls.what_is_wrong(data, _fields_in_error(exc), exc)) from None

    @classmethod
    def what_is_wrong(cls, data: Mapping[str, Any], fields: list[str], exc: ValidationError) -> str:
        """The sender-facing sentence for a failed validation; events steps receive say more."""
        return f"{cls.__name__} data's '{fields[0]}' is not valid: {_first_problem(exc)}"


def _positive_whole_number(value: Any) -> Any:
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= MAX_INT64_DIGITS:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PydanticCustomError("generation", "not a positive whole number")
    return value


Generation = Annotated[int, BeforeValidator(_positive_whole_number)]


def _fields_in_error(exc: ValidationError) -> list[str]:
    """The top-level field names of a ValidationError, in the order the model declares them."""
    return [str(error["loc"][0]) if error["loc"] else "" for error in exc.errors()]


# --- google.cloud.storage.object.v1.finalized -----------------------------------------------------


class StorageObjectData(EventData):
    """What GCS (or the local watcher, or the GCS source adapter) says about a written object.

    Preprocess acts on `bucket`, `name` and `generation` only; the rest describes the object as
    GCS saw it and is never trusted (the bucket is asked again)."""

    bucket: StrictStr
    name: StrictStr
    generation: Generation
    metageneration: StrictStr | StrictInt | None = None
    size: StrictStr | StrictInt | None = None  # a string, as GCS sends int64 values
    md5_hash: StrictStr | None = Field(None, alias="md5Hash")
    content_type: StrictStr | None = Field(None, alias="contentType")
    time_created: StrictStr | None = Field(None, alias="timeCreated")
    updated: StrictStr | None = None
    metadata: dict[str, StrictStr | None] | None = None

    @field_serializer("generation")
    def _as_gcs_writes_it(self, generation: int) -> str:
        return str(generation)

    @classmethod
    def what_is_wrong(cls, data: Mapping[str, Any], fields: list[str], exc: ValidationError) -> str:
        if "bucket" in fields or "name" in fields:
            return "storage event data needs string 'bucket' and 'name'"
        if "generation" in fields:
            return ("storage event data has no valid 'generation' (a positive whole number): "
                    f"{repr(data.get('generation'))[:60]}")
        return f"storage event data's '{fields[0]}' is not what GCS sends: {_first_problem(exc)}"


# --- the platform's own events -----------------------------------------------------------------


class UploadRef(EventData):
    """The upload an outcome is about: `upload` in every platform event."""

    bucket: StrictStr
    name: StrictStr
    generation: StrictInt | StrictStr  # a string from preprocess, as GCS writes it; kept as given
    md5_hash: StrictStr | None = Field(None, alias="md5Hash")


class RowCounts(EventData):
    uploaded: StrictInt
    used: StrictInt | None = None  # rows left after dropping those without a target
    train: StrictInt
    test: StrictInt


class DroppedColumn(EventData):
    column: StrictStr
    reason: StrictStr
    kind: StrictStr | None = None


class DatasetPrepared(EventData):
    """bucketml.dataset.prepared.v1, also stored as prepared.json (written last: the run is complete).

    Train reads `model`, `prepared`, `upload` and `run`; the rest summarises the prepared data
    for other subscribers and may be missing from an event made by hand."""

    model: StrictStr
    run: StrictStr | None = None
    upload: UploadRef
    prepared: StrictStr  # the object prefix of train.csv, test.csv, schema.json
    task: StrictStr | None = None
    target: StrictStr | None = None
    rows: RowCounts | None = None
    columns: StrictInt | None = None
    dropped: list[DroppedColumn] | None = None
    warnings: list[StrictStr] | None = None
    profile: StrictStr | None = None  # object name of profile.json (runs made before profiles have none)

    @classmethod
    def what_is_wrong(cls, data: Mapping[str, Any], fields: list[str], exc: ValidationError) -> str:
        if {"model", "prepared"} & set(fields) or not isinstance(data.get("upload"), dict):
            return "dataset.prepared data needs 'model', 'prepared' and 'upload'"
        if "upload" in fields:
            return "dataset.prepared data's 'upload' needs string 'bucket' and 'name' and a 'generation'"
        return f"dataset.prepared data's '{fields[0]}' is not valid: {_first_problem(exc)}"


class DatasetRejected(EventData):
    """bucketml.dataset.rejected.v1, also stored as rejected/<model>/<file>.<generation>.json."""

    model: StrictStr
    upload: UploadRef
    reason: StrictStr  # a code of contracts/rejections.py REASONS
    message: StrictStr
    report: StrictStr  # the object name of this record
    time: StrictStr


class TrainingFailed(EventData):
    """bucketml.training.failed.v1; the record under failed/ adds the `time`."""

    model: StrictStr
    upload: UploadRef
    reason: StrictStr  # no_model, prepared_data_missing
    message: StrictStr
    report: StrictStr


class ModelTrained(EventData):
    """bucketml.model.trained.v1: every new version, current or not."""

    model: StrictStr
    version: StrictInt
    current_version: StrictInt | None  # equal to `version` when it was promoted; None: nothing is current
    algorithm: StrictStr
    metric: StrictStr
    metrics: dict[str, Number | None]  # None: undefined on the held-out rows (ROC AUC of a missing class)
    model_object: StrictStr
    card_object: StrictStr
    upload: UploadRef
    report_object: StrictStr | None = None  # absent for versions without a report
    # model.trained only: the training's promotion decision, {promoted, reason} as the card's
    # `promotion` has them; absent for versions made before promotion records.
    promotion: dict[str, Any] | None = None


class ModelPublished(ModelTrained):
    """bucketml.model.published.v1: the current pointer moved (after a training, a promote or a rollback)."""

    previous_version: StrictInt | None
    reason: StrictStr | None


class RolloutFigures(EventData):
    """What decided a rollout step, as far as the sender could see it."""

    percent: StrictInt | None = None  # a canary's share of unpinned requests (a shadow answers none)
    started: StrictStr | None = None  # when the canary or shadow started (the pointer's record)
    # As counted by one predict replica since it started (`requests_from`), and absent when that
    # replica could not be asked: answered inference requests (2xx) per version, and for a shadow
    # the rows it compared with the answers and those where it agreed.
    requests: dict[str, StrictInt] | None = None
    compared_rows: StrictInt | None = None
    agreeing_rows: StrictInt | None = None
    requests_from: StrictStr | None = None
    # Decided by the monitor (decided_by "monitor"), from every replica's figures over the canary's
    # period: requests, 5xx answers and p99 latency per side ("stable", "canary"), the rows both
    # scored and the canary's agreement on them, the PSI of its predictions against the stable
    # version's, the replicas counted, and why.
    decided_by: StrictStr | None = None
    errors: dict[str, StrictInt] | None = None
    p99_ms: dict[str, Number | None] | None = None
    agreement: Number | None = None
    prediction_psi: Number | None = None
    replicas: StrictInt | None = None
    min_requests: StrictInt | None = None
    reasons: list[StrictStr] | None = None


class Rollout(EventData):
    """bucketml.rollout.started.v1, .promoted.v1 and .rolled_back.v1: a canary began (or changed
    its share), became the current version, or was removed leaving the current version; a shadow
    began or was stopped (started and rolled_back, kind "shadow")."""

    model: StrictStr
    kind: StrictStr  # "canary" or "shadow"
    version: StrictInt  # the canary's or shadow's version
    current_version: StrictInt  # the current version once the step is done
    previous_version: StrictInt | None = None  # promoted: the version the canary replaced
    figures: RolloutFigures


class DriftedColumn(EventData):
    column: StrictStr
    psi: Number


class ModelDrift(EventData):
    """bucketml.model.drift.v1: served inputs of the current version no longer look like its
    training rows. Once per episode: again only after the drift has ended and come back."""

    model: StrictStr
    version: StrictInt
    threshold: Number  # the spec's drift_threshold
    rows: StrictInt  # served rows the figures cover (every replica, current and previous window)
    window_seconds: Number
    drifted: list[DriftedColumn]  # the columns over the threshold, most shifted first
    psi: dict[str, Number | None]  # every watched column's index (None: no served value)
    prediction_psi: Number | None  # the predictions against the training target's spread
    started: StrictStr  # when the monitor saw it
class BatchCompleted(EventData):
    """bucketml.batch.completed.v1: a file under batch/ was scored; its predictions object is complete."""

    model: StrictStr
    version: StrictInt  # the current version that scored every row
    input: StrictStr  # batch/<model>/<name>.csv
    generation: StrictInt  # the input's generation that was scored
    output: StrictStr  # predictions/<model>/<name>.csv
    rows: StrictInt
    seconds: float


class BatchFailed(EventData):
    """bucketml.batch.failed.v1: a file under batch/ was not scored, and no predictions object was written."""

    model: StrictStr
    input: StrictStr
    generation: StrictInt
    reason: StrictStr  # a code of serving/batch.py REASONS
    message: StrictStr  # what is wrong and what to do


def _first_problem(exc: ValidationError) -> str:
    return exc.errors()[0]["msg"]
