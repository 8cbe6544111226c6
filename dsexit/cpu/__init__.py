"""CPU-only tuning, behind one door: what a CPU process sets up once at start-up, never the GPU path.

    allocator.py   the host allocator: glibc's malloc kept from returning freed tensor memory;
                   tcmalloc preloaded by re-executing the process, when the user asks for it
    kernels.py     dropout with a cheaper CPU mask, and attention in training on its math path
                   with that mask (neither compiles)

The one entrance is `tune_process`, which `dsexit.train.cluster.distributed.setup_process` calls when, and
only when, DeepSpeed's accelerator is the CPU: the pretrain command and the benchmarks start that
way, and a GPU process imports nothing from here. Its first step, `start_process` (the settings
checked, tcmalloc's re-execution), imports no torch: the pretrain command calls it before its heavy
imports (`dsexit.train.cluster.distributed.start_process`), so a re-executed process pays them once.
The model (`dsexit.model`) uses torch's own dropout and attention, which compile with
`fullgraph=True` on every device; this package only fills the model's kernel slots
(`dsexit.model.kernels`), once, before the model runs. What the settings change, as measured:
docs/cpu.md.
"""

from __future__ import annotations

_KERNELS = ("cpu_attention", "cpu_dropout")


def __getattr__(name: str):
    """The kernels, imported on first use (they import torch; `start_process` must not)."""
    if name in _KERNELS:
        from dsexit.cpu import kernels

        return getattr(kernels, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def use_cpu_kernels(enabled: bool = True) -> None:
    """Fill the model's kernel slots with the CPU kernels (or torch's own again, `enabled=False`)."""
    from dsexit.cpu.kernels import cpu_attention, cpu_dropout
    from dsexit.model import kernels

    if enabled:
        kernels.use(dropout=cpu_dropout, attention=cpu_attention)
    else:
        kernels.use_defaults()


def start_process(*, reexec: bool = True) -> None:
    """`tune_process`'s first step, torch-free: both allocator settings checked (a bad one raises
    `ConfigError` before anything changes), then, unless `reexec=False`, the re-execution with
    tcmalloc preloaded where `DSEXIT_TCMALLOC` asks for it (once: the re-executed process skips it)."""
    from dsexit.cpu.allocator import preload_tcmalloc, tcmalloc_choice, tuning_choice

    tcmalloc_choice()
    tuning_choice()
    if reexec:
        preload_tcmalloc()


def tune_process(*, kernels: bool = True, reexec: bool = True) -> None:
    """Everything a CPU process tunes, in this order, before it starts any work:

    1. with `DSEXIT_TCMALLOC=auto` (or a library's path), re-execute this process with tcmalloc
       preloaded (first: no thread, no MPI, no process group may exist yet); `reexec=False` skips it;
    2. glibc's malloc keeps freed memory and one heap (unless `DSEXIT_MALLOC_TUNING=off`);
    3. subnormal floats flush to zero (they can slow CPU kernels by orders of magnitude);
    4. the CPU dropout and attention in the model's kernel slots, unless `kernels=False` (a model
       that will be compiled keeps torch's, which `torch.compile(fullgraph=True)` needs).

    A bad `DSEXIT_TCMALLOC` or `DSEXIT_MALLOC_TUNING` raises `ConfigError` before anything changes."""
    start_process(reexec=reexec)  # before torch is imported, where the caller did not call it already
    import torch

    from dsexit.cpu.allocator import keep_freed_memory

    keep_freed_memory()
    torch.set_flush_denormal(True)
    use_cpu_kernels(kernels)


__all__ = ["cpu_attention", "cpu_dropout", "start_process", "tune_process", "use_cpu_kernels"]
