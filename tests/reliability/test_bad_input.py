"""Bad input never crashes anything.

Malformed CloudEvents (attributes missing or of the wrong type, unsupported specversions, data
that is not JSON or not an object, wrong content types, garbage bytes, deep nesting, bodies over
the limit, both content modes) go over real HTTP to the real preprocess and train functions
(functions-framework processes) and to the broker ingress (its own process, routing by the
real manifests to those functions). Each is answered with a 4xx whose JSON `error` names what
is wrong, or, for a well-formed event whose content is bad business, with the rejection or
failure event; never a 5xx, and never a hang (every request has a timeout). Then hypothesis
generates CloudEvent-ish requests (headers and bodies, valid and not) for all three: no 5xx,
no hang, the broker still answers afterwards, none of the deliveries it made of what it
accepted got a 5xx from a function, and no process logs a traceback or exits uncleanly.

The figures (cases tried, 5xx answers) are printed (run with -s).
BUCKETML_RELIABILITY_LONG=1 runs many more generated cases.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bucketml.storage import LocalStorage
from helpers import ROOT, Sink, free_port, function_server, predict_server, stop, wait_for_http, wait_until
from platform_support import broker_events

FINALIZED = "google.cloud.storage.object.v1.finalized"
PREPARED = "bucketml.dataset.prepared.v1"
PUBLISHED = "bucketml.model.published.v1"
REJECTED = "bucketml.dataset.rejected.v1"
FAILED = "bucketml.training.failed.v1"
MANIFESTS = ROOT / "infra" / "knative"
TIMEOUT = (5, 30)  # connect, read: a hang fails the test instead of stalling it
LONG = os.environ.get("BUCKETML_RELIABILITY_LONG") == "1"
EXAMPLES = {"broker": 3000 if LONG else 150, "function": 1500 if LONG else 100}
MAX_EVENT_BYTES = 10 * 1024 * 1024  # the broker's and the functions' limit for one request
FIGURES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


# --- the processes -------------------------------------------------------------------------------


def manifest_services(folder: Path) -> set[str]:
    """The Knative Services the Broker and Trigger manifests name (subscribers, dead-letter sinks)."""
    names = set()
    for path in folder.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") not in ("Broker", "Trigger"):
                continue
            spec = doc.get("spec") or {}
            refs = [
                (spec.get("subscriber") or {}).get("ref"),
                ((spec.get("delivery") or {}).get("deadLetterSink") or {}).get("ref"),
            ]
            names |= {ref["name"] for ref in refs if isinstance(ref, dict) and ref.get("kind") == "Service"}
    return names


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    """preprocess, train, deadletter, batch and predict as functions-framework processes over a folder
    bucket, the broker as its own process routing by the real manifests to them (a Service the
    manifests name that is none of these would be a recording sink)."""
    root = tmp_path_factory.mktemp("bad-input")
    storage = LocalStorage(root / "bucket")
    with (
        Sink() as sink,
        function_server("preprocess", storage.root, root) as preprocess,
        function_server("train", storage.root, root) as train,
        function_server("deadletter", storage.root, root) as deadletter,
        function_server("batch", storage.root, root) as batch,
        predict_server(storage.root, root) as predict,
    ):
        subscribers = {name: sink.url for name in manifest_services(MANIFESTS)}
        subscribers |= {"preprocess": preprocess.url, "train": train.url, "deadletter": deadletter.url, "predict": predict.url,
                        "batch": batch.url}
        port = free_port()
        log_path = root / "broker.log"
        with open(log_path, "wb") as log:
            broker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bucketml.local.broker",
                    "--manifests",
                    str(MANIFESTS),
                    "--db",
                    str(root / "broker.sqlite"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    *[arg for name, url in sorted(subscribers.items()) for arg in ("--subscriber", f"{name}={url}")],
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(url + "/healthz", broker, "the broker", log_path, timeout=30)
            with requests.Session() as session:
                yield {
                    "storage": storage,
                    "preprocess": preprocess.url,
                    "train": train.url,
                    "batch": batch.url,
                    "broker": url,
                    "session": session,
                }
        finally:
            code = stop(broker)
            text = log_path.read_text()
            print(text[-3000:])
        assert code == 0, f"the broker did not stop cleanly on SIGTERM ({code})"
        assert "Traceback" not in text, "the broker logged an unhandled error:\n" + text


def send(
    platform, target: str, headers: dict, body: bytes, method: str = "POST", figures: str | None = None
) -> requests.Response:
    """One request to `target`, counted in FIGURES[figures or target]."""
    url = platform[target] + ("/" if target == "broker" else "")
    counts = FIGURES[figures or target]
    started = time.monotonic()
    try:
        response = platform["session"].request(method, url, headers=headers, data=body, timeout=TIMEOUT)
    except requests.Timeout:
        counts["hangs"] += 1
        raise AssertionError(f"{target} did not answer within {TIMEOUT[1]}s") from None
    counts["cases"] += 1
    counts["5xx" if response.status_code >= 500 else f"{response.status_code // 100}xx"] += 1
    counts["slowest ms"] = max(counts["slowest ms"], int((time.monotonic() - started) * 1000))
    return response


def json_error(response: requests.Response) -> str:
    assert response.headers.get("Content-Type", "").startswith("application/json"), (response.status_code, response.text[:300])
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
    return body["error"]


def check_answer(target: str, response: requests.Response) -> None:
    """What every answer must be, whatever was sent: no 5xx; a 4xx names the problem in JSON; a
    success is what the broker (a stored event) or a function (a reply event or nothing) says."""
    assert response.status_code < 500, (target, response.status_code, response.text[:500])
    if response.status_code >= 400:
        json_error(response)
    elif target == "broker":
        assert response.status_code == 202 and isinstance(response.json().get("seq"), int), response.text[:300]
    elif response.status_code == 200:  # a reply event in binary mode
        assert response.headers.get("ce-type") and response.headers.get("ce-specversion") == "1.0", response.headers
    else:
        assert response.status_code == 202 and not response.content, (response.status_code, response.text[:300])


# --- malformed requests, one by one --------------------------------------------------------------


def binary(type_: str | None = FINALIZED, content_type: str | None = "application/json", **extra: str) -> dict:
    headers = {"ce-specversion": "1.0", "ce-id": "bad-1", "ce-source": "//tests/reliability", "ce-type": type_}
    headers |= {f"ce-{k}": v for k, v in extra.items()}
    if content_type:
        headers["Content-Type"] = content_type
    return {k: v for k, v in headers.items() if v is not None}


STRUCTURED = {"Content-Type": "application/cloudevents+json"}


def structured(drop: tuple[str, ...] = (), **attributes) -> bytes:
    document = {"specversion": "1.0", "id": "bad-1", "source": "//tests/reliability", "type": FINALIZED, "data": {}}
    document.update(attributes)
    return json.dumps({k: v for k, v in document.items() if k not in drop}).encode()


NOISE = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()

# name -> (headers, body, status, what the error must mention): malformed for everyone, as an envelope.
ENVELOPES = {
    "no body, no headers": ({}, b"", 400, "not a valid CloudEvent"),
    "garbage bytes": ({"Content-Type": "application/octet-stream"}, NOISE, 400, "not a valid CloudEvent"),
    "garbage bytes said to be structured": (STRUCTURED, NOISE, 400, "not a valid CloudEvent"),
    "plain text": ({"Content-Type": "text/plain"}, b"hello", 400, "not a valid CloudEvent"),
    "structured: a JSON list": (STRUCTURED, b"[1, 2, 3]", 400, "not a valid CloudEvent"),
    "structured: nested 100000 deep": (STRUCTURED, b"[" * 100_000, 400, "not a valid CloudEvent"),
    "structured: no type": (STRUCTURED, structured(drop=("type",)), 400, "type"),
    "structured: no id": (STRUCTURED, structured(drop=("id",)), 400, "id"),
    "structured: no source": (STRUCTURED, structured(drop=("source",)), 400, "source"),
    "structured: empty type": (STRUCTURED, structured(type=""), 400, "'type' is missing"),
    "structured: specversion 0.3": (STRUCTURED, structured(specversion="0.3"), 400, "specversion"),
    "structured: specversion 2.0": (STRUCTURED, structured(specversion="2.0"), 400, "specversion"),
    "structured: specversion a number": (STRUCTURED, structured(specversion=1.0), 400, "specversion"),
    "structured: type a number": (STRUCTURED, structured(type=5), 400, "'type' must be a string"),
    "structured: id a list": (STRUCTURED, structured(id=[1]), 400, "'id' must be a string"),
    "structured: source an object": (STRUCTURED, structured(source={"a": 1}), 400, "'source' must be a string"),
    "structured: subject a number": (STRUCTURED, structured(subject=3), 400, "'subject' must be a string"),
    "structured: time not a time": (STRUCTURED, structured(time="yesterday"), 400, "'time' must be an RFC 3339"),
    "structured: time in month 13": (STRUCTURED, structured(time="2024-13-01T00:00:00Z"), 400, "'time' must be an RFC 3339"),
    "structured: extension an object": (STRUCTURED, structured(bucketmlmodel={"a": 1}), 400, "'bucketmlmodel' must be"),
    "structured: extension a float": (STRUCTURED, structured(weight=0.5), 400, "'weight' must be"),
    "structured: extension name with a dot": (STRUCTURED, structured(**{"my.model": "x"}), 400, "attribute name 'my.model'"),
    "structured: data and data_base64": (STRUCTURED, structured(data_base64="e30="), 400, "data_base64"),
    "structured: data_base64 not base64": (STRUCTURED, structured(drop=("data",), data_base64="!!! not base64"), 400, "base64"),
    "structured: data_base64 a number": (STRUCTURED, structured(drop=("data",), data_base64=5), 400, "not a valid CloudEvent"),
    "binary: no ce-type": (binary(type_=None), b"{}", 400, "ce-type"),
    "binary: no ce-id, no ce-source": ({"ce-specversion": "1.0", "ce-type": FINALIZED}, b"{}", 400, "ce-id, ce-source"),
    "binary: specversion 0.3": (binary() | {"ce-specversion": "0.3"}, b"{}", 400, "specversion '0.3'"),
    "binary: specversion banana": (binary() | {"ce-specversion": "banana"}, b"{}", 400, "specversion"),
    "binary: time not a time": (binary(time="not a time"), b"{}", 400, "'time'"),
    "binary: extension name with a dash": (binary(**{"my-model": "x"}), b"{}", 400, "attribute name 'my-model'"),
    "binary: a newline in subject (percent-encoded)": (binary(subject="a%0Ab"), b"{}", 400, "control character"),
    "binary: subject not percent-encoded UTF-8": (binary(subject="caf%E9"), b"{}", 400, "percent-encoded UTF-8"),
    "structured: a newline in subject": (STRUCTURED, structured(subject="a\nb"), 400, "control character"),
    "structured: a lone surrogate in id": (STRUCTURED, structured(id="\ud800"), 400, "surrogate"),
    "a body over the limit": (binary(), b'{"pad": "' + b"x" * MAX_EVENT_BYTES + b'"}', 413, "bytes"),
}


@pytest.mark.parametrize("target", ["broker", "preprocess", "train", "batch"])
def test_malformed_envelopes_are_4xx_naming_the_problem(platform, target):
    for name, (headers, body, status, mentions) in ENVELOPES.items():
        response = send(platform, target, headers, body, figures=f"handwritten -> {target}")
        assert response.status_code == status, (name, response.status_code, response.text[:300])
        error = json_error(response)
        assert mentions in error, (name, error)
        assert len(error) < 2000, (name, "the error echoes the request", len(error))
    # The wrong method: not an event at all.
    response = send(platform, target, {}, b"", method="GET" if target != "broker" else "PUT", figures=f"handwritten -> {target}")
    assert response.status_code == 405, response.text[:300]
    json_error(response)
    report(f"handwritten -> {target}")


def prepared_json(model: str = "m", prefix: str = "prepared/m/r/", upload: dict | None = None) -> bytes:
    upload = {"bucket": "b", "name": "n", "generation": "1"} if upload is None else upload
    return json.dumps({"model": model, "prepared": prefix, "upload": upload}).encode()


# Well-formed events whose data is wrong: the functions refuse them (400, naming the field); the
# broker stores them (202: it carries data without reading it) and its delivery ends at a 400.
# name -> (content type, data, status from the function, what the error must mention)
DATA_FOR = {
    "preprocess": {
        "data not JSON": ("application/json", b"{not json", 400, "not JSON"),
        "data invalid UTF-8": ("application/json", b'{"name": "\xff"}', 400, "not JSON"),
        "data a JSON list": ("application/json", b"[]", 400, "JSON object"),
        "data nested 100000 deep": ("application/json", b"[" * 100_000, 400, "not JSON"),
        "data said to be an image": (
            "image/png",
            b'{"bucket": "b", "name": "datasets/m/a.csv", "generation": "1"}',
            400,
            "datacontenttype",
        ),
        "data said to be text": ("text/plain", b"{}", 400, "datacontenttype"),
        "data nested deep, said to be text": ("text/plain", b"[" * 100_000, 400, "datacontenttype"),
        "no bucket or name": ("application/json", b'{"generation": "1"}', 400, "'bucket' and 'name'"),
        "name a number": ("application/json", b'{"bucket": "bucket", "name": 5, "generation": "1"}', 400, "'bucket' and 'name'"),
        "generation not a number": (
            "application/json",
            b'{"bucket": "bucket", "name": "datasets/m/a.csv", "generation": "abc"}',
            400,
            "generation",
        ),
        "generation a fraction": (
            "application/json",
            b'{"bucket": "bucket", "name": "datasets/m/a.csv", "generation": 1.5}',
            400,
            "generation",
        ),
        "generation true": (
            "application/json",
            b'{"bucket": "bucket", "name": "datasets/m/a.csv", "generation": true}',
            400,
            "generation",
        ),
        "generation of 5000 digits": (
            "application/json",
            b'{"bucket": "bucket", "name": "datasets/m/a.csv", "generation": "' + b"9" * 5000 + b'"}',
            400,
            "generation",
        ),
        "name with NUL": (
            "application/json",
            b'{"bucket": "bucket", "name": "datasets/m/a\\u0000.csv", "generation": "1"}',
            400,
            "control character",
        ),
        "name with a lone surrogate": (
            "application/json",
            b'{"bucket": "bucket", "name": "datasets/m/\\ud800.csv", "generation": "1"}',
            400,
            "surrogate",
        ),
        "name over 1024 bytes": (
            "application/json",
            json.dumps({"bucket": "bucket", "name": "datasets/m/" + "a" * 2000 + ".csv", "generation": "1"}).encode(),
            400,
            "1024",
        ),
        "name part over 255 bytes": (
            "application/json",
            json.dumps({"bucket": "bucket", "name": "datasets/m/" + "a" * 300 + ".csv", "generation": "1"}).encode(),
            400,
            "bytes",
        ),
        # Well-formed, nothing to do: 202 with no body.
        "an object that does not exist": (
            "application/json",
            b'{"bucket": "bucket", "name": "datasets/m/gone.csv", "generation": "1"}',
            202,
            "",
        ),
        "an object outside datasets/": (
            "application/json",
            b'{"bucket": "bucket", "name": "models/m/current.json", "generation": "1"}',
            202,
            "",
        ),
    },
    "train": {
        "data not JSON": ("application/json", b"{not json", 400, "not JSON"),
        "data a JSON string": ("application/json", b'"model"', 400, "JSON object"),
        "data nested 100000 deep": ("application/json", b'{"a": ' * 100_000, 400, "not JSON"),
        "data said to be binary": ("application/octet-stream", b"{}", 400, "datacontenttype"),
        "nothing in it": ("application/json", b"{}", 400, "'model', 'prepared' and 'upload'"),
        "upload a list": ("application/json", b'{"model": "m", "prepared": "prepared/m/r/", "upload": []}', 400, "'upload'"),
        "upload empty": ("application/json", b'{"model": "m", "prepared": "prepared/m/r/", "upload": {}}', 400, "'upload'"),
        "upload of the wrong types": (
            "application/json",
            prepared_json(upload={"bucket": [1], "name": {}, "generation": None}),
            400,
            "'upload'",
        ),
        "model name invalid": ("application/json", prepared_json(model="../x", prefix="prepared/x/r/"), 400, "model name"),
        "prepared outside prepared/": ("application/json", prepared_json(prefix="../../"), 400, "prepared/m/"),
        "prepared of another model": ("application/json", prepared_json(prefix="prepared/other/r/"), 400, "prepared/m/"),
        "prepared with a part over 255 bytes": (
            "application/json",
            prepared_json(prefix=f"prepared/m/{'r' * 300}/"),
            400,
            "bytes",
        ),
    },
}
ACCEPTS = {"preprocess": FINALIZED, "train": PREPARED, "batch": FINALIZED}


@pytest.mark.parametrize("target", ["preprocess", "train"])
def test_wrong_data_is_refused_by_the_function_and_carried_by_the_broker(platform, target):
    unknown = send(platform, target, binary(type_="com.example.unknown.v1"), b"{}", figures=f"handwritten -> {target}")
    assert unknown.status_code == 400 and f"handles {ACCEPTS[target]} events" in json_error(unknown)
    for name, (content_type, data, status, mentions) in DATA_FOR[target].items():
        response = send(platform, target, binary(ACCEPTS[target], content_type), data, figures=f"handwritten -> {target}")
        assert response.status_code == status, (name, response.status_code, response.text[:300])
        if status >= 400:
            error = json_error(response)
            assert mentions in error, (name, error)
            assert len(error) < 2000, (name, "the error echoes the request", len(error))
        else:
            assert not response.content
    # The broker stores what is a CloudEvent, whatever its data or type; delivering it is the functions' business.
    for name, (content_type, data, _, _) in DATA_FOR[target].items():
        response = send(platform, "broker", binary(ACCEPTS[target], content_type), data, figures="handwritten -> broker")
        assert response.status_code == 202, (name, response.status_code, response.text[:300])
    assert (
        send(platform, "broker", binary(type_="com.example.unknown.v1"), b"{}", figures="handwritten -> broker").status_code
        == 202
    )
    report(f"handwritten -> {target}")
    report("handwritten -> broker")


def delivered(platform, seq: int) -> list[dict]:
    """The deliveries of event `seq` once each was attempted (else [])."""
    found = requests.get(f"{platform['broker']}/events/{seq}", timeout=10).json()["deliveries"]
    return found if found and all(d["attempts"] >= 1 for d in found) else []


def test_any_attribute_value_travels_through_the_broker(platform):
    """An attribute outside Latin-1 (an object name in Japanese, say), an integer or a boolean is
    fine in structured mode; the broker delivers it in binary mode (percent-encoded, in canonical
    form), and the function reads it back."""
    name = "datasets/m/データ 100%.csv"
    body = structured(subject=f"objects/{name}", data={"bucket": "bucket", "name": name, "generation": "5"}, count=5, fresh=True)
    accepted = send(platform, "broker", STRUCTURED, body, figures="handwritten -> broker")
    assert accepted.status_code == 202, accepted.text
    deliveries = wait_until(lambda: delivered(platform, accepted.json()["seq"]), "the event to be delivered", timeout=15)
    # Every upload event goes to preprocess and to batch (which leaves objects outside batch/ alone).
    assert sorted((d["trigger"], d["status"], d["last_error"]) for d in deliveries) == [
        ("batch-on-upload", "delivered", None), ("preprocess-on-upload", "delivered", None)]
    assert (
        requests.get(f"{platform['broker']}/events/{accepted.json()['seq']}", timeout=10).json()["subject"] == f"objects/{name}"
    )


def test_bad_business_content_is_a_reply_event_not_an_error(platform):
    """A well-formed event about bad content: the reply is the rejection or failure event."""
    storage = platform["storage"]
    info = storage.write("datasets/noise/noise.csv", NOISE, content_type="text/csv")
    response = send(platform, "preprocess", binary(FINALIZED), json.dumps(info.event_data()).encode())
    assert response.status_code == 200 and response.headers["ce-type"] == REJECTED, (response.status_code, response.text[:300])
    assert response.json()["reason"] == "not_csv" and response.json()["upload"]["name"] == "datasets/noise/noise.csv"

    upload = {"bucket": storage.bucket_name, "name": "datasets/noise/gone.csv", "generation": "1"}
    data = {"model": "noise", "run": "r1", "prepared": "prepared/noise/r1/", "upload": upload}
    response = send(platform, "train", binary(PREPARED), json.dumps(data).encode())
    assert response.status_code == 200 and response.headers["ce-type"] == FAILED, (response.status_code, response.text[:300])
    assert response.json()["reason"] == "prepared_data_missing"


# --- generated requests --------------------------------------------------------------------------

# Header values as HTTP carries them: printable Latin-1, not starting with a space.
HEADER_TEXT = st.text(st.characters(codec="latin-1", categories=["L", "N", "P", "S", "Zs"]), max_size=30).map(str.lstrip)
HEADER_NAMES = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-ABCZ"), min_size=1, max_size=12)
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
CONTENT_TYPES = (
    st.sampled_from(
        [
            None,
            "application/json",
            "application/cloudevents+json",
            "application/json; charset=utf-8",
            "text/plain",
            "application/octet-stream",
            "image/png",
            "application/cloudevents-batch+json",
        ]
    )
    | HEADER_TEXT
)
TYPES = [FINALIZED, PREPARED, PUBLISHED, "com.example.other.v1"]
NAMES = st.sampled_from(
    ["datasets/m/a.csv", "datasets/noise/noise.csv", "models/m/current.json", "datasets/m/", "../x"]
) | st.text(max_size=40)
GENERATIONS = st.sampled_from(["1", "0", "-1", "abc", "1.5", "9" * 30]) | st.integers() | st.floats() | st.booleans() | st.none()


def maybe(strategy):
    """A key's value, or None for 'leave the key out'."""
    return st.none() | strategy


