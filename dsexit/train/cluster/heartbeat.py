"""Peer heartbeats: a node that vanishes is noticed within `--heartbeat-timeout`, not `--dist-timeout`.

A closed connection fails a collective at once. A host that vanishes without closing its sockets (power
lost, network cut, kernel hung) leaves its peers waiting inside gloo or NCCL for the whole
`--dist-timeout`, and an elastic agent restarts workers only once one of its own has failed. So the
first rank of every node beats on the job's TCP store (the store the process group met on: rank 0's under
deepspeed and mpirun, the elastic agent's on the rendezvous host under torchrun) and watches every other
node's beat. A node whose beat stops advancing for the timeout, or a store that stops answering for as
long, is lost: `on_lost` gets one sentence naming it, and the caller logs it and exits (code 3), which an
elastic agent answers by re-forming the job without that node. Only nodes are watched: ranks that die on
one machine close their connections, and the agent there sees them exit.

Two threads: the beater makes the store's round trips, which can block while a network is down; the
judge only compares clocks, so a hung round trip cannot hide a loss. A beat is a counter, never a time,
so no two nodes' clocks are compared. A node that ends normally says so (`stop`) before its beat stops.
"""

from __future__ import annotations

import datetime
import logging
import os
import secrets
import threading
import time
from typing import Callable

from dsexit.train.cluster.distributed import (
    WorldInfo,
    broadcast_object,
    describe_node,
    job_nodes,
    node_of,
    restart_advice,
)

log = logging.getLogger("dsexit")

BEATS_PER_TIMEOUT = 5  # beats a silent node misses before it is declared lost
DONE = 1 << 40  # added to a node's counter when it ends normally


class PeerWatch:
    """This node's beat and its watch over the others' (see the module docstring).

    `store` is any torch.distributed Store; `keys` the key of every node's counter by node label. Peers'
    descriptions come with them (`descriptions`), as does the description of the store's own host."""

    def __init__(
        self,
        store,
        me: str,
        keys: dict[str, str],
        descriptions: dict[str, str],
        store_description: str,
        store_owner: str | None,
        timeout_s: float,
        on_lost: Callable[[str], None],
        who: str,
    ):
        self.store, self.me, self.keys = store, me, keys
        self.descriptions, self.store_description, self.store_owner = descriptions, store_description, store_owner
        self.timeout_s, self.on_lost, self.who = timeout_s, on_lost, who
        self.interval_s = max(0.05, timeout_s / BEATS_PER_TIMEOUT)
        started = time.monotonic()
        self._lock = threading.Lock()
        self._counters = {label: -1 for label in keys if label != me}
        self._changed_at = {label: started for label in self._counters}
        self._done: set[str] = set()
        self._answered_at = started
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._beat, daemon=True, name="dsexit-heartbeat"),
            threading.Thread(target=self._judge, daemon=True, name="dsexit-peer-watch"),
        ]

    # ------------------------------------------------------------------ the job's watch
    @classmethod
    def start_for_job(cls, world: WorldInfo, timeout_s: float, on_lost: Callable[[str], None]) -> "PeerWatch | None":
        """Every rank calls this once after `init_process_group` (the job's key prefix is agreed on by a
        collective); the first rank of each node of a job of several nodes gets a started watch, every other
        rank None. `timeout_s` 0 turns the watch off."""
        token = broadcast_object(secrets.token_hex(8))  # this job incarnation's keys: a restart starts afresh
        nodes = job_nodes()
        if timeout_s <= 0 or len(nodes) < 2 or world.local_rank != 0:
            return None
        import torch.distributed as dist

        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        store = dist.TCPStore(
            host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False
        )
        owner = next((label for label, node in nodes.items() if node["address"] == host), None)
        where = f"{host}:{port}" + (f" on {describe_node(owner, nodes)}" if owner else "")
        me = node_of(world.rank, nodes)
        watch = cls(
            store,
            me,
            {label: f"dsexit/heartbeat/{token}/{label}" for label in nodes},
            {label: describe_node(label, nodes) for label in nodes},
            where,
            owner,
            timeout_s,
            on_lost,
            who=f"rank {world.rank} on {me}",
        )
        log.info("peer heartbeat: %d nodes, lost after %g s of silence (--heartbeat-timeout)", len(nodes), timeout_s)
        return watch.start()

    def start(self) -> "PeerWatch":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """This node ends normally: say so to the others, then stop beating and watching."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self.store.add(self.keys[self.me], DONE)
        except Exception:  # the store's host may have ended first; the others then end too
            pass

    # ------------------------------------------------------------------ the two threads
    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.add(self.keys[self.me], 1)
                # add(key, 0) reads a counter without waiting for a key that a late node has not made yet
                counters = {label: self.store.add(self.keys[label], 0) for label in self._counters}
            except Exception:  # unreachable or timed out: the judge decides when that means lost
                self._stop.wait(self.interval_s)
                continue
            now = time.monotonic()
            with self._lock:
                self._answered_at = now
                for label, counter in counters.items():
                    if counter >= DONE:
                        self._done.add(label)
                    if counter != self._counters[label]:
                        self._counters[label], self._changed_at[label] = counter, now
            self._stop.wait(self.interval_s)

    def _judge(self) -> None:
        while not self._stop.wait(self.interval_s / 2):
            sentence = self.lost_sentence(time.monotonic())
            if sentence is not None:
                self._stop.set()
                self.on_lost(sentence)
                return

    def lost_sentence(self, now: float) -> str | None:
        """The sentence naming what is lost at monotonic time `now`, or None while all is well."""
        with self._lock:
            silent_store = now - self._answered_at
            silent = {label: now - at for label, at in self._changed_at.items() if label not in self._done}
            store_owner_done = self.store_owner in self._done
        if silent_store > self.timeout_s:
            if store_owner_done:  # the store's host ended normally: nothing left to watch
                self._stop.set()
                return None
            what = (
                f"lost the job's store at {self.store_description}: no answer for {silent_store:.0f} s "
                "(--heartbeat-timeout); its host is gone or the network to it is cut"
            )
        else:
            late = [label for label, seconds in silent.items() if seconds > self.timeout_s]
            if not late:
                return None
            what = "; ".join(
                f"lost peer {self.descriptions[label]}: no heartbeat for {silent[label]:.0f} s (--heartbeat-timeout)"
                for label in late
            )
        return f"{self.who}: {what}. {restart_advice()}"
