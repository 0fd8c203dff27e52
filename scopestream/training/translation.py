"""Losses of the seeds' unpaired translation (STABLE, §002.2 of the seed notes)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def info_consistency_loss(
    e_b_of_ab: torch.Tensor,
    z_a: torch.Tensor,
    e_a_of_ba: torch.Tensor,
    z_b: torch.Tensor,
) -> torch.Tensor:
    """STABLE's information consistency: ‖E_B(x_AB) − sg[E_A(x_A)]‖₁ + ‖sg[E_A(x_BA)] − E_B(x_B)‖₁.

    The information map of an image and of its translation must agree; the stop-gradients
    are as in the reference trainer (asymmetric: the first term trains E_B∘D_B against a
    frozen Z_A, the second pulls E_B(x_B) toward a frozen E_A(x_BA)). Mean L1 per term.
    """
    return (e_b_of_ab - z_a.detach()).abs().mean() + (e_a_of_ba.detach() - z_b).abs().mean()


def cycle_ramp(step: int, total: int) -> float:
    """STABLE's sigmoid growth of the cycle weight: σ(12·t/T − 6) for t < T, then 1."""
    if total <= 0 or step >= total:
        return 1.0
    return 1.0 / (1.0 + math.exp(-(12.0 * step / total - 6.0)))
