"""`bucketml deploy`: the Knative manifests of infra/knative/ made concrete for one environment.

The kustomize base is the one source; rendering applies what an overlay would (namespace,
images, bucket, broker address, the Google service account) to its objects, so the result is
the same set of objects `kubectl kustomize` builds from an overlay with those settings
(tests/test_deploy.py compares them). `apply` sends them with server-side apply through the
official `kubernetes` client (one PATCH per object creates or updates it, owned by the field
manager `bucketml`), then waits for the Knative Services to be Ready.

Two choices change which objects are rendered. `variant`: training in the train Service of the
base (`service`), or as Kubernetes Jobs through a Knative JobSink (`jobsink`: the resources and
patches of infra/variants/prod-jobsink applied over the base, as kustomize would). `events`: the
bucket's uploads reach the Broker through the base's GCS source (`pubsub`: a ContainerSource
pulling the bucket's Pub/Sub notifications), or through an Eventarc trigger the user creates
(`eventarc`: the ContainerSource is left out and `eventarc_instructions` says what to create).
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bucketml import settings as config

SERVING = "serving.knative.dev/v1"
FUNCTIONS = ("preprocess", "train", "predict", "deadletter", "monitor", "batch", "console")
BUCKET = re.compile(r"^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
NAMESPACE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# How training runs -> the folder of infra/variants/ applied over the base (None: the base alone).
VARIANTS = {"service": None, "jobsink": "prod-jobsink"}
# How the bucket's uploads reach the Broker: the base's GCS source, or an Eventarc trigger.
EVENT_SOURCES = ("pubsub", "eventarc")
GCS_SOURCE = ("sources.knative.dev/v1", "ContainerSource", "gcs-uploads")  # infra/knative/gcs-source.yaml


class DeployError(ValueError):
    pass


@dataclass(frozen=True)
class Settings:
    bucket: str  # gs://<bucket>
    registry: str  # where bucketml-<function> images live, e.g. europe-docker.pkg.dev/<project>/<repo>
    tag: str
    project: str  # the Google Cloud project of the bucket's Pub/Sub notifications (the GCS source)
    namespace: str = "bucketml"
    google_service_account: str | None = None  # Workload Identity: <name>@<project>.iam.gserviceaccount.com
    variant: str = "service"  # a key of VARIANTS
    events: str = "pubsub"  # one of EVENT_SOURCES

    def check(self) -> None:
        if not BUCKET.fullmatch(self.bucket):
            raise DeployError(f"--bucket must be gs://<bucket name> (lower case), got {self.bucket!r}")
        if not NAMESPACE.fullmatch(self.namespace):
            raise DeployError(f"--namespace must be a Kubernetes name (lower case, digits, '-'), got {self.namespace!r}")
        if not self.registry or self.registry.endswith("/") or ":" in self.registry.rsplit("/", 1)[-1]:
            raise DeployError(f"--registry is the image repository prefix without a tag, got {self.registry!r}")
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", self.tag):
            raise DeployError(f"--tag must be a Docker tag, got {self.tag!r}")
        if not re.fullmatch(r"[a-z][a-z0-9-]{4,28}[a-z0-9]", self.project):
            raise DeployError(f"--project must be a Google Cloud project id, got {self.project!r}")
        if self.variant not in VARIANTS:
            raise DeployError(f"--variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.events not in EVENT_SOURCES:
            raise DeployError(f"--events must be one of {', '.join(EVENT_SOURCES)}, got {self.events!r}")

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
    if settings.events == "eventarc":  # uploads come from an Eventarc trigger, not the GCS source
        objects = [o for o in objects if identity(o) != GCS_SOURCE]
    rendered = [_configured(obj, settings, labels) for obj in objects]
    if VARIANTS[settings.variant] is not None:
        rendered = _with_variant(rendered, variant_dir(settings.variant, base), settings)
    return rendered


def _configured(original: dict[str, Any], settings: Settings, labels: dict[str, str]) -> dict[str, Any]:
    obj = copy.deepcopy(original)
    metadata = obj.setdefault("metadata", {})
    metadata["namespace"] = settings.namespace  # every object here is namespaced
    if labels:
        metadata["labels"] = {**metadata.get("labels", {}), **labels}
    if "containers" in _pod_spec(obj):  # Services, the GCS source, the JobSink's Job
        _configure_containers(obj, settings)
    if obj.get("kind") == "ServiceAccount" and settings.google_service_account:
        metadata.setdefault("annotations", {})["iam.gke.io/gcp-service-account"] = settings.google_service_account
    return obj


def identity(obj: dict[str, Any]) -> tuple[str, str, str]:
    return obj.get("apiVersion", ""), obj.get("kind", ""), obj.get("metadata", {}).get("name", "")


def variant_dir(variant: str, base: Path | None = None) -> Path:
    """infra/variants/<folder>: beside `base` when one is given (infra/knative), else the
    installation's (the checkout's, or the copy bundled with the package)."""
    return (base.parent if base is not None else config.infra_dir()) / "variants" / VARIANTS[variant]


def _with_variant(rendered: list[dict[str, Any]], folder: Path, settings: Settings) -> list[dict[str, Any]]:
    """The variant's own resources (configured like the base's) and its patches over `rendered`.
    The variant's resources that are folders (the overlay it builds on) are what `rendered`
    already stands for; its namespace and images are the settings'."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    objects = list(rendered)
    for resource in kustomization.get("resources", []):
        path = folder / resource
        if path.is_file():  # the labels of the base's kustomization do not reach these
            objects += [_configured(doc, settings, {}) for doc in yaml.safe_load_all(path.read_text()) if doc]
    where = folder / "kustomization.yaml"
    for entry in kustomization.get("patches", []):
        if set(entry) != {"patch"}:
            raise DeployError(f"{where}: only inline patches without a target are rendered, got {sorted(entry)}")
        patch = yaml.safe_load(entry["patch"])
        matched = [i for i, obj in enumerate(objects) if identity(obj) == identity(patch)]
        if not matched:
            raise DeployError(f"{where}: a patch names {' '.join(identity(patch))}, which is not rendered")
        if patch.get("$patch") == "delete":
            objects = [obj for i, obj in enumerate(objects) if i not in matched]
        else:
            for i in matched:
                objects[i] = _merged(objects[i], patch)
    return objects


