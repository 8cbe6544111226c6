"""Peer heartbeats (`dsexit.train.cluster.heartbeat.PeerWatch`) on a real TCP store: a node that goes
silent is named, one that ends normally is not, and a store that stops answering (a round trip that
hangs, as across a cut network) is named too without the hung call holding the judge up."""

from __future__ import annotations

import datetime
import threading

import pytest
import torch.distributed as dist

from dsexit.train.cluster.heartbeat import DONE, PeerWatch

TIMEOUT_S = 0.5
LABELS = ("node 0", "node 1")


@pytest.fixture
def store_server():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=10))
    yield server


def _client(server):
    return dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=datetime.timedelta(seconds=10))


class _Lost:
    def __init__(self):
        self.sentences: list[str] = []
        self.event = threading.Event()

    def __call__(self, sentence: str) -> None:
        self.sentences.append(sentence)
        self.event.set()


def _watch(store, me: str, lost: _Lost, token: str = "t", store_owner: str | None = "node 0") -> PeerWatch:
    return PeerWatch(
        store,
        me,
        {label: f"hb/{token}/{label}" for label in LABELS},
        {label: f"{label} (10.0.0.{index + 1}, host h{index}, rank(s) {index})" for index, label in enumerate(LABELS)},
        "10.0.0.1:29500 on node 0",
        store_owner,
        TIMEOUT_S,
        lost,
        who=f"rank {LABELS.index(me)} on {me}",
    )


def test_a_node_that_stops_beating_is_named_and_a_live_one_is_not(store_server):
    lost_by_0, lost_by_1 = _Lost(), _Lost()
    zero = _watch(_client(store_server), "node 0", lost_by_0).start()
    one = _watch(_client(store_server), "node 1", lost_by_1).start()
    # Both beat for several timeouts: nobody is lost.
    assert not lost_by_0.event.wait(3 * TIMEOUT_S) and not lost_by_1.sentences
    one._stop.set()  # node 1 vanishes: its beat stops without the word that it ended
    assert lost_by_0.event.wait(30), "node 0 never noticed node 1's silence"
    [sentence] = lost_by_0.sentences
    assert sentence.startswith("rank 0 on node 0: lost peer node 1 (10.0.0.2, host h1, rank(s) 1): no heartbeat for")
    assert "--heartbeat-timeout" in sentence and "--resume auto" in sentence  # no elastic agent here
    zero.stop()


def test_a_node_that_ends_normally_is_not_taken_for_lost(store_server):
    lost_by_0 = _Lost()
    zero = _watch(_client(store_server), "node 0", lost_by_0).start()
    one_store = _client(store_server)
    one = _watch(one_store, "node 1", _Lost()).start()
    assert not lost_by_0.event.wait(2 * TIMEOUT_S)
    one.stop()
    assert one_store.add("hb/t/node 1", 0) >= DONE
    assert not lost_by_0.event.wait(4 * TIMEOUT_S), lost_by_0.sentences
    zero.stop()


def test_the_elastic_agent_is_named_as_what_happens_next(store_server, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    lost = _Lost()
    zero = _watch(_client(store_server), "node 0", lost)
    sentence = zero.lost_sentence(zero._answered_at + 2 * TIMEOUT_S)  # not started: nothing has answered
    assert sentence is not None and "elastic agent restarts this node's workers" in sentence
    assert "(2 restart(s) left)" in sentence


class _HangingStore:
    """A store whose round trips hang once `cut` is set, as a TCP connection does across a cut link."""

    def __init__(self, real):
        self.real, self.cut, self.release = real, threading.Event(), threading.Event()

    def add(self, key, amount):
        if self.cut.is_set():
            self.release.wait()
            raise RuntimeError("connection reset")
        return self.real.add(key, amount)


def _node_1_on_a_store_that_can_hang(store_server):
    """Node 1 watching through a store that hangs once cut, node 0 (the store's host) through its own;
    both have beaten for a while. Returns node 1's losses, its store, and both watches."""
    lost = _Lost()
    hanging = _HangingStore(_client(store_server))
    one = _watch(hanging, "node 1", lost).start()
    zero = _watch(_client(store_server), "node 0", _Lost()).start()
    assert not lost.event.wait(2 * TIMEOUT_S)
    return lost, hanging, one, zero


def test_a_store_that_stops_answering_is_named_even_while_a_round_trip_hangs(store_server):
    lost, hanging, one, zero = _node_1_on_a_store_that_can_hang(store_server)
    hanging.cut.set()
    try:
        assert lost.event.wait(30), "the judge waited on the hung round trip"
        [sentence] = lost.sentences
        assert sentence.startswith("rank 1 on node 1: lost the job's store at 10.0.0.1:29500 on node 0: no answer for")
    finally:
        hanging.release.set()
        zero.stop()
        one.stop()


def test_the_store_going_away_after_its_host_ended_normally_is_no_loss(store_server):
    lost, hanging, one, zero = _node_1_on_a_store_that_can_hang(store_server)
    zero.stop()  # node 0 (the store's host) ends normally ...
    for _ in range(600):  # node 1 reads node 0's last word within a beat or two
        if "node 0" in one._done:
            break
        threading.Event().wait(0.05)
    assert "node 0" in one._done
    hanging.cut.set()  # ... then its store goes
    try:
        assert not lost.event.wait(4 * TIMEOUT_S), lost.sentences
    finally:
        hanging.release.set()
        one.stop()
