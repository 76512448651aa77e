"""The `bucketml` command line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import requests

from bucketml import settings as config
from bucketml.contracts import events
from bucketml.contracts.card import ModelCard, Profile, RowCounts, SummaryStyle, TargetProfile
from bucketml.registry.model_registry import Registry, RegistryError, check_model_name
from bucketml.contracts.upload import UploadSpecError, upload_metadata as spec_metadata
from bucketml.registry.outcomes import outcome_records
from bucketml.steps import steering
from bucketml.cli import batch
from bucketml.monitoring.decisions import MIN_DRIFT_ROWS
from bucketml.steps.rollout import rollout_event
from bucketml.local.client import (
    Failure,
    auth_headers,
    broker_events,
    call,
    describe,
    error_text,
    format_score,
    is_running,
    unauthorized,
    wait_for_outcome,
    wait_until_served,
)
from bucketml.storage import StorageError, open_storage


def _storage(bucket: str):
    return open_storage(bucket)


bucket_option = click.option("--bucket", envvar="BUCKETML_BUCKET", default=config.DEFAULT_BUCKET, show_default=True,
                             help="Local bucket folder, or gs://BUCKET.")
broker_option = click.option("--broker", envvar="BUCKETML_BROKER_URL", default=config.broker_url(), show_default=True,
                             help="Broker ingress URL.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bucketml")
def cli() -> None:
    """bucketml: drop a CSV into a bucket, get a versioned ONNX model served over HTTP."""


# --- dev -----------------------------------------------------------------------------------
@cli.command()
@click.option("--bucket", envvar="BUCKETML_BUCKET", default=config.DEFAULT_BUCKET, show_default=True,
              help="Local bucket folder (watched for uploads), or gs://BUCKET: the functions then work on that "
                   "Google Cloud Storage bucket and learn of its uploads from --subscription.")
@click.option("--subscription", envvar="BUCKETML_PUBSUB_SUBSCRIPTION",
              help="With a gs:// bucket: the Pub/Sub subscription of the bucket's notifications, an id or "
                   "projects/P/subscriptions/S.")
@click.option("--project", envvar="GOOGLE_CLOUD_PROJECT",
              help="With a gs:// bucket: the project of --subscription when it is an id.")
@click.option("--state-dir", envvar="BUCKETML_STATE_DIR", default=config.DEFAULT_STATE_DIR, show_default=True,
              type=click.Path(file_okay=False), help="Broker and watcher state (SQLite).")
@click.option("--host", envvar="BUCKETML_HOST", default=config.DEFAULT_HOST, show_default=True)
@click.option("--predict-port", envvar="BUCKETML_PREDICT_PORT", default=config.DEFAULT_PREDICT_PORT, show_default=True)
@click.option("--broker-port", envvar="BUCKETML_BROKER_PORT", default=config.DEFAULT_BROKER_PORT, show_default=True)
@click.option("--preprocess-port", envvar="BUCKETML_PREPROCESS_PORT", default=config.DEFAULT_PREPROCESS_PORT, show_default=True)
@click.option("--train-port", envvar="BUCKETML_TRAIN_PORT", default=config.DEFAULT_TRAIN_PORT, show_default=True)
@click.option("--deadletter-port", envvar="BUCKETML_DEADLETTER_PORT", default=config.DEFAULT_DEADLETTER_PORT, show_default=True)
@click.option("--monitor-port", envvar="BUCKETML_MONITOR_PORT", default=config.DEFAULT_MONITOR_PORT, show_default=True)
@click.option("--batch-port", envvar="BUCKETML_BATCH_PORT", default=config.DEFAULT_BATCH_PORT, show_default=True)
@click.option("--console-port", envvar="BUCKETML_CONSOLE_PORT", default=config.DEFAULT_CONSOLE_PORT, show_default=True,
              help="The web console (open http://HOST:PORT/ in a browser).")
@click.option("--demo", is_flag=True, help="Once ready, upload a demo dataset and print a prediction.")
def dev(bucket, subscription, project, state_dir, host, predict_port, broker_port, preprocess_port, train_port,
        deadletter_port, monitor_port, batch_port, console_port, demo) -> None:
    """Run the whole platform locally: broker, bucket watcher, the functions (preprocess, train,
    predict, monitor, batch, the web console) and the dead-letter sink.

    With --bucket gs://BUCKET the functions work on that Google Cloud Storage bucket, and the
    GCS source (pulling the bucket's Pub/Sub notifications from --subscription) replaces the
    watcher; the bucket, the subscription and the notification are checked before anything starts."""
    from bucketml.local import supervisor as dev_runtime

    ports = dev_runtime.Ports(predict=predict_port, broker=broker_port, preprocess=preprocess_port, train=train_port,
                              deadletter=deadletter_port, monitor=monitor_port, batch=batch_port,
                              console=console_port)
    gcs_bucket = _gcs_bucket_name(bucket)
    if gcs_bucket is None:
        if subscription and click.get_current_context().get_parameter_source("subscription").name == "COMMANDLINE":
            raise Failure(f"--subscription is for a gs:// bucket; {bucket} is a local folder, which the watcher follows")
        settings = dev_runtime.Settings(Path(bucket).resolve(), Path(state_dir).resolve(), host, ports)
    else:
        settings = dev_runtime.Settings(f"gs://{gcs_bucket}", Path(state_dir).resolve(), host, ports,
                                        subscription=_checked_subscription(gcs_bucket, subscription, project))
    after_ready = None
    if demo:
        from bucketml.local.demo import run_demo

        after_ready = run_demo
    dev_runtime.run(settings, after_ready)


def _gcs_bucket_name(bucket: str) -> str | None:
    """NAME of a gs://NAME bucket URL, None for a local folder; Failure for a malformed gs URL."""
    if not bucket.lower().startswith("gs:"):
        return None
    name = bucket[len("gs://"):] if bucket.lower().startswith("gs://") else ""
    if not name or "/" in name.rstrip("/") or name != name.lower():
        raise Failure(f"--bucket {bucket}: expected gs://NAME (a Google Cloud Storage bucket name, lower case, "
                      "with no path after it), or a local folder; nothing was started")
    return name.rstrip("/")


def _checked_subscription(bucket: str, subscription: str | None, project: str | None) -> str:
    """The full path of the subscription `bucketml dev` pulls gs://`bucket`'s notifications from,
    once the bucket, the subscription and the notification were found; Failure, before anything
    starts, naming what is missing and the commands that create it."""
    from bucketml.cloud import gcs_source

    if not subscription:
        raise Failure(
            f"--bucket gs://{bucket} needs --subscription (or BUCKETML_PUBSUB_SUBSCRIPTION): the Pub/Sub subscription "
            "of the bucket's notifications, which tell the local functions of its uploads (a local folder is watched "
            "instead); nothing was started. Create a topic, a subscription and the notification, then pass "
            f"--subscription bucketml-uploads --project PROJECT:\n{gcs_source.setup_commands(bucket)}")
    try:
        path = gcs_source.subscription_path(project, subscription)
        notes = gcs_source.check_setup(bucket, path)
    except gcs_source.SetupError as exc:
        message = str(exc)
        raise Failure(message + ("\nnothing was started" if "\n" in message else "; nothing was started")) from None
    for note in notes:
        click.echo(f"warning: {note}", err=True)
    return path


# --- upload --------------------------------------------------------------------------------
@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "-m", required=True, help="Model name (datasets/<model>/ in the bucket).")
@click.option("--target", "-t", help="Target column, if not named target/label/class/y.")
@click.option("--task", type=click.Choice(["auto", "classification", "regression"]),
              help="Learning task (default: auto, detected from the target).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="A dataset spec field for this upload (repeatable), e.g. --set drop=id,notes --set metric=f1_macro; "
                   "overrides datasets/<model>/bucketml.yaml.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait for the outcome and, when a version is published, until predict serves it.")
