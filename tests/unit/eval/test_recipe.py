"""ELECTRA's fine-tuning recipe: layer-wise learning rates, per-task epochs, stratified subsamples."""

import collections

import pytest

from dsexit.commands.finetune import build_parser
from dsexit.eval import FinetuneConfig, load_task, stratified_subset
from dsexit.eval.finetune import parameter_groups
from dsexit.eval.tasks import Example
from tests.helpers.tasks import write_jsonl


@pytest.fixture(scope="module")
def classifier():
    """A random 3-layer `ElectraForSequenceClassification` with an embedding projection (64 -> 32 wide)."""
    import torch
    from transformers import ElectraConfig, ElectraForSequenceClassification

    torch.manual_seed(0)
    config = ElectraConfig(
        vocab_size=100,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    return ElectraForSequenceClassification(config)


def learning_rates(model, config: FinetuneConfig) -> dict[str, tuple[float, float]]:
    """(lr, weight decay) of every named parameter, as the optimizer groups give them."""
    by_id = {
        id(parameter): (group["lr"], group["weight_decay"])
        for group in parameter_groups(model, config)
        for parameter in group["params"]
    }
    return {name: by_id[id(parameter)] for name, parameter in model.named_parameters()}


def test_layerwise_learning_rates_follow_electras_depths(classifier):
    lr, decay, layers = 1e-3, 0.5, 3
    got = learning_rates(classifier, FinetuneConfig(lr=lr, layerwise_lr_decay=decay, weight_decay=0.01))
    assert len(got) == len(list(classifier.parameters()))  # every parameter in exactly one group
    for name, (group_lr, weight_decay) in got.items():
        if name.startswith("classifier."):
            expected = lr
        elif name.startswith(("electra.embeddings.", "electra.embeddings_project.")):
            expected = lr * decay ** (layers + 2)
        else:
            layer = int(name.split("electra.encoder.layer.")[1].split(".")[0])
            expected = lr * decay ** (layers + 1 - layer)
        assert group_lr == pytest.approx(expected), name
        no_decay = name.endswith(".bias") or "LayerNorm" in name
        assert weight_decay == (0.0 if no_decay else 0.01), name
    assert got["electra.encoder.layer.2.output.dense.weight"][0] == pytest.approx(lr * decay**2)


def test_decay_one_gives_every_group_the_base_lr(classifier):
    got = learning_rates(classifier, FinetuneConfig(lr=3e-4, layerwise_lr_decay=1.0))
    assert {group_lr for group_lr, _ in got.values()} == {3e-4}


def test_defaults_are_electra_smalls_published_recipe():
    config = FinetuneConfig()
    assert (config.lr, config.layerwise_lr_decay, config.warmup_fraction, config.weight_decay) == (3e-4, 0.8, 0.1, 0.01)
    assert config.epochs is None and config.mode == "finetune"


@pytest.mark.parametrize("name, epochs", [("RTE", 10), ("sts-b", 10), ("rt_sentiment", 3), ("mrpc", 3)])
def test_epochs_none_is_the_tasks_default_and_a_number_overrides(tmp_path, name, epochs):
    directory = tmp_path / name
    directory.mkdir()
    for split in ("train", "dev", "test"):
        write_jsonl(directory / f"{split}.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
    task = load_task(str(directory))
    FinetuneConfig().validate()
    assert FinetuneConfig().epochs_for(task) == epochs
    assert FinetuneConfig(epochs=7).epochs_for(task) == 7


def test_cli_epochs_default_to_the_task_and_take_a_number():
    parser = build_parser()
    assert parser.parse_args(["--model", "m", "--task", "t"]).epochs is None
    assert parser.parse_args(["--model", "m", "--task", "t", "--epochs", "4"]).epochs == 4
    assert "task default" in parser.format_help()


@pytest.mark.parametrize(
    "field, value",
    [("epochs", 0), ("layerwise_lr_decay", 0.0), ("layerwise_lr_decay", 1.5), ("mode", "linear"), ("probe_l2", -1.0)],
)
def test_invalid_recipe_values_are_refused(field, value):
    with pytest.raises(ValueError, match=rf"^{field}=.* is invalid; expected"):
        FinetuneConfig(**{field: value}).validate()


def test_stratified_subset_of_a_label_sorted_split():
    """600 negatives then 300 positives: the first 90 rows would be one class; the subset keeps 2:1."""
    examples = [Example(f"negative {i}", None, 0) for i in range(600)] + [
        Example(f"positive {i}", None, 1) for i in range(300)
    ]
    subset = stratified_subset(examples, 90, seed=0)
    assert collections.Counter(example.label for example in subset) == {0: 60, 1: 30}
    assert [e.text_a for e in subset] == [e.text_a for e in stratified_subset(examples, 90, seed=0)]
    assert [e.text_a for e in subset] != [e.text_a for e in stratified_subset(examples, 90, seed=1)]
    assert [e.text_a for e in subset] == [e.text_a for e in examples if e in subset]  # file order kept
    assert stratified_subset(examples, None, seed=0) == examples and stratified_subset(examples, 900, 0) == examples


def test_stratified_subset_rounds_to_exactly_the_limit():
    examples = [Example(str(i), None, i % 3) for i in range(10)]  # 4, 3, 3 of labels 0, 1, 2
    for limit in range(1, 10):
        subset = stratified_subset(examples, limit, seed=3)
        assert len(subset) == limit and len({e.text_a for e in subset}) == limit


def test_max_train_examples_draws_from_every_class_of_a_sorted_task(tmp_path):
    records = [{"text": "bad", "label": 0}] * 60 + [{"text": "good", "label": 1}] * 40
    for split in ("train", "dev", "test"):
        write_jsonl(tmp_path / f"{split}.jsonl", records)
    task = load_task(str(tmp_path))
    config = FinetuneConfig(max_train_examples=20, max_eval_examples=10, seeds=5)
    assert collections.Counter(e.label for e in config.examples(task, "train")) == {0: 12, 1: 8}
    assert collections.Counter(e.label for e in config.examples(task, "dev")) == {0: 6, 1: 4}


def test_learning_rate_schedule_is_linear_warmup_from_zero_then_linear_decay_to_zero(classifier):
    """Against the formula written out here (ELECTRA / BERT / Hugging Face: lr x step / warmup while warming
    up, lr x (total - step) / (total - warmup) after), for every step the fine-tuner takes."""
    from dsexit.eval.finetune import _optimizer

    lr, total = 1e-3, 50
    config = FinetuneConfig(lr=lr, layerwise_lr_decay=1.0, warmup_fraction=0.1)
    warmup = 5
    optimizer, schedule = _optimizer(classifier, config, total)
    used = []
    for _ in range(total):
        used.append(optimizer.param_groups[0]["lr"])  # the rate this step's optimizer.step() applies
        optimizer.step()
        schedule.step()
    expected = [
        lr * step / warmup if step < warmup else lr * (total - step) / (total - warmup) for step in range(total)
    ]
    assert used == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # The hand-written schedule this replaced decayed identically and warmed up one step earlier
    # ((step + 1) / warmup): its first step already used lr / warmup, this one starts from 0.
    assert used[0] == 0.0 and used[warmup] == pytest.approx(lr)
