"""bench/pretrain_vs_exit.py as a real process: the device scale's whole path, dry run on this CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import SHARED_DATA, load_bench

bench = load_bench("pretrain_vs_exit")


def test_device_scale_dry_run_goes_through_the_whole_path(tmp_path):
    """`--scale device --dry-run`: the GPU scale's arms, held-out comparison, precondition and plots,
    with a tiny model for seconds per run, on this CPU."""
    shared = SHARED_DATA
    out = tmp_path / "device.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [
            sys.executable,
            str(Path(bench.__file__)),
            "--scale",
            "device",
            "--dry-run",
            "--arms",
            "baseline",
            "exit-0.50",
            "generator-free",
            "--concurrency",  # the runs take one thread each: two at a time on two cores
            "2",
            "--corpus",
            str(shared / "corpus"),
            "--task",
            str(shared / "downstream" / "rt_sentiment"),
            "--data-cache",
            str(tmp_path / "data"),
            "--work-dir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("RESULT pretrain_vs_exit time_saved_pct=") and "nan" not in lines[-1]
    assert any(line.startswith("PRECONDITION pretraining_beats_untrained=") for line in lines)
    results = json.loads(out.read_text())
    assert set(results["arms"]) == {"baseline", "exit-0.50", "generator-free"}
    assert results["generator"] == "mlm" and results["precondition"]["probe"]["seeds"] == 2
    for run in results["runs"]:
        assert run["curve"][0]["step"] == 0 and len(run["curve"]) >= 2
    for plot in results["plots"]:
        assert Path(plot).read_bytes()[:4] == b"\x89PNG"