def usually(good, other):
    """Mostly `good` (so that requests get past the first check into what lies behind it), else `other`."""
    return st.sampled_from(["good"] * 4 + ["other"]).flatmap(lambda pick: good if pick == "good" else other)


ABSENT = st.just(None)
EXTENSION_NAMES = usually(st.text(st.sampled_from("abcxyz019"), min_size=1, max_size=8), HEADER_NAMES)


@st.composite
def storage_data(draw):
    fields = {
        "bucket": usually(st.just("bucket"), JSON_VALUES),
        "name": usually(NAMES, JSON_VALUES),
        "generation": usually(GENERATIONS, ABSENT),
        "size": maybe(st.sampled_from(["10", "x"]) | JSON_VALUES),
    }
    return {k: v for k, v in ((k, draw(s)) for k, s in fields.items()) if v is not None}


@st.composite
def prepared_data(draw):
    upload = draw(
        usually(
            st.fixed_dictionaries({"bucket": usually(st.just("bucket"), JSON_VALUES), "name": NAMES, "generation": GENERATIONS}),
            JSON_VALUES,
        )
    )
    fields = {
        "model": usually(st.sampled_from(["m", "noise"]), st.sampled_from(["bad name", ""]) | JSON_VALUES | ABSENT),
        "prepared": usually(
            st.sampled_from(["prepared/m/r/", "prepared/noise/r1/"]),
            st.sampled_from(["../", "prepared/m/", "prepared/noise/r1"]) | st.text(max_size=40) | ABSENT,
        ),
        "upload": usually(st.just(upload), ABSENT),
        "run": maybe(JSON_VALUES),
    }
    return {k: v for k, v in ((k, draw(s)) for k, s in fields.items()) if v is not None}


