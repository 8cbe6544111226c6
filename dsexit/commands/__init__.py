"""The command-line programs, one module each with a `main(argv) -> exit code`.

    pretrain.py      dsexit-pretrain, python -m dsexit.train, launch/pretrain.py
    prepare_data.py  dsexit-prepare, launch/prepare_data.py
    export_hf.py     dsexit-export, launch/export_hf.py
    finetune.py      dsexit-finetune, launch/finetune.py
    plot_run.py      dsexit-plot, launch/plot_run.py (needs the `plot` extra)

The console scripts are declared in pyproject.toml; `launch/*.py` are thin wrappers for a
source checkout. Modules here import the rest of dsexit inside `main`, so the pre-training
command can pick the accelerator before DeepSpeed is imported.
"""
