"""Checkpoint -> the trained model, and -> a Hugging Face directory.

`load_trained_model` rebuilds `ElectraPreTrainingModel` with fp32 weights from any
checkpoint (ZeRO shards consolidated by DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint`).
Every file is checked against the digests in the completion marker first; files dsexit
reads itself are loaded with `weights_only=True`; DeepSpeed's own loader unpickles, so
whoever can write the checkpoint location must be trusted.
`export_hf` writes what `from_pretrained` loads:

    OUT/                      ElectraForPreTraining (the discriminator; exit heads are
                              not part of HF ELECTRA) + the dataset's tokenizer
    OUT/generator/            ElectraForMaskedLM + tokenizer (generator="mlm" only)
    OUT/dsexit_model_config.json   the full model config (exit settings included)
    OUT/dsexit_export.json    which checkpoint and step this came from
"""

from __future__ import annotations

import json
import logging
import os

import torch

from dsexit.model import ElectraExitConfig, ElectraPreTrainingModel
from dsexit.model.hf import to_hf_masked_lm, to_hf_pretraining
from dsexit.train.checkpoint.files import CheckpointRef, open_checkpoint, saved_model_config, verify_files

log = logging.getLogger("dsexit")


def data_url_of(ref: CheckpointRef) -> str:
    from dsexit.data import DEFAULT_DATA_URL

    return ref.meta.get("data_url") or DEFAULT_DATA_URL


def _safe_globals() -> list:
    """What a dsexit checkpoint holds beyond tensors and containers: numpy RNG states (client state)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_weights_only(path: str) -> dict:
    """torch.load without running pickled code: tensors, containers and the few numpy types above."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def _pipeline_state_dict(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """A pipeline checkpoint keeps one file per pipeline layer; map them back to model names."""
    from dsexit.parallel.pipeline import pipeline_state_dict_to_model

    layer_states = {}
    for name in sorted(os.listdir(ref.path)):
        if name.startswith("layer_") and name.endswith("-model_states.pt"):
            index = int(name[len("layer_") :].split("-")[0])
            layer_states[index] = load_weights_only(os.path.join(ref.path, name))
    config = ElectraExitConfig.from_saved(saved_model_config(ref.meta))
    return {name: tensor.float() for name, tensor in pipeline_state_dict_to_model(layer_states, config).items()}


def fp32_state_dict(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    if int(ref.meta.get("pipeline_stages", 1)) > 1:
        return _pipeline_state_dict(ref)
    if int(ref.meta.get("zero_stage", 0)) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(ref.root, tag=ref.tag)
    states = load_weights_only(os.path.join(ref.path, "mp_rank_00_model_states.pt"))
    return {name: tensor.float() for name, tensor in states["module"].items()}


def load_trained_model(checkpoint: str | CheckpointRef) -> ElectraPreTrainingModel:
    """The model of a checkpoint (a tag directory or a checkpoints root), fp32, in eval mode."""
    ref = checkpoint if isinstance(checkpoint, CheckpointRef) else open_checkpoint(checkpoint)
    verify_files(ref)  # before anything unpickles a file of it (DeepSpeed's ZeRO consolidation does)
    model = ElectraPreTrainingModel(ElectraExitConfig.from_saved(saved_model_config(ref.meta)))
    state = fp32_state_dict(ref)
    missing, unexpected = model.load_state_dict(state, strict=False)
    persistent_buffers = {name for name, _ in model.named_buffers()}
    missing = [name for name in missing if name not in persistent_buffers]
    if missing or unexpected:
        raise ValueError(f"checkpoint {ref.path} does not fit the model: missing {missing}, unexpected {unexpected}.")
    return model.float().eval()


def export_hf(checkpoint: str | CheckpointRef, out_dir: str, *, with_generator: bool = True) -> str:
    from dsexit.data import save_hf_tokenizer

    ref = checkpoint if isinstance(checkpoint, CheckpointRef) else open_checkpoint(checkpoint)
    model = load_trained_model(ref)
    os.makedirs(out_dir, exist_ok=True)
    to_hf_pretraining(model).save_pretrained(out_dir)
    save_hf_tokenizer(data_url_of(ref), out_dir)
    if with_generator and model.generator is not None:
        generator_dir = os.path.join(out_dir, "generator")
        to_hf_masked_lm(model).save_pretrained(generator_dir)
        save_hf_tokenizer(data_url_of(ref), generator_dir)
    with open(os.path.join(out_dir, "dsexit_model_config.json"), "w") as handle:
        json.dump(model.config.to_dict(), handle, indent=1)
    with open(os.path.join(out_dir, "dsexit_export.json"), "w") as handle:
        json.dump({"checkpoint": os.path.abspath(ref.path), "step": ref.step}, handle, indent=1)
    log.info("exported %s (step %d) to %s", ref.tag, ref.step, out_dir)
    return out_dir
