"""bench/compare_trees.py: launches take turns between two trees, each running its own copy of the
benchmark, and the figures are set side by side with their spread."""

import json
import textwrap

import pytest

from tests.helpers import load_bench

bench = load_bench("compare_trees")

# A benchmark whose figures depend on the tree it runs in (its package) and on the launch (a counter).
SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import speed
    counter = Path(sys.argv[0]).parent / "launches"
    launch = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(launch + 1))
    out = sys.argv[sys.argv.index("--out") + 1]
    Path(out).write_text(json.dumps({"arms": {"plain": {"tokens_per_s": speed.RATE + launch}}, "name": "x"}))
    """
)


def make_tree(root, rate):
    (root / "bench").mkdir(parents=True)
    (root / "bench" / "fake.py").write_text(SCRIPT)
    (root / "speed.py").write_text(f"RATE = {rate}\n")
    return root


def test_each_tree_runs_its_own_code_and_the_table_sets_them_side_by_side(tmp_path, capsys):
    old, new = make_tree(tmp_path / "old", 100.0), make_tree(tmp_path / "new", 150.0)
    out = tmp_path / "compare.json"
    bench.main(["--old", str(old), "--new", str(new), "--launches", "2", "--out", str(out), "bench/fake.py"])
    figure = json.loads(out.read_text())["figures"]["arms.plain.tokens_per_s"]
    assert figure["old"] == [100.0, 101.0] and figure["new"] == [150.0, 151.0]
    assert figure["old_spread"] == pytest.approx(0.01) and figure["new_over_old"] == pytest.approx(150.5 / 100.5)
    assert figure["beyond_spread"]
    assert "RESULT compare_trees figures=1 beyond_spread=1 arms.plain.tokens_per_s" in capsys.readouterr().out
