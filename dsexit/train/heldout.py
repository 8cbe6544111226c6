"""Held-out evaluation during pre-training: where a run stands against the trivial baselines.

A fixed set of validation samples (never trained on: `prepare_data` writes them to their
own shards) is corrupted once, with seeded generators that do not touch the training RNG:

    uniform     masked positions replaced uniformly over the vocabulary (specials excluded).
                Independent of the run's generator, so arms with different generators (MLM,
                uniform, unigram) and exit rules are measured on the same task.
    generator   the same masked positions given to the run's own generator (MLM), which
                samples the replacements with a fixed random stream at the run's sampling
                temperature (its training task); for generator-free runs, draws from their fixed
                distribution. The MLM loss is the generator's own (temperature 1).

Reported (`EVAL_FIELDS`), each a mean over the real tokens of the held-out samples:
    eval_rtd_loss_uniform / _acc_ / _auc_   the discriminator at full depth, uniform corruption
    eval_rtd_loss_uniform_exit, eval_compute_fraction   the same under the exit rule at the
                                            run's current tau (compute over exitable tokens)
    eval_rtd_loss_generator / _auc_         full depth, the run's generator corruption
    eval_mlm_loss / eval_mlm_accuracy       the generator on the masked positions
                                            (a fixed distribution's cross-entropy without one)
and the trivial baselines beside them:
    rtd_prior_entropy   the RTD loss of a model that knows only which positions can be replaced
                        (specials and padding never are) and the replacement rate among them
    unigram_entropy     the MLM loss of a context-free model: the cross-entropy of the masked
                        held-out tokens under the training data's unigram distribution

`Standing` turns the final figures into the run's verdict: the discriminator learned when its
held-out RTD loss under uniform corruption is at most 0.8 x the prior's entropy and its ROC-AUC on
its own generator's corruption is at least 0.7.

Every rank evaluates its own slice of the samples (all ranks run the same number of
batches, as ZeRO-3's parameter gathering requires) and the sums are all-reduced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dsexit.data.packing import token_type_ids as make_token_type_ids
from dsexit.model import ElectraExitConfig, ElectraPreTrainingModel
from dsexit.model.capacity import CapacitySchedule
from dsexit.model.discriminator import ExitDecision, exitable_tokens
from dsexit.model.pretraining import MaskedSlots

EVAL_FIELDS = (
    "eval_rtd_loss_uniform",
    "eval_rtd_acc_uniform",
    "eval_rtd_auc_uniform",
    "eval_rtd_loss_uniform_exit",
    "eval_compute_fraction",
    "eval_rtd_loss_generator",
    "eval_rtd_auc_generator",
    "eval_mlm_loss",
    "eval_mlm_accuracy",
    "rtd_prior_entropy",
    "unigram_entropy",
)


@dataclass
class Standing:
    """Whether the discriminator left the replaced-token prior on held-out data, criterion by criterion."""

    rtd_loss_uniform: float
    prior_entropy: float
    auc_generator: float
    generator: str

    RTD_SHARE_OF_PRIOR = 0.8
    MIN_AUC_GENERATOR = 0.7

    @classmethod
    def of(cls, results: dict[str, float], generator: str) -> "Standing":
        return cls(
            results["eval_rtd_loss_uniform"], results["rtd_prior_entropy"], results["eval_rtd_auc_generator"], generator
        )

    @property
    def rtd_holds(self) -> bool:
        return self.rtd_loss_uniform <= self.RTD_SHARE_OF_PRIOR * self.prior_entropy

    @property
    def auc_holds(self) -> bool:
        return self.auc_generator >= self.MIN_AUC_GENERATOR

    @property
    def learned(self) -> bool:
        return self.rtd_holds and self.auc_holds

    def sentence(self) -> str:
        verdict = (
            "the discriminator learned" if self.learned else "the discriminator has not learned within this budget"
        )
        return (
            f"{verdict}: held-out RTD loss {self.rtd_loss_uniform:.4f} under uniform corruption "
            f"{'<=' if self.rtd_holds else '>'} {self.RTD_SHARE_OF_PRIOR} x the replaced-token prior's "
            f"{self.prior_entropy:.4f} ({'yes' if self.rtd_holds else 'no'}); ROC-AUC {self.auc_generator:.3f} on "
            f"its own generator's ({self.generator}) corruption {'>=' if self.auc_holds else '<'} "
            f"{self.MIN_AUC_GENERATOR} ({'yes' if self.auc_holds else 'no'})"
        )


def binary_entropy(rate: float) -> float:
    if rate <= 0.0 or rate >= 1.0:
        return 0.0
    return -(rate * math.log(rate) + (1.0 - rate) * math.log(1.0 - rate))


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied scores sharing their mean rank)."""
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2  # 1-based rank, averaged over ties
    ranks = torch.empty_like(scores)
    ranks[order] = mean_rank[inverse]
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def unigram_log_probs(counts: np.ndarray, special_ids: list[int]) -> torch.Tensor:
    """log q(token) of the add-one smoothed unigram distribution, specials excluded."""
    smoothed = torch.from_numpy(counts.astype(np.float64)) + 1.0
    smoothed[special_ids] = 0.0
    return torch.log(smoothed / smoothed.sum())


