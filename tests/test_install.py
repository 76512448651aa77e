"""bucketml installed the way a user installs it: `pip install` of the repository into a fresh
virtual environment, then, from an empty folder, `bucketml dev`, `bucketml upload`, a
prediction over HTTP and `bucketml deploy`, with the Trigger manifests, the kustomize base and
the function sources taken from the installed package, never from the source tree.

`pip install <repository>` alone: the package's dependencies are requirements.txt's pins, which
pip's cache (filled by the test environment's own install) provides. `--no-compile` only
skips writing .pyc files, which saves most of the install's time here.
"""

from __future__ import annotations

import dataclasses
import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from bucketml.cloud import deploy
from helpers import ROOT, churn_frame, free_ports, packaging_test, stop

pytestmark = packaging_test

RECORDS = [
    {"tenure": 3, "monthly": 99.5, "plan": "basic", "region": "north"},
    {"tenure": None, "monthly": None, "plan": None, "region": "south"},
]
BUNDLED = ("infra/knative", "infra/overlays", "infra/variants", "functions")
DEPLOY = deploy.Settings(bucket="gs://acme-ml-prod", registry="europe-docker.pkg.dev/acme/ml", tag="1.4.2",
                         project="acme-ml", namespace="ml-prod")
DEPLOY_FLAGS = ["--bucket", DEPLOY.bucket, "--registry", DEPLOY.registry, "--tag", DEPLOY.tag, "--project", DEPLOY.project,
                "--namespace", DEPLOY.namespace]


def user_env(venv: Path, **variables: str) -> dict[str, str]:
    """The environment of a user with only `venv` activated: no bucketml variable (so no
    BUCKETML_MANIFESTS or BUCKETML_FUNCTIONS), no PYTHONPATH, nothing of the repository on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BUCKETML_", "PYTHON", "VIRTUAL_ENV"))}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and not Path(p).resolve().is_relative_to(ROOT)]
    env.update(PATH=os.pathsep.join([str(venv / "bin"), *path]), VIRTUAL_ENV=str(venv), **variables)
    return env


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("installed")
    venv = folder / "venv"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile"]
    subprocess.run([*pip, str(ROOT)], check=True, cwd=folder, env=user_env(venv))
    print(f"venv and `pip install <repository>`: {time.monotonic() - started:.1f}s")
    return venv


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def inside(path: str | Path, folder: Path) -> bool:
    """Whether `path` is in `folder`, symlinks not followed (the venv's python links to the base one)."""
    return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))


def test_the_package_carries_the_manifests_and_functions_of_the_source_tree(venv):
    bundled = site_packages(venv) / "bucketml" / "_bundled"
    for relative in BUNDLED:
        source = ROOT / relative
        files = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        assert files, f"{relative} is empty in the source tree"
        match, mismatch, errors = filecmp.cmpfiles(source, bundled / relative, [str(f) for f in files], shallow=False)
        assert not mismatch and not errors, f"{relative}: not the source tree's copy: {mismatch + errors}"
    located = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import bucketml, json; from bucketml import settings as s; "
         "print(json.dumps([bucketml.__file__, str(s.manifests_dir()), str(s.functions_dir()), str(s.infra_dir())]))"],
        capture_output=True, text=True, check=True, cwd=venv.parent, env=user_env(venv)).stdout
    package, manifests, functions, infra = json.loads(located)
    assert inside(package, venv), package
    assert Path(manifests) == bundled / "infra" / "knative" and Path(functions) == bundled / "functions", located
    assert Path(infra) == bundled / "infra" and (Path(infra) / "variants" / "prod-jobsink" / "kustomization.yaml").is_file()
    assert (site_packages(venv) / "bucketml-0.1.0.dist-info" / "licenses" / "LICENSE").is_file()


