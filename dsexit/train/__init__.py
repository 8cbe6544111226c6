"""The DeepSpeed trainer: configuration, launch, the training loop, checkpoints, export.

What lives where, in the order a run meets it:
    __main__.py       `python -m dsexit.train`: the pre-training command (dsexit/commands/pretrain.py)
    config/           TrainConfig, the command line, the DeepSpeed JSON, and resolution into a
                      ResolvedRun before the trainer is built (its __init__ lists the files)
    cluster/          who is in the job: the process's set-up (`setup_process`: the accelerator, on
                      a CPU the one door to `dsexit.cpu`), ranks from deepspeed / torchrun / mpirun,
                      the process group, peer heartbeats, the membership record an elastic restart
                      reads, preemption (its __init__ lists the files)
    errors.py         the errors a run ends with (ConfigError, CheckpointError, ...); the command
                      turns them into exit codes
    trainer.py        Trainer: the run, step by step
    engine.py         the one place that builds the model and the DeepSpeed engine
    param_groups.py   optimizer parameter groups (no weight decay on biases and LayerNorm)
    compiling.py      `--compile`: the training forward under torch.compile
    step_runner.py    one optimizer step through the engine, one runner per parallel mode
    step_stats.py     one step's statistics over micro-batches and ranks (one all-reduce)
    rng.py            RNG capture / restore
    heldout.py        held-out evaluation during pre-training, against the trivial baselines
    metrics.py        rank-0 reporting: progress bar / lines, metrics.jsonl, DeepSpeed monitors
    checkpoint/       saving and resuming: the on-disk layout, the one rule that chooses what to
                      resume, the manager, the mirror, retention, universal conversion, run
                      identity (its __init__ lists the files)
    export.py         checkpoint -> model -> Hugging Face directory
    plot.py           PNG plots of a run (dsexit-plot; needs the `plot` extra)

Storage (URLs, retries, atomic writes, credential redaction) is `dsexit.storage`'s. Nothing
here imports DeepSpeed at module import time except through functions, so that
`cluster.distributed.select_accelerator()` can run first.
"""