def data_bodies(type_: str):
    shaped = storage_data() if type_ == FINALIZED else prepared_data()
    return usually(
        shaped.map(lambda d: json.dumps(d).encode()),
        JSON_VALUES.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=200) | st.just(b"[" * 5000),
    )


@st.composite
def binary_requests(draw, types: list[str]):
    type_ = draw(usually(st.sampled_from(types), HEADER_TEXT | ABSENT))
    attributes = {
        "specversion": usually(st.just("1.0"), st.sampled_from(["0.3", "1", "", "2.0"]) | HEADER_TEXT | ABSENT),
        "id": usually(st.just("fuzz-1"), HEADER_TEXT | ABSENT),
        "source": usually(st.just("//fuzz"), HEADER_TEXT | ABSENT),
        "type": st.just(type_),
        "time": usually(
            st.sampled_from(["2024-05-01T10:30:00Z", "2024-05-01T10:30:00.123456+02:00"]) | ABSENT,
            st.sampled_from(["2024-02-30T00:00:00Z", "yesterday"]) | HEADER_TEXT,
        ),
        "subject": HEADER_TEXT | ABSENT,
        "bucketmlmodel": HEADER_TEXT | ABSENT,
    }
    headers = {f"ce-{name}": value for name, strategy in attributes.items() if (value := draw(strategy)) is not None}
    headers |= draw(st.dictionaries(EXTENSION_NAMES.map(lambda n: "ce-" + n), HEADER_TEXT, max_size=2))
    content_type = draw(usually(st.sampled_from(["application/json", "application/json; charset=utf-8"]), CONTENT_TYPES))
    if content_type is not None:
        headers["Content-Type"] = content_type
    return headers, draw(data_bodies(type_ if type_ in (FINALIZED, PREPARED) else FINALIZED))


