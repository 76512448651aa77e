"""The predict function runs without the training stack: no pandas, scikit-learn or matplotlib
code is loaded into its processes, and its own modules import none of them (nor pydantic, which
only the typed contracts of the event functions use). Its cold start is what users wait for.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, churn_frame, predict_server, publish, wait_until
from bucketml.storage.local import LocalStorage

TRAINING_STACK = ("pandas", "sklearn", "matplotlib")
# A shared object of the training stack, by the folder it is installed in (scikit-learn's and
# matplotlib's wheels put their bundled libraries in <name>.libs).
TRAINING_OBJECT = re.compile(r"/(pandas|sklearn|scikit_learn\.libs|matplotlib|matplotlib\.libs)/[^ ]*\.so")


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, from /proc (the uvicorn worker is a child of the server)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").iterdir():
            todo.extend(int(child) for child in (task / "children").read_text().split())
    return found


def shared_objects(pid: int) -> set[str]:
    """Every file mapped into the process's memory (its loaded shared objects among them)."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split(maxsplit=5)[5] for line in lines if len(line.split(maxsplit=5)) == 6}


def test_a_serving_predict_process_maps_no_training_library(tmp_path):
    storage = LocalStorage(tmp_path / "bucket")
    with predict_server(storage.root, tmp_path) as server:
        version = publish(storage, "churn", churn_frame(seed=0), "churn.csv")
        wait_until(lambda: server.version_of("churn") == version, "churn to be served")
        record = {"tenure": 3, "monthly": 99.5, "plan": "basic", "region": "north"}
        assert server.predict({"model": "churn", "records": [record]}).status_code == 200
        assert server.post("/v2/models/churn/infer", {"nope": 1}).status_code == 400  # an error answer too

        mapped = {pid: shared_objects(pid) for pid in process_tree(server.process.pid)}
    # The check can see a library: onnxruntime's is mapped in the process that scored.
    assert any(re.search(r"/onnxruntime/capi/[^ ]*\.so", path) for paths in mapped.values() for path in paths), mapped
    loaded = sorted({path for paths in mapped.values() for path in paths if TRAINING_OBJECT.search(path)})
    assert not loaded, f"the predict processes {sorted(mapped)} mapped training libraries: {loaded}"


def test_importing_the_predict_function_imports_no_training_library_nor_pydantic(tmp_path):
    code = ("import sys; sys.path.insert(0, 'functions/predict'); import main; "
            f"print(sorted(m for m in {TRAINING_STACK + ('pydantic',)!r} if m in sys.modules))")
    result = subprocess.run(
        [sys.executable, "-c", code],
        # HOST: outside functions-framework, where it would listen; loopback, so no token is needed
        cwd=ROOT, env=dict(os.environ, BUCKETML_BUCKET=str(tmp_path / "bucket"), HOST="127.0.0.1"),
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
