"""Support for the reliability tests that run `bucketml dev`: its parts' processes, a platform
that leaves no process behind, and a ledger of uploads that says how each one ended."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import requests

from helpers import running_platform, versions_by_upload

KINDS = ("broker", "watcher", "preprocess", "train", "predict", "monitor", "ping", "batch", "console")
TYPES = {
    "prepared": "bucketml.dataset.prepared.v1",
    "rejected": "bucketml.dataset.rejected.v1",
    "trained": "bucketml.model.trained.v1",
    "published": "bucketml.model.published.v1",
    "failed": "bucketml.training.failed.v1",
}


# --- processes --------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                found += [int(child) for child in (task / "children").read_text().split()]
    return found


def descendants(pid: int) -> list[int]:
    found, todo = [], children(pid)
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children(child)
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (FileNotFoundError, ProcessLookupError):
        return []


def kind_of(pid: int) -> str | None:
    argv = cmdline(pid)
    if "bucketml.local.broker" in argv:
        return "broker"
    if "bucketml.local.watcher" in argv:
        return "watcher"
    if "bucketml.local.ping" in argv:
        return "ping"
    if "--target" in argv:
        return argv[argv.index("--target") + 1]
    return None


def parts(dev_pid: int) -> dict[str, list[int]]:
    """{part: [its main process, then the processes it started (gunicorn workers)]}."""
    found: dict[str, list[int]] = {}
    for pid in children(dev_pid):
        kind = kind_of(pid)
        if kind:
            found[kind] = [pid, *descendants(pid)]
    return found


def alive_in_group(pgid: int) -> list[int]:
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(entry.name))
    return alive


@contextlib.contextmanager
def platform(root: Path, ports: dict[str, int], env: dict[str, str] | None = None):
    """`bucketml dev` (helpers.running_platform) whose parts are all gone once it stopped: any
    process of a part's group still alive then fails the test, and is killed either way."""
    groups: set[int] = set()
    try:
        with running_platform(root, ports, env) as info:
            dev = info["process"].pid

            def current_parts() -> dict[str, list[int]]:
                found = parts(dev)
                groups.update(pids[0] for pids in found.values())  # each part leads its own session
                return found

            info["parts"] = current_parts
            current_parts()
            try:
                yield info
            finally:
                current_parts()
    finally:
        left = {pgid: alive_in_group(pgid) for pgid in groups}
        for pgid, pids in left.items():
            if pids:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
    leftovers = {pgid: pids for pgid, pids in left.items() if pids}
    assert not leftovers, f"processes of `bucketml dev` outlived it: {leftovers}"


# --- uploads and how they ended ---------------------------------------------------------
@dataclass
class Upload:
    name: str
    generation: int
    expect: str  # "version" or "rejected"

    @property
    def key(self) -> tuple[str, str]:
        return self.name, str(self.generation)

    @property
    def report(self) -> str:
        model, filename = self.name.split("/")[1:]
        return f"rejected/{model}/{filename}.{self.generation}.json"


