"""`bucketml deploy`: --dry-run renders the same objects `kubectl kustomize` builds from an
overlay with the same settings; applying sends them with server-side apply and waits for the
Services (against a stub API server: no cluster runs here); bad settings are one clear line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
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


def overlay(folder: Path, s: deploy.Settings) -> Path:
    """A kustomize overlay that says what `s` says, written the way a user would."""
    images = "".join(
        f"  - name: bucketml-{f}\n    newName: {s.registry}/bucketml-{f}\n    newTag: \"{s.tag}\"\n" for f in deploy.FUNCTIONS
    )
    folder.mkdir(parents=True)
    (folder / "kustomization.yaml").write_text(textwrap.dedent(f"""\
        apiVersion: kustomize.config.k8s.io/v1beta1
        kind: Kustomization
        namespace: {s.namespace}
        resources:
          - {os.path.relpath(BASE, folder)}
        images:
        """) + images + textwrap.dedent(f"""\
        patches:
          - target: {{group: serving.knative.dev, version: v1, kind: Service}}
            patch: |-
              - op: replace
                path: /spec/template/spec/containers/0/env/0/value
                value: {s.bucket}
          - target: {{group: serving.knative.dev, version: v1, kind: Service, name: train}}
            patch: |-
              - op: replace
                path: /spec/template/spec/containers/0/env/1/value
                value: {s.broker_url}
          - target: {{group: sources.knative.dev, version: v1, kind: ContainerSource, name: gcs-uploads}}
            patch: |-
              - op: replace
                path: /spec/template/spec/containers/0/env/0/value
                value: {s.project}
          - target: {{version: v1, kind: ServiceAccount, name: bucketml}}
            patch: |-
              - op: replace
                path: /metadata/annotations/iam.gke.io~1gcp-service-account
                value: {s.google_service_account}
        """))
    return folder


def canonical(objects: list[dict]) -> list[str]:
    return sorted(json.dumps(o, sort_keys=True) for o in objects)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
def test_dry_run_renders_what_kubectl_kustomize_builds_for_the_same_settings(tmp_path):
    built = subprocess.run(["kubectl", "kustomize", str(overlay(tmp_path / "overlay", SETTINGS))],
                           capture_output=True, text=True, check=True).stdout
    printed = subprocess.run([BUCKETML, "deploy", *FLAGS, "--dry-run"], capture_output=True, text=True, check=True).stdout
    # Without --apply, deploy only renders: the same YAML, and nothing is sent anywhere.
    assert subprocess.run([BUCKETML, "deploy", *FLAGS], capture_output=True, text=True, check=True).stdout == printed
    rendered = [d for d in yaml.safe_load_all(printed) if d]
    assert canonical(rendered) == canonical([d for d in yaml.safe_load_all(built) if d])
    services = {o["metadata"]["name"]: o for o in rendered if o["kind"] == "Service" and o["apiVersion"] == deploy.SERVING}
    assert services["predict"]["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "europe-docker.pkg.dev/acme/ml/bucketml-predict:1.4.2"
    assert {o["metadata"]["namespace"] for o in rendered} == {"ml-prod"}


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
        "/apis/serving.knative.dev/v1/namespaces/ml-prod/services/preprocess",
        "/apis/serving.knative.dev/v1/namespaces/ml-prod/services/train",
        "/apis/serving.knative.dev/v1/namespaces/ml-prod/services/predict",
        "/apis/serving.knative.dev/v1/namespaces/ml-prod/services/deadletter",
        "/apis/sources.knative.dev/v1/namespaces/ml-prod/containersources/gcs-uploads",
    ])
    # predict's bearer token: created with a random value when missing.
    secret = stub.objects.pop("/api/v1/namespaces/ml-prod/secrets/bucketml-predict-token")
    assert len(secret["stringData"]["token"]) >= 32 and "created Secret ml-prod/bucketml-predict-token" in done.stdout
    # What was applied is what --dry-run prints.
    assert canonical(list(stub.objects.values())) == canonical(deploy.render(SETTINGS))
    assert "predict     https://predict.ml-prod.example.com" in done.stdout
    assert all(stub.gets[name] >= 2 for name in deploy.FUNCTIONS)  # it waited for Ready


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
