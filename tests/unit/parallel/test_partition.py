"""Pipeline partitions by layer counts and by expected work (no processes)."""

import json

import pytest

from dsexit.parallel.partition import PartitionError, expected_work_partition, parse_layer_counts, stage_expected_costs


def test_layer_counts_are_checked_against_stages_and_depth():
    assert parse_layer_counts("layers:4,8", 2, 12) == [4, 8]
    for bad in ("layers:4,7", "layers:12", "layers:0,12", "layers:a,b"):
        with pytest.raises(PartitionError, match="pipeline_partition="):
            parse_layer_counts(bad, 2, 12)


def test_without_skips_expected_work_balances_what_the_stages_hold():
    # stage 0 also pays for the embeddings and generator (two layers' worth here)
    assert expected_work_partition(2.0, [1.0] * 12, [1.0] * 12, 2) == [5, 7]
    assert expected_work_partition(0.0, [1.0] * 12, [1.0] * 12, 3) == [4, 4, 4]


def test_later_stages_hold_more_layers_when_half_the_micro_batches_leave_early():
    reach = [1.0] * 4 + [0.5] * 8  # half the micro-batches have no active token after layer 4
    counts = expected_work_partition(2.0, [1.0] * 12, reach, 2)
    assert counts == [3, 9]  # balanced on holdings it would be [5, 7]
    costs = stage_expected_costs(counts, 2.0, [1.0] * 12, reach)
    assert costs == [5.0, 5.0]
    # against every other split, none has a smaller largest stage
    for first in range(1, 12):
        assert max(stage_expected_costs([first, 12 - first], 2.0, [1.0] * 12, reach)) >= max(costs)


def test_a_profile_file_feeds_the_expected_partition(tmp_path):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"first_stage_cost": 2.0, "layer_cost": [1.0] * 12, "reach": [1.0] * 4 + [0.5] * 8}))
    assert parse_layer_counts(f"expected:{profile}", 2, 12) == [3, 9]
    with pytest.raises(PartitionError, match="6 layers"):
        parse_layer_counts(f"expected:{profile}", 2, 6)
    with pytest.raises(PartitionError, match="cannot read"):
        parse_layer_counts(f"expected:{tmp_path / 'missing.json'}", 2, 12)