def _merged(target: Any, patch: Any) -> Any:
    """A JSON merge patch (RFC 7386), what kustomize applies to a custom resource: objects merge
    key by key, null removes a key, anything else (lists too) replaces."""
    if not isinstance(patch, dict) or not isinstance(target, dict):
        return copy.deepcopy(patch)
    merged = dict(target)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = _merged(target.get(key), value)
    return merged


def left_out(settings: Settings, base: Path | None = None) -> list[tuple[str, str, str]]:
    """The base's objects this rendering leaves out (apiVersion, kind, name): a deployment made
    with other choices may have created them, and applying does not delete anything."""
    kept = {identity(obj) for obj in render(settings, base)}
    return [identity(obj) for obj in base_objects(base)[0] if identity(obj) not in kept]


def eventarc_instructions(settings: Settings) -> list[str]:
    """What to create so that uploads reach the Broker when the GCS source is left out: an
    Eventarc trigger delivering the bucket's finalized events to the Broker's ingress (GKE)."""
    bucket = settings.bucket.removeprefix("gs://")
    return [
        "uploads reach the Broker through Eventarc: no GCS source was rendered. Create the trigger once (docs/deploy.md),",
        "setting REGION, CLUSTER and the trigger's service account (EVENTARC_SA):",
        f"  gcloud eventarc gke-destinations init --project {settings.project}",
        f"  gcloud eventarc triggers create bucketml-uploads --project {settings.project} --location REGION \\",
        "      --destination-gke-cluster CLUSTER --destination-gke-location REGION \\",
        "      --destination-gke-namespace knative-eventing --destination-gke-service broker-ingress \\",
        f"      --destination-gke-path /{settings.namespace}/default \\",
        f"      --event-filters type=google.cloud.storage.object.v1.finalized --event-filters bucket={bucket} \\",
        f"      --service-account EVENTARC_SA@{settings.project}.iam.gserviceaccount.com",
    ]


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    """The pod template's spec: a Service's or ContainerSource's, or the JobSink's Job's."""
    spec = obj.get("spec", {})
    if obj.get("kind") == "JobSink":
        spec = spec.get("job", {}).get("spec", {})
    return spec.get("template", {}).get("spec", {})