@dataclass
class _Corruption:
    masked: torch.Tensor  # bool [N, T]
    uniform_ids: torch.Tensor  # long [N, T]: uniform replacements at masked positions
    uniform_labels: torch.Tensor  # float [N, T]


class HeldOutEvaluator:
    def __init__(
        self,
        samples: np.ndarray,
        config: ElectraExitConfig,
        *,
        unigram_counts: np.ndarray,
        seed: int = 0,
        batch_size: int = 64,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.config, self.batch_size, self.seed = config, batch_size, seed
        all_ids = torch.from_numpy(np.asarray(samples, dtype=np.int64))
        # Every rank runs the same number of batches: the slices are equal, a remainder is dropped.
        per_rank = len(all_ids) // world_size
        if per_rank == 0:
            raise ValueError(
                f"{len(all_ids)} held-out samples cannot be split over {world_size} ranks; "
                f"expected at least one per rank."
            )
        self.num_samples = per_rank * world_size
        ids = all_ids[: self.num_samples]
        self.input_ids = ids[rank * per_rank : (rank + 1) * per_rank]
        self.attention_mask = (self.input_ids != config.pad_token_id).long()
        self.token_type_ids = make_token_type_ids(self.input_ids, config.sep_token_id, config.pad_token_id)
        self.exitable = exitable_tokens(self.input_ids, self.attention_mask, config)
        self.corruption = self._corrupt(ids, rank, per_rank)
        self.unigram_log_probs = unigram_log_probs(unigram_counts, self._special_ids())
        self.baselines = self._baselines(ids)

    def _special_ids(self) -> list[int]:
        config = self.config
        return [config.pad_token_id, config.cls_token_id, config.sep_token_id, config.mask_token_id]

    def _replaceable(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids != self.config.pad_token_id) & ~torch.isin(ids, torch.tensor(self._special_ids()))

    def _corrupt(self, ids: torch.Tensor, rank: int, per_rank: int) -> _Corruption:
        """Masks and uniform replacements for all samples, drawn once from `seed` (world-size independent)."""
        generator = torch.Generator().manual_seed(self.seed)
        masked = self._replaceable(ids) & (torch.rand(ids.shape, generator=generator) < self.config.mask_prob)
        allowed = torch.ones(self.config.vocab_size)
        allowed[self._special_ids()] = 0.0
        draws = torch.multinomial(allowed / allowed.sum(), ids.numel(), replacement=True, generator=generator)
        uniform_ids = torch.where(masked, draws.view_as(ids), ids)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        self._all_masked, self._all_uniform_labels = masked, (uniform_ids != ids)
        return _Corruption(
            masked=masked[mine], uniform_ids=uniform_ids[mine], uniform_labels=(uniform_ids != ids).float()[mine]
        )

    def _baselines(self, ids: torch.Tensor) -> dict[str, float]:
        real = ids != self.config.pad_token_id
        replaceable = self._replaceable(ids)
        rate = float(self._all_uniform_labels[replaceable].float().mean()) if replaceable.any() else 0.0
        # Specials and padding are never replaced: a model knowing only that and the rate pays
        # the binary entropy on replaceable positions alone, averaged over every real token.
        prior = binary_entropy(rate) * float(replaceable.sum()) / max(1.0, float(real.sum()))
        originals = ids[self._all_masked]
        unigram = float(-self.unigram_log_probs[originals].mean()) if originals.numel() else float("nan")
        return {"rtd_prior_entropy": prior, "unigram_entropy": unigram}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(
        self,
        model: ElectraPreTrainingModel,
        exit_threshold: float | None,
        device: torch.device | str = "cpu",
        exit_capacity: int | None = None,
    ) -> dict[str, float]:
        """The `EVAL_FIELDS` of `model` now (a collective when the world has more than one rank); under the
        exit rule, with `exit_threshold` or, for capacity routing, the level `exit_capacity`."""
        was_training = model.training
        model.eval()
        sums = torch.zeros(len(_SUMS), dtype=torch.float64)
        uniform_scores, uniform_targets, generator_scores, generator_targets = [], [], [], []
        sampling = torch.Generator(device=device).manual_seed(self.seed + 1)
        try:
            for start in range(0, len(self.input_ids), self.batch_size):
                batch = slice(start, start + self.batch_size)
                ids, mask = self.input_ids[batch].to(device), self.attention_mask[batch].to(device)
                types, exitable = self.token_type_ids[batch].to(device), self.exitable[batch].to(device)
                masked = self.corruption.masked[batch].to(device)
                real = mask.bool()
                uniform_ids = self.corruption.uniform_ids[batch].to(device)
                uniform_labels = self.corruption.uniform_labels[batch].to(device)
                full = self._discriminate(model, uniform_ids, mask, types, exitable, None)
                _accumulate(sums, "uniform", full.logits[real], uniform_labels[real])
                uniform_scores.append(full.logits[real].cpu())
                uniform_targets.append(uniform_labels[real].cpu())
                exiting = self._discriminate(model, uniform_ids, mask, types, exitable, exit_threshold, exit_capacity)
                _accumulate(sums, "uniform_exit", exiting.logits[real], uniform_labels[real])
                sums[_SUMS.index("token_layers")] += sum(work.token_layers for work in exiting.work)
                sums[_SUMS.index("token_layers_full")] += float(exitable.sum()) * self.config.num_hidden_layers
                generator_ids, log_probs = self._generator_replacements(model, ids, mask, types, masked, sampling)
                generator_labels = (generator_ids != ids).float()
                state = self._discriminate(model, generator_ids, mask, types, exitable, None)
                _accumulate(sums, "generator", state.logits[real], generator_labels[real])
                generator_scores.append(state.logits[real].cpu())
                generator_targets.append(generator_labels[real].cpu())
                originals = ids[masked]
                sums[_SUMS.index("mlm_loss")] -= float(log_probs.gather(1, originals[:, None]).sum())
                sums[_SUMS.index("mlm_correct")] += float((log_probs.argmax(-1) == originals).sum())
                sums[_SUMS.index("mlm_count")] += originals.numel()
        finally:
            model.train(was_training)
        scores = {
            "uniform": (torch.cat(uniform_scores), torch.cat(uniform_targets)),
            "generator": (torch.cat(generator_scores), torch.cat(generator_targets)),
        }
        sums, scores = _all_reduce(sums, scores, device)
        total = lambda name: float(sums[_SUMS.index(name)])  # noqa: E731
        tokens = max(1.0, total("tokens"))
        return {
            "eval_rtd_loss_uniform": total("uniform_loss") / tokens,
            "eval_rtd_acc_uniform": total("uniform_correct") / tokens,
            "eval_rtd_auc_uniform": roc_auc(*scores["uniform"]),
            "eval_rtd_loss_uniform_exit": total("uniform_exit_loss") / tokens,
            "eval_compute_fraction": total("token_layers") / max(1.0, total("token_layers_full")),
            "eval_rtd_loss_generator": total("generator_loss") / tokens,
            "eval_rtd_auc_generator": roc_auc(*scores["generator"]),
            "eval_mlm_loss": total("mlm_loss") / max(1.0, total("mlm_count")),
            "eval_mlm_accuracy": total("mlm_correct") / max(1.0, total("mlm_count")),
            **self.baselines,
            "eval_samples": self.num_samples,
        }

    def _discriminate(self, model, ids, mask, types, exitable, exit_threshold, exit_capacity=None):
        capacity = None if exit_capacity is None else CapacitySchedule.at_level(self.config, exit_capacity)
        decision = ExitDecision.for_config(self.config, threshold=exit_threshold, capacity=capacity)
        return model.discriminator(ids, mask, types, decision=decision, exitable=exitable)

    def _generator_replacements(self, model, ids, mask, types, masked, sampling):
        """(ids with the masked positions replaced, log-probabilities of the masked rows [M, V])."""
        rows = masked.reshape(-1).nonzero().squeeze(1)
        if model.generator is not None:
            generator_input = ids.reshape(-1).index_fill(0, rows, self.config.mask_token_id).view_as(ids)
            slots = MaskedSlots.from_mask(masked)  # each sequence's masked positions in order: `rows`' order
            logits = model.generator(model.embeddings, generator_input, mask, types, positions=slots.positions)
            logits = logits[slots.valid.reshape(-1)].float()
            log_probs = F.log_softmax(logits, dim=-1)
            replacements = model.sample_from_logits(logits, self.config.generator_temperature, generator=sampling)
        else:  # a fixed distribution is its own generator
            log_probs = torch.log(model.replacement_probs.double().clamp(min=1e-30)).float()
            log_probs = log_probs.expand(rows.numel(), -1)
            replacements = torch.multinomial(
                model.replacement_probs, max(1, rows.numel()), replacement=True, generator=sampling
            )[: rows.numel()]
        corrupted = ids.reshape(-1).index_copy(0, rows, replacements).view_as(ids)
        return corrupted, log_probs


_SUMS = (
    "tokens",
    "uniform_loss",
    "uniform_correct",
    "uniform_exit_loss",
    "uniform_exit_correct",
    "generator_loss",
    "generator_correct",
    "token_layers",
    "token_layers_full",
    "mlm_loss",
    "mlm_correct",
    "mlm_count",
)


def _accumulate(sums: torch.Tensor, prefix: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
    logits = logits.float()
    sums[_SUMS.index(f"{prefix}_loss")] += float(F.binary_cross_entropy_with_logits(logits, labels, reduction="sum"))
    sums[_SUMS.index(f"{prefix}_correct")] += float(((logits > 0).float() == labels).sum())
    if prefix == "uniform":
        sums[_SUMS.index("tokens")] += labels.numel()


def _all_reduce(sums: torch.Tensor, scores: dict, device) -> tuple[torch.Tensor, dict]:
    """Sum the counters and gather the (score, label) pairs of every rank for the AUC."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return sums, scores
    sums = sums.to(device)
    dist.all_reduce(sums)
    gathered = {}
    for name, (logits, labels) in scores.items():
        pairs = [None] * dist.get_world_size()
        dist.all_gather_object(pairs, (logits, labels))
        gathered[name] = (torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]))
    return sums.cpu(), gathered