@click.option("--timeout", default=900.0, show_default=True,
              help="Seconds to wait for the outcome and for predict to serve a published version.")
@bucket_option
@broker_option
@click.option("--predict-url", envvar="BUCKETML_PREDICT_URL", default=config.predict_url(), show_default=True,
              help="The predict function (BUCKETML_PREDICT_URL), asked whether it serves a published version.")
def upload(file: Path, model: str, target: str | None, task: str | None, settings: tuple[str, ...], wait: bool,
           timeout: float, bucket: str, broker: str, predict_url: str) -> None:
    """Upload FILE as a dataset for a model and wait until it is served, trained but not
    promoted, rejected or failed.

    A published version is waited for until predict (--predict-url) answers unpinned requests
    with it, so a /predict right after this command returns gets that version.

    --target, --task and --set are stored as the object's custom metadata, where they take
    precedence over the model's bucketml.yaml."""
    try:
        check_model_name(model)
    except RegistryError as exc:
        raise Failure(str(exc)) from None
    metadata = upload_metadata(target, task, settings)
    check_upload_size(file)
    name = f"datasets/{model}/{file.name}"
    info = _storage(bucket).write(name, file.read_bytes(), content_type="text/csv", metadata=metadata)
    click.echo(f"uploaded   {name} (generation {info.generation}, {info.size} bytes)")
    if not wait:
        return
    if not is_running(broker):
        click.echo(f"the platform is not running at {broker}; `bucketml dev` will process the upload when it starts")
        return
    deadline = time.monotonic() + timeout
    outcome = wait_for_outcome(broker, name, info.generation, timeout)
    if outcome["type"] in (events.DATASET_REJECTED, events.TRAINING_FAILED):
        sys.exit(1)
    if outcome["type"] == events.MODEL_PUBLISHED:
        wait_until_served(predict_url, model, outcome["data"]["version"], deadline - time.monotonic())


