"""The Storage contract: the same cases against a local folder and against fake-gcs-server."""

from __future__ import annotations

import base64
import datetime
import hashlib
import multiprocessing
import os
import re
import subprocess
import sys
import threading
import uuid

import pytest
from bucketml.storage import (
    InvalidObjectName,
    LocalStorage,
    NotFound,
    PreconditionFailed,
    Storage,
    open_storage,
)


@pytest.fixture(params=["local", "gcs"])
def store(request, tmp_path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "bucket")
    from bucketml.storage.gcs import GCSStorage

    name = f"test-{uuid.uuid4().hex[:16]}"
    gcs = GCSStorage(name, endpoint=request.getfixturevalue("fake_gcs"))
    gcs.client.create_bucket(name)
    return gcs


@pytest.fixture
def local(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "bucket")


def b64md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


# -- both backends ---------------------------------------------------------------------------


def test_write_read_stat_roundtrip(store):
    data = b"x,y\n1,2\n"
    written = store.write("datasets/m/a.csv", data, content_type="text/csv", metadata={"source": "test"})

    assert store.read("datasets/m/a.csv") == data
    stat = store.stat("datasets/m/a.csv")
    assert stat == written
    assert (stat.bucket, stat.name, stat.size) == (store.bucket_name, "datasets/m/a.csv", len(data))
    assert stat.content_type == "text/csv"
    assert stat.metadata == {"source": "test"}
    for stamp in (stat.time_created, stat.updated):
        assert stamp.endswith("Z")
        assert datetime.datetime.fromisoformat(stamp).tzinfo is not None
    assert store.exists("datasets/m/a.csv")


def test_generation_increases_on_overwrite(store):
    first = store.write("models/m/current.json", b"1")
    second = store.write("models/m/current.json", b"2")
    assert second.generation > first.generation
    assert store.stat("models/m/current.json").generation == second.generation


def test_create_only_refuses_an_existing_object(store):
    first = store.write("models/m/v1/model.onnx", b"original", if_generation_match=0)
    with pytest.raises(PreconditionFailed, match="already exists"):
        store.write("models/m/v1/model.onnx", b"intruder", if_generation_match=0)
    assert store.read("models/m/v1/model.onnx") == b"original"
    assert store.stat("models/m/v1/model.onnx").generation == first.generation


def test_stale_generation_cannot_replace_a_pointer(store):
    store.write("models/m/current.json", b'{"version": 1}')
    seen = store.stat("models/m/current.json").generation  # both writers read this

    store.write("models/m/current.json", b'{"version": 2}', if_generation_match=seen)
    with pytest.raises(PreconditionFailed, match="does not match the required") as err:
        store.write("models/m/current.json", b'{"version": 3}', if_generation_match=seen)
    assert "models/m/current.json" in str(err.value)
    assert store.read("models/m/current.json") == b'{"version": 2}'


def test_generation_match_on_a_missing_object_fails(store):
    with pytest.raises(PreconditionFailed, match="does not exist"):
        store.write("nothing/here.json", b"x", if_generation_match=12345)
    assert not store.exists("nothing/here.json")


def test_delete(store):
    store.write("a.txt", b"a")
    store.delete("a.txt")
    assert not store.exists("a.txt")
    with pytest.raises(NotFound):
        store.delete("a.txt")


def test_delete_with_precondition(store):
    info = store.write("b.txt", b"b")
    with pytest.raises(PreconditionFailed):
        store.delete("b.txt", if_generation_match=info.generation - 1)
    assert store.read("b.txt") == b"b"
    store.delete("b.txt", if_generation_match=info.generation)
    assert not store.exists("b.txt")


def test_missing_objects_raise_not_found(store):
    with pytest.raises(NotFound, match="datasets/m/x.csv does not exist in bucket"):
        store.read("datasets/m/x.csv")
    with pytest.raises(NotFound):
        store.stat("datasets/m/x.csv")


def test_list_by_prefix_in_name_order(store):
    names = ["datasets/b/x.csv", "datasets/a/2.csv", "models/a/current.json", "datasets/a/10.csv", "datasets/a/1.csv"]
    for name in names:
        store.write(name, name.encode())

    def listed(prefix=""):
        return [info.name for info in store.list(prefix)]

    assert listed() == sorted(names)
    assert listed("datasets/a/") == ["datasets/a/1.csv", "datasets/a/10.csv", "datasets/a/2.csv"]
    assert listed("datasets/a/1") == ["datasets/a/1.csv", "datasets/a/10.csv"]
    assert listed("datasets/") == ["datasets/a/1.csv", "datasets/a/10.csv", "datasets/a/2.csv", "datasets/b/x.csv"]
    assert listed("nothing/") == []
    assert [i.size for i in store.list("models/")] == [len(b"models/a/current.json")]


def test_read_a_specific_generation(store):
    old = store.write("models/m/current.json", b"old")
    new = store.write("models/m/current.json", b"new")
    assert store.read("models/m/current.json", generation=new.generation) == b"new"
    with pytest.raises(NotFound):
        store.read("models/m/current.json", generation=old.generation)


