"""Peak memory and time to read a large CSV upload: bucketml's streaming reader vs a plain
pandas.read_csv of the whole file (what a hand-written preprocess function would do).

    .venv/bin/python bench/read_large_csv.py [--gigabytes 1.0] [--keep]

Each reader runs in its own process; the figures are that process's peak RSS (ru_maxrss) and
wall time. The file is generated (numeric, categorical and missing values) in a temp folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

READERS = {
    "bucketml": (
        "from bucketml.training.reading import read_csv\n"
        "frame = read_csv(lambda: open(PATH, 'rb'), 'big.csv', {})\n"
        "rows_kept, rows_read = len(frame), frame.attrs['rows_read']\n"
    ),
    "pandas.read_csv": (
        "import pandas as pd\n"
        "frame = pd.read_csv(PATH)\n"
        "rows_kept = rows_read = len(frame)\n"
    ),
}


def generate(path: Path, gigabytes: float) -> int:
    """Repeat a 4 MB block of realistic rows until the file has the requested size."""
    rng = np.random.default_rng(0)
    n = 40_000
    block = pd.DataFrame(
        {
            "age": rng.integers(18, 90, n),
            "income": rng.normal(50_000, 15_000, n).round(2),
            "score": rng.random(n).round(6),
            "city": rng.choice(["Berlin", "Paris", "Madrid", "Rome", "Vienna", "Oslo"], n),
            "plan": rng.choice(["basic", "plus", "pro", ""], n),
            "visits": rng.poisson(3, n),
            "label": rng.choice(["yes", "no"], n),
        }
    ).to_csv(index=False)
    header, body = block.split("\n", 1)
    data = body.encode()
    target = int(gigabytes * (1 << 30))
    with open(path, "wb") as f:
        f.write((header + "\n").encode())
        while f.tell() < target:
            f.write(data)
    return path.stat().st_size


def measure(name: str, path: Path) -> dict:
    code = (
        f"import json, resource, time\nPATH = {str(path)!r}\nstarted = time.perf_counter()\n"
        + READERS[name]
        + "print(json.dumps({'seconds': time.perf_counter() - started, 'rows_kept': rows_kept, 'rows_read': rows_read,"
        " 'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else f"exit {done.returncode}"}
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--keep", action="store_true", help="keep the generated file")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bucketml-bench-"))
    path = folder / "big.csv"
    started = time.perf_counter()
    size = generate(path, args.gigabytes)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, pandas {pd.__version__}")
    print(f"file: {size / (1 << 30):.2f} GiB generated in {time.perf_counter() - started:.1f}s")
    print(f"{'reader':<18}{'peak RSS (MiB)':>16}{'seconds':>10}{'rows read':>14}{'rows kept':>12}")
    for name in READERS:
        result = measure(name, path)
        if "error" in result:
            print(f"{name:<18} failed: {result['error']}")
            continue
        print(f"{name:<18}{result['peak_rss_mib']:>16.0f}{result['seconds']:>10.1f}{result['rows_read']:>14,}{result['rows_kept']:>12,}")
    if not args.keep:
        path.unlink()
        folder.rmdir()


if __name__ == "__main__":
    main()
