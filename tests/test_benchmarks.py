"""Smoke runs of the benchmark scripts that have a CPU mode (their GPU numbers come from the H200 runs)."""

import csv
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_bench_devices_splits_the_layers_and_writes_a_row(tmp_path):
    """bench_devices.py on two (CPU) devices and with the offloaded cache: one row per run, the decode rate and
    the peak memory filled in."""
    for extra in (["--devices", "cpu,cpu"], ["--devices", "cpu", "--offload"]):
        res = subprocess.run([sys.executable, "benchmarks/bench_devices.py", "--tiny", "--context", "600", "--steps", "1",
                              "--out-dir", str(tmp_path), *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "devices.csv")))
    assert [(r["devices"], r["offload"]) for r in rows] == [("cpu+cpu", "False"), ("cpu", "True")]
    assert all(int(r["tokens"]) == 600 and float(r["tok_per_s"]) > 0 and r["peak_gib"].startswith("cpu=") for r in rows)