def test_open_streams_a_large_object_at_its_generation(store):
    data = bytes(range(256)) * 40_000  # 10 MiB: more than one chunk of any stream
    info = store.write("big/blob.bin", data)
    with store.open("big/blob.bin", generation=info.generation) as f:
        parts = iter(lambda: f.read(1 << 20), b"")
        assert b"".join(parts) == data
    with pytest.raises(NotFound):
        store.open("big/blob.bin", generation=info.generation + 1)
    with pytest.raises(NotFound):
        store.open("big/missing.bin")


def test_write_file_streams_a_file_create_only_with_metadata(store, tmp_path):
    data = os.urandom(3 << 20)  # several of the local backend's copy blocks
    path = tmp_path / "out.csv"
    path.write_bytes(data)
    info = store.write_file("predictions/m/a.csv", path, if_generation_match=0, content_type="text/csv",
                            metadata={"input": "batch/m/a.csv"})
    assert store.read("predictions/m/a.csv") == data
    stat = store.stat("predictions/m/a.csv")
    assert stat == info
    assert (stat.size, stat.content_type, stat.metadata) == (len(data), "text/csv", {"input": "batch/m/a.csv"})
    assert stat.md5_hash == b64md5(data)
    # Create-only: a second write is refused and changes nothing.
    with pytest.raises(PreconditionFailed, match="already exists"):
        store.write_file("predictions/m/a.csv", path, if_generation_match=0)
    assert store.stat("predictions/m/a.csv").generation == info.generation


def test_write_file_takes_an_open_file_and_replaces_by_generation(store, tmp_path):
    first = store.write("predictions/m/b.csv", b"old")
    with open(tmp_path / "new.csv", "wb+") as f:
        f.write(b"new bytes")
        f.seek(0)
        with pytest.raises(PreconditionFailed):
            store.write_file("predictions/m/b.csv", f, if_generation_match=first.generation + 1)
        assert store.read("predictions/m/b.csv") == b"old"
        f.seek(0)
        second = store.write_file("predictions/m/b.csv", f, if_generation_match=first.generation)
    assert second.generation > first.generation
    assert store.read("predictions/m/b.csv") == b"new bytes"


def test_md5_hash_is_base64_of_the_md5_digest(store):
    data = os.urandom(1000)
    assert store.write("blob.bin", data).md5_hash == b64md5(data)
    assert store.stat("blob.bin").md5_hash == b64md5(data)


def test_event_data_carries_numbers_as_strings(store):
    info = store.write("datasets/m/a.csv", b"x\n1\n", content_type="text/csv", metadata={"k": "v"})
    event = info.event_data()
    assert event["generation"] == str(info.generation)
    assert event["size"] == "4"
    assert event["bucket"] == store.bucket_name
    assert event["name"] == "datasets/m/a.csv"
    assert event["contentType"] == "text/csv"
    assert event["md5Hash"] == b64md5(b"x\n1\n")
    assert event["metadata"] == {"k": "v"}


# Names both backends refuse, each with the rule it breaks (GCS allows some of them, bucketml
# does not: a name must mean the same object in a folder and in a bucket).
REFUSED_NAMES = [
    ("../x", "'..' segment"),
    ("datasets/../../x", "'..' segment"),
    ("/abs", "is absolute"),
    ("a//b", "empty"),
    ("a/", "empty"),
    ("a\\b", "backslash"),
    ("..\\x", "backslash"),
    ("a\x00b", "control character"),
    ("a\nb", "control character"),
    ("a\x85b", "control character"),  # C1 NEL
    ("a\udc80b", "lone surrogate"),
    ("a" * 1025, "1025 bytes long; the limit is 1024"),
    ("é" * 513, "1026 bytes long; the limit is 1024"),  # 513 characters: the limit is in bytes
    (".bucketml/lock", "reserved"),
]


@pytest.mark.parametrize("name, rule", REFUSED_NAMES, ids=[str(i) for i in range(len(REFUSED_NAMES))])
def test_refused_names_are_refused_by_both_backends_with_the_rule(store, name, rule):
    store.write("datasets/m/kept.csv", b"kept")
    for call in (
        lambda: store.write(name, b"evil"),
        lambda: store.write(name, b"evil", if_generation_match=0),
        lambda: store.read(name),
        lambda: store.open(name),
        lambda: store.stat(name),
        lambda: store.delete(name),
    ):
        with pytest.raises(InvalidObjectName, match=re.escape(rule)) as err:
            call()
        assert isinstance(err.value, ValueError)
    assert [info.name for info in store.list()] == ["datasets/m/kept.csv"]
    assert store.read("datasets/m/kept.csv") == b"kept"


def test_the_longest_name_works_on_both_backends(store):
    name = "/".join(["é" * 100] * 5) + "/" + "x" * 19  # 1024 bytes of UTF-8, 520 characters
    assert len(name.encode()) == 1024
    info = store.write(name, b"long")
    assert (info.name, store.read(name), [i.name for i in store.list()]) == (name, b"long", [name])


