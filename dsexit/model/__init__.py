"""ELECTRA with token-level early exit. Knows nothing of DeepSpeed, pipelines or data."""

from . import kernels
from .capacity import CapacitySchedule
from .config import PRESETS, ElectraExitConfig
from .discriminator import ElectraDiscriminator, ExitDecision, ExitState
from .exit_control import CapacityController, ExitController, exit_controller_for
from .flops import ComputeLog, FlopReport, LayerWork, count_flops
from .generator import ElectraGenerator
from .pretraining import ElectraPreTrainingModel, PreTrainingOutput

__all__ = [
    "kernels",
    "PRESETS",
    "ElectraExitConfig",
    "ElectraDiscriminator",
    "ExitDecision",
    "ExitState",
    "ExitController",
    "CapacityController",
    "CapacitySchedule",
    "exit_controller_for",
    "ComputeLog",
    "FlopReport",
    "LayerWork",
    "count_flops",
    "ElectraGenerator",
    "ElectraPreTrainingModel",
    "PreTrainingOutput",
]
