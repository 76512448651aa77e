"""The virtualenvs the benchmarks install their peers into (bench/.peers-venv,
bench/.quality-venv), never into the project's environment."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Lines of a requirements file after this one are installed with `pip install --no-deps`.
NO_DEPS_MARKER = "# --no-deps"


def ensure(venv: Path, requirements: Path, what: str) -> Path:
    """The Python of `venv`, created and filled from `requirements` when that file changed since
    the last install (a stamp of its hash is kept in the venv)."""
    python = venv / "bin" / "python"
    stamp = venv / ".requirements.sha256"
    wanted = hashlib.sha256(requirements.read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    print(f"installing {what} into {venv.relative_to(REPO)} (pip, a minute or two)", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--quiet"]  # errors only
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    # One file, two installs: the lines after the marker go in without their dependencies.
    with_deps, _, without_deps = requirements.read_text().partition(NO_DEPS_MARKER)
    with tempfile.TemporaryDirectory() as tmp:
        for part, extra in ((with_deps, []), (without_deps, ["--no-deps"])):
            if not part.strip():
                continue
            listed = Path(tmp) / "requirements.txt"
            listed.write_text(part)
            subprocess.run([*pip, *extra, "-r", str(listed)], check=True)
    stamp.write_text(wanted)
    return python
