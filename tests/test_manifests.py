"""The Knative manifests, as a cluster receives them: every overlay under infra/overlays is
built with `kubectl kustomize` (the base is infra/knative) and checked for what a deployment
relies on, for the same event topology as the local broker's, and against the Kubernetes
schemas of its core parts."""

from __future__ import annotations

import copy
import json
import functools
import math
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.utils import parse_quantity

from bucketml.local.broker import load_topology, parse_duration

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "infra" / "knative"
OVERLAYS = ROOT / "infra" / "overlays"
EXAMPLE_SUBSCRIBER = ROOT / "infra" / "examples" / "published-subscriber.yaml"
OVERLAY_NAMES = sorted(path.parent.name for path in OVERLAYS.glob("*/kustomization.yaml"))

# What each environment promises; a new overlay needs its line here.
EXPECTED = {
    "dev": {"namespace": "bucketml-dev", "tag": "dev", "predict_min_scale": 0},
    "prod": {"namespace": "bucketml", "tag": "0.1.0", "predict_min_scale": 1},
}
FUNCTIONS = ("preprocess", "train", "predict", "deadletter", "monitor", "batch", "console")
SUBSCRIBERS = {name: f"http://{name}.test" for name in FUNCTIONS}  # Service name -> base URL, for load_topology
BROKER_INGRESS = "http://broker-ingress.knative-eventing.svc.cluster.local"  # Knative's MT-channel-based broker
SERVING, EVENTING = "serving.knative.dev/v1", "eventing.knative.dev/v1"
# RevisionSpec = a PodSpec plus these Knative fields.
REVISION_FIELDS = {"containerConcurrency", "timeoutSeconds", "responseStartTimeoutSeconds", "idleTimeoutSeconds"}
SCALE = "autoscaling.knative.dev/"


def _kustomize() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


@functools.cache
def _rendered(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*_kustomize(), str(folder)], capture_output=True, text=True, timeout=60, check=False)


def build(folder: Path) -> tuple[dict, ...]:
    """The objects `kubectl kustomize FOLDER` renders (run once per folder)."""
    if _kustomize() is None:
        pytest.skip("kubectl (which embeds kustomize) is not installed, nor kustomize: the Knative overlays cannot be built")
    done = _rendered(folder)
    assert done.returncode == 0, f"`{' '.join(done.args[:-1])} {folder.relative_to(ROOT)}` failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def overlay(name: str) -> tuple[dict, ...]:
    return build(OVERLAYS / name)


def of_kind(docs, api_version: str, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["apiVersion"] == api_version and d["kind"] == kind}


def services(docs) -> dict[str, dict]:
    return of_kind(docs, SERVING, "Service")


