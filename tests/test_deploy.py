"""`bucketml deploy --dry-run` renders the same objects `kubectl kustomize` builds from an
overlay with the same settings, and refuses bad settings with one clear line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from bucketml import deploy
from helpers import BUCKETML

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "infra" / "knative"
SETTINGS = deploy.Settings(bucket="gs://acme-ml-prod", registry="europe-docker.pkg.dev/acme/ml", tag="1.4.2",
                           namespace="ml-prod", google_service_account="bucketml@acme.iam.gserviceaccount.com")


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
    printed = subprocess.run([BUCKETML, "deploy", "--bucket", SETTINGS.bucket, "--registry", SETTINGS.registry,
                              "--tag", SETTINGS.tag, "--namespace", SETTINGS.namespace,
                              "--google-service-account", SETTINGS.google_service_account, "--dry-run"],
                             capture_output=True, text=True, check=True).stdout
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
])
def test_bad_settings_are_one_clear_line(flags, mention):
    args = {"--bucket": "gs://acme", "--registry": "r.example.com/ml", "--tag": "1", "--namespace": "ml"}
    args.update(dict(zip(flags[::2], flags[1::2])))
    done = subprocess.run([BUCKETML, "deploy", *[x for kv in args.items() for x in kv], "--dry-run"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: ") and mention in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_without_dry_run_it_says_applying_is_not_built_yet():
    done = subprocess.run([BUCKETML, "deploy", "--bucket", "gs://acme", "--registry", "r.example.com/ml", "--tag", "1"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 1 and "--dry-run" in done.stderr and "kubectl apply" in done.stderr