def check_upload_size(file: Path) -> None:
    """Refuse, before uploading, a file the preprocess function would reject as file_too_large
    (BUCKETML_MAX_UPLOAD_BYTES, read here from this command's environment)."""
    from bucketml.training.reading import Limits

    try:
        limit = Limits.from_environment().max_upload_bytes
    except ValueError as exc:
        raise Failure(f"an upload limit variable is not a number: {exc}") from None
    size = file.stat().st_size
    if size > limit:
        raise Failure(f"{file} is {size} bytes, over the upload limit of {limit} bytes (BUCKETML_MAX_UPLOAD_BYTES); "
                      "nothing was uploaded: split the file, compress it (.csv.gz), or raise the limit "
                      "where preprocess runs and here")


def upload_metadata(target: str | None, task: str | None, settings: tuple[str, ...]) -> dict[str, str]:
    """Object metadata from --target, --task and --set KEY=VALUE, validated with the dataset
    spec's schema so a mistake fails here, before anything is uploaded (contracts/upload.py)."""
    try:
        return spec_metadata(target, task, settings)
    except UploadSpecError as exc:
        raise Failure(str(exc)) from None


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


# --- models --------------------------------------------------------------------------------
@cli.command()
@click.argument("name", required=False)
@bucket_option
def models(name: str | None, bucket: str) -> None:
    """List models, or the versions of model NAME (* marks the current one)."""
    registry = Registry(_storage(bucket))
    if name is None:
        names = registry.models()
        if not names:
            click.echo("no models yet; upload a dataset with `bucketml upload FILE --model NAME`")
        for model in names:
            pointer = registry.current(model)
            versions = registry.versions(model)
            if pointer.version is None:
                click.echo(f"{model:<24} no current version ({_plural(len(versions), 'version')})")
                continue
            card = registry.model_card(model, pointer.version)
            click.echo(f"{model:<24} v{pointer.version:<4} {card.algorithm:<20} "
                       f"{card.metric}={format_score(card.score)}  ({_plural(len(versions), 'version')})")
        return
    versions = registry.versions(name)
    refused = outcome_records(registry.storage, name)
    if not versions and not any(refused.values()):
        raise Failure(f"model '{name}' has no versions, and no upload of it was rejected or failed")
    cards = {version: registry.model_card(name, version) for version in versions}
    scores = {version: f"{card.metric}={format_score(card.score)}" for version, card in cards.items()}
    # Wide enough for the longest score ("balanced_accuracy=0.8479") and two spaces.
    width = max([18, *(len(score) + 2 for score in scores.values())])
    if versions:
        current = registry.current(name).version
        click.echo(f"{'':2}{'version':<9}{'created':<22}{'algorithm':<22}{'score':<{width}}{'rows':<7}upload")
    else:
        click.echo(f"model '{name}' has no versions yet")
    for version, card in cards.items():
        mark = "*" if version == current else " "
        counts = card.data.rows if card.data is not None else None
        rows = counts.train if counts is not None and counts.train is not None else ""
        click.echo(f"{mark:2}{version:<9}{card.created:<22}{card.algorithm:<22}{scores[version]:<{width}}{rows!s:<7}"
                   f"{card.lineage.upload.name}")
    for title, records in refused.items():
        if records:
            click.echo(f"{title} ({len(records)}):")
        for record in records:
            upload = record.get("upload", {})
            click.echo(f"  {record.get('time') or '':<28}{upload.get('name')}#{upload.get('generation')}  {record.get('reason')}")
            click.echo(f"      {record.get('message')}")


