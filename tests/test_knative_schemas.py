"""Every Knative object the deployment builds validates against typed models generated from
Knative's published CRD schemas (Serving 1.17, Eventing 1.17: the cloudcoil model packages),
strictly, and survives a round trip through them: a field the schema does not know would be
pruned by the API server, so it fails here unless it is a known, documented gap."""

from __future__ import annotations

import shutil
import subprocess
import warnings

import pydantic
import pytest
import yaml

from helpers import ROOT
from test_manifests import differences

BUILDS = ["infra/overlays/dev", "infra/overlays/prod", "infra/variants/prod-jobsink"]
# Fields the manifests set that the published CRD schemas do not have. Knative's API server
# prunes them, so on a cluster they have no effect; each is listed in docs/deploy.md.
KNOWN_GAPS = {".spec.delivery.timeout"}  # Trigger delivery timeout: honoured by the local broker only

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")


def models() -> dict[tuple[str, str], type]:
    with warnings.catch_warnings():  # the generated models shadow a few Resource attributes
        warnings.simplefilter("ignore")
        from cloudcoil.models.knative_eventing.eventing import v1 as eventing
        from cloudcoil.models.knative_eventing.sinks import v1alpha1 as sinks
        from cloudcoil.models.knative_eventing.sources import v1 as sources
        from cloudcoil.models.knative_serving.serving import v1 as serving
    return {
        ("serving.knative.dev/v1", "Service"): serving.Service,
        ("eventing.knative.dev/v1", "Broker"): eventing.Broker,
        ("eventing.knative.dev/v1", "Trigger"): eventing.Trigger,
        ("sinks.knative.dev/v1alpha1", "JobSink"): sinks.JobSink,
        ("sources.knative.dev/v1", "ContainerSource"): sources.ContainerSource,
        ("sources.knative.dev/v1", "PingSource"): sources.PingSource,
    }


@pytest.mark.parametrize("build", BUILDS)
def test_knative_objects_match_the_published_crd_schemas(build):
    built = subprocess.run(["kubectl", "kustomize", str(ROOT / build)], capture_output=True, text=True, check=True).stdout
    checked = 0
    known = models()
    for doc in (d for d in yaml.safe_load_all(built) if d):
        model = known.get((doc["apiVersion"], doc["kind"]))
        if model is None:
            assert doc["apiVersion"] == "v1", f"{doc['apiVersion']} {doc['kind']}: no schema to check it against"
            continue  # core objects: tests/test_manifests.py checks them with the Kubernetes models
        check_schema(model, doc, f"{build}: {doc['kind']} {doc['metadata']['name']}")
        checked += 1
    assert checked >= 4


def check_schema(model: type, doc: dict, where: str) -> None:
    """`doc` validates strictly against `model` (its CRD's schema) and has no field the schema lacks."""
    try:  # strict: "1" stays a string (the generated quantity types would otherwise misread it)
        parsed = model.model_validate(doc, strict=True)
    except pydantic.ValidationError as exc:
        pytest.fail(f"{where} does not match the {doc['kind']} schema:\n{exc}")
    dumped = parsed.model_dump(by_alias=True, exclude_none=True, mode="json")
    unknown = [p for p in differences(doc, dumped) if "not a field of the schema" in p]
    assert [p for p in unknown if p.split(":")[0] not in KNOWN_GAPS] == [], where


def test_a_misspelt_field_is_caught():
    doc = {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"template": {"spec": {"containerConcurency": 3, "containers": [{"image": "x"}]}}}}
    dumped = models()[("serving.knative.dev/v1", "Service")].model_validate(doc, strict=True).model_dump(
        by_alias=True, exclude_none=True, mode="json")
    assert any("containerConcurency: not a field of the schema" in p for p in differences(doc, dumped))
