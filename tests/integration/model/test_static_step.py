"""The training step has static shapes and reads nothing back from the device, so it compiles into
one graph per shape and nothing in forward or backward synchronises a GPU.

On torch 2.13 a host read inside a compiled graph does not always break it (`nonzero()`, boolean
indexing, `int(t.sum())` and `.item()` can trace as data-dependent symbols, which still
synchronise), so `fullgraph=True` alone proves little: the checking backend below fails when the
forward or backward graph holds a data-dependent operation or a symbolic size.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from dsexit.model import ElectraExitConfig, ElectraPreTrainingModel, kernels
from tests.unit.model.conftest import VOCAB, make_batch

# Operations whose output size or value the host must read from the device.
_DATA_DEPENDENT = {
    "aten.nonzero.default",
    "aten._local_scalar_dense.default",
    "aten.item.default",
    "aten.masked_select.default",
    "aten.unique.default",
    "aten._unique2.default",
    "aten.unique_consecutive.default",
    "aten.unique_dim.default",
    "aten.bincount.default",
    "aten.repeat_interleave.Tensor",
    "aten.index.Tensor_bool",
}


class CheckingBackend:
    """An aot_autograd backend that records every forward and backward graph and what it found wrong."""

    def __init__(self):
        self.graphs: list[str] = []
        self.problems: list[str] = []
        self.backend = aot_autograd(fw_compiler=self._check("forward"), bw_compiler=self._check("backward"))

    def _check(self, kind: str):
        def compiler(graph_module: torch.fx.GraphModule, example_inputs):
            self.graphs.append(kind)
            for node in graph_module.graph.nodes:
                if node.op == "call_function" and str(node.target) in _DATA_DEPENDENT:
                    self.problems.append(f"{kind}: {node.target}")
                if node.op == "call_function" and "sym" in str(node.target):
                    self.problems.append(f"{kind}: symbolic size {node.target}")
                if node.op == "call_function" and str(node.target) == "aten.index.Tensor":
                    indices = [arg for arg in node.args[1] if arg is not None]
                    if any(
                        index.meta.get("val") is not None and index.meta["val"].dtype == torch.bool for index in indices
                    ):
                        self.problems.append(f"{kind}: boolean-mask indexing")
            return make_boxed_func(graph_module.forward)

        return compiler


def _tiny_model() -> ElectraPreTrainingModel:
    config = ElectraExitConfig.from_preset("electra-tiny", vocab_size=VOCAB)
    torch.manual_seed(0)
    return ElectraPreTrainingModel(config).train()


def _training_step(model: ElectraPreTrainingModel):
    def step(input_ids, attention_mask, token_type_ids, replacement_mix):
        output = model(input_ids, attention_mask, token_type_ids, replacement_mix=replacement_mix)
        statistics = torch.stack(
            [output.generator_loss, output.discriminator_loss, output.rtd_accuracy, output.flops.token_layers_executed]
        )
        return output.loss, statistics, output.exit_layer_counts

    return step


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
def test_exits_off_training_step_compiles_whole_with_no_data_dependent_operation(padded):
    """The model as `ElectraPreTrainingModel(config)` builds it by default (exit heads present, no
    token exiting: exits off or in warm-up), forward and backward; then twenty steps with other
    batches and other per-step values compile nothing new."""
    assert kernels.uses_defaults()  # CPU kernels are the CPU set-up's choice, not the model's
    model = _tiny_model()
    checking = CheckingBackend()
    torch._dynamo.reset()
    compiled = torch.compile(_training_step(model), backend=checking.backend, fullgraph=True, dynamic=False)
    for step in range(21):
        input_ids, attention_mask, token_type_ids = make_batch(4, 32, pad_tail=padded, seed=step)
        mix = torch.tensor(0.5 * step / 20)
        loss, statistics, counts = compiled(input_ids, attention_mask if padded else None, token_type_ids, mix)
        loss.backward()
        assert torch.isfinite(loss) and int(counts.sum()) == int(attention_mask.sum())
    assert checking.problems == []
    assert checking.graphs == ["forward", "backward"], checking.graphs  # one graph each, no recompilation
    assert all(parameter.grad is not None for parameter in model.discriminator.parameters())


def test_the_step_equals_the_eager_step():
    model = _tiny_model()
    input_ids, attention_mask, token_type_ids = make_batch(3, 24, pad_tail=True, seed=3)
    torch._dynamo.reset()
    compiled = torch.compile(_training_step(model), backend=CheckingBackend().backend, fullgraph=True, dynamic=False)
    model.eval()  # no dropout: the same random draws for masking and sampling are all that remain
    results = []
    for function in (_training_step(model), compiled):
        torch.manual_seed(11)
        results.append(function(input_ids, attention_mask, token_type_ids, None))
    for eager, traced in zip(*results):
        torch.testing.assert_close(eager, traced)


@pytest.mark.parametrize("exit_kv", ["keep", "drop"])
def test_capacity_exits_run_on_meta_tensors(exit_kv):
    """Capacity routing reads nothing back either: forward and backward on tensors that hold no values."""
    config = ElectraExitConfig.from_preset("electra-tiny", vocab_size=VOCAB, exit_kv=exit_kv)
    with torch.device("meta"):
        model = ElectraPreTrainingModel(config).train()
        input_ids = torch.randint(200, VOCAB, (4, 32))
        attention_mask = torch.ones(4, 32, dtype=torch.long)
        token_type_ids = torch.zeros(4, 32, dtype=torch.long)
    loss, statistics, counts, floor_counts = _capacity_step(model)(input_ids, attention_mask, token_type_ids, 6)
    loss.backward()
    assert loss.device.type == "meta" and statistics.shape == (2,) and floor_counts.shape == (2, 4)


def test_exits_off_training_step_runs_on_meta_tensors():
    """Meta tensors hold no values: any read of one on the host (`.item()`, `nonzero()`, `bool()`)
    raises, so a step that runs end to end on them reads nothing back."""
    config = ElectraExitConfig.from_preset("electra-tiny", vocab_size=VOCAB)
    with torch.device("meta"):
        model = ElectraPreTrainingModel(config).train()
        input_ids = torch.randint(200, VOCAB, (4, 32))
        attention_mask = torch.ones(4, 32, dtype=torch.long)
        token_type_ids = torch.zeros(4, 32, dtype=torch.long)
    for mask in (None, attention_mask):
        loss, statistics, counts = _training_step(model)(
            input_ids, mask, token_type_ids, torch.tensor(0.2, device="meta")
        )
        loss.backward()
        assert loss.device.type == "meta" and statistics.shape == (4,) and counts.shape == (4,)


def test_the_checking_backend_finds_host_reads_that_trace_as_symbols(monkeypatch):
    """The check itself: `nonzero()` and boolean indexing, which torch can trace as data-dependent
    sizes when asked to, are reported (the guard above would catch them creeping into the model)."""
    monkeypatch.setattr(torch._dynamo.config, "capture_dynamic_output_shape_ops", True)
    for reads in (lambda x: x.nonzero().sum(), lambda x: x[x > 0].sum()):
        checking = CheckingBackend()
        torch._dynamo.reset()
        torch.compile(reads, backend=checking.backend, fullgraph=True, dynamic=False)(torch.randn(16))
        assert checking.problems, reads


def _capacity_step(model: ElectraPreTrainingModel):
    def step(input_ids, attention_mask, token_type_ids, level):
        output = model(input_ids, attention_mask, token_type_ids, exit_capacity=level, min_confidence=0.25)
        statistics = torch.stack([output.flops.token_layers_executed.float(), output.forced_exits.float()])
        return output.loss, statistics, output.exit_layer_counts, output.floor_counts

    return step


@pytest.mark.parametrize("routing", ["capacity", "random"])
@pytest.mark.parametrize("exit_kv", ["keep", "drop"])
def test_capacity_exits_compile_whole_with_no_data_dependent_operation(exit_kv, routing):
    """Tokens exit at every head (capacity level 6), forward and backward, with padding: one graph each,
    nothing the host reads; other batches at the same level compile nothing new."""
    config = ElectraExitConfig.from_preset("electra-tiny", vocab_size=VOCAB, exit_kv=exit_kv, exit_routing=routing)
    torch.manual_seed(0)
    model = ElectraPreTrainingModel(config).train()
    checking = CheckingBackend()
    torch._dynamo.reset()
    compiled = torch.compile(_capacity_step(model), backend=checking.backend, fullgraph=True, dynamic=False)
    for step in range(3):
        input_ids, attention_mask, token_type_ids = make_batch(4, 32, pad_tail=True, seed=step)
        loss, statistics, counts, _ = compiled(input_ids, attention_mask, token_type_ids, 6)
        loss.backward()
        assert torch.isfinite(loss) and int(counts.sum()) == int(attention_mask.sum())
        assert (counts[:3] > 0).all()  # tokens left at every exit head
    assert checking.problems == []
    assert checking.graphs == ["forward", "backward"], checking.graphs
    assert all(parameter.grad is not None for parameter in model.discriminator.parameters())


def test_a_run_crossing_capacity_levels_compiles_once_per_level_it_visits(monkeypatch):
    """The controller's level changes now and then; each level is its own static graph, compiled the
    first time the run meets it and reused when it comes back (recompile limit: the levels, and the
    warm-up's graph without exits)."""
    from dsexit.model.capacity import LEVELS

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", LEVELS + 1)
    model = _tiny_model()
    checking = CheckingBackend()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(_capacity_step(model), backend=checking.backend, fullgraph=True, dynamic=False)
    levels = [None, 16, 16, 8, 8, 16, 8]
    for step, level in enumerate(levels):
        input_ids, attention_mask, token_type_ids = make_batch(4, 32, seed=step)
        loss, *_ = compiled(input_ids, None, token_type_ids, level)
        loss.backward()
    visited = len(set(levels))
    assert checking.problems == []
    assert checking.graphs == ["forward", "backward"] * visited, checking.graphs
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == visited