def _configure_containers(obj: dict[str, Any], settings: Settings) -> None:
    for container in _pod_spec(obj)["containers"]:
        image = container.get("image", "")
        if image in {f"bucketml-{name}" for name in FUNCTIONS}:
            container["image"] = f"{settings.registry}/{image}:{settings.tag}"
        for variable in container.get("env", []):
            if variable["name"] == "BUCKETML_BUCKET":
                variable["value"] = settings.bucket
            elif variable["name"] == "BUCKETML_BROKER_URL":
                variable["value"] = settings.broker_url
            elif variable["name"] == "GOOGLE_CLOUD_PROJECT":
                variable["value"] = settings.project


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False)


# --- applying -----------------------------------------------------------------------------
FIELD_MANAGER = "bucketml"
APPLY_PATCH = "application/apply-patch+yaml"  # server-side apply; JSON is valid YAML


def plural(kind: str) -> str:
    return kind.lower() + "s"  # Broker, Trigger, Service, ServiceAccount: all regular


def apply(objects: list[dict[str, Any]], api_client, echo=print) -> None:
    """Create or update every object (server-side apply), in the rendered order."""
    from kubernetes import client

    custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    for obj in objects:
        namespace, name, kind = obj["metadata"]["namespace"], obj["metadata"]["name"], obj["kind"]
        try:
            if obj["apiVersion"] == "v1" and kind == "ServiceAccount":
                core.patch_namespaced_service_account(name, namespace, obj, field_manager=FIELD_MANAGER, force=True,
                                                      _content_type=APPLY_PATCH)
            else:
                group, version = obj["apiVersion"].split("/")
                custom.patch_namespaced_custom_object(group, version, namespace, plural(kind), name, obj,
                                                      field_manager=FIELD_MANAGER, force=True, _content_type=APPLY_PATCH)
        except client.ApiException as exc:
            raise DeployError(f"{kind} {namespace}/{name}: the API server refused it: HTTP {exc.status} {_reason(exc)}") from None
        echo(f"applied {kind} {namespace}/{name}")


TOKEN_SECRET = "bucketml-predict-token"  # mounted by predict (infra/knative/services.yaml)


def ensure_token_secret(namespace: str, api_client, echo=print) -> bool:
    """Create predict's bearer-token Secret with a random token unless it exists (an existing
    token is never replaced: clients hold it). True when it was created."""
    import secrets

    from kubernetes import client

    core = client.CoreV1Api(api_client)
    try:
        core.read_namespaced_secret(TOKEN_SECRET, namespace)
        return False
    except client.ApiException as exc:
        if exc.status != 404:
            raise DeployError(f"Secret {namespace}/{TOKEN_SECRET}: the API server refused to read it: HTTP {exc.status} {_reason(exc)}") from None
    secret = client.V1Secret(
        metadata=client.V1ObjectMeta(name=TOKEN_SECRET, namespace=namespace, labels={"app.kubernetes.io/part-of": "bucketml"}),
        string_data={"token": secrets.token_urlsafe(32)},
    )
    try:
        core.create_namespaced_secret(namespace, secret)
    except client.ApiException as exc:
        raise DeployError(f"Secret {namespace}/{TOKEN_SECRET}: the API server refused it: HTTP {exc.status} {_reason(exc)}") from None
    echo(f"created Secret {namespace}/{TOKEN_SECRET} with a new predict token; clients send it as a bearer token:")
    echo(f"  export BUCKETML_TOKEN=\"$(kubectl get secret {TOKEN_SECRET} -n {namespace} -o jsonpath='{{.data.token}}' | base64 -d)\"")
    return True


