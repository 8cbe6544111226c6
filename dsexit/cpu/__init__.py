"""CPU-only tuning, behind one door: what a CPU process sets up once at start-up, never the GPU path.

    allocator.py   the host allocator: glibc's malloc kept from returning freed tensor memory;
                   tcmalloc preloaded by re-executing the process, when the user asks for it
    kernels.py     dropout with a cheaper CPU mask, and attention in training on its math path
                   with that mask (neither compiles)

The one entrance is `tune_process`, which `dsexit.train.cluster.distributed.setup_process` calls when, and
only when, DeepSpeed's accelerator is the CPU: the pretrain command and the benchmarks start that
way, and a GPU process imports nothing from here. The model (`dsexit.model`) uses torch's own
dropout and attention, which compile with `fullgraph=True` on every device; this package only
fills the model's kernel slots (`dsexit.model.kernels`), once, before the model runs. What the
settings change, as measured: docs/cpu.md.
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


def tune_process(*, kernels: bool = True, reexec: bool = True) -> None:
    """Everything a CPU process tunes, in this order, before it starts any work:

    1. with `DSEXIT_TCMALLOC=auto` (or a library's path), re-execute this process with tcmalloc
       preloaded (first: no thread, no MPI, no process group may exist yet); `reexec=False` skips it;
    2. glibc's malloc keeps freed memory and one heap (unless `DSEXIT_MALLOC_TUNING=off`);
    3. subnormal floats flush to zero (they can slow CPU kernels by orders of magnitude);
    4. the CPU dropout and attention in the model's kernel slots, unless `kernels=False` (a model
       that will be compiled keeps torch's, which `torch.compile(fullgraph=True)` needs).

    A bad `DSEXIT_TCMALLOC` or `DSEXIT_MALLOC_TUNING` raises `ConfigError` before anything changes."""
    import torch

    from dsexit.cpu.allocator import keep_freed_memory, preload_tcmalloc, tcmalloc_choice, tuning_choice

    tcmalloc_choice()  # both settings checked before either takes effect
    tuning_choice()
    if reexec:
        preload_tcmalloc()
    keep_freed_memory()
    torch.set_flush_denormal(True)
    use_cpu_kernels(kernels)


__all__ = ["cpu_attention", "cpu_dropout", "tune_process", "use_cpu_kernels"]
