"""The container images' package sets, checked without a container engine: each image's
requirements are generated from requirements.txt, and the predict set holds none of the
training libraries. The images themselves are built and run in tests/test_containers.py."""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT

RENDER = ROOT / "infra" / "images" / "render_requirements.py"


def test_image_requirements_are_generated_from_requirements_txt():
    done = subprocess.run([sys.executable, str(RENDER), "--check"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    predict = (ROOT / "infra" / "images" / "requirements-predict.txt").read_text().lower()
    for heavy in ("scikit-learn", "skl2onnx", "onnx=", "pandas", "scipy", "matplotlib"):
        assert heavy not in predict, f"the predict image would ship {heavy}"
    assert "onnxruntime==" in predict and "functions-framework==" in predict
