"""Which model versions this replica serves: follows each model's current pointer.

A poll of the pointers' generations (metadata only) every `poll_seconds` makes every replica
pick up a new version even though a published event reaches only one of them. A new version is
loaded and checked (OnnxModel.load) before it replaces the old one; until then, and if loading
fails, the old one keeps serving (docs/reliability.md).
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

from bucketml.monitoring.reference import REFERENCE_FILE, Reference
from bucketml.registry.model_registry import Pointer, Registry, RegistryError, check_model_name
from bucketml.serving.errors import (
    BucketUnavailable,
    InvalidRequest,
    NoModelServed,
    UnknownModel,
    VersionNotLoadable,
)
from bucketml.serving.runtime import OnnxModel
from bucketml.storage import InvalidObjectName, NotFound, StorageError

log = logging.getLogger("bucketml.serving")

VERSION_CACHE = 8  # explicitly requested (non-current) versions kept loaded per replica
RETRY_FAILED_SECONDS = 30.0  # a version that failed to load is tried again this often, not every poll
# A look at the pointers that has not come back after this long (a storage client retrying through
# an outage, a hung mount) shows in readiness as the bucket being unreachable, until it comes back.
STALLED_SECONDS = 3.0


class ModelManager:
    """The current version of every model, and a few explicitly requested older ones."""

    def __init__(self, registry: Registry, poll_seconds: float = 1.0):
        self.registry = registry
        self.poll_seconds = poll_seconds
        self._current: dict[str, OnnxModel] = {}
        self._canaries: dict[str, tuple[OnnxModel, int]] = {}  # model -> (canary version loaded, percent)
        self._shadows: dict[str, OnnxModel] = {}  # model -> its shadow version, loaded
        self._generations: dict[str, int] = {}
        self._pinned: OrderedDict[tuple[str, int], OnnxModel] = OrderedDict()
        self._errors: dict[str, str] = {}
        self._failed: dict[str, tuple[int, float]] = {}  # model -> (pointer generation, when it failed)
        self._outage: str | None = None  # why the bucket cannot be read now; what is loaded serves on
        self._asking_since: float | None = None  # when the look at the pointers under way began
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._watcher_pid: int | None = None
        self._first_look = threading.Event()

    # Threads do not survive fork (gunicorn forks its workers after importing the function),
    # so the watcher starts in the process that serves requests: right after the fork when
    # the function registers start() with os.register_at_fork (the models load while the
    # server boots), else on the first request.
    def start(self) -> None:
        """Start the watcher, whose first act is loading every current version (returns at once)."""
        with self._lock:
            if self._watcher_pid == os.getpid():
                return
            self._watcher_pid = os.getpid()
            self._first_look = threading.Event()
        threading.Thread(target=self._watch, name="bucketml-pointer-watch", daemon=True).start()

    def ensure_watching(self, timeout: float = 60.0) -> None:
        """Started, and the first look at the pointers done (requests wait for it once)."""
        if self._watcher_pid != os.getpid():
            self.start()
        self._first_look.wait(timeout)

    def _watch(self) -> None:
        first = True
        while True:
            try:
                self.refresh()
            except Exception:  # a bucket hiccup must not kill the watcher; the old model serves on
                log.exception("refreshing models failed")
            if first:  # even after a failure: requests then get a clear "not served" answer
                self._first_look.set()
                first = False
            time.sleep(self.poll_seconds)

    def refresh(self, model: str | None = None) -> None:
        with self._refresh_lock:
            try:
                models = [model] if model else self._ask(self.registry.models)
            except StorageError as exc:
                return self._unreachable(exc)
            for name in models:
                generation, version = 0, None
                try:
                    generation = self._ask(self.registry.pointer_generation, name)
                    if generation == 0 or generation == self._generations.get(name):
                        continue
                    failed = self._failed.get(name)
                    if model is None and failed and failed[0] == generation and time.monotonic() - failed[1] < RETRY_FAILED_SECONDS:
                        continue  # the same broken version: retried now and then (and on /reload), not every poll
                    pointer = self.registry.current(name)
                    version = pointer.version
                    loaded = self._current.get(name)
                    if pointer.version is not None and (loaded is None or loaded.version != pointer.version):
                        fresh = self._load(name, pointer.version)
                        with self._lock:
                            self._current[name] = fresh
                        log.info("serving %s version %s", name, pointer.version)
                    self._follow_canary(name, pointer)
                    self._follow_shadow(name, pointer)
                    self._generations[name] = pointer.generation
                    self._errors.pop(name, None)
                    self._failed.pop(name, None)
                except Exception as exc:  # a bad version must never take down what is serving
                    if isinstance(exc, StorageError) and not isinstance(exc, (NotFound, InvalidObjectName)):
                        return self._unreachable(exc)  # the bucket, not the version: no verdict on the version
                    message = f"version {version}: {exc}" if version is not None else str(exc)
                    if self._errors.get(name) != message:
                        log.error("could not load the current version of %s (%s); the previous one keeps serving", name, message)
                    self._errors[name] = message
                    self._failed[name] = (generation, time.monotonic())
            if self._outage is not None:
                log.info("the bucket answers again; following the current versions as before")
                self._outage = None

    def _follow_canary(self, model: str, pointer: Pointer) -> None:
        """Load the canary the pointer names (or drop the one it no longer names). A canary that
        fails to load raises like a current version would: the error shows in readiness, and
        meanwhile unpinned requests keep going to the current version only."""
        named = self.registry.canary_of(pointer) if pointer.version is not None else None
        if named is None:
            if self._canaries.pop(model, None) is not None:
                log.info("%s has no canary any more; every unpinned request goes to version %s", model, pointer.version)
            return
        version, percent = named
        loaded = self._canaries.get(model)
        if loaded is None or loaded[0].version != version:
            self._canaries.pop(model, None)  # the old canary's share must not go on while the new one loads
            canary = self._load_beside(model, version, "canary")
        else:
            canary = loaded[0]
        self._canaries[model] = (canary, percent)
        log.info("%s canary: version %s answers %s%% of unpinned requests", model, version, percent)

    def _follow_shadow(self, model: str, pointer: Pointer) -> None:
        """Load the shadow the pointer names, or drop the one it no longer names (as for canaries)."""
        named = self.registry.shadow_of(pointer) if pointer.version is not None else None
        loaded = self._shadows.get(model)
        if named is None:
            if self._shadows.pop(model, None) is not None:
                log.info("%s has no shadow any more", model)
            return
        if loaded is None or loaded.version != named:
            self._shadows.pop(model, None)
            self._shadows[model] = self._load_beside(model, named, "shadow")
            log.info("%s shadow: version %s scores a copy of unpinned /predict requests", model, named)

    def shadow_for(self, answered: OnnxModel) -> OnnxModel | None:
        """The shadow to compare with an answer, when `answered` is its model's current version
        (the shadow is measured against the stable version, not against a canary)."""
        shadow = self._shadows.get(answered.model)
        return shadow if shadow is not None and self._current.get(answered.model) is answered else None

    def shadows(self) -> dict[str, int]:
        return {name: loaded.version for name, loaded in self._shadows.items()}

    def _ask(self, question: Callable[..., Any], *args: Any) -> Any:
        """A look at the bucket's metadata, timed so that errors() can tell one that hangs."""
        self._asking_since = time.monotonic()
        try:
            return question(*args)
        finally:
            self._asking_since = None

    def _unreachable(self, exc: StorageError) -> None:
        """The bucket cannot be read (an outage, a moved folder): keep serving what is loaded,
        say why in readiness (errors), log it once, and look again at the next poll."""
        message = f"cannot reach the bucket to look for a new version, serving what is loaded: {exc}"
        if self._outage is None:
            log.error("%s (%d model(s) loaded)", message, len(self._current))
        self._outage = message

    def _load(self, model: str, version: int) -> OnnxModel:
        card = self.registry.card(model, version)
        loaded = OnnxModel(model, version, card).load(self.registry.model_bytes(model, version))
        loaded.reference = self._reference(model, version)
        return loaded

    def _reference(self, model: str, version: int) -> Reference | None:
        """The version's training distributions (reference.json), for the monitor's drift figures;
        None for a version without one (made before references existed, or registered by hand)."""
        name = Registry.version_prefix(model, version) + REFERENCE_FILE
        try:
            return Reference.from_dict(json.loads(self.registry.storage.read(name)))
        except NotFound:
            return None
        except (ValueError, KeyError, TypeError) as exc:  # serving does not depend on it: say so and go on
            log.warning("%s version %s: %s is not a reference (%s); its inputs are not watched for drift", model,
                        version, name, exc)
            return None

    def generation(self, model: str) -> int:
        """The generation of the model's pointer this replica follows (0: none yet)."""
        return self._generations.get(model, 0)

    def stable_for(self, answered: OnnxModel) -> OnnxModel | None:
        """The model's current version when `answered` is its canary (to compare their answers)."""
        canary = self._canaries.get(answered.model)
        return self._current.get(answered.model) if canary is not None and canary[0] is answered else None

    def _load_beside(self, model: str, version: int, role: str) -> OnnxModel:
        """Load a canary or shadow; a failure says which it was (readiness shows it under the model)."""
        try:
            return self._load(model, version)
        except StorageError as exc:
            if not isinstance(exc, (NotFound, InvalidObjectName)):
                raise  # the bucket, not the version: refresh() reports an outage
            raise RuntimeError(f"{role} version {version} could not be loaded: {exc}") from exc
        except Exception as exc:
            raise RuntimeError(f"{role} version {version} could not be loaded: {exc}") from exc

    def ready(self) -> bool:
        return bool(self._current)

    def loaded(self) -> dict[str, OnnxModel]:
        return dict(self._current)

    def errors(self) -> dict[str, str]:
        errors = dict(self._errors)
        outage, asking = self._outage, self._asking_since
        if outage is None and asking is not None and time.monotonic() - asking > STALLED_SECONDS:
            waited = time.monotonic() - asking
            outage = f"cannot reach the bucket to look for a new version, serving what is loaded: no answer for {waited:.0f}s"
        if outage is not None:  # every loaded model is stuck on its version until the bucket answers
            for name in self._current:
                errors.setdefault(name, outage)
        return errors

    def get(self, model: str | None, version: int | None = None) -> OnnxModel:
        current = self._current
        if model is None:
            if not current:
                if self._outage is not None:
                    raise NoModelServed(f"no model is loaded yet: {self._outage}")
                raise NoModelServed("no model is being served yet; upload a dataset first")
            if len(current) > 1:
                raise InvalidRequest(f"several models are served ({', '.join(sorted(current))}); name one with 'model'")
            model = next(iter(current))  # the only one; a requested version still applies
        served = current.get(model)
        if version is None or (served is not None and served.version == version):
            if served is None:
                raise UnknownModel(f"model '{model}' is not served; served models: {', '.join(sorted(current)) or 'none'}")
            return served
        return self._pinned_version(model, version)

    def routed(self, model: str | None, version: int | None = None) -> OnnxModel:
        """The version that scores an inference request: `get`, except that an unpinned request
        goes to the model's canary, when it has one, with the canary's probability. One
        independent draw per request, so every replica sends the same share whatever the load
        balancer does, and no state is shared between replicas."""
        served = self.get(model, version)
        if version is not None:
            return served
        canary = self._canaries.get(served.model)
        if canary is not None and random.random() * 100 < canary[1]:
            return canary[0]
        return served

    def canaries(self) -> dict[str, dict[str, int]]:
        """{model: {"version": n, "percent": p}} of the canaries this replica routes to."""
        return {name: {"version": loaded.version, "percent": percent} for name, (loaded, percent) in self._canaries.items()}

    def _pinned_version(self, model: str, version: int) -> OnnxModel:
        key = (model, version)
        with self._lock:
            if key in self._pinned:
                self._pinned.move_to_end(key)
                return self._pinned[key]
        if not 0 <= version < 2**63:  # no stored version; a 300-digit one would be a path segment too long to look up
            raise UnknownModel(f"model '{model}' has no version {version}")
        try:
            check_model_name(model)  # never a storage path from an arbitrary string
            loaded = self._load(model, version)
        except RegistryError as exc:
            raise UnknownModel(str(exc)) from None
        except NotFound:
            raise UnknownModel(f"model '{model}' has no version {version}") from None
        except StorageError as exc:
            if not isinstance(exc, InvalidObjectName):  # not a symlink leading outside: an outage
                raise BucketUnavailable(f"the bucket is unavailable: {exc}") from None
            raise VersionNotLoadable(f"model '{model}' version {version} cannot be served: {exc}") from None
        except Exception as exc:  # stored but not loadable (refused external data, corrupt): no retry helps
            raise VersionNotLoadable(f"model '{model}' version {version} cannot be served: {exc}") from None
        with self._lock:
            self._pinned[key] = loaded
            while len(self._pinned) > VERSION_CACHE:
                self._pinned.popitem(last=False)
        return loaded
