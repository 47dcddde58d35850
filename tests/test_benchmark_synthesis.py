"""The engine benchmark runs on the CPU with the tiny architecture and prints its table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_cpu_benchmark_prints_public_eager_and_compiled_rows() -> None:
    cmd = [sys.executable, str(REPO / "benchmarks" / "synthesis.py"), "--quick", "--resolutions", "32", "--views", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "SPEED TEST with random weights" in out
    rows = {m.group(1): m.group(0) for m in re.finditer(r"tiny32 (public|eager|compiled) .*", out)}
    assert set(rows) == {"public", "eager", "compiled"}, out
    for row in rows.values():
        fields = row.split()
        assert fields[-1] == "yes"  # finite pixels
        views, total, per_view = int(fields[-10]), float(fields[-9]), float(fields[-8])
        floor_s, x_floor = float(fields[-5]), float(fields[-4])
        assert views == 4 and total > 0 and abs(per_view * 4 - total) < 1e-3 * max(1, total) + 4e-4
        # The printed figures are rounded: allow the ratio what half a unit of each last digit moves it.
        half = [0.5 * 10.0 ** -len(f.split(".")[1]) if "." in f else 0.5 for f in (fields[-9], fields[-5])]
        low, high = (total - half[0]) / (floor_s + half[1]), (total + half[0]) / max(floor_s - half[1], 1e-12)
        assert floor_s > 0 and low - 0.01 <= x_floor <= high + 0.01, (total, floor_s, x_floor)
    # The compiled path gives the eager path's pixels (the same seeds, views and weights).
    assert float(rows["compiled"].split()[-2]) <= 1e-5
    assert re.search(r"goal tiny32: compiled 4 views = [\d.]+ x floor", out)
