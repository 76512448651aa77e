"""monitor: decides canaries and watches for drift, from the figures every predict replica writes.

Run by a ping (Knative's PingSource every minute in a cluster; `bucketml dev` every
BUCKETML_MONITOR_SECONDS). Each run, for every model with a current version:

1. The figures: the replica files `monitoring/<model>/<version>/<replica>.json` of the pointer's
   present generation (monitoring.aggregates), summed per version, so the canary and the stable
   version are compared over the same period and every replica counts.
2. A canary that answered `canary_min_requests` (its card's spec) is promoted or rolled back
   (monitoring.decisions.decide_canary). The step is one compare-and-swap of the pointer that
   also records its announcement; a run that finds an announcement not yet sent sends it, so a
   crash between the two loses nothing and two runs at once take the step once.
3. Drift: each input column's PSI over the replicas' windows against the version's
   reference.json; when columns exceed the spec's `drift_threshold`, one
   bucketml.model.drift.v1, and no other until the episode ends (every column back under the
   threshold) and a new one starts.

Events wait in the model's state object (`monitoring/<model>/state.json`, compare-and-swap)
until the event sink took them: a sink that is down delays them to a later run, never drops them,
and runs at once (a PingSource delivers at least once) send each one once.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from typing import Any

from cloudevents.http import CloudEvent

from bucketml import settings, timestamps
from bucketml.contracts import events
from bucketml.contracts.event_data import DriftedColumn, ModelDrift, RolloutFigures
from bucketml.monitoring.aggregates import PREFIX
from bucketml.monitoring.decisions import Drift, Totals, decide_canary, drift, merge
from bucketml.monitoring.reference import REFERENCE_FILE, Reference
from bucketml.registry.model_registry import CANARY, DECIDED, Pointer, Registry
from bucketml.steps.rollout import rollout_event
from bucketml.storage import NotFound, PreconditionFailed, Storage

log = logging.getLogger("bucketml.monitor")

FUNCTION = "monitor"
ANNOUNCED_KEPT = 100  # ids of sent events remembered per model (a decision is re-found for a run or two)
# An outbox entry claimed by a run is left to it this long: longer than an event post may take
# (events.post's timeout), so a live run finishes or gives up first, and a killed run's claim lapses.
CLAIM_SECONDS = 15.0
MAX_CONFLICTS = 20
STALE_SECONDS = 600.0  # a replica file of an earlier pointer generation, unchanged this long, is removed
DEFAULT_MIN_REQUESTS = 200
DEFAULT_DRIFT_THRESHOLD = 0.2


def state_name(model: str) -> str:
    return f"{PREFIX}{model}/state.json"


def handle_ping(storage: Storage, event: CloudEvent) -> None:
    """The function's step: one run over every model. A ping's data carries nothing needed (a
    PingSource without `data` sends none), so only its type is checked."""
    if event["type"] != events.PING:
        raise events.MalformedEvent(f"this function handles {events.PING} events (a PingSource), not {event['type']}")
    run(storage, settings.event_sink_url())
    return None


def run(storage: Storage, sink: str) -> list[CloudEvent]:
    """One run over every model; the events sent."""
    registry = Registry(storage)
    sent: list[CloudEvent] = []
    for model in registry.models():
        try:
            sent += ModelWatch(registry, model, sink).run()
        except PreconditionFailed:  # another run wrote the state first: it did this model's work
            log.info("%s: another monitor run took this one's step", model)
        except (NotFound, KeyError, TypeError, ValueError) as exc:  # one model's odd objects never stop the others
            log.warning("%s: not monitored this run: %s: %s", model, type(exc).__name__, exc)
    return sent


class ModelWatch:
    """One model's run: read the state and figures, decide, write the state, send what waits."""

    def __init__(self, registry: Registry, model: str, sink: str):
        self.registry, self.model, self.sink = registry, model, sink
        self.storage = registry.storage

    def run(self) -> list[CloudEvent]:
        pointer = self.registry.current(self.model)
        if pointer.version is None:
            return []
        state, generation = self._state()
        outbox: list[dict[str, Any]] = state.setdefault("outbox", [])
        announced: list[str] = state.setdefault("announced", [])
        changed = False
        decided = pointer.data.get(DECIDED)
        if (isinstance(decided, dict) and decided.get("id") not in announced and decided.get("id") != state.get("last_decision")
                and not _holds(outbox, decided.get("id"))):
            outbox.append(decided)  # a step whose announcement a crash cut short
            changed = True
        files = self._files(pointer)
        step = self._canary_step(pointer, files) if Registry.canary_of(pointer) is not None else None
        if step is not None:
            outbox.append(step)
            changed = True
        else:  # (after a canary step the pointer moved: the figures of the version now current start afresh)
            changed |= self._drift_step(pointer, files, state, outbox)
        if changed:
            self._write_state(state, generation)
        return self._send()

    # --- the figures ---------------------------------------------------------------------
    def _files(self, pointer: Pointer) -> list[dict[str, Any]]:
        """The replica files counted under the pointer's present generation. Files of an earlier
        generation not rewritten for STALE_SECONDS are removed: every pointer move and every
        replica start leaves one per version, and nothing reads them again."""
        found = []
        prefix = f"{PREFIX}{self.model}/"
        for info in self.storage.list(prefix):
            parts = info.name[len(prefix):].split("/")
            if len(parts) != 2 or not parts[1].endswith(".json"):
                continue  # state.json, or something else
            try:
                data = json.loads(self.storage.read(info.name))
            except (NotFound, ValueError):
                continue  # removed meanwhile, or half-written by a hand: a replica rewrites its own soon
            if not isinstance(data, dict):
                continue
            if data.get("epoch") == pointer.generation:
                found.append(data)
            elif _age_seconds(info.updated) > STALE_SECONDS:
                self._remove(info.name, info.generation)
        return found

    def _remove(self, name: str, generation: int) -> None:
        try:  # only the generation read: a replica that rewrote it meanwhile keeps its file
            self.storage.delete(name, if_generation_match=generation)
        except (NotFound, PreconditionFailed):
            pass

    @staticmethod
    def _of(files: list[dict[str, Any]], version: int) -> Totals:
        return merge(f for f in files if f.get("version") == version)

    # --- canaries --------------------------------------------------------------------------
    def _canary_step(self, pointer: Pointer, files: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Promote or roll back the canary once it answered enough; the announcement, or None."""
        version, percent = Registry.canary_of(pointer)
        card = self.registry.card(self.model, version)
        spec = card.get("spec") or {}
        min_requests = int(spec.get("canary_min_requests") or DEFAULT_MIN_REQUESTS)
        stable, canary = self._of(files, pointer.version), self._of(files, version)
        decision = decide_canary(stable, canary, card["schema"]["task"], min_requests)
        if decision.step == "wait":
            return None
        promote = decision.step == "promote"
        f = decision.figures
        versions = {"stable": str(pointer.version), "canary": str(version)}
        figures = RolloutFigures.model_validate({
            "percent": percent, "started": (pointer.data.get(CANARY) or {}).get("started"), "decided_by": FUNCTION,
            "requests": {versions[side]: n for side, n in f["requests"].items()},
            "errors": {versions[side]: n for side, n in f["errors"].items()},
            "p99_ms": {versions[side]: ms for side, ms in f["p99_ms"].items()},
            "compared_rows": f["compared_rows"], "agreeing_rows": int(canary.compared["agreeing"]),
            "agreement": f["agreement"], "prediction_psi": f["prediction_psi"], "replicas": f["replicas"],
            "min_requests": min_requests, "reasons": decision.reasons,
        })
        type_ = events.ROLLOUT_PROMOTED if promote else events.ROLLOUT_ROLLED_BACK
        event = rollout_event(type_, self.model, version, version if promote else pointer.version, pointer.generation,
                              figures, previous=pointer.version if promote else None, function=FUNCTION)
        entry = {"id": event["id"], "type": event["type"], "data": event.get_data()}
        if not self.registry.finish_canary(self.model, pointer, promote=promote, decided=entry):
            log.info("%s: the pointer moved while the canary was being decided; deciding again next run", self.model)
            return None
        log.info("%s: canary version %s %s: %s", self.model, version, "promoted" if promote else "rolled back",
                 "; ".join(decision.reasons))
        return entry

    # --- drift -------------------------------------------------------------------------------
    def _drift_step(self, pointer: Pointer, files: list[dict[str, Any]], state: dict[str, Any],
                    outbox: list[dict[str, Any]]) -> bool:
        """Open or close the current version's drift episode; whether the state changed."""
        found = self.drift_of(pointer, files)
        if found is None:
            return False
        result, window_seconds = found
        episode = state.get("drift") if (state.get("drift") or {}).get("version") == pointer.version else None
        drifting = result.drifting
        if drifting and not (episode and episode.get("open")):
            number = (episode or {}).get("episodes", 0) + 1
            started = timestamps.utc_now()
            data = ModelDrift(
                model=self.model, version=pointer.version, threshold=result.threshold, rows=result.rows,
                window_seconds=window_seconds,
                drifted=[DriftedColumn(column=name, psi=result.features[name]) for name in drifting],
                psi=result.features, prediction_psi=result.prediction_psi, started=started,
            ).to_data()
            entry = {"id": f"drift-{self.model}-{pointer.version}-{number}-{pointer.generation}",
                     "type": events.MODEL_DRIFT, "data": data}
            state["drift"] = {"version": pointer.version, "open": True, "episodes": number, "columns": drifting,
                              "started": started}
            outbox.append(entry)
            log.warning("%s version %s: served inputs drifted from the training rows: %s", self.model,
                        pointer.version, ", ".join(f"{c} (PSI {result.features[c]:.2f})" for c in drifting))
            return True
        if episode and episode.get("open") and result.judged and not drifting:
            episode.update(open=False, ended=timestamps.utc_now())
            log.info("%s version %s: the drift episode is over", self.model, pointer.version)
            return True
        return False

    def drift_of(self, pointer: Pointer, files: list[dict[str, Any]] | None = None) -> tuple[Drift, float] | None:
        """The current version's drift figures (and the window length), or None without a reference."""
        try:
            reference = Reference.from_dict(json.loads(self.storage.read(
                Registry.version_prefix(self.model, pointer.version) + REFERENCE_FILE)))
        except NotFound:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s version %s: its %s cannot be read (%s)", self.model, pointer.version, REFERENCE_FILE, exc)
            return None
        spec = self.registry.card(self.model, pointer.version).get("spec") or {}
        threshold = float(spec.get("drift_threshold") or DEFAULT_DRIFT_THRESHOLD)
        mine = [f for f in (files if files is not None else self._files(pointer)) if f.get("version") == pointer.version]
        window = max((float(f.get("window_seconds") or 0) for f in mine), default=0.0)
        return drift(reference, merge(mine), threshold), window

    # --- the state and its outbox ----------------------------------------------------------
    def _state(self) -> tuple[dict[str, Any], int]:
        """The model's state and its generation (0: none yet)."""
        name = state_name(self.model)
        try:
            info = self.storage.stat(name)
            data = json.loads(self.storage.read(name, generation=info.generation))
        except NotFound:
            return {}, 0
        except ValueError:  # not JSON (a hand edit): started afresh rather than stopping the monitor
            log.warning("%s is not JSON; starting the model's monitor state afresh", name)
            return {}, self.storage.stat(name).generation
        return (data if isinstance(data, dict) else {}), info.generation

    def _write_state(self, state: dict[str, Any], generation: int) -> int:
        """Compare-and-swap; PreconditionFailed when another run wrote it first."""
        state["announced"] = state.get("announced", [])[-ANNOUNCED_KEPT:]
        info = self.storage.write(state_name(self.model), json.dumps(state).encode(), if_generation_match=generation,
                                  content_type="application/json")
        return info.generation

    def _send(self) -> list[CloudEvent]:
        """Send what waits in the outbox, oldest first, each once: a run claims an entry (compare-
        and-swap) before sending it, so runs at once never send it twice, and a claim lapses after
        CLAIM_SECONDS, so one whose run was killed is sent by a later run."""
        sent = []
        for _ in range(MAX_CONFLICTS):
            state, generation = self._state()
            outbox = state.get("outbox") or []
            if not outbox:
                return sent
            entry = outbox[0]
            if entry.get("claimed_until", 0) > time.time():
                return sent  # another run is sending it
            entry["claimed_until"] = time.time() + CLAIM_SECONDS
            try:
                self._write_state(state, generation)
            except PreconditionFailed:
                continue  # another run changed the state: look again
            event = events.platform_event(entry["type"], FUNCTION, self.model, entry["data"], id_=entry["id"])
            try:
                events.emit(self.sink, event)
            except events.SinkUnavailable as exc:
                log.warning("%s: %s; sent on a later run", self.model, exc)
                self._update(lambda s: _release(s, entry["id"]))
                return sent
            self._update(lambda s: _settle(s, entry["id"]))
            sent.append(event)
        return sent

    def _update(self, change) -> None:
        """Apply `change` to the freshest state (compare-and-swap, again on conflicts)."""
        for _ in range(MAX_CONFLICTS):
            state, generation = self._state()
            change(state)
            try:
                self._write_state(state, generation)
                return
            except PreconditionFailed:
                continue
        raise PreconditionFailed(f"{state_name(self.model)} kept changing under {MAX_CONFLICTS} attempts")


def _settle(state: dict[str, Any], event_id: str) -> None:
    """The event was sent: out of the outbox, into the ids announced."""
    state["outbox"] = [entry for entry in state.get("outbox", []) if entry.get("id") != event_id]
    if event_id not in state.setdefault("announced", []):
        state["announced"].append(event_id)
    if event_id.startswith("rollout-"):  # the pointer keeps its record of the step: never sent twice, however long ago
        state["last_decision"] = event_id


def _release(state: dict[str, Any], event_id: str) -> None:
    for entry in state.get("outbox", []):
        if entry.get("id") == event_id:
            entry.pop("claimed_until", None)


def _age_seconds(rfc3339: str) -> float:
    try:
        when = datetime.datetime.fromisoformat(rfc3339.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return 0.0  # unknown: kept
    return (datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()


def _holds(outbox: list[dict[str, Any]], event_id: Any) -> bool:
    return any(entry.get("id") == event_id for entry in outbox)
