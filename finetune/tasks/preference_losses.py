"""Preference losses on per-sequence log-probabilities: pure functions, one per method, and their registry.

Every function takes the policy's log-probabilities of the chosen and rejected responses, ``(B,)`` each
(given the prompt; sums over response tokens, or per-token means for the ``length_normalised`` losses),
and for the methods with a reference model the reference's. Each returns ``PairLosses``: the loss of every
pair and the implicit rewards of both responses, ``(B,)`` each. Signs and defaults follow the papers and
TRL (``DPOTrainer``, ``CPOTrainer``, ``ORPOTrainer``):

``dpo`` (Rafailov et al. 2023), with ``h = (chosen - rejected) - (ref_chosen - ref_rejected)``::

    loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)      beta 0.1, eps (label_smoothing) 0
    reward = beta (logp - ref_logp)

``eps > 0`` is conservative DPO (cDPO: each label is flipped with probability ``eps``).

``ipo`` (Azar et al. 2023): ``loss = (h - 1 / (2 beta))²`` with ``beta`` the paper's tau (0.1), on per-token
mean log-probabilities as TRL computes it; rewards as DPO's.

``simpo`` (Meng et al. 2024), reference-free on per-token mean log-probabilities::

    loss = -(1 - eps) log sigmoid(beta (chosen - rejected) - gamma) - eps log sigmoid(-(...))
    reward = beta logp                                                     beta 2.0, gamma 1.0, eps 0

(TRL's ``simpo_gamma`` is this ``gamma`` divided by ``beta``; the defaults are the paper's Llama-3 setting.)

``orpo`` (Hong et al. 2024), reference-free on per-token mean log-probabilities ``p``::

    odds(p) = p - log(1 - exp(p))
    loss = -chosen + beta * -log sigmoid(odds(chosen) - odds(rejected))   beta (the paper's lambda) 0.1
    reward = beta logp

The NLL term is the chosen response's mean per-token NLL, per pair as in the paper (TRL averages it over
all chosen tokens of the batch instead); so every loss here is a mean over pairs, and batch 1 x
accumulation 8 equals batch 8 x 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from finetune.registry import Registry


class PairLosses(NamedTuple):
    """Per pair: the loss, and the chosen and rejected responses' rewards (``(B,)`` each)."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-(1 - eps) log sigmoid(x) - eps log sigmoid(-x)``: the preference is right with probability 1 - eps."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PairLosses:
    """DPO (conservative DPO with ``label_smoothing`` above 0) on summed log-probabilities."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    loss = _smoothed_sigmoid_loss(beta * (chosen_ratio - rejected_ratio), label_smoothing)
    return PairLosses(loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def ipo(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> PairLosses:
    """IPO: the log-ratio margin regressed onto ``1 / (2 beta)`` (``beta`` is the paper's tau)."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    loss = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return PairLosses(loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def simpo(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
) -> PairLosses:
    """SimPO: reference-free, on per-token mean log-probabilities, with a target reward margin ``gamma``."""
    loss = _smoothed_sigmoid_loss(beta * (chosen - rejected) - gamma, label_smoothing)
    return PairLosses(loss, beta * chosen.detach(), beta * rejected.detach())


def log_odds(logp: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` from ``log p`` (``logp`` < 0), without overflow when ``p`` is near 0 or 1."""
    logp = logp.clamp(max=-1e-6)  # p = 1 has infinite odds
    # log(1 - p) = log(-expm1(log p)) is exact near p = 1, log1p(-p) near p = 0.
    log_rest = torch.where(logp > -0.693, torch.log(-torch.expm1(logp)), torch.log1p(-torch.exp(logp)))
    return logp - log_rest


def orpo(chosen: torch.Tensor, rejected: torch.Tensor, beta: float = 0.1) -> PairLosses:
    """ORPO: the chosen response's mean NLL plus ``beta`` (lambda) times the odds-ratio loss."""
    ratio = F.logsigmoid(log_odds(chosen) - log_odds(rejected))
    loss = -chosen - beta * ratio
    return PairLosses(loss, beta * chosen.detach(), beta * rejected.detach())


@dataclass(frozen=True)
class PreferenceLoss:
    """A preference loss and what it needs.

    Args:
        name: the ``model.loss`` name.
        function: the loss (this module's functions); policy log-probs first, then the reference's when
            ``reference``, then its hyper-parameters by keyword.
        reference: it compares with a reference model (DPO, IPO); false: reference-free.
        length_normalised: it takes per-token mean log-probabilities (else sums over the response).
        beta: its default ``beta``.
        options: the hyper-parameters it takes besides ``beta``, with their defaults.
    """

    name: str
    function: Callable[..., PairLosses]
    reference: bool
    length_normalised: bool
    beta: float
    options: tuple[tuple[str, float], ...] = ()


LOSSES: Registry[PreferenceLoss] = Registry("preference loss", "model.loss")
for _loss in (
    PreferenceLoss("dpo", dpo, True, False, 0.1, (("label_smoothing", 0.0),)),
    PreferenceLoss("ipo", ipo, True, True, 0.1),
    PreferenceLoss("simpo", simpo, False, True, 2.0, (("gamma", 1.0), ("label_smoothing", 0.0))),
    PreferenceLoss("orpo", orpo, False, True, 0.1),
):
    LOSSES.register(_loss.name)(_loss)