def container(service: dict) -> dict:
    containers = service["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"Service {service['metadata']['name']}: one container expected"
    return containers[0]


def env(service: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container(service).get("env", [])}


def annotations(service: dict) -> dict[str, str]:
    return service["spec"]["template"].get("metadata", {}).get("annotations", {})


def source_topology() -> list[dict]:
    """The Broker and Trigger documents of infra/knative/*.yaml: what the local broker reads."""
    docs = [d for path in sorted(BASE.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text())]
    return [d for d in docs if isinstance(d, dict) and d.get("apiVersion") == EVENTING and d.get("kind") in ("Broker", "Trigger")]


by_overlay = pytest.mark.parametrize("name", OVERLAY_NAMES)


def test_every_overlay_is_described():
    assert OVERLAY_NAMES, "no overlay under infra/overlays"
    assert set(OVERLAY_NAMES) == set(EXPECTED), "add the overlay's namespace, image tag and predict min-scale to EXPECTED"


def test_the_base_builds_without_a_namespace():
    docs = build(BASE)
    assert set(services(docs)) == set(FUNCTIONS)
    assert all("namespace" not in d["metadata"] for d in docs), "the overlays choose the namespace, not the base"


@by_overlay
def test_overlay_has_the_platform(name):
    docs = overlay(name)
    local = load_topology(BASE, SUBSCRIBERS)
    assert set(services(docs)) == set(FUNCTIONS)
    assert set(of_kind(docs, EVENTING, "Broker")) == set(local.brokers) == {"default"}
    assert set(of_kind(docs, EVENTING, "Trigger")) == {t.name for t in local.triggers}
    assert len(local.triggers) == 4
    assert set(of_kind(docs, "v1", "ServiceAccount")) == {"bucketml"}
    for service in services(docs).values():
        assert service["spec"]["template"]["spec"]["serviceAccountName"] == "bucketml"


@by_overlay
def test_overlay_namespace_and_images(name):
    docs, expected = overlay(name), EXPECTED[name]
    for doc in docs:
        assert doc["metadata"].get("namespace") == expected["namespace"], f"{doc['kind']} {doc['metadata']['name']}"
    for function, service in services(docs).items():
        image = container(service)["image"]
        assert "@" not in image, f"{function}: {image}"
        repository, _, tag = image.rpartition(":")
        assert repository.rpartition("/")[2] == f"bucketml-{function}", f"{function} runs {image}"
        assert tag == expected["tag"], f"{function} runs {image}"
        assert annotations(service).get(f"{SCALE}metric") == "concurrency"


@by_overlay
def test_predict_is_ready_only_with_a_model_and_runs_one_worker_per_core(name):
    docs = overlay(name)
    predict = container(services(docs)["predict"])
    assert predict["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert predict["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"

    workers = env(services(docs)["predict"])["WORKERS"]
    field = workers["valueFrom"]["resourceFieldRef"]
    assert field["resource"] == "limits.cpu" and field.get("divisor") == "1" and "value" not in workers
    assert field.get("containerName", predict["name"]) == predict["name"]
    # What the kubelet puts in WORKERS: the limit in whole cores, rounded up.
    assert math.ceil(parse_quantity(predict["resources"]["limits"]["cpu"])) >= 1

    assert env(services(docs)["predict"])["FUNCTION_USE_ASGI"]["value"] == "true"
    for function in ("preprocess", "train"):  # WSGI functions: --asgi would break them
        assert "FUNCTION_USE_ASGI" not in env(services(docs)[function])

    scale = annotations(services(docs)["predict"])
    assert int(scale[f"{SCALE}min-scale"]) == EXPECTED[name]["predict_min_scale"]


@by_overlay
def test_autoscaling_settings_are_consistent(name):
    for function, service in services(overlay(name)).items():
        scale, spec = annotations(service), service["spec"]["template"]["spec"]
        low, high = int(scale.get(f"{SCALE}min-scale", 0)), int(scale.get(f"{SCALE}max-scale", 0))
        assert low >= 0 and (high == 0 or low <= high), f"{function}: min-scale {low}, max-scale {high}"
        concurrency = spec.get("containerConcurrency", 0)
        if f"{SCALE}target" in scale and concurrency:
            # Knative silently caps a soft target above the hard limit.
            assert int(scale[f"{SCALE}target"]) <= concurrency, function
    train = services(overlay(name))["train"]["spec"]["template"]["spec"]
    assert train["containerConcurrency"] == 1


KUSTOMIZATIONS = sorted(path.parent.relative_to(ROOT).as_posix() for path in (ROOT / "infra").rglob("kustomization.yaml"))


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_a_trigger_with_its_own_delivery_names_the_dead_letter_sink_and_backoff(folder):
    """On Knative a Trigger's own spec.delivery replaces the Broker's whole (the Broker's applies
    only to Triggers without one). A Trigger that sets, say, only a timeout would lose the
    dead-letter sink and the backoff, and a failed event would be dropped."""
    docs = build(ROOT / folder)
    [broker] = of_kind(docs, EVENTING, "Broker").values()
    assert broker["spec"]["delivery"]["deadLetterSink"]["ref"]["name"] == "deadletter"
    triggers = of_kind(docs, EVENTING, "Trigger")
    assert triggers, f"{folder}: no Trigger rendered"
    for name, trigger in triggers.items():
        delivery = trigger["spec"].get("delivery")
        if delivery is None:
            continue  # the Broker's delivery applies
        missing = [key for key in ("deadLetterSink", "retry", "backoffPolicy", "backoffDelay") if key not in delivery]
        assert not missing, f"{folder}: Trigger {name} has its own delivery without {', '.join(missing)}"
        assert delivery["deadLetterSink"] == broker["spec"]["delivery"]["deadLetterSink"], name


@by_overlay
def test_every_subscriber_outlives_its_trigger_delivery_timeout(name, tmp_path):
    docs = overlay(name)
    (tmp_path / "built.yaml").write_text(yaml.safe_dump_all(docs))
    topology = load_topology(tmp_path, SUBSCRIBERS)
    for trigger_name, trigger in of_kind(docs, EVENTING, "Trigger").items():
        ref = trigger["spec"]["subscriber"]["ref"]
        assert (ref["apiVersion"], ref["kind"]) == (SERVING, "Service") and ref["name"] in services(docs), trigger_name
        timeout = topology.trigger(trigger_name).delivery.timeout
        # Without a delivery timeout the Broker waits as long as the Service allows.
        if timeout is not None:
            allowed = services(docs)[ref["name"]]["spec"]["template"]["spec"].get("timeoutSeconds", 300)
            assert allowed >= timeout, f"{ref['name']}: timeoutSeconds {allowed} < {trigger_name}'s delivery timeout {timeout:g} s"
    assert topology.trigger("train-on-prepared").delivery.timeout == 1800


@by_overlay
def test_settings_of_each_environment(name):
    docs, namespace = overlay(name), EXPECTED[name]["namespace"]
    base_bucket = env(services(build(BASE))["predict"])["BUCKETML_BUCKET"]["value"]
    buckets = {function: env(service)["BUCKETML_BUCKET"]["value"] for function, service in services(docs).items()}
    assert len(set(buckets.values())) == 1, f"every function must use the same bucket: {buckets}"
    bucket = buckets["predict"]
    assert bucket.startswith("gs://") and bucket != base_bucket, f"{name} does not set its bucket: {bucket}"
    for function, service in services(docs).items():
        assert env(service)["BUCKETML_LOG_FORMAT"]["value"] == "json", function
    # kustomize's namespace does not reach into this URL: each overlay must set it.
    broker = next(iter(of_kind(docs, EVENTING, "Broker")))
    assert env(services(docs)["train"])["BUCKETML_BROKER_URL"]["value"] == f"{BROKER_INGRESS}/{namespace}/{broker}"
    account = of_kind(docs, "v1", "ServiceAccount")["bucketml"]
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")


@by_overlay
def test_one_topology_two_engines(name, tmp_path):
    """The Triggers a cluster gets are the ones `bucketml dev` routes by: a Trigger added to
    infra/knative but not to the base's resources, or added by an overlay, fails here."""
    docs = overlay(name)
    (tmp_path / "built.yaml").write_text(yaml.safe_dump_all(docs))
    built, local = load_topology(tmp_path, SUBSCRIBERS), load_topology(BASE, SUBSCRIBERS)
    assert dict(built.brokers) == dict(local.brokers)
    # Trigger: name, broker, filter attributes, subscriber URL (service and path), delivery.
    assert sorted(built.triggers, key=lambda t: t.name) == sorted(local.triggers, key=lambda t: t.name)
    # And field for field, so that nothing the local broker does not read differs either.
    source = {(d["kind"], d["metadata"]["name"]): d["spec"] for d in source_topology()}
    assert {(d["kind"], d["metadata"]["name"]): d["spec"] for d in docs if d["apiVersion"] == EVENTING} == source


def test_example_subscriber_is_a_valid_trigger_outside_the_base(tmp_path):
    (example,) = [d for d in yaml.safe_load_all(EXAMPLE_SUBSCRIBER.read_text()) if d]
    assert (example["apiVersion"], example["kind"]) == (EVENTING, "Trigger")
    assert example["spec"]["filter"]["attributes"]["type"] == "bucketml.model.published.v1"
    names = {d["metadata"]["name"] for d in source_topology()}
    assert example["metadata"]["name"] not in names
    # Valid for the local broker's reader when put beside the base's Broker.
    for path in BASE.glob("*.yaml"):
        shutil.copy(path, tmp_path / path.name)
    shutil.copy(EXAMPLE_SUBSCRIBER, tmp_path / "example.yaml")
    topology = load_topology(tmp_path, {**SUBSCRIBERS, "model-notifier": "http://notifier.test"})
    routed = topology.routes("default", {"type": "bucketml.model.published.v1", "bucketmlmodel": "iris"})
    assert {t.name for t in routed} == {"predict-on-published", example["metadata"]["name"]}


# Schemas. The Kubernetes parts are checked with the official client's models: in kubernetes
# 37 they are pydantic models with extra="forbid", so model_validate (pydantic's public API)
# rejects an unknown or misspelt field and a wrong type at any depth. (ApiClient's
# deserializer goes through from_dict, which silently drops unknown fields.) A round trip
# back to camelCase then catches snake_case spellings, which the models also accept.
# Knative's own CRD schemas (Service, Broker, Trigger) are not available offline: their
# Knative-specific fields are checked by the tests above, and the Broker and Triggers by the
# local broker's reader (load_topology), which refuses what it cannot route.


def differences(expected: Any, actual: Any, path: str = "") -> Iterator[str]:
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key in sorted(expected.keys() | actual.keys()):
            if key not in actual:
                yield f"{path}.{key}: not a field of the schema"
            elif key not in expected:
                yield f"{path}.{key}: added by the schema"
            else:
                yield from differences(expected[key], actual[key], f"{path}.{key}")
    elif isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        for index, (e, a) in enumerate(zip(expected, actual)):
            yield from differences(e, a, f"{path}[{index}]")
    elif expected != actual:
        yield f"{path}: {expected!r} became {actual!r}"


def check_schema(model: type, data: dict, where: str) -> None:
    try:
        parsed = model.model_validate(data)
    except pydantic.ValidationError as exc:
        pytest.fail(f"{where} is not a valid {model.__name__}:\n{exc}")
    problems = list(differences(data, parsed.model_dump(by_alias=True, exclude_none=True)))
    assert not problems, f"{where} ({model.__name__}):\n" + "\n".join(problems)


def pod_spec(service: dict) -> dict:
    """The Revision's PodSpec, with the probe ports Knative fills in from the container port
    (Knative forbids or ignores them; the Kubernetes schema requires them)."""
    spec = {k: v for k, v in copy.deepcopy(service["spec"]["template"]["spec"]).items() if k not in REVISION_FIELDS}
    for one in spec.get("containers", []):
        port = (one.get("ports") or [{}])[0].get("containerPort", 8080)
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            for action in ("httpGet", "tcpSocket"):
                if action in one.get(probe, {}):
                    one[probe][action].setdefault("port", port)
    return spec


@by_overlay
def test_kubernetes_parts_match_the_kubernetes_schemas(name):
    for doc in overlay(name):
        where = f"{name}: {doc['kind']} {doc['metadata']['name']}"
        check_schema(k8s.V1ObjectMeta, doc["metadata"], f"{where} metadata")
        if doc["apiVersion"] == "v1":
            check_schema(getattr(k8s, f"V1{doc['kind']}"), doc, where)
        elif (doc["apiVersion"], doc["kind"]) == (SERVING, "Service"):
            assert set(doc["spec"]) <= {"template", "traffic"}, f"{where}: spec has {sorted(doc['spec'])}"
            check_schema(k8s.V1ObjectMeta, doc["spec"]["template"].get("metadata", {}), f"{where} template metadata")
            check_schema(k8s.V1PodSpec, pod_spec(doc), f"{where} template spec")
            revision = doc["spec"]["template"]["spec"]
            for field in REVISION_FIELDS & revision.keys():
                assert isinstance(revision[field], int) and revision[field] >= 0, f"{where}: {field}"
            for key, value in annotations(doc).items():
                if key.startswith(SCALE) and key.endswith("-scale"):
                    assert value.isdigit(), f"{where}: {key} {value!r}"
                if key == f"{SCALE}scale-down-delay":
                    assert value[:-1].isdigit() and value[-1] in "smh", f"{where}: {key} {value!r}"
            resources = container(doc)["resources"]
            for resource, request in resources.get("requests", {}).items():
                limit = resources.get("limits", {}).get(resource)
                assert limit is None or parse_quantity(request) <= parse_quantity(limit), f"{where}: {resource} request over limit"
        elif (doc["apiVersion"], doc["kind"]) == ("sources.knative.dev/v1", "ContainerSource"):
            check_schema(k8s.V1PodSpec, doc["spec"]["template"]["spec"], f"{where} template spec")
            assert doc["spec"]["sink"]["ref"]["kind"] == "Broker", f"{where}: the source must post to the Broker"
        elif (doc["apiVersion"], doc["kind"]) == ("sources.knative.dev/v1", "PingSource"):
            # Straight to the monitor Service (a PingSource's reply would go nowhere), every minute.
            assert doc["spec"]["sink"]["ref"] == {"apiVersion": SERVING, "kind": "Service", "name": "monitor"}, where
            assert doc["spec"]["schedule"] == "* * * * *", where
            assert doc["spec"]["contentType"] == "application/json", where
            json.loads(doc["spec"]["data"])  # what the content type says
        elif doc["apiVersion"] == EVENTING and doc["kind"] in ("Broker", "Trigger"):
            for value in (doc["spec"].get("delivery") or {}).values():
                if isinstance(value, str) and value.startswith("P"):
                    parse_duration(value)
        else:
            pytest.fail(f"{where}: no schema check for {doc['apiVersion']} {doc['kind']}; add one here")
