"""The Lightning module and the patch dataset for every training mode."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset

from scopestream.inference.architectures import build
from scopestream.training.n2v import n2v_mask

if TYPE_CHECKING:
    from scopestream.inference.manifest import Normalization
    from scopestream.training.data import PatchSampler


class NaNLoss(RuntimeError):
    """The loss became NaN or infinite."""


class PatchDataset(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """(input, target, loss weight) tensors for one mode; ``length`` draws, deterministic."""

    def __init__(
        self,
        sampler: PatchSampler,
        mode: str,
        input_norm: Normalization,
        target_norm: Normalization | None,
        length: int,
    ) -> None:
        self.sampler, self.mode, self.length = sampler, mode, length
        self.input_norm, self.target_norm = input_norm, target_norm

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, ys = self.sampler.sample(i)
        xn = self.input_norm.apply(x[None])
        if self.mode == "n2v":
            rng = np.random.default_rng((self.sampler.seed, i, 7))
            masked, mask = n2v_mask(xn[0], rng)
            return (
                torch.from_numpy(masked[None]),
                torch.from_numpy(xn),
                torch.from_numpy(mask[None]),
            )
        assert self.target_norm is not None
        y = self.target_norm.apply(np.stack(ys))
        weight = np.isfinite(y).astype(np.float32)  # a missing target (NaN) does not count
        return torch.from_numpy(xn), torch.from_numpy(np.nan_to_num(y)), torch.from_numpy(weight)


class TrainModule(L.LightningModule):
    """One network, one loss: n2v (blind-spot MSE), care (L1/L2 ± SSIM), supervised (masked L2)."""

    def __init__(
        self,
        arch_kind: str,
        arch_params: dict[str, Any],
        mode: str,
        *,
        lr: float = 4e-4,
        loss: str = "l2",
        ssim_weight: float = 0.0,
        max_steps: int = 1000,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build(arch_kind, arch_params)  # type: ignore[arg-type]
        self.mode, self.lr, self.loss_kind = mode, lr, loss
        self.ssim_weight, self.max_steps = ssim_weight, max_steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y, w = batch
        pred = self(x)
        diff = pred - y
        per = diff.abs() if (self.mode == "care" and self.loss_kind == "l1") else diff * diff
        loss: torch.Tensor = (per * w).sum() / w.sum().clamp(min=1.0)
        if self.ssim_weight > 0 and self.mode != "n2v":
            loss = loss + self.ssim_weight * (1 - _ssim_torch(pred, y))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NaNLoss(f"the training loss became {value} at step {self.global_step}")
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-5)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=max(1, self.max_steps), eta_min=self.lr * 0.05
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _ssim_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM with a 7×7 uniform window (for the optional loss term)."""
    pool = torch.nn.functional.avg_pool2d
    c1, c2 = 0.01**2, 0.03**2
    ma, mb = pool(a, 7, 1, 3), pool(b, 7, 1, 3)
    va = pool(a * a, 7, 1, 3) - ma * ma
    vb = pool(b * b, 7, 1, 3) - mb * mb
    cab = pool(a * b, 7, 1, 3) - ma * mb
    s = ((2 * ma * mb + c1) * (2 * cab + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    out: torch.Tensor = s.mean()
    return out