# --- profile -------------------------------------------------------------------------------
def _share(value) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def _figure(value) -> str:
    return "-" if value is None else f"{value:.4g}"


# The profile's column summaries as `bucketml profile` prints them (report.html has its own style).
SUMMARY = SummaryStyle(number=_figure, shorten=lambda value: value[:20], top=4, more=", ...", through=" .. ", quartiles=True)


def _known(value: object) -> object:
    return "?" if value is None else value


def render_profile(model: str, version: int, card: ModelCard, profile: Profile) -> list[str]:
    """The profile of a version as readable text lines (`bucketml profile`)."""
    rows = profile.rows or RowCounts()
    target = profile.target or TargetProfile()
    upload = _known(card.lineage.upload.name)
    task = target.task if target.task is not None else card.task
    lines = [
        f"{model} version {version}: {task} on '{target.name if target.name is not None else card.target}', from {upload}",
        (f"rows: {_known(rows.uploaded)} uploaded, {_known(rows.used)} used, "
         f"{_known(rows.train)} train / {_known(rows.test)} test"),
        "",
    ]
    columns = profile.columns
    width = min(32, max([len("column")] + [len(c.name) for c in columns]))
    lines.append(f"{'column':<{width}}  {'type':<9} {'missing':>8} {'distinct':>9}  summary")
    for col in columns:
        name = col.name if len(col.name) <= width else col.name[: width - 1] + "~"
        distinct = col.distinct if col.distinct is not None else ""
        lines.append(f"{name:<{width}}  {col.type!s:<9} {_share(col.missing_share):>8} {distinct:>9}  {col.summary(SUMMARY)}")
    if profile.dropped:
        lines += ["", "dropped columns:"]
        lines += [f"  {d.column:<{width}}  {d.reason}" for d in profile.dropped]
    if profile.warnings:
        lines += ["", "warnings:"] + [f"  ! {w}" for w in profile.warnings]
    if profile.notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in profile.notes]
    lines += ["", f"target '{target.name}' ({target.task}):"]
    if target.classes is not None:
        counts = target.classes
        total = sum(counts.values()) or 1
        label_width = max([5] + [len(k) for k in counts])
        lines.append(f"  {'class':<{label_width}}  {'rows':>7}  {'share':>6}")
        for label, count in sorted(counts.items(), key=lambda item: -item[1]):  # the card's keys are sorted
            lines.append(f"  {label:<{label_width}}  {count:>7}  {_share(count / total):>6}")
        if target.imbalance_ratio is not None:
            lines.append(f"  largest/smallest class ratio: {target.imbalance_ratio:.2f}")
        if target.training_only_classes:
            lines.append(f"  used for training only (too few rows to test): {', '.join(target.training_only_classes)}")
    else:
        lines.append("  " + target.summary(SUMMARY) + f", distinct {_known(target.distinct)}")
    return lines


@cli.command()
@click.argument("name")
@click.option("--version", type=int, help="A specific version instead of the current one.")
@bucket_option
def profile(name: str, version: int | None, bucket: str) -> None:
    """Show the data profile of model NAME's current version: columns, types, missing values,
    dropped columns with why, warnings and the target's distribution."""

    registry = Registry(_storage(bucket))
    version, card = _version_card(registry, name, version, "name one with --version")
    if card.profile is None or not card.profile.to_json_dict():
        raise Failure(f"version {version} of '{name}' has no profile (it was trained before profiles existed)")
    for line in render_profile(name, version, card, card.profile):
        click.echo(line)