@st.composite
def structured_requests(draw, types: list[str]):
    type_ = draw(usually(st.sampled_from(types), JSON_VALUES))
    attributes = {
        "specversion": usually(st.just("1.0"), st.sampled_from(["0.3", "1", 1.0]) | JSON_VALUES | ABSENT),
        "id": usually(st.just("fuzz-1"), JSON_VALUES | ABSENT),
        "source": usually(st.just("/fuzz"), JSON_VALUES | ABSENT),
        "type": st.just(type_),
        "time": usually(st.just("2024-05-01T10:30:00Z") | ABSENT, HEADER_TEXT | JSON_VALUES),
        "datacontenttype": usually(st.just("application/json") | ABSENT, CONTENT_TYPES),
        "subject": usually(st.text(max_size=20) | ABSENT, JSON_VALUES),
        "bucketmlmodel": usually(st.text(max_size=20) | ABSENT, JSON_VALUES),
    }
    document = {name: value for name, strategy in attributes.items() if (value := draw(strategy)) is not None}
    document |= draw(st.dictionaries(EXTENSION_NAMES, usually(st.text(max_size=10) | st.integers(), JSON_VALUES), max_size=2))
    data_type = type_ if type_ in (FINALIZED, PREPARED) else FINALIZED
    kind = draw(st.sampled_from(["data", "data", "data_base64", "both", "none"]))
    if kind in ("data", "both"):
        document["data"] = draw(usually(storage_data() if data_type == FINALIZED else prepared_data(), JSON_VALUES))
    if kind in ("data_base64", "both"):
        raw = draw(data_bodies(data_type))
        document["data_base64"] = draw(usually(st.just(base64.b64encode(raw).decode()), JSON_VALUES))
    content_type = draw(
        usually(st.sampled_from(["application/cloudevents+json", "application/cloudevents+json; charset=utf-8"]), CONTENT_TYPES)
    )
    headers = {} if content_type is None else {"Content-Type": content_type}
    return headers, json.dumps(document, ensure_ascii=draw(st.booleans())).encode()


