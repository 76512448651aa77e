"""`bucketml deploy`: the Knative manifests of infra/knative/ made concrete for one environment.

The kustomize base is the one source; rendering applies what an overlay would (namespace,
images, bucket, broker address, the Google service account) to its objects, so the result is
the same set of objects `kubectl kustomize` builds from an overlay with those settings
(tests/test_deploy.py compares them). Applying is not built yet: pipe the output to
`kubectl apply -f -`.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import config

SERVING = "serving.knative.dev/v1"
FUNCTIONS = ("preprocess", "train", "predict")
BUCKET = re.compile(r"^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
NAMESPACE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class DeployError(ValueError):
    pass


@dataclass(frozen=True)
class Settings:
    bucket: str  # gs://<bucket>
    registry: str  # where bucketml-<function> images live, e.g. europe-docker.pkg.dev/<project>/<repo>
    tag: str
    namespace: str = "bucketml"
    google_service_account: str | None = None  # Workload Identity: <name>@<project>.iam.gserviceaccount.com

    def check(self) -> None:
        if not BUCKET.fullmatch(self.bucket):
            raise DeployError(f"--bucket must be gs://<bucket name> (lower case), got {self.bucket!r}")
        if not NAMESPACE.fullmatch(self.namespace):
            raise DeployError(f"--namespace must be a Kubernetes name (lower case, digits, '-'), got {self.namespace!r}")
        if not self.registry or self.registry.endswith("/") or ":" in self.registry.rsplit("/", 1)[-1]:
            raise DeployError(f"--registry is the image repository prefix without a tag, got {self.registry!r}")
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", self.tag):
            raise DeployError(f"--tag must be a Docker tag, got {self.tag!r}")

    @property
    def broker_url(self) -> str:
        return f"http://broker-ingress.knative-eventing.svc.cluster.local/{self.namespace}/default"


def base_objects(base: Path | None = None) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The base's objects, in its resource order, and the labels its kustomization adds."""
    base = base or config.manifests_dir()
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    objects = []
    for resource in kustomization.get("resources", []):
        objects += [doc for doc in yaml.safe_load_all((base / resource).read_text()) if doc]
    labels: dict[str, str] = {}
    for entry in kustomization.get("labels", []):
        labels.update(entry.get("pairs", {}))
    return objects, labels


def render(settings: Settings, base: Path | None = None) -> list[dict[str, Any]]:
    settings.check()
    objects, labels = base_objects(base)
    rendered = []
    for original in objects:
        obj = copy.deepcopy(original)
        metadata = obj.setdefault("metadata", {})
        metadata["namespace"] = settings.namespace  # every object here is namespaced
        if labels:
            metadata["labels"] = {**metadata.get("labels", {}), **labels}
        if obj.get("apiVersion") == SERVING and obj.get("kind") == "Service":
            _configure_service(obj, settings)
        if obj.get("kind") == "ServiceAccount" and settings.google_service_account:
            metadata.setdefault("annotations", {})["iam.gke.io/gcp-service-account"] = settings.google_service_account
        rendered.append(obj)
    return rendered


def _configure_service(service: dict[str, Any], settings: Settings) -> None:
    for container in service["spec"]["template"]["spec"]["containers"]:
        image = container.get("image", "")
        if image in {f"bucketml-{name}" for name in FUNCTIONS}:
            container["image"] = f"{settings.registry}/{image}:{settings.tag}"
        for variable in container.get("env", []):
            if variable["name"] == "BUCKETML_BUCKET":
                variable["value"] = settings.bucket
            elif variable["name"] == "BUCKETML_BROKER_URL":
                variable["value"] = settings.broker_url


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False)
