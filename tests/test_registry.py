"""The model registry on a folder bucket: create-only versions and a compare-and-swap pointer."""

from __future__ import annotations

import json
import threading

import pytest
from bucketml.registry.model_registry import Pointer, Registry, RegistryError, RolloutRefused, check_model_name
from bucketml.storage import LocalStorage, NotFound, PreconditionFailed


@pytest.fixture
def storage(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "bucket")


@pytest.fixture
def registry(storage) -> Registry:
    return Registry(storage)


def model_bytes(version: int) -> bytes:
    """Stands in for build_model: the version number is part of the file, as in real models."""
    return f"onnx-bytes-of-version-{version}".encode()


def card_for(generation: int = 1, name: str = "datasets/m/data.csv", **extra) -> dict:
    return {
        "task": "classification",
        "metrics": {"accuracy": 0.9},
        "lineage": {"upload": {"bucket": "bucket", "name": name, "generation": str(generation), "md5Hash": "x"}},
        **extra,
    }


def register(registry: Registry, model: str = "m", generation: int = 1) -> int:
    return registry.register(model, model_bytes, card_for(generation))


# --- versions --------------------------------------------------------------------------------


def test_versions_are_numbered_1_2_3_and_complete(registry, storage):
    assert registry.versions("m") == []
    assert [register(registry, generation=g) for g in (10, 20, 30)] == [1, 2, 3]
    assert registry.versions("m") == [1, 2, 3]
    assert registry.models() == ["m"]
    for version in (1, 2, 3):
        assert registry.model_bytes("m", version) == model_bytes(version)
        card = registry.card("m", version)
        assert card["version"] == version and card["model"] == "m"
        assert card["metrics"] == {"accuracy": 0.9}
        stored = storage.stat(f"models/m/versions/{version}/model.onnx")
        assert card["artifact"]["model_md5"] == stored.md5_hash
    # Registering does not make a version current; that is the pointer's job.
    assert registry.current("m").version is None


