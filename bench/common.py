"""What the benchmarks with peers share: the virtualenvs they install the peers into
(bench/.peers-venv, bench/.quality-venv, never the project's environment), and the machine and
package-version lines they print."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Lines of a requirements file after this one are installed with `pip install --no-deps`.
NO_DEPS_MARKER = "# --no-deps"


def ensure_venv(venv: Path, requirements: Path, what: str) -> Path:
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


def versions(python: Path, packages: list[str]) -> str:
    """'name version, ...' of `packages` as installed for `python`."""
    code = f"import importlib.metadata as m\nprint(', '.join(p + ' ' + m.version(p) for p in {packages!r}))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False).stdout.strip()


def machine() -> str:
    """Architecture, cores, CPU model and Python version, for the first line of a run."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return f"{platform.machine()}, {os.cpu_count()} cores ({model}), Python {platform.python_version()}"
