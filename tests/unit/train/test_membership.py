"""The membership record (`dsexit.train.cluster.membership`): what a restarted worker says changed."""

from __future__ import annotations

import json

import pytest

from dsexit.train.cluster import distributed, membership
from dsexit.train.cluster.distributed import WorldInfo

A = ("host-a", "10.0.0.1")
B = ("host-b", "10.0.0.2")


@pytest.fixture
def roster(monkeypatch):
    """Set the job's roster as `init_process_group` would: one (host, address, node rank) per rank."""

    def set_places(*places):
        monkeypatch.setitem(distributed._ROSTER, "places", list(places))
        monkeypatch.setitem(distributed._ROSTER, "timeout_s", 1800.0)

    monkeypatch.setattr(distributed, "_ROSTER", {})
    return set_places


def _world(size: int, rank: int = 0, local_rank: int = 0) -> WorldInfo:
    return WorldInfo(rank, size, local_rank, 1, "env")


def test_a_first_start_has_nothing_to_report_and_writes_the_world(tmp_path, roster):
    roster((*A, "0"), (*B, "1"))
    assert membership.begin(str(tmp_path), _world(2)) is None
    record = json.loads((tmp_path / membership.MEMBERSHIP_FILE).read_text())
    assert record["world_size"] == 2 and sorted(node["address"] for node in record["nodes"].values()) == [A[1], B[1]]


def test_a_lost_node_is_named_with_the_steps_redone(tmp_path, roster):
    roster((*A, "0"), (*B, "1"))
    membership.begin(str(tmp_path), _world(2))
    membership.record_stop(str(tmp_path), _world(2), "lost peer", 7, lost="rank 0 on node 0: lost peer node 1 (...)")
    roster((*A, "0"))
    change = membership.begin(str(tmp_path), _world(1))
    assert change is not None and change.left == ["node 1"] and change.joined == []
    sentence = change.sentence(resumed_step=6)
    assert sentence.startswith("node 1 (10.0.0.2, host host-b) left; world size 2 -> 1; resumed from step 6; ")
    assert "1 step(s) redone (the previous world reached step 7); it stopped: lost peer (rank 0 on node 0" in sentence
    assert 0 <= change.seconds_since_stop() < 60


def test_a_node_that_joins_under_another_label_is_told_apart_by_its_address(tmp_path, roster):
    roster((*A, "0"))
    membership.begin(str(tmp_path), _world(1))
    membership.record_stop(str(tmp_path), _world(1), "preempted", 4)
    roster((*B, "0"), (*A, "1"))  # the new rendezvous ordered B first: A is node 1 now, and stays
    change = membership.begin(str(tmp_path), _world(2))
    assert change.joined == ["node 0"] and change.left == []
    sentence = change.sentence(4)
    assert sentence.startswith("node 0 (10.0.0.2, host host-b) joined; world size 1 -> 2; resumed from step 4; 0")


def test_the_same_world_after_a_clean_stop_reports_nothing_and_other_ranks_write_nothing(tmp_path, roster):
    roster((*A, "0"), (*A, "0"))
    assert membership.begin(str(tmp_path / "x"), _world(2, rank=1, local_rank=1)) is None
    assert not (tmp_path / "x").exists()
    membership.begin(str(tmp_path), _world(2))
    membership.record_stop(str(tmp_path), _world(2), "finished", 10)
    assert membership.begin(str(tmp_path), _world(2)) is None


def test_a_worker_that_never_recorded_its_stop_leaves_the_steps_redone_unknown(tmp_path, roster):
    roster((*A, "0"), (*B, "1"))
    membership.begin(str(tmp_path), _world(2))  # killed before any stop was recorded
    roster((*A, "0"))
    change = membership.begin(str(tmp_path), _world(1))
    assert "steps redone unknown" in change.sentence(2) and change.seconds_since_stop() is None


def test_an_unreadable_record_is_a_first_start(tmp_path, roster):
    (tmp_path / membership.MEMBERSHIP_FILE).write_text('{"nodes": ')
    roster((*A, "0"))
    assert membership.begin(str(tmp_path), _world(1)) is None
    assert json.loads((tmp_path / membership.MEMBERSHIP_FILE).read_text())["world_size"] == 1
