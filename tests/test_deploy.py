"""`bucketml deploy`: --dry-run renders the same objects `kubectl kustomize` builds from an
overlay with the same settings, for every --variant (the train Service, or the JobSink variant)
and --events (the Pub/Sub GCS source, or Eventarc without it), each valid against Knative's
published schemas; applying sends them with server-side apply and waits for the Services
(against a stub API server: no cluster runs here); bad settings are one clear line."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import yaml
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from bucketml.cloud import deploy
from helpers import BUCKETML, ROOT, free_port

BASE = ROOT / "infra" / "knative"
SETTINGS = deploy.Settings(bucket="gs://acme-ml-prod", registry="europe-docker.pkg.dev/acme/ml", tag="1.4.2",
                           project="acme-ml", namespace="ml-prod", google_service_account="bucketml@acme.iam.gserviceaccount.com")
FLAGS = ["--bucket", SETTINGS.bucket, "--registry", SETTINGS.registry, "--tag", SETTINGS.tag, "--project", SETTINGS.project,
         "--namespace", SETTINGS.namespace, "--google-service-account", SETTINGS.google_service_account]


def json_patch(target: dict, path: str, value: str) -> dict:
    return {"target": target, "patch": yaml.safe_dump([{"op": "replace", "path": path, "value": value}])}


def overlay(folder: Path, s: deploy.Settings) -> Path:
    """A kustomize overlay that says what `s` says, written the way a user would: over the base,
    with the JobSink variant's own resources and patches for --variant jobsink, and the GCS
    source deleted for --events eventarc."""
    service = {"group": "serving.knative.dev", "version": "v1", "kind": "Service"}
    source = {"group": "sources.knative.dev", "version": "v1", "kind": "ContainerSource", "name": "gcs-uploads"}
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": s.namespace,
        "resources": [os.path.relpath(BASE, folder)],
        "images": [{"name": f"bucketml-{f}", "newName": f"{s.registry}/bucketml-{f}", "newTag": s.tag} for f in deploy.FUNCTIONS],
        "patches": [
            json_patch(service, "/spec/template/spec/containers/0/env/0/value", s.bucket),
            json_patch({**service, "name": "train"}, "/spec/template/spec/containers/0/env/1/value", s.broker_url),
            json_patch({**service, "name": "monitor"}, "/spec/template/spec/containers/0/env/1/value", s.broker_url),
            json_patch({**service, "name": "console"}, "/spec/template/spec/containers/0/env/1/value", s.broker_url),
            json_patch(source, "/spec/template/spec/containers/0/env/0/value", s.project),
            json_patch({"version": "v1", "kind": "ServiceAccount", "name": "bucketml"},
                       "/metadata/annotations/iam.gke.io~1gcp-service-account", s.google_service_account),
        ],
    }
    if s.variant == "jobsink":
        variant = deploy.variant_dir("jobsink", BASE)
        own = yaml.safe_load((variant / "kustomization.yaml").read_text())
        kustomization["resources"] += [os.path.relpath(variant / r, folder) for r in own["resources"] if (variant / r).is_file()]
        kustomization["configurations"] = [os.path.relpath(variant / c, folder) for c in own["configurations"]]
        jobsink = {"group": "sinks.knative.dev", "version": "v1alpha1", "kind": "JobSink", "name": "train"}
        kustomization["patches"] += own["patches"] + [
            json_patch(jobsink, "/spec/job/spec/template/spec/containers/0/env/0/value", s.bucket),
            json_patch(jobsink, "/spec/job/spec/template/spec/containers/0/env/1/value", s.broker_url),
        ]
    if s.events == "eventarc":
        delete = {"$patch": "delete", "apiVersion": "sources.knative.dev/v1", "kind": "ContainerSource",
                  "metadata": {"name": "gcs-uploads"}}
        kustomization["patches"].append({"patch": yaml.safe_dump(delete)})
    folder.mkdir(parents=True)
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return folder


def kustomize(folder: Path) -> list[dict]:
    # The variant's files lie outside the overlay's folder: kustomize loads them only when told to.
    built = subprocess.run(["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(folder)],
                           capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(built) if d]


def canonical(objects: list[dict]) -> list[str]:
    return sorted(json.dumps(o, sort_keys=True) for o in objects)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
def test_dry_run_renders_what_kubectl_kustomize_builds_for_the_same_settings(tmp_path):
    built = kustomize(overlay(tmp_path / "overlay", SETTINGS))
    printed = subprocess.run([BUCKETML, "deploy", *FLAGS, "--dry-run"], capture_output=True, text=True, check=True).stdout
    # Without --apply, deploy only renders: the same YAML, and nothing is sent anywhere.
    assert subprocess.run([BUCKETML, "deploy", *FLAGS], capture_output=True, text=True, check=True).stdout == printed
    rendered = [d for d in yaml.safe_load_all(printed) if d]
    assert canonical(rendered) == canonical(built)
    services = {o["metadata"]["name"]: o for o in rendered if o["kind"] == "Service" and o["apiVersion"] == deploy.SERVING}
    assert services["predict"]["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "europe-docker.pkg.dev/acme/ml/bucketml-predict:1.4.2"
    assert {o["metadata"]["namespace"] for o in rendered} == {"ml-prod"}


CHOICES = [(variant, events) for variant in deploy.VARIANTS for events in deploy.EVENT_SOURCES]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
@pytest.mark.parametrize("variant, events", CHOICES)
def test_every_variant_renders_what_kubectl_kustomize_builds(tmp_path, variant, events):
    settings = dataclasses.replace(SETTINGS, variant=variant, events=events)
    printed = subprocess.run([BUCKETML, "deploy", *FLAGS, "--variant", variant, "--events", events, "--dry-run"],
                             capture_output=True, text=True, check=True).stdout
    rendered = [d for d in yaml.safe_load_all(printed) if d]
    assert canonical(rendered) == canonical(kustomize(overlay(tmp_path / "overlay", settings)))
    assert canonical(rendered) == canonical(deploy.render(settings))
    kinds = {(o["kind"], o["metadata"]["name"]) for o in rendered}
    assert (("JobSink", "train") in kinds) == (variant == "jobsink")
    assert (("Service", "train") in kinds) == (variant == "service")
    assert (("ContainerSource", "gcs-uploads") in kinds) == (events == "pubsub")
    assert {o["metadata"]["namespace"] for o in rendered} == {"ml-prod"}
    if variant == "jobsink":  # the Job's image, bucket and broker are this environment's, not the variant's placeholders
        job = next(o for o in rendered if o["kind"] == "JobSink")["spec"]["job"]["spec"]["template"]["spec"]["containers"][0]
        assert job["image"] == "europe-docker.pkg.dev/acme/ml/bucketml-train:1.4.2"
        assert {e["name"]: e["value"] for e in job["env"]}["BUCKETML_BROKER_URL"] == SETTINGS.broker_url
        trigger = next(o for o in rendered if o["kind"] == "Trigger" and o["metadata"]["name"] == "train-on-prepared")
        assert trigger["spec"]["subscriber"]["ref"] == {"apiVersion": "sinks.knative.dev/v1alpha1", "kind": "JobSink",
                                                        "name": "train"}


@pytest.mark.parametrize("variant, events", CHOICES)
def test_every_variant_matches_the_published_knative_schemas(variant, events):
    """As tests/test_knative_schemas.py checks the kustomize builds: strictly, no unknown field."""
    from test_knative_schemas import check_schema, models

    known, checked = models(), set()
    for obj in deploy.render(dataclasses.replace(SETTINGS, variant=variant, events=events)):
        model = known.get((obj["apiVersion"], obj["kind"]))
        if model is None:
            assert (obj["apiVersion"], obj["kind"]) == ("v1", "ServiceAccount")  # tests/test_manifests.py checks it
            continue
        check_schema(model, obj, f"{variant}/{events}: {obj['kind']} {obj['metadata']['name']}")
        checked.add(obj["kind"])
    assert {"Broker", "Trigger", "Service"} <= checked
    assert ("JobSink" in checked) == (variant == "jobsink") and ("ContainerSource" in checked) == (events == "pubsub")


@pytest.mark.parametrize("variant", list(deploy.VARIANTS))
def test_eventarc_leaves_out_the_gcs_source_and_nothing_else_and_says_what_to_create(variant):
    pubsub = deploy.render(dataclasses.replace(SETTINGS, variant=variant))
    eventarc = deploy.render(dataclasses.replace(SETTINGS, variant=variant, events="eventarc"))
    assert [deploy.identity(o) for o in pubsub if o not in eventarc] == [deploy.GCS_SOURCE]
    assert [o for o in pubsub if deploy.identity(o) != deploy.GCS_SOURCE] == eventarc

    done = subprocess.run([BUCKETML, "deploy", *FLAGS, "--variant", variant, "--events", "eventarc", "--dry-run"],
                          capture_output=True, text=True, check=True)
    assert [d for d in yaml.safe_load_all(done.stdout) if d] == eventarc  # stdout stays YAML to pipe into kubectl
    command = " ".join(line.rstrip("\\") for line in done.stderr.splitlines())
    for part in ["gcloud eventarc triggers create", "--destination-gke-namespace knative-eventing",
                 "--destination-gke-service broker-ingress", "--destination-gke-path /ml-prod/default",
                 "--event-filters type=google.cloud.storage.object.v1.finalized", "--event-filters bucket=acme-ml-prod"]:
        assert part in command, (part, done.stderr)
    quiet = subprocess.run([BUCKETML, "deploy", *FLAGS, "--variant", variant, "--dry-run"],
                           capture_output=True, text=True, check=True)
    assert quiet.stderr == ""  # the Pub/Sub source needs no trigger


@pytest.mark.parametrize("flags, mention", [
    (["--bucket", "acme"], "gs://"),
    (["--bucket", "gs://Acme"], "lower case"),
    (["--namespace", "Prod_1"], "Kubernetes name"),
    (["--registry", "europe-docker.pkg.dev/acme/ml:latest"], "without a tag"),
    (["--tag", "1.0 beta"], "Docker tag"),
    (["--project", "Acme ML"], "project id"),
])
def test_bad_settings_are_one_clear_line(flags, mention):
    args = {"--bucket": "gs://acme", "--registry": "r.example.com/ml", "--tag": "1", "--namespace": "ml", "--project": "acme-ml"}
    args.update(dict(zip(flags[::2], flags[1::2])))
    done = subprocess.run([BUCKETML, "deploy", *[x for kv in args.items() for x in kv], "--dry-run"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: ") and mention in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_an_unknown_variant_or_event_source_is_refused():
    for field, value, mention in [("variant", "kueue", "--variant must be one of service, jobsink"),
                                  ("events", "sns", "--events must be one of pubsub, eventarc")]:
        with pytest.raises(deploy.DeployError, match=mention):
            deploy.render(dataclasses.replace(SETTINGS, **{field: value}))
    done = subprocess.run([BUCKETML, "deploy", *FLAGS, "--events", "sns"], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and done.stdout == "" and "'sns' is not one of 'pubsub', 'eventarc'" in done.stderr


# --- --apply, against a stub Kubernetes API -----------------------------------------------------
# No Kubernetes API server can run on the machines the tests run on, so this stub stands in
# for one: it speaks the few endpoints `bucketml deploy` uses (server-side apply PATCHes, GETs
# of Knative Services) and records what it was sent. The real kubernetes client talks to it
# over HTTP through a kubeconfig, as it would to a cluster.


class StubKubernetes:
    def __init__(self, ready_after: int = 2, never_ready: frozenset = frozenset(), refuse: frozenset = frozenset()):
        self.objects: dict[str, dict] = {}
        self.requests: list[tuple[str, str, str]] = []
        self.lists: dict[str, list[dict]] = {}  # path -> items, for list requests
        self.gets: dict[str, int] = {}
        self.ready_after, self.never_ready, self.refuse = ready_after, never_ready, refuse
        self.server = make_server("127.0.0.1", free_port(), self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @Request.application
    def app(self, request: Request) -> Response:
        self.requests.append((request.method, request.path, request.headers.get("Content-Type", "")))
        name = request.path.rsplit("/", 1)[-1]
        if "/secrets" in request.path:  # predict's token Secret: read, and created when missing
            if request.method == "POST":
                secret = json.loads(request.get_data())
                self.objects[f"{request.path}/{secret['metadata']['name']}"] = secret
                return Response(json.dumps(secret), 201, content_type="application/json")
            if request.path not in self.objects:
                return Response(json.dumps({"kind": "Status", "reason": "NotFound", "code": 404}), 404, content_type="application/json")
            return Response(json.dumps(self.objects[request.path]), 200, content_type="application/json")
        if request.method == "PATCH":
            assert request.args.get("fieldManager") == "bucketml" and request.args.get("force") == "true"
            if name in self.refuse:
                return Response(json.dumps({"kind": "Status", "message": f"admission webhook denied {name}"}), 422,
                                content_type="application/json")
            self.objects[request.path] = json.loads(request.get_data())
            return Response(json.dumps(self.objects[request.path]), 200, content_type="application/json")
        if request.path in self.lists:
            return Response(json.dumps({"items": self.lists[request.path]}), 200, content_type="application/json")
        obj = dict(self.objects[request.path])
        self.gets[name] = self.gets.get(name, 0) + 1
        ready = self.gets[name] >= self.ready_after and name not in self.never_ready
        obj["status"] = {"url": f"https://{name}.{obj['metadata']['namespace']}.example.com",
                         "conditions": [{"type": "Ready", "status": "True" if ready else "Unknown",
                                         "message": None if ready else "Revision is waiting for its readiness probe"}]}
        return Response(json.dumps(obj), 200, content_type="application/json")

    def kubeconfig(self, folder: Path) -> Path:
        path = folder / "kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "stub",
            "clusters": [{"name": "stub", "cluster": {"server": self.url}}],
            "users": [{"name": "stub", "user": {"token": "test"}}],
            "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": "stub"}}],
        }))
        return path

    def close(self):
        self.server.shutdown()


def run_deploy(kubeconfig: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([BUCKETML, "deploy", *FLAGS, "--apply", *extra],
                          capture_output=True, text=True, check=False, env=dict(os.environ, KUBECONFIG=str(kubeconfig)))


def test_apply_sends_every_object_by_server_side_apply_and_waits_for_ready(tmp_path):
    stub = StubKubernetes(ready_after=2)
    try:
        done = run_deploy(stub.kubeconfig(tmp_path), "--wait", "30")
    finally:
        stub.close()
    assert done.returncode == 0, done.stderr
    patches = [(path, kind) for method, path, kind in stub.requests if method == "PATCH"]
    assert {kind for _, kind in patches} == {"application/apply-patch+yaml"}
    assert sorted(path for path, _ in patches) == sorted([
        "/api/v1/namespaces/ml-prod/serviceaccounts/bucketml",
        "/apis/eventing.knative.dev/v1/namespaces/ml-prod/brokers/default",
        "/apis/eventing.knative.dev/v1/namespaces/ml-prod/triggers/preprocess-on-upload",
        "/apis/eventing.knative.dev/v1/namespaces/ml-prod/triggers/train-on-prepared",
        "/apis/eventing.knative.dev/v1/namespaces/ml-prod/triggers/predict-on-published",
        "/apis/eventing.knative.dev/v1/namespaces/ml-prod/triggers/batch-on-upload",
        "/apis/serving.knative.dev/v1/namespaces/ml-prod/services/preprocess",
        "/apis/serving.knative.dev/v1/namespaces/ml-prod/services/train",
        "/apis/serving.knative.dev/v1/namespaces/ml-prod/services/predict",
        "/apis/serving.knative.dev/v1/namespaces/ml-prod/services/deadletter",
        "/apis/serving.knative.dev/v1/namespaces/ml-prod/services/monitor",
        "/apis/serving.knative.dev/v1/namespaces/ml-prod/services/batch",
        "/apis/serving.knative.dev/v1/namespaces/ml-prod/services/console",
        "/apis/sources.knative.dev/v1/namespaces/ml-prod/containersources/gcs-uploads",
        "/apis/sources.knative.dev/v1/namespaces/ml-prod/pingsources/monitor-every-minute",
    ])
    # predict's bearer token: created with a random value when missing.
    secret = stub.objects.pop("/api/v1/namespaces/ml-prod/secrets/bucketml-predict-token")
    assert len(secret["stringData"]["token"]) >= 32 and "created Secret ml-prod/bucketml-predict-token" in done.stdout
    # What was applied is what --dry-run prints.
    assert canonical(list(stub.objects.values())) == canonical(deploy.render(SETTINGS))
    assert "predict     https://predict.ml-prod.example.com" in done.stdout
    assert all(stub.gets[name] >= 2 for name in deploy.FUNCTIONS)  # it waited for Ready


def test_apply_of_the_jobsink_variant_with_eventarc_sends_its_objects_and_says_what_is_left(tmp_path):
    stub = StubKubernetes(ready_after=1)
    try:
        done = run_deploy(stub.kubeconfig(tmp_path), "--variant", "jobsink", "--events", "eventarc", "--wait", "30")
    finally:
        stub.close()
    assert done.returncode == 0, done.stderr
    patched = {path for method, path, _ in stub.requests if method == "PATCH"}
    assert "/apis/sinks.knative.dev/v1alpha1/namespaces/ml-prod/jobsinks/train" in patched
    assert not any("/containersources/" in path or path.endswith("/services/train") for path in patched)
    stub.objects.pop("/api/v1/namespaces/ml-prod/secrets/bucketml-predict-token")
    settings = dataclasses.replace(SETTINGS, variant="jobsink", events="eventarc")
    assert canonical(list(stub.objects.values())) == canonical(deploy.render(settings))
    # Applying deletes nothing: what an earlier deployment with the other choices made is named.
    assert "not part of this deployment: Service ml-prod/train" in done.stdout
    assert "kubectl delete service.serving.knative.dev train -n ml-prod" in done.stdout
    assert "kubectl delete containersource.sources.knative.dev gcs-uploads -n ml-prod" in done.stdout
    assert "gcloud eventarc triggers create bucketml-uploads" in done.stdout and done.stderr == ""


def test_apply_keeps_an_existing_predict_token(tmp_path):
    stub = StubKubernetes(ready_after=1)
    path = "/api/v1/namespaces/ml-prod/secrets/bucketml-predict-token"
    stub.objects[path] = {"metadata": {"name": "bucketml-predict-token"}, "data": {"token": "c2VjcmV0"}}
    try:
        done = run_deploy(stub.kubeconfig(tmp_path), "--wait", "30")
    finally:
        stub.close()
    assert done.returncode == 0, done.stderr
    assert {m for m, p, _ in stub.requests if p == path} == {"GET"} and "created Secret" not in done.stdout
    assert ("POST", "/api/v1/namespaces/ml-prod/secrets") not in [(m, p) for m, p, _ in stub.requests]


def test_apply_names_what_the_cluster_refused_or_what_never_became_ready(tmp_path):
    refusing = StubKubernetes(refuse=frozenset({"train-on-prepared"}))
    try:
        refused = run_deploy(refusing.kubeconfig(tmp_path))
    finally:
        refusing.close()
    assert refused.returncode == 1
    assert "Trigger ml-prod/train-on-prepared" in refused.stderr and "admission webhook denied" in refused.stderr

    stuck = StubKubernetes(never_ready=frozenset({"predict"}))
    try:
        late = run_deploy(stuck.kubeconfig(tmp_path), "--wait", "3")
    finally:
        stuck.close()
    assert late.returncode == 1 and "not Ready after 3s: predict: Revision is waiting for its readiness probe" in late.stderr


def test_apply_without_a_cluster_configuration_is_one_clear_line(tmp_path):
    done = run_deploy(tmp_path / "missing-kubeconfig")
    assert done.returncode == 1 and "no usable Kubernetes configuration" in done.stderr and "leave out --apply" in done.stderr


def test_apply_to_an_unreachable_api_server_is_one_clear_line(tmp_path):
    nobody = StubKubernetes()
    kubeconfig = nobody.kubeconfig(tmp_path)
    nobody.close()
    nobody.server.server_close()  # nothing listens at its address any more
    done = run_deploy(kubeconfig)
    assert done.returncode == 1 and "unreachable" in done.stderr and nobody.url in done.stderr, done.stderr


def test_status_lists_services_with_revisions_and_traffic_and_triggers(tmp_path):
    stub = StubKubernetes()
    ready = [{"type": "Ready", "status": "True"}]
    stub.lists = {
        "/apis/serving.knative.dev/v1/namespaces/ml-prod/services": [
            {"metadata": {"name": "predict"}, "status": {"url": "https://predict.ml-prod.example.com", "conditions": ready,
                                                        "traffic": [{"revisionName": "predict-00002", "percent": 100}]}},
            {"metadata": {"name": "train"}, "status": {"conditions": [{"type": "Ready", "status": "False",
                                                                       "message": "image pull failed"}]}},
        ],
        "/apis/serving.knative.dev/v1/namespaces/ml-prod/revisions": [
            {"metadata": {"name": "predict-00001", "labels": {"serving.knative.dev/service": "predict"}}, "status": {"conditions": ready}},
            {"metadata": {"name": "predict-00002", "labels": {"serving.knative.dev/service": "predict"}}, "status": {"conditions": ready}},
        ],
        "/apis/eventing.knative.dev/v1/namespaces/ml-prod/triggers": [
            {"metadata": {"name": "predict-on-published"},
             "spec": {"filter": {"attributes": {"type": "bucketml.model.published.v1"}}, "subscriber": {"ref": {"name": "predict"}}},
             "status": {"conditions": ready}},
        ],
    }
    try:
        done = subprocess.run([BUCKETML, "status", "--namespace", "ml-prod"], capture_output=True, text=True, check=False,
                              env=dict(os.environ, KUBECONFIG=str(stub.kubeconfig(tmp_path))))
    finally:
        stub.close()
    assert done.returncode == 0, done.stderr
    lines = [line.split() for line in done.stdout.splitlines()]
    assert ["predict", "Ready", "https://predict.ml-prod.example.com"] in lines
    assert ["revision", "predict-00001", "Ready", "no", "traffic"] in lines
    assert ["revision", "predict-00002", "Ready", "100%", "of", "traffic"] in lines
    assert "train       not ready: image pull failed" in done.stdout
    assert ["predict-on-published", "bucketml.model.published.v1", "->", "predict", "Ready"] in lines