def wait_ready(objects: list[dict[str, Any]], api_client, timeout: float = 300.0, poll: float = 2.0) -> dict[str, str]:
    """Each Knative Service's URL once its Ready condition is True; DeployError naming the
    Services that are not, and why, when `timeout` passes."""
    from kubernetes import client

    custom = client.CustomObjectsApi(api_client)
    services = [o for o in objects if o["apiVersion"] == SERVING and o["kind"] == "Service"]
    deadline, urls, waiting = time.monotonic() + timeout, {}, {}
    while True:
        for service in services:
            name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
            if name in urls:
                continue
            status = custom.get_namespaced_custom_object("serving.knative.dev", "v1", namespace, "services", name).get("status", {})
            ready = next((c for c in status.get("conditions", []) if c.get("type") == "Ready"), {})
            if ready.get("status") == "True":
                urls[name] = status.get("url", "")
                waiting.pop(name, None)
            else:
                waiting[name] = ready.get("message") or ready.get("reason") or "no Ready condition yet"
        if not waiting:
            return urls
        if time.monotonic() > deadline:
            why = "; ".join(f"{name}: {message}" for name, message in sorted(waiting.items()))
            raise DeployError(f"not Ready after {timeout:.0f}s: {why}")
        time.sleep(poll)


def _reason(exc) -> str:
    import json

    try:
        return json.loads(exc.body).get("message", "")
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason or "")


def status(namespace: str, api_client) -> list[str]:
    """Lines describing the Knative Services (with their Revisions) and Triggers in `namespace`."""
    from kubernetes import client

    custom = client.CustomObjectsApi(api_client)

    def items(group: str, plural_: str) -> list[dict[str, Any]]:
        return custom.list_namespaced_custom_object(group, "v1", namespace, plural_).get("items", [])

    def ready(obj: dict[str, Any]) -> str:
        condition = next((c for c in obj.get("status", {}).get("conditions", []) if c.get("type") == "Ready"), {})
        if condition.get("status") == "True":
            return "Ready"
        return f"not ready: {condition.get('message') or condition.get('reason') or 'no status yet'}"

    revisions: dict[str, list[dict[str, Any]]] = {}
    for revision in items("serving.knative.dev", "revisions"):
        service = revision["metadata"].get("labels", {}).get("serving.knative.dev/service", "")
        revisions.setdefault(service, []).append(revision)
    lines = [f"Services in {namespace}:"]
    for service in sorted(items("serving.knative.dev", "services"), key=lambda o: o["metadata"]["name"]):
        name, state = service["metadata"]["name"], service.get("status", {})
        lines.append(f"  {name:<11} {ready(service)}  {state.get('url', '')}")
        traffic = {t.get("revisionName"): t.get("percent") for t in state.get("traffic", [])}
        for revision in sorted(revisions.get(name, []), key=lambda o: o["metadata"]["name"]):
            rev = revision["metadata"]["name"]
            share = f"{traffic[rev]}% of traffic" if rev in traffic else "no traffic"
            lines.append(f"    revision {rev:<24} {ready(revision)}  {share}")
    lines.append(f"Triggers in {namespace}:")
    for trigger in sorted(items("eventing.knative.dev", "triggers"), key=lambda o: o["metadata"]["name"]):
        spec = trigger.get("spec", {})
        kind = spec.get("filter", {}).get("attributes", {}).get("type", "every event")
        subscriber = spec.get("subscriber", {}).get("ref", {}).get("name") or spec.get("subscriber", {}).get("uri", "")
        lines.append(f"  {trigger['metadata']['name']:<24} {kind} -> {subscriber}  {ready(trigger)}")
    return lines
