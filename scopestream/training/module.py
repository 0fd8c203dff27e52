"""The Lightning module and the patch dataset for every training mode."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from torch import nn
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
        *,
        mask_fraction: float = 0.015,
        mask_replace: str = "median",
    ) -> None:
        self.sampler, self.mode, self.length = sampler, mode, length
        self.mask_fraction, self.mask_replace = mask_fraction, mask_replace
        self.input_norm, self.target_norm = input_norm, target_norm

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, ys = self.sampler.sample(i)
        if self.sampler.spatial == "2.5d-z":  # the window's planes are the channels
            xn = self.input_norm.apply(x[:, None], channel_axis=1)[:, 0]
        else:
            xn = self.input_norm.apply(x[None])
        if self.mode == "n2v":
            rng = np.random.default_rng((self.sampler.seed, i, 7))
            masked, mask = n2v_mask(xn[0], rng, self.mask_fraction, self.mask_replace)
            return (
                torch.from_numpy(masked[None]),
                torch.from_numpy(xn),
                torch.from_numpy(mask[None]),
            )
        assert self.target_norm is not None
        y = self.target_norm.apply(np.stack(ys))
        weight = np.isfinite(y).astype(np.float32)  # a missing target (NaN) does not count
        return torch.from_numpy(xn), torch.from_numpy(np.nan_to_num(y)), torch.from_numpy(weight)


class PatchDiscriminator(nn.Module):
    """Conditional PatchGAN (pix2pix): real/fake per overlapping patch of (input, stain).

    Three strided 4×4 convolutions and a 1-channel head give one logit per
    ~34 px patch: it judges texture and sharpness locally, the reconstruction
    loss keeps the low frequencies right.
    """

    def __init__(self, dims: int, in_channels: int, base: int = 32) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d
        layers: list[nn.Module] = [conv(in_channels, base, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = base
        for _ in range(2):
            layers += [conv(ch, ch * 2, 4, 2, 1), norm(ch * 2, affine=True), nn.LeakyReLU(0.2)]
            ch *= 2
        layers += [conv(ch, 1, 3, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's activations (after each LeakyReLU), the logits last: what
        pix2pixHD's feature matching compares."""
        feats = []
        for layer in self.net:
            x = layer(x)
            if isinstance(layer, nn.LeakyReLU):
                feats.append(x)
        return [*feats, x]


