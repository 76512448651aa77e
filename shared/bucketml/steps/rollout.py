"""The announcement of a rollout step (bucketml.rollout.*.v1), shared by whoever takes the step:
training that starts a canary, the monitor that ends one, and the CLI."""

from __future__ import annotations

from cloudevents.http import CloudEvent

from bucketml.contracts import events
from bucketml.contracts.event_data import Rollout, RolloutFigures
from bucketml.registry.model_registry import CANARY


def rollout_event(type_: str, model: str, version: int, current: int, generation: int | str, figures: RolloutFigures,
                  previous: int | None = None, kind: str = CANARY, function: str = "registry") -> CloudEvent:
    """One rollout step of a canary (or shadow) `version`. Its id names the step and `generation`
    (the pointer generation the step wrote, or read before writing), so the same step announced
    twice keeps its id."""
    data = {"model": model, "kind": kind, "version": version, "current_version": current,
            "figures": figures.to_data()}
    if previous is not None:
        data["previous_version"] = previous
    step = type_.split(".")[2]  # started, promoted, rolled_back
    return events.platform_event(type_, function, model, Rollout.model_validate(data).to_data(),
                                 id_=f"rollout-{step}-{kind}-{model}-{version}-{generation}")
