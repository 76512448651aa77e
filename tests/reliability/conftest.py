"""The reliability tests: bad input never crashes anything; serving holds under change.

They use the suite's `helpers` (in the folder above) like every other test.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parents[1])
if TESTS not in sys.path:  # pytest puts it there for tests/conftest.py; also when run from this folder alone
    sys.path.insert(0, TESTS)
