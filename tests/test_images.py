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


def test_the_console_adds_nothing_to_the_predict_image():
    """The console (Jinja2 pages, python-multipart forms) runs in the pipeline image's set."""
    predict = (ROOT / "infra" / "images" / "requirements-predict.txt").read_text().lower()
    pipeline = (ROOT / "infra" / "images" / "requirements-pipeline.txt").read_text().lower()
    for package in ("python-multipart", "jinja2"):
        assert package not in predict, f"the predict image would ship the console's {package}"
        assert package in pipeline, f"the console's image (the pipeline set) lacks {package}"
