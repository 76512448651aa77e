"""Writes each image's pinned requirements from the one verified set, requirements.txt.

    python infra/images/render_requirements.py          # rewrite requirements-<image>.txt
    python infra/images/render_requirements.py --check  # exit 1 if a file is stale

An image lists the packages it needs by name; the versions always come from requirements.txt,
so a version is changed in one place. The predict image has no scikit-learn, skl2onnx, onnx,
pandas, scipy or matplotlib: it serves ONNX models with onnxruntime alone.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "requirements.txt"
HERE = Path(__file__).resolve().parent

COMMON = ["functions-framework", "cloudevents", "Werkzeug", "requests", "numpy", "google-cloud-storage",
          "python-json-logger", "PyYAML", "pydantic", "starlette"]
IMAGES = {
    # predict: ASGI (uvicorn's fast loop and parser), onnxruntime, fast JSON, metrics.
    "predict": COMMON + ["httptools", "uvloop", "onnxruntime", "orjson", "prometheus-client"],
    # preprocess and train share one image: reading, typing and splitting data, training,
    # exporting and checking the ONNX model (with onnxruntime), and the version report.
    "pipeline": COMMON + ["scikit-learn", "skl2onnx", "onnx", "protobuf", "pandas", "scipy", "threadpoolctl",
                          "matplotlib", "Jinja2", "onnxruntime", "orjson", "prometheus-client",
                          "google-cloud-pubsub",  # the GCS event source (bucketml.gcs_source) runs in this image
                          "python-multipart", "httptools", "uvloop"],  # the console's upload form, and its ASGI server
}


def pins() -> dict[str, str]:
    """Package name (lower case) -> its line in requirements.txt."""
    found = {}
    for line in SOURCE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name = re.split(r"[\[=<>~ ]", line, maxsplit=1)[0]
            found[name.lower()] = line
    return found


def render(image: str) -> str:
    lines = pins()
    missing = [name for name in IMAGES[image] if name.lower() not in lines]
    if missing:
        raise SystemExit(f"{image}: {', '.join(missing)} not pinned in requirements.txt")
    body = "\n".join(lines[name.lower()] for name in sorted(IMAGES[image], key=str.lower))
    return (f"# The {image} image's packages. Generated from requirements.txt by\n"
            f"# infra/images/render_requirements.py: edit versions there, then re-run it.\n{body}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1)")
    args = parser.parse_args()
    stale = []
    for image in IMAGES:
        path = HERE / f"requirements-{image}.txt"
        text = render(image)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        sys.exit(f"stale: {', '.join(stale)}; run python infra/images/render_requirements.py")


if __name__ == "__main__":
    main()
