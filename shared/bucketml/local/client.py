"""A client of a running platform: the broker's event log, followed for one upload.

Shared by the `bucketml` command line and `bucketml dev --demo`, which both upload a dataset,
wait for what became of it and, once a version is published, for the predict function to
serve it. Errors are `Failure`: one line the CLI prints as
`error: ...` with exit code 1, and the demo prints in its log.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import click
import requests

from bucketml import auth
from bucketml import settings
from bucketml.contracts import events


class Failure(click.ClickException):
    """One clear line on stderr, exit code 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class Unreachable(Failure):
    """The part did not answer at all (connection refused, timeout): one that may be starting."""


def error_text(response: requests.Response) -> str:
    """What a part said was wrong: its JSON `error`, else the start of the body."""
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def auth_headers() -> dict[str, str]:
    """Authorization for the broker and predict when BUCKETML_TOKEN or BUCKETML_TOKEN_FILE is set."""
    try:
        return auth.client_headers()
    except settings.ConfigError as exc:
        raise Failure(str(exc)) from None


def unauthorized(what: str, url: str, response: requests.Response) -> Failure:
    """The one-line error for a 401 from the broker or predict: which variable to set."""
    if auth_headers():
        return Failure(f"{what} at {url} refused the token in BUCKETML_TOKEN/BUCKETML_TOKEN_FILE "
                       f"(HTTP 401: {error_text(response)}); "
                       "set the token the platform was started with")
    return Failure(f"{what} at {url} requires a token (HTTP 401); set BUCKETML_TOKEN (or BUCKETML_TOKEN_FILE, "
                   "a file holding it) to the token the platform was started with")


def call(method: str, base_url: str, path: str, what: str, *, when_down: str, timeout: float,
         **request: Any) -> requests.Response:
    """One request to the broker or predict with the token; a part that is down or refuses the
    token is a Failure saying what to do (`when_down`, or which variable to set)."""
    try:
        response = requests.request(method, base_url.rstrip("/") + path, headers=auth_headers(), timeout=timeout, **request)
    except requests.RequestException:
        raise Unreachable(when_down) from None
    if response.status_code == 401:
        raise unauthorized(what, base_url, response)
    return response


def broker_events(broker: str, **params: Any) -> list[dict]:
    """One page of the broker's event log (GET /events, docs/http-api.md)."""
    response = call("GET", broker, "/events", "the broker", params=params, timeout=10,
                    when_down=f"the platform is not running at {broker}; start it with `bucketml dev`")
    if response.status_code != 200:
        raise Failure(f"broker answered HTTP {response.status_code}: {response.text[:200]}")
    return response.json()["events"]


def is_running(broker: str) -> bool:
    try:
        return requests.get(broker.rstrip("/") + "/healthz", timeout=3).status_code == 200
    except requests.RequestException:
        return False


def wait_for_outcome(broker: str, name: str, generation: int, timeout: float,
                     echo: Callable[[str], Any] = click.echo) -> dict:
    """Follow the events of one upload until it is published, trained, rejected or failed."""
    deadline = time.monotonic() + timeout
    after = 0
    while time.monotonic() < deadline:
        for event in broker_events(broker, after=after, limit=1000):
            after = max(after, event["seq"])
            data = event.get("data") if isinstance(event.get("data"), dict) else {}
            upload = data if event["type"] == events.OBJECT_FINALIZED else data.get("upload") or {}
            if upload.get("name") != name or str(upload.get("generation")) != str(generation):
                continue
            echo(describe(event["type"], data))
            # A trained version that is already current is followed by its model.published.
            promoted = event["type"] == events.MODEL_TRAINED and data.get("current_version") == data.get("version")
            if event["type"] in events.UPLOAD_OUTCOMES and not promoted:
                return event
        time.sleep(0.3)
    raise Failure(f"no outcome within {timeout:.0f}s; follow it with `bucketml events`")


def wait_until_served(predict: str, model: str, version: int, timeout: float,
                      echo: Callable[[str], Any] = click.echo) -> None:
    """After model.published: wait until the predict function at `predict` serves `version`
    of `model` to unpinned requests, then echo the `served` line.

    Served means `GET /v2/models/{model}/ready` names that version (the version an unpinned
    /predict to that replica computes with) and `GET /v2/models/{model}/versions/{version}/ready`
    answers 200. A replica picks a new version up on the published event (/reload) or its next
    poll of the pointer; until then the previous version, or none, answers. Predict that is
    down, refuses or does not serve the version before `timeout` is one Failure line."""
    deadline = time.monotonic() + max(timeout, 0.0)
    said_waiting = False
    started = time.monotonic()
    while True:
        reason = _serving(predict, model, version)
        if reason is None:
            echo(f"  served     {model} version {version}")
            return
        if time.monotonic() >= deadline:
            break
        if not said_waiting and time.monotonic() - started > 5:
            echo(f"  waiting    for predict at {predict} to serve {model} version {version} ({reason})")
            said_waiting = True
        time.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))
    raise Failure(f"{model} version {version} was published, but predict at {predict} does not serve it yet "
                  f"({reason}); set --predict-url or BUCKETML_PREDICT_URL if predict runs elsewhere")