class MultiscaleDiscriminator(nn.Module):
    """pix2pixHD's discriminator (MMV_Im2Im's ``pix2pix_HD``): ``n_scales`` PatchGANs,
    the k-th judging the pair downsampled k times (AvgPool 3, stride 2), so one sees fine
    texture and another the layout of whole cells."""

    def __init__(self, dims: int, in_channels: int, n_scales: int = 2, base: int = 32) -> None:
        super().__init__()
        self.dims = dims
        self.scales = nn.ModuleList(
            PatchDiscriminator(dims, in_channels, base) for _ in range(n_scales)
        )

    def features(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per scale: its layers' activations, the logits last."""
        pool = nn.functional.avg_pool2d if self.dims == 2 else nn.functional.avg_pool3d
        out = []
        for i, d in enumerate(self.scales):
            if i:
                x = pool(x, 3, stride=2, padding=1, count_include_pad=False)
            out.append(d.features(x))  # type: ignore[operator]
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [f[-1] for f in self.features(x)]


def _centre(x: torch.Tensor, dims: int) -> torch.Tensor:
    """The input the discriminator is conditioned on: a 2.5D window's centre plane."""
    if dims == 2 and x.shape[1] > 1:
        c = x.shape[1] // 2
        return x[:, c : c + 1]
    return x


class TrainModule(L.LightningModule):
    """One network, one loss: n2v (blind-spot MSE), care (L1/L2 ± SSIM), supervised (masked L2),
    pix2pix (masked L1 + a PatchGAN's adversarial term; validation loss = the L1 part).

    pix2pix with ``gan="multiscale"`` is MMV_Im2Im's pix2pixHD variant: two discriminators
    (full and half resolution), the generator's loss
    ``rec_weight·MSE + gan_weight·mean_i BCE(D_i(x, ŷ), 1)
    + fm_weight·mean_i Σ_j L1(f_ij(x, ŷ), f_ij(x, y))`` (f_ij: discriminator i's layer j;
    the seed's weights 20, 1, 10), the discriminators' ``mean_i ½[BCE(real, 1) +
    BCE(fake, 0)]`` at their own learning rate (2e-4); validation loss = the MSE part.
    """

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
        gan_weight: float = 0.05,
        gan: str = "patch",
        fm_weight: float = 10.0,
        rec_weight: float = 20.0,
        disc_lr: float | None = None,
    ) -> None:
        super().__init__()
        if gan not in ("patch", "multiscale"):
            raise ValueError(f"gan must be patch or multiscale, got {gan!r}")
        self.save_hyperparameters()
        self.net = build(arch_kind, arch_params)  # type: ignore[arg-type]
        self.mode, self.lr, self.loss_kind = mode, lr, loss
        self.ssim_weight, self.max_steps = ssim_weight, max_steps
        self.gan_weight, self.gan = gan_weight, gan
        self.fm_weight, self.rec_weight = fm_weight, rec_weight
        self.disc_lr = disc_lr if disc_lr is not None else (2e-4 if gan == "multiscale" else lr)
        self.disc: PatchDiscriminator | MultiscaleDiscriminator | None = None
        #: processes that trained together (the process group's size, not the devices asked for)
        self.world_size = 1
        if mode == "pix2pix":
            out_ch = int(self.net.head.out_channels)  # type: ignore[arg-type,union-attr]
            # conditioned on the input (a 2.5D window's centre plane): 1 channel + the stains
            if gan == "multiscale":
                self.disc = MultiscaleDiscriminator(self.net.dims, 1 + out_ch)
            else:
                self.disc = PatchDiscriminator(self.net.dims, 1 + out_ch)
            self.automatic_optimization = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out

    def on_fit_start(self) -> None:
        """Record how many processes really joined the training (DDP's process group)."""
        dist = torch.distributed
        self.world_size = (
            int(dist.get_world_size()) if dist.is_available() and dist.is_initialized() else 1
        )

    def _loss(
        self,
        batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        pred: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x, y, w = batch
        pred = self(x) if pred is None else pred
        diff = pred - y
        l1 = (self.mode == "care" and self.loss_kind == "l1") or (
            self.mode == "pix2pix" and self.gan == "patch"
        )
        per = diff.abs() if l1 else diff * diff
        loss: torch.Tensor = (per * w).sum() / w.sum().clamp(min=1.0)
        if self.ssim_weight > 0 and self.mode != "n2v":
            loss = loss + self.ssim_weight * (1 - _ssim_torch(pred, y))
        return loss

    def _check(self, loss: torch.Tensor) -> None:
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NaNLoss(f"the training loss became {value} at step {self.global_step}")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if isinstance(self.disc, MultiscaleDiscriminator):
            return self._multiscale_step(batch)
        if self.disc is not None:
            return self._gan_step(batch)
        loss = self._loss(batch)
        self._check(loss)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def _gan_step(self, batch: Any) -> torch.Tensor:
        """pix2pix: one discriminator step, then one generator step (manual optimization)."""
        assert self.disc is not None
        opt_g, opt_d = self.optimizers()  # type: ignore[misc,attr-defined]
        x, y, w = batch
        cond = _centre(x, self.net.dims)
        bce = nn.functional.binary_cross_entropy_with_logits
        fake = self(x)
        real_logit = self.disc(torch.cat([cond, y * w.clamp(max=1)], 1))
        fake_logit = self.disc(torch.cat([cond, (fake * w).detach()], 1))
        d_loss = 0.5 * (
            bce(real_logit, torch.ones_like(real_logit))
            + bce(fake_logit, torch.zeros_like(fake_logit))
        )
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_adv_logit = self.disc(torch.cat([cond, fake * w], 1))
        rec = self._loss(batch, fake)
        g_loss = rec + self.gan_weight * bce(g_adv_logit, torch.ones_like(g_adv_logit))
        self._check(g_loss)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()  # type: ignore[union-attr]
        self.log("train_loss", rec, prog_bar=True, on_step=True, on_epoch=False)
        self.log("d_loss", d_loss, on_step=True, on_epoch=False)
        self.log("g_adv", g_loss - rec, on_step=True, on_epoch=False)
        return g_loss

    def _multiscale_step(self, batch: Any) -> torch.Tensor:
        """pix2pixHD: the discriminators' step, then the generator's (feature matching)."""
        disc = self.disc
        assert isinstance(disc, MultiscaleDiscriminator)
        opt_g, opt_d = self.optimizers()  # type: ignore[misc,attr-defined]
        x, y, w = batch
        cond = _centre(x, self.net.dims)
        bce = nn.functional.binary_cross_entropy_with_logits
        real = torch.cat([cond, y * w.clamp(max=1)], 1)
        fake = self(x)
        fake_d = disc(torch.cat([cond, (fake * w).detach()], 1))
        d_loss = torch.stack(
            [
                0.5 * (bce(r, torch.ones_like(r)) + bce(f, torch.zeros_like(f)))
                for r, f in zip(disc(real), fake_d, strict=True)
            ]
        ).mean()
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        with torch.no_grad():
            real_feats = disc.features(real)
        fake_feats = disc.features(torch.cat([cond, fake * w], 1))
        adv = torch.stack([bce(f[-1], torch.ones_like(f[-1])) for f in fake_feats]).mean()
        fm = torch.stack(
            [
                nn.functional.l1_loss(a, b)
                for fs, rs in zip(fake_feats, real_feats, strict=True)
                for a, b in zip(fs[:-1], rs[:-1], strict=True)
            ]
        ).sum() / len(disc.scales)
        rec = self._loss(batch, fake)
        g_loss = self.rec_weight * rec + self.gan_weight * adv + self.fm_weight * fm
        self._check(g_loss)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()  # type: ignore[union-attr]
        self.log("train_loss", rec, prog_bar=True, on_step=True, on_epoch=False)
        self.log("d_loss", d_loss, on_step=True, on_epoch=False)
        self.log("g_adv", adv, on_step=True, on_epoch=False)
        self.log("g_fm", fm, on_step=True, on_epoch=False)
        return g_loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=1e-5)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=max(1, self.max_steps), eta_min=self.lr * 0.05
        )
        if self.disc is None:
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        opt_d = torch.optim.Adam(self.disc.parameters(), lr=self.disc_lr, betas=(0.5, 0.999))
        return [opt, opt_d], [{"scheduler": sched, "interval": "step"}]


def _ssim_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM with a 7×7 uniform window (for the optional loss term)."""
    pool = torch.nn.functional.avg_pool2d if a.ndim == 4 else torch.nn.functional.avg_pool3d
    c1, c2 = 0.01**2, 0.03**2
    ma, mb = pool(a, 7, 1, 3), pool(b, 7, 1, 3)
    va = pool(a * a, 7, 1, 3) - ma * ma
    vb = pool(b * b, 7, 1, 3) - mb * mb
    cab = pool(a * b, 7, 1, 3) - ma * mb
    s = ((2 * ma * mb + c1) * (2 * cab + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    out: torch.Tensor = s.mean()
    return out