def test_version_files_are_create_only(registry, storage):
    register(registry)
    before = storage.stat("models/m/versions/1/model.onnx")
    with pytest.raises(PreconditionFailed):
        storage.write("models/m/versions/1/model.onnx", b"tampered", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        storage.write("models/m/versions/1/card.json", b"{}", if_generation_match=0)
    assert storage.stat("models/m/versions/1/model.onnx").generation == before.generation
    assert registry.model_bytes("m", 1) == model_bytes(1)
    # A new registration never reuses a number.
    assert register(registry) == 2
    assert registry.model_bytes("m", 1) == model_bytes(1)


def test_unfinished_version_is_invisible_and_its_number_is_not_reused(registry, storage):
    assert [register(registry), register(registry)] == [1, 2]
    # A trainer crashed after claiming version 3: model.onnx is there, card.json never came.
    storage.write("models/m/versions/3/model.onnx", b"half of a model", if_generation_match=0)

    assert registry.versions("m") == [1, 2]
    with pytest.raises(NotFound):
        registry.card("m", 3)
    with pytest.raises(NotFound):
        registry.move_pointer("m", 3, reason="must not point at a half-written version")
    assert registry.current("m").version is None

    assert register(registry) == 4
    assert registry.versions("m") == [1, 2, 4]
    assert registry.model_bytes("m", 4) == model_bytes(4)
    assert storage.read("models/m/versions/3/model.onnx") == b"half of a model"


def test_card_of_a_missing_version_says_which(registry):
    register(registry)
    with pytest.raises(NotFound, match="version 7"):
        registry.card("m", 7)


# --- the current pointer ---------------------------------------------------------------------


def test_move_pointer_promotes_and_reports_the_previous_version(registry, storage):
    register(registry), register(registry)
    assert registry.move_pointer("m", 1, reason="first") == (True, None)
    assert registry.current("m").version == 1

    assert registry.move_pointer("m", 2, reason="better") == (True, 1)
    pointer = registry.current("m")
    assert pointer.version == 2
    assert pointer.data["previous"] == 1 and pointer.data["reason"] == "better"
    assert pointer.generation == storage.stat("models/m/current.json").generation
    assert json.loads(storage.read("models/m/current.json"))["version"] == 2

    # Pointing at the version that is already current changes nothing.
    assert registry.move_pointer("m", 2, reason="again") == (False, 2)
    assert registry.current("m").generation == pointer.generation


def test_only_if_newer_never_moves_the_pointer_back(registry):
    for _ in range(3):
        register(registry)
    registry.move_pointer("m", 3, reason="newest")
    # A slow trainer that finished version 2 after version 3 went live must not replace it.
    assert registry.move_pointer("m", 2, reason="late", only_if_newer=True) == (False, 3)
    assert registry.current("m").version == 3
    # A rollback (without only_if_newer) is allowed to go back.
    assert registry.move_pointer("m", 1, reason="rollback") == (True, 3)
    assert registry.current("m").version == 1
    assert registry.move_pointer("m", 2, reason="newer than 1", only_if_newer=True) == (True, 1)
    assert registry.current("m").version == 2


def test_pointing_at_a_missing_version_raises_and_leaves_the_pointer(registry, storage):
    register(registry)
    registry.move_pointer("m", 1, reason="first")
    generation = storage.stat("models/m/current.json").generation
    with pytest.raises(NotFound):
        registry.move_pointer("m", 5, reason="no such version")
    with pytest.raises(NotFound):
        registry.move_pointer("other", 1, reason="no such model")
    assert registry.current("m").version == 1
    assert storage.stat("models/m/current.json").generation == generation
    assert not storage.exists("models/other/current.json")


def test_pointer_moves_only_by_compare_and_swap(registry, storage):
    register(registry), register(registry)
    registry.move_pointer("m", 1, reason="first")
    seen = registry.current("m")
    registry.move_pointer("m", 2, reason="someone else")
    # A writer still holding the old generation loses, and the pointer keeps the winner.
    with pytest.raises(PreconditionFailed):
        storage.write(Registry.pointer_name("m"), b'{"version": 1}', if_generation_match=seen.generation)
    assert registry.current("m").version == 2
    assert registry.pointer_generation("m") == registry.current("m").generation != seen.generation
    assert registry.pointer_generation("never-trained") == 0


def test_racing_promotions_with_only_if_newer_end_on_the_newest(registry):
    versions = [register(registry) for _ in range(6)]
    start = threading.Barrier(len(versions))
    results, errors = {}, []

    def promote(version):
        try:
            start.wait(timeout=10)
            results[version] = registry.move_pointer("m", version, reason=f"trainer {version}", only_if_newer=True)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert registry.current("m").version == max(versions)
    assert results[max(versions)][1] != max(versions)  # the newest was promoted, not skipped
    assert results[max(versions)][0] is True


# --- concurrent registration -----------------------------------------------------------------


def test_two_racing_registrations_get_distinct_numbers(registry):
    # Both writers are held inside build_model(1) until both have chosen number 1, so they
    # really collide on the create-only write of models/m/versions/1/model.onnx.
    collide = threading.Barrier(2)
    built: dict[str, list[int]] = {"a": [], "b": []}
    results, errors = {}, []

    def writer(key: str):
        def build(version: int) -> bytes:
            built[key].append(version)
            if version == 1:
                try:
                    collide.wait(timeout=5)
                except threading.BrokenBarrierError:
                    pass
            return f"{key}:{version}".encode()

        try:
            results[key] = registry.register("m", build, card_for(generation=ord(key), name=f"datasets/m/{key}.csv"))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert errors == []
    assert sorted(results.values()) == [1, 2]
    assert registry.versions("m") == [1, 2]
    assert built["a"][0] == built["b"][0] == 1  # both tried 1; the loser moved on to 2
    for key, version in results.items():
        # Each version holds the bytes built for its own number, by its own writer.
        assert registry.model_bytes("m", version) == f"{key}:{version}".encode()
        assert registry.card("m", version)["lineage"]["upload"]["name"] == f"datasets/m/{key}.csv"
        assert registry.find_by_upload("m", registry.card("m", version)["lineage"]["upload"]) == version


def test_many_racing_registrations_get_distinct_consecutive_numbers(registry):
    start = threading.Barrier(8)
    results, errors = [], []

    def writer(i):
        try:
            start.wait(timeout=10)
            results.append(registry.register("m", model_bytes, card_for(generation=i)))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(results) == list(range(1, 9))
    assert registry.versions("m") == list(range(1, 9))
    for version in results:
        assert registry.model_bytes("m", version) == model_bytes(version)


# --- lookups and names -----------------------------------------------------------------------


def test_find_by_upload_finds_the_version_made_from_an_upload(registry):
    registry.register("m", model_bytes, card_for(generation=111, name="datasets/m/a.csv"))
    registry.register("m", model_bytes, card_for(generation=222, name="datasets/m/a.csv"))
    registry.register("m", model_bytes, card_for(generation=111, name="datasets/m/b.csv"))

    def upload(name, generation, bucket="bucket"):
        return {"bucket": bucket, "name": name, "generation": generation}

    assert registry.find_by_upload("m", upload("datasets/m/a.csv", "111")) == 1
    assert registry.find_by_upload("m", upload("datasets/m/a.csv", 222)) == 2  # int or str generation
    assert registry.find_by_upload("m", upload("datasets/m/b.csv", "111")) == 3
    assert registry.find_by_upload("m", upload("datasets/m/a.csv", "333")) is None
    assert registry.find_by_upload("m", upload("datasets/m/a.csv", "111", bucket="other")) is None
    assert registry.find_by_upload("unknown", upload("datasets/m/a.csv", "111")) is None


@pytest.mark.parametrize("name", ["../x", "a b", "", "a" * 64, "a/b", ".hidden", "-x", "x\n", None])
def test_invalid_model_names_are_rejected(registry, storage, name):
    with pytest.raises(RegistryError, match="invalid model name"):
        check_model_name(name)
    with pytest.raises(RegistryError):
        registry.register(name, model_bytes, card_for())
    assert list(storage.list("")) == []


@pytest.mark.parametrize("name", ["iris", "a", "a" * 63, "churn-v2.1_eu", "9lives"])
def test_valid_model_names_are_accepted(name):
    assert check_model_name(name) == name


# --- the typed card ------------------------------------------------------------------------------


def test_model_card_reads_the_stored_card_typed_and_writes_it_back_unchanged(registry, storage):
    extra = {"target": "label", "algorithm": "svm", "metric": "accuracy", "report": "models/m/versions/1/report.html",
             "candidate_failures": ["random_forest: ONNX disagrees with sklearn: 3 labels differ", "a text without a name"],
             "from_a_newer_trainer": {"kept": [1, 2.5, None]}}
    version = registry.register("m", model_bytes, card_for(7, **extra))
    card = registry.model_card("m", version)
    assert (card.model, card.version, card.algorithm, card.score) == ("m", version, "svm", 0.9)
    assert card.lineage.upload.generation == "7" and card.lineage.upload.md5_hash == "x"
    first, second = card.candidate_failures
    assert (first.name, first.reason) == ("random_forest", "ONNX disagrees with sklearn: 3 labels differ")
    assert (second.name, second.reason, second.why) == ("a text without a name", None, "a text without a name")
    # Absent keys stay absent, nulls stay null, unknown keys are kept: the same JSON, byte for byte.
    stored = storage.read(f"models/m/versions/{version}/card.json")
    assert json.dumps(card.to_json_dict(), indent=2, sort_keys=True).encode() == stored
    assert "profile" not in card.to_json_dict() and "report_error" not in card.to_json_dict()


def test_a_missing_version_has_no_typed_card_either(registry):
    with pytest.raises(NotFound, match="model 'm' has no version 4"):
        registry.model_card("m", 4)


def test_one_column_summary_in_two_styles():
    """`bucketml profile` and report.html summarise a column with the same function."""
    from bucketml.contracts.card import ColumnProfile, SummaryStyle

    plain = SummaryStyle(number=lambda v: f"{v:.4g}", shorten=lambda v: v[:3], top=2, more=", ...", through=" .. ",
                         quartiles=True)
    short = SummaryStyle(number=str, shorten=lambda v: v, top=3, more=", …", through=" … ", quartiles=False)
    numbers = ColumnProfile.model_validate({"name": "x", "type": "number", "min": 1, "max": 2.5, "mean": 1.75,
                                            "std": 0.5, "p25": 1, "p50": 2, "p75": 2})
    assert numbers.summary(plain) == "min 1, max 2.5, mean 1.75, std 0.5, p25/p50/p75 1/2/2"
    assert numbers.summary(short) == "min 1, max 2.5, mean 1.75, std 0.5, median 2"
    words = ColumnProfile.model_validate({"name": "w", "type": "string", "top": [
        {"value": "north", "count": 3}, {"value": "south", "count": 2}, {"value": "east", "count": 1}]})
    assert words.summary(plain) == "nor (3), sou (2), ..."
    assert words.summary(short) == "north (3), south (2), east (1)"
    dates = ColumnProfile.model_validate({"name": "d", "type": "datetime", "min": "2024-01-01", "max": "2024-02-01",
                                          "parts": ["year", "month"], "unparsed": 2})
    assert dates.summary(plain) == "2024-01-01 .. 2024-02-01; parts year, month; 2 not dates"
    assert ColumnProfile.model_validate({"name": "id", "examples": ["a1", "b2"]}).summary(short) == "e.g. a1, b2"


# --- canary rollouts -------------------------------------------------------------------------


def test_a_canary_is_named_in_the_pointer_by_compare_and_swap(registry, storage):
    for _ in range(3):
        register(registry)
    registry.move_pointer("m", 1, reason="first")
    before = registry.current("m")

    pointer = registry.start_canary("m", 2, 30)
    assert pointer.version == 1 and pointer.generation != before.generation
    assert pointer.data["canary"]["version"] == 2 and pointer.data["canary"]["percent"] == 30
    assert Registry.canary_of(pointer) == (2, 30)
    assert Registry.canary_of(before) is None
    # A writer still holding the generation from before the canary loses.
    with pytest.raises(PreconditionFailed):
        storage.write(Registry.pointer_name("m"), b'{"version": 1}', if_generation_match=before.generation)

    # A new current version (a training publishing meanwhile) keeps the canary...
    registry.move_pointer("m", 3, reason="trained")
    assert Registry.canary_of(registry.current("m")) == (2, 30)
    # ... unless it is the canary itself: then the rollout is over.
    registry.move_pointer("m", 2, reason="promoted")
    assert registry.current("m").version == 2 and "canary" not in registry.current("m").data


def test_a_canary_must_be_another_complete_version_and_a_share_from_1_to_99(registry):
    register(registry), register(registry)
    with pytest.raises(RolloutRefused, match="no current version"):
        registry.start_canary("m", 2, 30)
    registry.move_pointer("m", 1, reason="first")
    generation = registry.current("m").generation
    for version, percent, expected in ((2, 0, "from 1 to 99"), (2, 100, "from 1 to 99"), (2, True, "from 1 to 99"),
                                       (1, 30, "already the current version")):
        with pytest.raises(RolloutRefused, match=expected):
            registry.start_canary("m", version, percent)
    with pytest.raises(NotFound, match="no version 7"):
        registry.start_canary("m", 7, 30)
    assert registry.current("m").generation == generation


def test_ending_a_canary_leaves_the_current_version(registry):
    register(registry), register(registry)
    registry.move_pointer("m", 1, reason="first")
    with pytest.raises(RolloutRefused, match="no canary"):
        registry.end_canary("m")
    registry.start_canary("m", 2, 10)
    assert registry.end_canary("m") == (2, 1)
    pointer = registry.current("m")
    assert pointer.version == 1 and Registry.canary_of(pointer) is None and pointer.data["reason"] == "first"


@pytest.mark.parametrize("canary", [None, "2", {"version": 2}, {"version": "2", "percent": 30},
                                    {"version": 2, "percent": 0}, {"version": 2, "percent": True}])
def test_a_malformed_canary_in_a_hand_edited_pointer_is_no_canary(canary):
    assert Registry.canary_of(Pointer(1, 5, {"version": 1, "canary": canary})) is None


def test_a_shadow_is_named_in_the_pointer_beside_a_canary_and_can_be_stopped(registry):
    for _ in range(3):
        register(registry)
    with pytest.raises(RolloutRefused, match="no current version"):
        registry.start_shadow("m", 2)
    registry.move_pointer("m", 1, reason="first")
    with pytest.raises(RolloutRefused, match="already the current version"):
        registry.start_shadow("m", 1)
    with pytest.raises(NotFound, match="no version 9"):
        registry.start_shadow("m", 9)
    registry.start_canary("m", 3, 20)
    pointer = registry.start_shadow("m", 2)
    assert Registry.shadow_of(pointer) == 2 and Registry.canary_of(pointer) == (3, 20)
    assert Registry.shadow_of(Pointer(1, 5, {"version": 1, "shadow": {"version": "2"}})) is None

    registry.move_pointer("m", 3, reason="canary promoted")  # the shadow stays, the canary is over
    pointer = registry.current("m")
    assert Registry.shadow_of(pointer) == 2 and Registry.canary_of(pointer) is None
    assert registry.end_shadow("m")[0] == 2
    assert Registry.shadow_of(registry.current("m")) is None
    with pytest.raises(RolloutRefused, match="no shadow"):
        registry.end_shadow("m")