@cli.command()
@click.argument("name")
@bucket_option
def drift(name: str, bucket: str) -> None:
    """Show how far the inputs served to model NAME's current version have moved from its training
    rows: each column's population stability index over every replica's recent windows, as the
    monitor computes it (above the spec's drift_threshold, a column counts as drifted)."""
    from bucketml.steps.monitor import ModelWatch, state_name

    registry = Registry(_storage(bucket))
    pointer = registry.current(name)
    if pointer.version is None:
        raise Failure(f"model '{name}' has no current version; upload a dataset first")
    found = ModelWatch(registry, name, sink="").drift_of(pointer)
    if found is None:
        raise Failure(f"version {pointer.version} of '{name}' has no reference distributions (it was trained "
                      "before they existed); retrain it to watch its inputs for drift")
    result, window = found
    if window:
        click.echo(f"{name} version {pointer.version}: {result.rows:,} served rows in every replica's last "
                   f"{window / 60:g} to {2 * window / 60:g} min; threshold {result.threshold:g}")
    else:
        click.echo(f"{name} version {pointer.version}: no served rows since its pointer last moved; "
                   f"threshold {result.threshold:g}")
    if not result.judged:
        click.echo(f"too few served rows to judge (the monitor waits for {MIN_DRIFT_ROWS})")
    width = max([len(column) for column in result.features] + [len("(predictions)"), len("column")])
    click.echo(f"{'column':<{width}}  {'PSI':>8}")
    drifting = set(result.drifting)
    for column, value in sorted(result.features.items(), key=lambda item: -(item[1] or 0)):
        figure = "-" if value is None else f"{value:.4f}"
        click.echo(f"{column:<{width}}  {figure:>8}{'  drifted' if column in drifting else ''}")
    prediction = "-" if result.prediction_psi is None else f"{result.prediction_psi:.4f}"
    click.echo(f"{'(predictions)':<{width}}  {prediction:>8}")
    try:
        episode = json.loads(registry.storage.read(state_name(name))).get("drift") or {}
    except (StorageError, ValueError):
        episode = {}
    if episode.get("version") == pointer.version and episode.get("open"):
        click.echo(f"drift episode open since {episode.get('started')}: {', '.join(episode.get('columns') or [])}")


def _version_card(registry: Registry, name: str, version: int | None, hint: str) -> tuple[int, ModelCard]:
    """The card of `version` of model `name`, or of its current version; one-line errors."""
    from bucketml.storage import NotFound

    try:
        check_model_name(name)
    except RegistryError as exc:
        raise Failure(str(exc)) from None
    if version is None:
        version = registry.current(name).version
        if version is None:
            if registry.versions(name):
                raise Failure(f"model '{name}' has no current version; {hint}")
            raise Failure(f"model '{name}' has no versions")
    try:
        return version, registry.model_card(name, version)
    except NotFound:
        raise Failure(f"model '{name}' has no version {version}") from None


# --- report --------------------------------------------------------------------------------
@cli.command()
@click.argument("name")
@click.argument("version", type=int, required=False)
@click.option("--open", "open_", is_flag=True, help="Also open it in the default web browser.")
@bucket_option
def report(name: str, version: int | None, open_: bool, bucket: str) -> None:
    """Print the path of report.html of model NAME's current version (or VERSION): one HTML file
    with the data profile, every candidate, plots of the errors, feature importance and the ONNX
    parity check. From a gs:// bucket it is downloaded to a temporary file first."""
    import tempfile

    from bucketml.storage import LocalStorage, NotFound

    storage = _storage(bucket)
    registry = Registry(storage)
    version, card = _version_card(registry, name, version, f"name one: bucketml report {name} VERSION")
    name_of_report = Registry.version_prefix(name, version) + "report.html"

    def missing() -> Failure:
        why = (f"it could not be rendered: {card.report_error}" if card.report_error
               else "it was trained before reports existed")
        return Failure(f"version {version} of '{name}' has no report ({why})")

    if isinstance(storage, LocalStorage):
        if not storage.exists(name_of_report):
            raise missing()
        path = storage.root / name_of_report
    else:
        try:
            data = storage.read(name_of_report)
        except NotFound:
            raise missing() from None
        with tempfile.NamedTemporaryFile(prefix=f"bucketml-{name}-v{version}-", suffix=".html", delete=False) as f:
            f.write(data)
        path = Path(f.name)
    click.echo(str(path))
    if open_ and click.launch(str(path)) != 0:
        click.echo("could not open a browser; open the file above yourself", err=True)


# --- promote / rollback / canary -----------------------------------------------------------
predict_url_option = click.option("--predict-url", envvar="BUCKETML_PREDICT_URL", default=config.predict_url(),
                                  show_default=True, help="A predict replica whose request counts go into the event.")


def announce(broker: str, event, fallback: str) -> None:
    """Post `event` to the broker; when it cannot take it, say so and what still happens (`fallback`)."""
    response = None
    try:
        response = events.post(broker.rstrip("/"), event)
        delivered = response.status_code < 300
    except requests.RequestException:
        delivered = False
    if response is not None and response.status_code == 401:
        click.echo(f"{unauthorized('the broker', broker, response).format_message()}; {fallback}")
    elif not delivered:
        click.echo(f"the broker at {broker} did not take the {event['type']} event; {fallback}")


def _announcer(broker: str):
    return lambda event, fallback: announce(broker, event, fallback)


