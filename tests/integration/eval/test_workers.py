"""Fine-tuning and probe jobs spread over spawned worker processes come back to the right model and
seed, with the results a sequential run gives."""

import pytest

from dsexit.eval import FinetuneConfig, finetune, finetune_many, load_task
from tests.helpers.tasks import first_word_task  # noqa: F401  (a fixture)


def test_probe_through_workers_matches_the_sequential_run(tiny_export, first_word_task):
    task = load_task(str(first_word_task))
    config = FinetuneConfig(
        mode="probe",
        seeds=2,
        max_seq_len=16,
        max_train_examples=40,
        max_eval_examples=20,
        precision="fp32",
        progress="none",
    )
    finished = []
    parallel = finetune_many(
        [str(tiny_export)], task, config, workers=2, on_done=lambda model_dir, run: finished.append(run["seed"])
    )[0]
    sequential = finetune(str(tiny_export), task, config)
    assert sorted(finished) == [1, 2]
    assert parallel["median"]["dev"] == pytest.approx(sequential["median"]["dev"])


def test_parallel_workers_give_each_model_its_own_sequential_results(tiny_export, synthetic_task, tmp_path):
    """Jobs spread over worker processes come back to the right model and seed, as a sequential run gives them."""
    import shutil

    import torch
    from transformers import ElectraForPreTraining

    other = tmp_path / "other_init"
    shutil.copytree(tiny_export, other)
    torch.manual_seed(1)
    reinitialised = ElectraForPreTraining(ElectraForPreTraining.config_class.from_pretrained(tiny_export))
    reinitialised.save_pretrained(other)
    task = load_task(str(synthetic_task))
    config = FinetuneConfig(
        lr=2e-3,
        epochs=1,
        batch_size=16,
        max_seq_len=32,
        seeds=2,
        precision="fp32",
        max_train_examples=128,
        progress="none",
    )
    finished = []
    parallel = finetune_many(
        [str(tiny_export), str(other)],
        task,
        config,
        workers=2,
        on_done=lambda model_dir, run: finished.append((model_dir, run["seed"])),
    )
    assert sorted(finished) == sorted((str(d), s) for d in (tiny_export, other) for s in (1, 2))
    sequential = [finetune(str(model_dir), task, config) for model_dir in (tiny_export, other)]
    losses = {}
    for got, want in zip(parallel, sequential):
        assert got["model_dir"] == want["model_dir"] and got["examples"] == {"train": 128, "dev": 200, "test": 200}
        assert [run["seed"] for run in got["per_seed"]] == [1, 2]
        for got_run, want_run in zip(got["per_seed"], want["per_seed"]):
            assert got_run["epochs"][0]["train_loss"] == pytest.approx(want_run["epochs"][0]["train_loss"], rel=1e-4)
            losses[got["model_dir"], got_run["seed"]] = got_run["epochs"][0]["train_loss"]
    # The two initialisations really differ, so a mix-up of models would have been seen above.
    assert losses[str(tiny_export), 1] != pytest.approx(losses[str(other), 1], rel=1e-3)
