"""The DeepSpeed trainer: configuration, launch, the training loop, checkpoints, export.

What lives where:
    config.py      TrainConfig: one dataclass per section, training presets, validation
    cli.py         command line -> TrainConfig (launch/pretrain.py)
    ds_config.py   the DeepSpeed JSON: parallelism matrix, "auto" fields, precision
    resolve.py     ResolvedRun: dataset, model config, DeepSpeed config; before any process group
    distributed.py ranks from deepspeed / torchrun / mpirun, CPU threads, the process group
    engine.py      the one place that builds the model and the DeepSpeed engine
    trainer.py     Trainer: the run, step by step
    step_stats.py  one step's statistics over micro-batches and ranks (one all-reduce)
    metrics.py     rank-0 reporting: progress bar / lines, metrics.jsonl, DeepSpeed monitors
    checkpoint.py  save, completeness marker, resume choice, retention
    store.py       checkpoint mirror on fsspec URLs
    universal.py   resume at another data-parallel size via ds_to_universal
    export.py      checkpoint -> model -> Hugging Face directory
    rng.py         RNG capture / restore
    preemption.py  SIGTERM / SIGINT -> checkpoint and clean exit
    redact.py      credentials never printed or saved
    plot.py        PNG plots of a run (launch/plot_run.py)

Nothing here imports DeepSpeed at module import time except through functions, so that
`distributed.select_accelerator()` can run first.
"""