@cli.command()
@click.argument("name")
@click.argument("version", type=int)
@bucket_option
@broker_option
@predict_url_option
def promote(name: str, version: int, bucket: str, broker: str, predict_url: str) -> None:
    """Make VERSION the current version of model NAME (when VERSION is its canary, this ends the canary)."""
    auth_headers()  # a token setting that cannot be read fails before anything moves
    steering.promote(Registry(_storage(bucket)), name, version, predict_url, "bucketml promote", click.echo,
                     _announcer(broker))


@cli.command()
@click.argument("name")
@click.option("--to", "to_version", type=int, help="The version to go back to (default: the one before the current).")
@bucket_option
@broker_option
@predict_url_option
def rollback(name: str, to_version: int | None, bucket: str, broker: str, predict_url: str) -> None:
    """Make an earlier version of model NAME current again; with a canary, remove the canary instead
    (the current version stays)."""
    registry = Registry(_storage(bucket))
    if registry.current(name).version is not None:
        auth_headers()  # a token setting that cannot be read fails before anything moves
    try:
        steering.rollback(registry, name, to_version, predict_url, "bucketml rollback", click.echo, _announcer(broker))
    except steering.SteeringRefused as exc:
        raise Failure(str(exc)) from None


@cli.command()
@click.argument("name")
@click.argument("version", type=int)
@click.option("--percent", type=click.IntRange(1, 99), required=True,
              help="The share of unpinned requests the canary answers, 1 to 99.")
@bucket_option
@broker_option
def canary(name: str, version: int, percent: int, bucket: str, broker: str) -> None:
    """Send PERCENT % of model NAME's unpinned requests to VERSION, on every predict replica, until
    `bucketml promote NAME VERSION` or `bucketml rollback NAME` ends it."""
    auth_headers()  # a token setting that cannot be read fails before anything moves
    steering.start_canary(Registry(_storage(bucket)), name, version, percent, click.echo, _announcer(broker))


@cli.command()
@click.argument("name")
@click.argument("version", type=int, required=False)
@click.option("--stop", is_flag=True, help="Stop the model's shadow instead.")
@bucket_option
@broker_option
@predict_url_option
def shadow(name: str, version: int | None, stop: bool, bucket: str, broker: str, predict_url: str) -> None:
    """Have VERSION score a copy of model NAME's unpinned /predict requests after they are answered,
    counting how often it agrees with the answer (predict's /metrics); --stop ends it."""
    if (version is None) == (not stop):
        raise Failure("name the shadow's VERSION, or give --stop (and no VERSION) to stop the shadow")
    auth_headers()  # a token setting that cannot be read fails before anything moves
    registry = Registry(_storage(bucket))
    if stop:
        ended, before = registry.end_shadow(name)
        decided = steering.figures(name, before, predict_url, kind="shadow")
        agreement = (f": agreed on {decided.agreeing_rows} of {decided.compared_rows} rows at {predict_url}"
                     if decided.compared_rows is not None else "")
        click.echo(f"{name}: shadow version {ended} stopped{agreement}")
        announce(broker, rollout_event(events.ROLLOUT_ROLLED_BACK, name, ended, before.version,
                                               registry.pointer_generation(name), decided, kind="shadow"), steering.NEXT_POLL)
        return
    pointer = registry.start_shadow(name, version)
    click.echo(f"{name}: shadow version {version} scores a copy of unpinned requests; version {pointer.version} answers them")
    announce(broker, rollout_event(events.ROLLOUT_STARTED, name, version, pointer.version, pointer.generation,
                                           steering.figures(name, pointer, None, kind="shadow"), kind="shadow"), steering.NEXT_POLL)


# --- predict -------------------------------------------------------------------------------
@cli.command()
@click.argument("name")
@click.argument("payload")
@click.option("--version", type=int, help="A specific version instead of the current one.")
@click.option("--url", envvar="BUCKETML_PREDICT_URL", default=config.predict_url(), show_default=True)
def predict(name: str, payload: str, version: int | None, url: str) -> None:
    """Predict with model NAME. PAYLOAD is JSON: a record, a list of records, {"records": [...]}
    or {"features": [[...]]}; @FILE reads it from a file and - from stdin."""
    if payload == "-":
        payload = sys.stdin.read()
    elif payload.startswith("@"):
        payload = Path(payload[1:]).read_text()
    try:
        body = json.loads(payload)
    except ValueError as exc:
        raise Failure(f"PAYLOAD is not valid JSON: {exc}") from None
    if isinstance(body, dict) and not ({"records", "features"} & body.keys()):
        body = {"records": [body]}
    elif isinstance(body, list):
        body = {"records": body}
    body["model"] = name
    if version is not None:
        body["version"] = version
    response = call("POST", url, "/predict", "the predict function", json=body, timeout=30,
                    when_down=f"the predict function is not running at {url}; start the platform with `bucketml dev`")
    if response.status_code != 200:
        raise Failure(f"HTTP {response.status_code}: {error_text(response)}")
    click.echo(json.dumps(response.json(), indent=2))


