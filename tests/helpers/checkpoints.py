"""A stand-in for DeepSpeed's checkpoint writer: what `CheckpointManager` tests need, in milliseconds."""

from __future__ import annotations

import json
import os


class FakeEngine:
    """Writes what DeepSpeed would, in miniature; `calls` records the tag directory's state at each save."""

    def __init__(self):
        self.calls = []

    def save_checkpoint(self, root, tag, client_state, save_latest):
        tag_dir = os.path.join(root, tag)
        self.calls.append(sorted(os.listdir(tag_dir)) if os.path.isdir(tag_dir) else None)
        os.makedirs(tag_dir, exist_ok=True)
        with open(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), "wb") as handle:
            handle.write(json.dumps(client_state).encode())
        with open(os.path.join(tag_dir, "zero_pp_rank_0_mp_rank_00_optim_states.pt"), "wb") as handle:
            handle.write(os.urandom(64))
