"""The DeepSpeed trainer: configuration, launch, the training loop, checkpoints, export.

What lives where:
    __main__.py    `python -m dsexit.train`: the pre-training command
    config/        TrainConfig, the command line, the DeepSpeed JSON, and resolution into a
                   ResolvedRun before any process group (its __init__ lists the files)
    distributed.py ranks from deepspeed / torchrun / mpirun, CPU threads, the process group
    engine.py      the one place that builds the model and the DeepSpeed engine
    trainer.py     Trainer: the run, step by step
    step_stats.py  one step's statistics over micro-batches and ranks (one all-reduce)
    metrics.py     rank-0 reporting: progress bar / lines, metrics.jsonl, DeepSpeed monitors
    checkpoint/    saving and resuming: the on-disk layout, the manager, the mirror, universal
                   conversion, run identity (its __init__ lists the files)
    export.py      checkpoint -> model -> Hugging Face directory
    rng.py         RNG capture / restore
    preemption.py  SIGTERM / SIGINT -> checkpoint and clean exit
    plot.py        PNG plots of a run (dsexit-plot; needs the `plot` extra)

Nothing here imports DeepSpeed at module import time except through functions, so that
`distributed.select_accelerator()` can run first.
"""