def requests_for(types: list[str]):
    raw = st.tuples(CONTENT_TYPES.map(lambda c: {} if c is None else {"Content-Type": c}), st.binary(max_size=500))
    return binary_requests(types) | structured_requests(types) | raw


FUZZ = {
    "deadline": None,
    "database": None,
    "derandomize": not LONG,
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}


def report(key: str) -> None:
    figures = FIGURES[key]
    print(
        f"\nFIGURES {key}: {figures['cases']} requests, {figures['5xx']} answered 5xx, "
        f"{figures['hangs']} hangs; 2xx {figures['2xx']}, 4xx {figures['4xx']}; slowest {figures['slowest ms']} ms"
    )


def test_generated_requests_to_the_broker_ingress(platform):
    @settings(max_examples=EXAMPLES["broker"], **FUZZ)
    @given(requests_for(TYPES))
    def ingress(request):
        headers, body = request
        check_answer("broker", send(platform, "broker", headers, body, figures="generated -> broker"))

    try:
        ingress()
    finally:
        report("generated -> broker")
    # The broker still answers, and still takes a good event.
    broker = platform["broker"]
    assert requests.get(broker + "/healthz", timeout=5).json() == {"status": "ok"}
    good = send(platform, "broker", binary(PUBLISHED), json.dumps({"model": "m", "version": 1}).encode())
    assert good.status_code == 202

    # What it accepted it delivered (to the real functions for their types): none of those deliveries got a 5xx.
    accepted = broker_events(broker)
    routed = [e["seq"] for e in accepted if e["type"] in (FINALIZED, PREPARED, PUBLISHED)]
    assert routed, "no generated event was of a routed type"

    def deliveries() -> list[dict]:
        found = [delivered(platform, seq) for seq in routed]
        return [d for each in found for d in each] if all(found) else []

    made = wait_until(deliveries, "every routed event to be delivered once", timeout=30)
    server_errors = [d for d in made if re.match(r"HTTP 5\d\d", d["last_error"] or "")]
    print(
        f"FIGURES broker deliveries of generated events: {len(made)} to {len(routed)} routed events, {len(server_errors)} got a 5xx"
    )
    assert not server_errors, server_errors[:3]


