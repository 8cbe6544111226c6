"""bench/compare_trees.py: the figures of two trees' launches set side by side with their spread
(launching them: tests/integration/bench/test_compare_trees.py)."""

import pytest

from tests.helpers import load_bench

bench = load_bench("compare_trees")


def test_a_difference_within_the_spread_is_not_beyond_it():
    rows = bench.compare([{"a": 10.0}, {"a": 12.0}], [{"a": 11.0}, {"a": 11.5}], ["a"])
    assert rows["a"]["new_over_old"] == pytest.approx(11.25 / 11.0) and not rows["a"]["beyond_spread"]


def test_flatten_names_numbers_by_their_path_and_skips_the_rest():
    flat = bench.flatten({"configs": {"ours fp32": {"speed": 3, "ok": True, "name": "n"}}, "ratio": 1.5})
    assert flat == {"configs.ours fp32.speed": 3.0, "ratio": 1.5}
