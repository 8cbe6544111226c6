"""Reference for a pipeline run's held-out records: run under `torchrun --nproc_per_node N` (the run's
world size), it evaluates the weights of the run's checkpoints as a plain `ElectraPreTrainingModel`
with the data-parallel evaluator, each rank on the slice it evaluates in a data-parallel run.

    heldout_worker.py RUN_DIR OUT_JSON STEP:TAU [STEP:TAU ...]   (TAU: a threshold or "none")

writes {step: results} (rank 0).
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch.distributed as dist

from dsexit.data import read_validation_samples
from dsexit.data.index import DatasetIndex
from dsexit.data.stats import token_counts
from dsexit.train.checkpoint.files import open_checkpoint
from dsexit.train.export import data_url_of, load_trained_model
from dsexit.train.heldout import HeldOutEvaluator
from dsexit.train.trainer import BASELINE_SHARDS


def main():
    run_dir, out_path, *steps = sys.argv[1:]
    deepspeed.init_distributed(dist_backend="gloo")
    settings = json.loads((Path(run_dir) / "config.json").read_text())["train"]
    results = {}
    for item in steps:
        step, tau = item.split(":")
        checkpoint = open_checkpoint(str(Path(run_dir) / "checkpoints" / f"global_step{step}"))
        model = load_trained_model(checkpoint)
        dataset = DatasetIndex.load(data_url_of(checkpoint))
        evaluator = HeldOutEvaluator(
            read_validation_samples(dataset, settings["metrics"]["eval_samples"]),
            model.config,
            unigram_counts=token_counts(dataset, max_shards=BASELINE_SHARDS),
            seed=settings["job"]["seed"],
            batch_size=settings["metrics"]["eval_batch_size"],
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
        )
        results[step] = evaluator.evaluate(model, None if tau == "none" else float(tau))
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