# -- local folder only -----------------------------------------------------------------------


def test_a_copied_in_file_is_an_object(local):
    data = b"a,b\n1,2\n"
    path = local.root / "datasets" / "m" / "dropped.csv"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)

    [info] = local.list("datasets/")
    assert info.name == "datasets/m/dropped.csv"
    assert info.generation == path.stat().st_mtime_ns // 1000
    assert (info.size, info.md5_hash, info.content_type, info.metadata) == (len(data), b64md5(data), "text/csv", {})
    assert local.stat("datasets/m/dropped.csv") == info  # second time from the cached md5


def test_copying_over_an_object_drops_its_metadata(local):
    local.write("datasets/m/a.csv", b"1\n", content_type="text/csv", metadata={"k": "v"})
    (local.root / "datasets" / "m" / "a.csv").write_bytes(b"replaced by cp\n")
    info = local.stat("datasets/m/a.csv")
    assert info.metadata == {}
    assert info.md5_hash == b64md5(b"replaced by cp\n")


def test_listing_skips_hidden_and_internal_files(local):
    local.write("visible.txt", b"v")
    (local.root / ".hidden").write_bytes(b"h")
    (local.root / "datasets" / ".cache").mkdir(parents=True)
    (local.root / "datasets" / ".cache" / "x.csv").write_bytes(b"h")
    (local.root / "datasets" / ".DS_Store").write_bytes(b"h")
    assert [info.name for info in local.list()] == ["visible.txt"]


def test_readers_never_see_an_object_without_its_metadata(local):
    local.write("models/m/current.json", b"0", metadata={"version": "0"})
    done = threading.Event()

    def writer():
        for i in range(1, 200):
            local.write("models/m/current.json", str(i).encode(), metadata={"version": str(i)})
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not done.is_set():
        info = local.stat("models/m/current.json")
        assert info.metadata["version"].isdigit()
        [listed] = local.list("models/")
        assert "version" in listed.metadata
    thread.join()
    assert local.stat("models/m/current.json").metadata == {"version": "199"}


@pytest.mark.parametrize("name", ["../x", "/abs", "a/./b", "a\x00b", ".bucketml/lock", "a//b", ""])
def test_invalid_names_are_refused(local, tmp_path, name):
    before = sorted(tmp_path.rglob("*"))
    for call in (
        lambda: local.write(name, b"evil"),
        lambda: local.read(name),
        lambda: local.stat(name),
        lambda: local.delete(name),
    ):
        with pytest.raises(InvalidObjectName):
            call()
    assert sorted(tmp_path.rglob("*")) == before


def test_a_symlink_cannot_lead_outside_the_folder(local, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (local.root / "link").symlink_to(outside)
    with pytest.raises(InvalidObjectName, match="outside"):
        local.write("link/x", b"evil")
    assert list(outside.iterdir()) == []


def _increment(root: str, times: int, start) -> None:
    """Add 1 to the counter `times` times with read-modify-write retried on conflicts."""
    store = LocalStorage(root)
    start.wait()  # all at once, or slow interpreter start-ups would take turns instead
    for _ in range(times):
        while True:
            generation = store.stat("counter").generation
            try:
                value = int(store.read("counter", generation=generation))
                store.write("counter", str(value + 1).encode(), if_generation_match=generation)
                break
            except (NotFound, PreconditionFailed):
                continue


def test_compare_and_swap_holds_across_processes(local):
    local.write("counter", b"0")
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, nothing shared but the folder
    start = ctx.Barrier(4)
    workers = [ctx.Process(target=_increment, args=(str(local.root), 25, start)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert [w.exitcode for w in workers] == [0] * 4
    assert local.read("counter") == b"100"


# -- open_storage ----------------------------------------------------------------------------


def test_open_storage_picks_the_backend(tmp_path, fake_gcs, monkeypatch):
    assert open_storage(str(tmp_path / "b")).url == str(tmp_path / "b")
    assert open_storage((tmp_path / "b c").as_uri()).url == str(tmp_path / "b c")
    assert isinstance(open_storage(str(tmp_path / "b")), LocalStorage)

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake_gcs)
    gcs = open_storage("gs://some-bucket")
    assert (gcs.url, gcs.bucket_name) == ("gs://some-bucket", "some-bucket")


def test_importing_the_package_does_not_import_google_cloud_storage():
    code = "import sys, bucketml.storage; sys.exit('google.cloud.storage' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_children_are_the_folders_directly_under_a_prefix(store):
    for name in ("models/a/current.json", "models/a/versions/1/card.json", "models/b.c/versions/2/model.onnx",
                 "models/file.txt", "modelsx/d/e.txt", "datasets/z/data.csv"):
        store.write(name, b"x")
    assert store.children("models/") == ["a", "b.c"]
    assert store.children("models/a/") == ["versions"]
    assert store.children("models/a/versions/1/") == []
    assert store.children("nothing/") == []
    assert store.children("") == ["datasets", "models", "modelsx"]
