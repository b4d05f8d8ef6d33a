"""Pairwise preference losses for reward models (docs/models.md#preference-losses, after VideoAlign
`trainer.py`).

Labels per pair (A, B), as integer tensors:
    PREFER_A = 1, PREFER_B = -1, TIE = 0, INVALID = 22 (masked: contributes 0 to the sum but
    still counts in the mean's denominator, exactly as the reference trainer does).

bt_loss  (Bradley-Terry): non-tied pairs only, L = -log sigma(r_c - r_r); ties count as masked.
btt_loss (Rao-Kupper, "BT with ties"), with d = r_c - r_r:
    non-tied: L = -log sigma(d - ln k)
    tied:     L = -log sigma(d - ln k) - log sigma(-d - ln k) - ln(k^2 - 1)
where r_c = r_A if label == 1 else r_B, r_r = the other one. Both return the mean over all entries.
`btt_probabilities` gives the model's (P(A wins), P(tie), P(B wins)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PREFER_A, PREFER_B, TIE, INVALID = 1, -1, 0, 22


def _chosen_rejected(reward_a: torch.Tensor, reward_b: torch.Tensor, labels: torch.Tensor):
    a_wins = labels == PREFER_A
    return torch.where(a_wins, reward_a, reward_b), torch.where(a_wins, reward_b, reward_a)


def bt_loss(reward_a: torch.Tensor, reward_b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss; reward_a/reward_b (N,) float, labels (N,) int in {1, -1, 0, 22}. Ties and
    invalid pairs are masked (they count in the denominator). Returns a scalar in fp32."""
    chosen, rejected = _chosen_rejected(reward_a.float(), reward_b.float(), labels)
    valid = (labels == PREFER_A) | (labels == PREFER_B)
    loss = -F.logsigmoid(chosen - rejected)
    return torch.where(valid, loss, 0.0).mean()


def btt_loss(reward_a: torch.Tensor, reward_b: torch.Tensor, labels: torch.Tensor, k: float = 5.0) -> torch.Tensor:
    """Rao-Kupper Bradley-Terry-with-ties loss (docs/models.md#preference-losses); k > 1. Invalid labels
    (anything outside {1, -1, 0}) are masked and still count in the mean's denominator. Returns a scalar in fp32."""
    if k <= 1:
        raise ValueError(f"btt_loss needs k > 1 (ln(k^2 - 1) must exist), got {k}")
    log_k = math.log(k)
    chosen, rejected = _chosen_rejected(reward_a.float(), reward_b.float(), labels)
    d = chosen - rejected
    win = -F.logsigmoid(d - log_k)
    tie = win - F.logsigmoid(-d - log_k) - math.log(k * k - 1)
    valid = (labels == PREFER_A) | (labels == PREFER_B) | (labels == TIE)
    loss = torch.where(labels == TIE, tie, win)
    return torch.where(valid, loss, 0.0).mean()


def btt_probabilities(reward_a: torch.Tensor, reward_b: torch.Tensor, k: float = 5.0) -> torch.Tensor:
    """Rao-Kupper outcome probabilities (N, 3): (P(A wins), P(tie), P(B wins)); rows sum to 1."""
    d = reward_a.float() - reward_b.float()
    log_k = math.log(k)
    a_wins, b_wins = torch.sigmoid(d - log_k), torch.sigmoid(-d - log_k)
    tie = (k * k - 1) * a_wins * b_wins
    return torch.stack([a_wins, tie, b_wins], dim=-1)