# --- events --------------------------------------------------------------------------------
@cli.group("events", invoke_without_command=True)
@click.option("--model", "-m", help="Only events of this model.")
@click.option("--type", "type_", help="Only events of this type.")
@click.option("--limit", default=50, show_default=True, help="Show the newest N.")
@broker_option
@click.pass_context
def events_command(ctx: click.Context, model: str | None, type_: str | None, limit: int, broker: str) -> None:
    """Show the events the broker accepted; `events dead` and `events replay` handle the
    events no subscriber could take."""
    if ctx.invoked_subcommand is not None:
        return
    filters = {k: v for k, v in {"model": model, "type": type_}.items() if v}
    found, after = [], 0
    while True:  # the broker pages oldest first; show the newest `limit`
        page = broker_events(broker, after=after, limit=1000, **filters)
        found.extend(page)
        if len(page) < 1000:
            break
        after = page[-1]["seq"]
    for event in found[-limit:]:
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        click.echo(f"{event['seq']:>6}  {event.get('time') or '':<28} {event['type']:<44} {event.get('subject') or ''}")
        if event["type"] != events.OBJECT_FINALIZED:
            click.echo(f"        {describe(event['type'], data).strip()}")


@events_command.command("dead")
@click.argument("dead_letter_id", required=False)
@bucket_option
def events_dead(dead_letter_id: str | None, bucket: str) -> None:
    """List the dead-letter store (deadletters/ in the bucket), or show one record in full."""
    from bucketml.steps import deadletter

    storage = _storage(bucket)
    if dead_letter_id:
        try:
            click.echo(json.dumps(deadletter.get(storage, dead_letter_id).record, indent=2))
        except deadletter.DeadLetterNotFound as exc:
            raise Failure(str(exc)) from None
        return
    found = list(deadletter.summaries(storage))
    if not found:
        click.echo("no dead letters: every event reached its subscribers")
        return
    for item in found:
        replays = f", replayed {item['replays']}x" if item["replays"] else ""
        died = f", dead {item['times']}x" if item["times"] > 1 else ""
        click.echo(f"{item['id']}  {item['first_dead_at']}  {item['type']:<44} {item['subject'] or ''}")
        click.echo(f"        to {item['destination'] or '?'}: HTTP {item['code'] or '-'}{died}{replays}")
    click.echo("show one with `bucketml events dead ID`; send one again with `bucketml events replay ID`")


@events_command.command("replay")
@click.argument("dead_letter_id")
@bucket_option
@broker_option
def events_replay(dead_letter_id: str, bucket: str, broker: str) -> None:
    """Send a dead letter to the broker again; it is routed by the Triggers as on first arrival
    (every bucketml handler is idempotent). The record stays, with the replay noted."""
    from bucketml.steps import deadletter

    storage = _storage(bucket)
    try:
        letter = deadletter.replay(storage, dead_letter_id, broker)
    except deadletter.DeadLetterNotFound as exc:
        raise Failure(str(exc)) from None
    except events.SinkUnavailable as exc:
        raise Failure(f"{exc}; is the platform running (`bucketml dev`)?") from None
    attrs = letter.attributes
    click.echo(f"replayed {letter.id}: {attrs.get('type')} {attrs.get('subject') or ''} (event id {attrs.get('id')}) to {broker}")


# --- deploy ------------------------------------------------------------------------------
@cli.command()
@click.option("--bucket", "gcs_bucket", required=True, help="The Google Cloud Storage bucket, gs://<name>.")
@click.option("--registry", required=True,
              help="Where the bucketml-<function> images are, e.g. europe-docker.pkg.dev/<project>/<repository>.")
@click.option("--tag", required=True, help="The images' tag (a release, e.g. 0.1.0).")
@click.option("--project", required=True,
              help="The Google Cloud project of the bucket's Pub/Sub notifications (--events pubsub) or of the Eventarc trigger.")
