"""CPU-only tuning, behind one door: what a CPU host swaps in at start-up, never the GPU path.

The model (`dsexit.model`) uses torch's own dropout and attention, which compile with
`fullgraph=True` on every device. On a CPU host the trainer calls `use_cpu_kernels()` once at
start-up (unless it compiles the model): dropout then draws its mask from a PCG64 stream and
attention in training takes a math path with that mask (`kernels.py`). Nothing here is read by
the model's own code; it only fills the model's kernel slots (`dsexit.model.kernels`).
"""

from __future__ import annotations

from dsexit.cpu.kernels import cpu_attention, cpu_dropout


def use_cpu_kernels(enabled: bool = True) -> None:
    """Fill the model's kernel slots with the CPU kernels (or torch's own again, `enabled=False`)."""
    from dsexit.model import kernels

    if enabled:
        kernels.use(dropout=cpu_dropout, attention=cpu_attention)
    else:
        kernels.use_defaults()


__all__ = ["cpu_attention", "cpu_dropout", "use_cpu_kernels"]