@dataclass
class Ledger:
    """Every upload made, and the check that each ended exactly once."""

    bucket: Path
    staging: Path
    uploads: list[Upload] = field(default_factory=list)

    def drop(self, model: str, filename: str, content: bytes, expect: str) -> Upload:
        """Copy a file into the bucket folder as a user does (`cp`), not through the API."""
        self.staging.mkdir(parents=True, exist_ok=True)
        staged = self.staging / f"{model}-{filename}"
        staged.write_bytes(content)
        target = self.bucket / "datasets" / model / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(staged, target)
        upload = Upload(f"datasets/{model}/{filename}", target.stat().st_mtime_ns // 1000, expect)
        self.uploads.append(upload)
        return upload

    def spec(self, model: str, text: str) -> None:
        target = self.bucket / "datasets" / model / "bucketml.yaml"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def outcomes(self, broker: str) -> dict[tuple[str, str], dict]:
        """Per upload: the versions whose card names it, its rejection report, and the outcome
        events in the broker's log."""
        made = versions_by_upload(self.bucket)
        seen: dict[tuple[str, str], Counter] = {}
        trained_versions: dict[tuple[str, str], set] = {}
        for event in broker_events(broker):
            data = event.get("data") or {}
            upload = data.get("upload") if isinstance(data, dict) else None
            if not isinstance(upload, dict) or event["type"] not in TYPES.values():
                continue
            key = (upload.get("name"), str(upload.get("generation")))
            kind = next(k for k, t in TYPES.items() if t == event["type"])
            seen.setdefault(key, Counter())[kind] += 1
            if kind in ("trained", "published"):
                trained_versions.setdefault(key, set()).add((data["model"], data["version"]))
        result = {}
        for upload in self.uploads:
            events = seen.get(upload.key, Counter())
            result[upload.key] = {
                "versions": made.get(upload.key, []),
                "report": (self.bucket / upload.report).is_file(),
                "events": dict(events),
                "announced": sorted(trained_versions.get(upload.key, set())),
            }
        return result

    def settle(self, broker: str, timeout: float) -> dict:
        """Wait until every upload has ended (a version announced by model.trained, or a rejection
        with its report, or training.failed); then check each ended exactly once. Returns the
        figures; raises AssertionError listing every upload lost or ended more than once."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.outcomes(broker)
            pending = [u for u in self.uploads if ended(found[u.key]) is None]
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        problems, figures = [], Counter()
        for upload in self.uploads:
            state = found[upload.key]
            outcome = ended(state)
            figures[outcome or "lost"] += 1
            if outcome is None:
                problems.append(f"{upload.name}#{upload.generation}: no outcome within {timeout:.0f}s: {state}")
                continue
            if len(state["versions"]) > 1:
                problems.append(f"{upload.name}#{upload.generation}: {len(state['versions'])} versions {state['versions']}")
            if state["versions"] and (state["report"] or state["events"].get("rejected") or state["events"].get("failed")):
                problems.append(f"{upload.name}#{upload.generation}: both a version and a rejection: {state}")
            if state["announced"] and state["announced"] != state["versions"][:1]:
                problems.append(f"{upload.name}#{upload.generation}: announced {state['announced']}, made {state['versions']}")
            if outcome != upload.expect:
                problems.append(f"{upload.name}#{upload.generation}: expected {upload.expect}, got {outcome}: {state}")
        assert not problems, "\n".join(problems)
        return dict(figures)


def ended(state: dict) -> str | None:
    if state["versions"] and state["events"].get("trained"):
        return "version"
    if state["report"] and state["events"].get("rejected"):
        return "rejected"
    if state["events"].get("failed"):
        return "failed"
    return None


def broker_events(broker: str) -> list[dict]:
    found, after = [], 0
    while True:
        page = requests.get(f"{broker}/events", params={"after": after, "limit": 1000}, timeout=10).json()["events"]
        found += page
        if len(page) < 1000:
            return found
        after = page[-1]["seq"]


def dead_letters(broker: str) -> list[dict]:
    return requests.get(f"{broker}/deadletters", timeout=10).json()["deadletters"]


def cheap_spec(task: str = "classification") -> str:
    """One fast candidate: enough to exercise every step of training."""
    return "algorithms: [%s]\n" % ("logistic_regression" if task == "classification" else "ridge")


def numbers_frame(rows: int, seed: int):
    """A small regression dataset (its report is the quickest to draw): y from two numbers and a category."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"a": rng.normal(size=rows).round(3), "b": rng.normal(size=rows).round(3),
                          "kind": rng.choice(["p", "q", "r"], rows)})
    frame["y"] = (2 * frame["a"] - frame["b"] + (frame["kind"] == "p") + rng.normal(0, 0.1, rows)).round(3)
    return frame


def junk(kind: int) -> bytes:
    """Uploads that must be rejected."""
    return [b"", b"a,b\n1,2\n3,4\n5,6\n", bytes(range(256)) * 8, b"label\nyes\nno\n"][kind % 4]


def to_json(figures: dict) -> str:
    return json.dumps(figures, sort_keys=True)