@pytest.mark.parametrize("target", ["preprocess", "train", "batch"])
def test_generated_requests_to_the_functions(platform, target):
    types = [ACCEPTS[target], ACCEPTS[target], *TYPES]  # mostly the function's own type, to get past the first check

    @settings(max_examples=EXAMPLES["function"], **FUZZ)
    @given(requests_for(types))
    def function(request):
        headers, body = request
        check_answer(target, send(platform, target, headers, body, figures=f"generated -> {target}"))

    try:
        function()
    finally:
        report(f"generated -> {target}")
    # Still answering: a well-formed event is answered as it was before the fuzzing.
    if target == "preprocess":  # about a missing object: acknowledged
        still = send(
            platform, "preprocess", binary(FINALIZED), b'{"bucket": "bucket", "name": "datasets/m/gone.csv", "generation": "7"}'
        )
        assert still.status_code == 202, (still.status_code, still.text[:300])
    else:  # about prepared data that is missing: the failure event
        upload = {"bucket": platform["storage"].bucket_name, "name": "datasets/noise/gone.csv", "generation": "1"}
        data = {"model": "noise", "run": "r1", "prepared": "prepared/noise/r1/", "upload": upload}
        still = send(platform, "train", binary(PREPARED), json.dumps(data).encode())
        assert still.status_code == 200 and still.headers["ce-type"] == FAILED, (still.status_code, still.text[:300])
        assert still.json()["reason"] == "prepared_data_missing"