def serving_state(predict: str, model: str, version: int) -> str | None:
    """None when predict at `predict` serves `version` of `model` to unpinned requests, else why
    not (a token it refuses is a Failure)."""
    return _serving(predict, model, version)


def _serving(predict: str, model: str, version: int) -> str | None:
    """None when predict serves `version` of `model` to unpinned requests, else why not."""
    try:
        current = call("GET", predict, f"/v2/models/{model}/ready", "the predict function", timeout=5,
                       when_down="not reachable")
        if current.status_code != 200:
            return f"HTTP {current.status_code}: {error_text(current)}"
        served = current.json().get("version")
        if str(served) != str(version):
            error = current.json().get("error")
            return f"it serves version {served}" + (f"; {error}" if error else "")
        pinned = call("GET", predict, f"/v2/models/{model}/versions/{version}/ready", "the predict function",
                      timeout=5, when_down="not reachable")
        if pinned.status_code != 200:
            return f"HTTP {pinned.status_code} for version {version}: {error_text(pinned)}"
    except Unreachable:  # predict may be starting or reloading: keep asking (a refused token is raised)
        return "not reachable"
    except (ValueError, AttributeError):
        return "an answer that is not JSON"
    return None


def describe(type_: str, data: dict) -> str:
    """One line for an event of the upload pipeline."""
    if type_ == events.OBJECT_FINALIZED:
        return f"  finalized  {data.get('name')} ({data.get('size')} bytes)"
    if type_ == events.DATASET_PREPARED:
        rows = data.get("rows", {})
        return (f"  prepared   {data.get('task')} on target '{data.get('target')}': {rows.get('train')} train / "
                f"{rows.get('test')} test rows, {data.get('columns')} feature columns")
    if type_ in (events.MODEL_PUBLISHED, events.MODEL_TRAINED):
        metric = data.get("metric")
        score = data.get("metrics", {}).get(metric)
        state = "published" if type_ == events.MODEL_PUBLISHED else "trained  "
        current = data.get("current_version")
        suffix = "" if type_ == events.MODEL_PUBLISHED or current == data.get("version") else f" (current stays {current})"
        canary = (data.get("promotion") or {}).get("canary_percent")
        if type_ == events.MODEL_TRAINED and canary is not None and current != data.get("version"):
            suffix = (f" (canary of version {current} for {canary}% of unpinned requests; "
                      "the monitor promotes it or rolls it back)")
        return (f"  {state}  {data.get('model')} version {data.get('version')}: {data.get('algorithm')} "
                f"{metric}={format_score(score)}{suffix}")
    if type_ == events.DATASET_REJECTED:
        return f"  rejected   {data.get('reason')}: {data.get('message')}  (report: {data.get('report')})"
    if type_ == events.TRAINING_FAILED:
        return f"  failed     {data.get('reason')}: {data.get('message')}"
    if type_ in (events.ROLLOUT_STARTED, events.ROLLOUT_PROMOTED, events.ROLLOUT_ROLLED_BACK):
        return _rollout_line(type_, data)
    if type_ == events.MODEL_DRIFT:
        columns = ", ".join(f"{d.get('column')} (PSI {d.get('psi'):.2f})" for d in data.get("drifted") or [])
        return f"  drift      {data.get('model')} version {data.get('version')}: {columns} over {data.get('threshold')}"
    if type_ == events.BATCH_COMPLETED:
        return (f"  scored     {data.get('input')}: {data.get('rows')} rows with version {data.get('version')} in "
                f"{data.get('seconds')} s -> {data.get('output')}")
    if type_ == events.BATCH_FAILED:
        return f"  not scored {data.get('input')}: {data.get('reason')}: {data.get('message')}"
    return f"  {type_}"


def _rollout_line(type_: str, data: dict) -> str:
    kind, version, current = data.get("kind"), data.get("version"), data.get("current_version")
    figures = data.get("figures") or {}
    who = "by the monitor" if figures.get("decided_by") == "monitor" else ""
    why = "; ".join(figures.get("reasons") or [])
    if type_ == events.ROLLOUT_STARTED:
        share = f" for {figures.get('percent')}% of unpinned requests" if kind == "canary" else ""
        return f"  started    {kind} {data.get('model')} version {version}{share} (current {current})"
    if type_ == events.ROLLOUT_PROMOTED:
        line = f"  promoted   {kind} {data.get('model')} version {version} {who}".rstrip()
        return line + f", was {data.get('previous_version')}" + (f": {why}" if why else "")
    line = f"  rolled back {kind} {data.get('model')} version {version} {who}".rstrip()
    return line + f", version {current} stays" + (f": {why}" if why else "")


def format_score(value: float | None) -> str:
    """A metric can be undefined (ROC AUC when a class has no held-out row)."""
    return "n/a" if value is None else f"{value:.4f}"