def test_dev_upload_and_predict_from_an_empty_folder(venv, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    ports = free_ports()
    env = user_env(venv, BUCKETML_POLL_SECONDS="0.5")
    log_path = tmp_path / "dev.log"
    with open(log_path, "w") as log:
        dev = subprocess.Popen(
            [str(venv / "bin" / "bucketml"), "dev", *(x for name, port in ports.items() for x in (f"--{name}-port", str(port)))],
            cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env)
    parts: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 90
        while "ready; press Ctrl-C" not in log_path.read_text():
            assert dev.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "bucketml dev did not become ready:\n" + log_path.read_text()
            time.sleep(0.2)
        # What the running processes were started with: every path the installed package's.
        parts = json.loads((work / ".bucketml" / "dev.pids.json").read_text())["parts"]
        assert set(parts) >= {"broker", "preprocess", "train", "predict", "deadletter", "monitor", "watcher", "ping"}, parts
        bundled = site_packages(venv) / "bucketml" / "_bundled"
        for name, pid in parts.items():
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            assert not any(str(ROOT) in arg for arg in argv), f"{name} runs from the source tree: {argv}"
            assert inside(argv[0], venv), argv
            if name in ("broker", "ping"):  # both read the manifests
                assert Path(argv[argv.index("--manifests") + 1]) == bundled / "infra" / "knative", argv
            elif name != "watcher":
                assert Path(argv[argv.index("--source") + 1]) == bundled / "functions" / name / "main.py", argv
                assert Path(os.readlink(f"/proc/{pid}/cwd")) == bundled, name
        triggers = next(line for line in log_path.read_text().splitlines() if "triggers " in line)
        assert triggers.split()[-1] == str(bundled / "infra" / "knative"), triggers

        csv = tmp_path / "customers.csv"
        churn_frame(seed=3).to_csv(csv, index=False)
        predict_url, broker_url = f"http://127.0.0.1:{ports['predict']}", f"http://127.0.0.1:{ports['broker']}"
        uploaded = subprocess.run(
            [str(venv / "bin" / "bucketml"), "upload", str(csv), "--model", "churn", "--timeout", "150"],
            cwd=work, capture_output=True, text=True, timeout=200,
            env=dict(env, BUCKETML_BROKER_URL=broker_url, BUCKETML_PREDICT_URL=predict_url))
        assert uploaded.returncode == 0, (uploaded, log_path.read_text()[-5000:])
        assert "served     churn version 1" in uploaded.stdout, uploaded.stdout
        assert (work / "bucket" / "datasets" / "churn" / "customers.csv").is_file()

        answer = requests.post(predict_url + "/predict", json={"model": "churn", "records": RECORDS}, timeout=10)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["version"] == 1 and len(body["predictions"]) == 2 and set(body["predictions"]) <= {"yes", "no"}, body
    finally:
        dev.send_signal(signal.SIGINT)
        try:
            code = dev.wait(30)
        except subprocess.TimeoutExpired:
            code = stop(dev)
        for pid in parts.values():  # the supervisor stops its parts; make sure of it (each leads its group)
            try:
                ours = str(venv) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue  # gone
            if ours:
                os.killpg(pid, signal.SIGKILL)
        print(log_path.read_text()[-5000:])
    assert code == 0, f"bucketml dev did not stop cleanly ({code})"


# Every variant deploy renders (infra/variants/...) besides the base alone.
VARIANTS = [None, *(name for name, folder in getattr(deploy, "VARIANTS", {}).items() if folder)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_deploy_renders_the_manifests_from_an_empty_folder(venv, tmp_path, variant):
    work = tmp_path / "empty"
    work.mkdir()
    done = subprocess.run([str(venv / "bin" / "bucketml"), "deploy", *DEPLOY_FLAGS, *(["--variant", variant] if variant else []),
                           "--dry-run"], cwd=work, capture_output=True, text=True, env=user_env(venv), timeout=60)
    assert done.returncode == 0, done.stderr
    rendered = [d for d in yaml.safe_load_all(done.stdout) if d]
    # The same objects as rendering the source tree's base (and variant).
    settings = dataclasses.replace(DEPLOY, variant=variant) if variant else DEPLOY
    source = deploy.render(settings, ROOT / "infra" / "knative")
    assert sorted(json.dumps(o, sort_keys=True) for o in rendered) == sorted(json.dumps(o, sort_keys=True) for o in source)
    assert {o["kind"] for o in rendered} >= {"Broker", "Trigger", "Service"}
    assert {o["metadata"]["namespace"] for o in rendered} == {"ml-prod"}
    assert list(work.iterdir()) == []