@click.option("--namespace", default="bucketml", show_default=True)
@click.option("--google-service-account", help="Workload Identity: the Google service account with access to the bucket.")
@click.option("--variant", type=click.Choice(["service", "jobsink"]), default="service", show_default=True,
              help="How training runs: in the train Knative Service, or as one Kubernetes Job per prepared dataset "
                   "through a Knative JobSink (infra/variants/prod-jobsink; Knative Eventing 1.14 or later).")
@click.option("--events", "event_source", type=click.Choice(["pubsub", "eventarc"]), default="pubsub", show_default=True,
              help="How uploads reach the Broker: the bundled GCS source pulling the bucket's Pub/Sub notifications, "
                   "or an Eventarc trigger you create (the GCS source is left out; the trigger to create is printed).")
@click.option("--apply/--dry-run", "apply_", default=False,
              help="Apply the manifests to the cluster; without it (or with --dry-run) print them as YAML.")
@click.option("--context", help="The kubeconfig context to apply to (default: the current one).")
@click.option("--wait", "wait_seconds", default=300.0, show_default=True, help="Seconds to wait for the Services to be Ready.")
def deploy(gcs_bucket: str, registry: str, tag: str, project: str, namespace: str, google_service_account: str | None,
           variant: str, event_source: str, apply_: bool, context: str | None, wait_seconds: float) -> None:
    """Render the Knative manifests (infra/knative) for one environment: Broker, Triggers,
    Services (or, with --variant jobsink, a JobSink for training), the GCS source (not with
    --events eventarc). With --apply, apply them, wait for the Services to be Ready and print
    their URLs."""
    from bucketml.cloud import deploy as deployment  # PyYAML only; nothing the other commands need

    settings = deployment.Settings(gcs_bucket, registry, tag, project, namespace, google_service_account, variant, event_source)
    try:
        objects = deployment.render(settings)
        left_out = deployment.left_out(settings)
    except deployment.DeployError as exc:
        raise Failure(str(exc)) from None
    instructions = deployment.eventarc_instructions(settings) if event_source == "eventarc" else []
    if not apply_:
        click.echo(deployment.to_yaml(objects), nl=False)
        for line in instructions:  # beside the YAML, not in it
            click.echo(line, err=True)
        return
    from urllib3.exceptions import HTTPError

    api = _kubernetes(context)
    try:
        deployment.ensure_token_secret(settings.namespace, api, echo=click.echo)
        deployment.apply(objects, api, echo=click.echo)
        urls = deployment.wait_ready(objects, api, timeout=wait_seconds)
    except deployment.DeployError as exc:
        raise Failure(str(exc)) from None
    except HTTPError as exc:
        raise Failure(f"the Kubernetes API at {api.configuration.host} is unreachable: {exc}") from None
    for name, url in sorted(urls.items()):
        click.echo(f"{name:<11} {url}")
    for api_version, kind, name in left_out:  # applying never deletes: an earlier deploy's may still run
        click.echo(f"not part of this deployment: {kind} {settings.namespace}/{name}; if an earlier deploy created it, "
                   f"delete it: kubectl delete {kind.lower()}.{api_version.split('/')[0]} {name} -n {settings.namespace}")
    for line in instructions:
        click.echo(line)


def _kubernetes(context: str | None):
    from kubernetes import config as kube_config

    try:
        return kube_config.new_client_from_config(context=context)
    except (kube_config.ConfigException, OSError) as exc:
        raise Failure(f"no usable Kubernetes configuration ({exc}); set KUBECONFIG, or leave out --apply to print the manifests") from None


@cli.command()
@click.option("--namespace", default="bucketml", show_default=True)
@click.option("--context", help="The kubeconfig context (default: the current one).")
def status(namespace: str, context: str | None) -> None:
    """The deployed Knative Services (with their revisions and traffic) and Triggers."""
    from kubernetes.client import ApiException
    from urllib3.exceptions import HTTPError

    from bucketml.cloud import deploy as deployment

    api = _kubernetes(context)
    try:
        lines = deployment.status(namespace, api)
    except ApiException as exc:
        raise Failure(f"the Kubernetes API refused to list namespace {namespace}: HTTP {exc.status}") from None
    except HTTPError as exc:
        raise Failure(f"the Kubernetes API at {api.configuration.host} is unreachable: {exc}") from None
    click.echo("\n".join(lines))


cli.add_command(batch.predict_batch)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except (StorageError, RegistryError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
