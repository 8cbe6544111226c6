"""RNG state: capture and restore every generator a training step draws from.

Masking, replacement sampling and dropout use torch's default generator; numpy and
`random` are captured too so that any component drawing from them resumes exactly.
Each rank has its own stream (seed offset by rank); checkpoints keep all ranks' states.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_deterministic_kernels() -> None:
    """Kernels that give the same bits on every run. On CUDA, atomics in the embedding, scatter and
    fused-attention backward passes otherwise make two runs (or a run and its resume) drift apart
    after the first step, and the generator's discrete sampling amplifies the drift."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when the first cuBLAS handle is made
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    if torch.cuda.is_available():  # flash and memory-efficient attention accumulate with atomics
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank `rank`'s stream; `step` > 0 gives a fresh stream after a world-size change."""
    return seed + 1_000_003 * (rank + 1) + 7_919 * step


def capture_rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RngStates:
    """Every rank's RNG state as one `Stateful` (its `state_dict` is a collective: all ranks call it).

    At the same world size each rank resumes its own stream; at another, streams cannot
    continue, so each rank starts a fresh, reproducible one from (seed, rank, step).
    """

    def __init__(self, seed: int, rank: int, world_size: int, step: Callable[[], int]):
        self.seed, self.rank, self.world_size, self.step = seed, rank, world_size, step
        self.saved_world_size: int | None = None

    def state_dict(self) -> dict[str, Any]:
        import torch.distributed as dist

        states: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(states, capture_rng_state())
        return {"per_rank": states, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved_world_size = int(state["world_size"])
        if len(state["per_rank"]) == self.world_size:
            restore_rng_state(state["per_rank"][self.rank])
        else:
            seed_everything(rank_seed(self.seed, self.rank, self.step()))
