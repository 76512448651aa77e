"""`bucketml predict-batch`: score a CSV file with a model's current version, through the bucket.

The file is uploaded to batch/<model>/<file name>; the batch function scores it and announces
bucketml.batch.completed.v1 (or .failed.v1), which this command follows in the broker's event
log, as `bucketml upload` follows a dataset; then it downloads predictions/<model>/<file name>.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import click

from bucketml import settings as config
from bucketml.contracts import events
from bucketml.local.client import Failure, broker_events, is_running
from bucketml.registry.model_registry import RegistryError, check_model_name
from bucketml.storage import NotFound, Storage, open_storage

DOWNLOAD_BLOCK = 1 << 20


@click.command("predict-batch")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "-m", required=True, help="The model whose current version scores the rows.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the predictions (default: <file stem>.predictions.csv beside FILE).")
@click.option("--force", is_flag=True, help="Replace --output if it exists.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait for the scoring and download the predictions.")
@click.option("--timeout", default=1800.0, show_default=True, help="Seconds to wait for the scoring.")
@click.option("--bucket", envvar="BUCKETML_BUCKET", default=config.DEFAULT_BUCKET, show_default=True,
              help="Local bucket folder, or gs://BUCKET.")
@click.option("--broker", envvar="BUCKETML_BROKER_URL", default=config.broker_url(), show_default=True,
              help="Broker ingress URL.")
def predict_batch(file: Path, model: str, output: Path | None, force: bool, wait: bool, timeout: float, bucket: str,
                  broker: str) -> None:
    """Score every row of the CSV FILE with the current version of a model.

    FILE is uploaded to batch/<model>/<file name> in the bucket; the batch function writes
    predictions/<model>/<file name>: FILE's rows as sent, plus `prediction` and, for a
    classifier, one `probability_<class>` column per class. This command waits for it and
    downloads it to --output. A file the model cannot score ends with the reason and exit code 1."""
    try:
        check_model_name(model)
    except RegistryError as exc:
        raise Failure(str(exc)) from None
    if not file.name.lower().endswith(".csv"):
        raise Failure(f"{file.name}: the batch function scores files named <name>.csv; rename the file (it must be CSV)")
    output = output or file.with_name(f"{file.name[:-len('.csv')]}.predictions.csv")
    if wait and output.exists() and not force:
        raise Failure(f"{output} exists; nothing was uploaded: pass --force to replace it, or --output another path")
    name = f"batch/{model}/{file.name}"
    predictions = f"predictions/{model}/{file.name}"
    storage = open_storage(bucket)
    if storage.exists(predictions):  # the batch function would refuse it (output_exists): say so before uploading
        raise Failure(f"{predictions} already exists in {storage.url} (from an earlier upload of {file.name}) and "
                      "predictions are never overwritten; nothing was uploaded: delete that object, or rename the file")
    info = storage.write_file(name, file, content_type="text/csv")
    click.echo(f"uploaded   {name} (generation {info.generation}, {info.size} bytes)")
    if not wait:
        click.echo(f"the predictions will be {predictions} in the bucket")
        return
    if not is_running(broker):
        click.echo(f"the platform is not running at {broker}; `bucketml dev` will score the file when it starts, "
                   f"into {predictions}")
        return
    outcome = wait_for_batch(broker, model, name, info.generation, timeout)
    data = outcome["data"]
    if outcome["type"] == events.BATCH_FAILED:
        click.echo(f"error: not scored: {data.get('reason')}: {data.get('message')}", err=True)
        sys.exit(1)
    download(storage, data["output"], output, force)
    click.echo(f"scored     {data['rows']} rows with {model} version {data['version']} in {data['seconds']:.3f} s "
               f"-> {output}")


def wait_for_batch(broker: str, model: str, name: str, generation: int, timeout: float) -> dict:
    """The batch.completed or batch.failed event of object `name` at `generation`."""
    deadline = time.monotonic() + timeout
    after = 0
    while time.monotonic() < deadline:
        for event in broker_events(broker, after=after, limit=1000, model=model):
            after = max(after, event["seq"])
            data = event.get("data") if isinstance(event.get("data"), dict) else {}
            if (event["type"] in events.BATCH_OUTCOMES and data.get("input") == name
                    and str(data.get("generation")) == str(generation)):
                return event
        time.sleep(0.2)
    raise Failure(f"{name} was not scored within {timeout:.0f}s; follow it with `bucketml events --model {model}`")


def download(storage: Storage, name: str, path: Path, force: bool) -> None:
    """The object `name` copied to `path`: written beside it first, then moved in whole (with
    `force`) or linked in only if `path` still does not exist."""
    path = path.resolve()
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, storage.open(name) as source:
            while block := source.read(DOWNLOAD_BLOCK):
                out.write(block)
        if force:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)
            except FileExistsError:
                raise Failure(f"{path} appeared meanwhile; the predictions stay in the bucket as {name}: "
                              "pass --force to replace the file") from None
    except NotFound:
        raise Failure(f"{name} was announced but is gone from the bucket (deleted meanwhile?)") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
