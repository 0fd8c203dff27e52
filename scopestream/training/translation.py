"""Unpaired translation (the seeds' CycleGAN and STABLE): data, losses, training.

Two image domains, A (e.g. brightfield) and B (e.g. nuclei), with no aligned pairs.
Patches of A and of B are drawn independently (their own crops, flips and
rotations). From paired data, `unpaired_split` makes an honest unpaired set: the
training blocks (or fields) of A and of B are disjoint, and the test blocks keep
their true pairs for a leak-free evaluation.

``cyclegan``
    Zhu et al. 2017 with the reference defaults: generators G_AB, G_BA (ResNet, 9
    blocks, instance norm; or our U-Net, which tiles exactly live), 70×70 PatchGAN
    discriminators, LSGAN, cycle L1 ×10 each way, identity ×0.5·10, a pool of 50 fakes,
    Adam 2e-4 (β1 0.5), constant for the first half of the steps then linearly to 0.
``stable``
    You et al. 2025 (§002 of the seed notes): encoders E_A, E_B to an information map
    Z at full resolution (n_info channels) and decoders D_A, D_B (U-Nets with
    demodulated convolutions and DySample upsampling); G_AB = D_B∘E_A. Losses: LSGAN
    (no 0.5), cycle L1 (optionally ramped along a sigmoid), information consistency (its
    asymmetric stop-gradients); weights 1 / 5 / 10; AdamW 3e-4 without weight decay;
    one generator step (all four U-Nets), then the discriminators'. Live it runs
    D_B(E_A(x)) without the reference code's min–max rescaling.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from scopestream.training.data import DataError, FieldData, Region

if TYPE_CHECKING:
    from scopestream.inference.manifest import Normalization
    from scopestream.training.data import PatchSampler
    from scopestream.training.train import TrainConfig

UNPAIRED = ("cyclegan", "stable")


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


def unpaired_split(
    splits: dict[str, list[Region]], seed: int = 0
) -> dict[str, list[Region]]:
    """Paired data made unpaired without a leak: the training (and validation) regions
    shuffled and halved, one half giving domain A's patches (the inputs), the other B's
    (the targets), so no block of a field is seen in both domains; the test regions keep
    their pairs for the evaluation. Keys: ``train_a``, ``train_b``, ``val_a``, ``val_b``,
    ``test``."""
    rng = np.random.default_rng((seed, 17))
    train = [splits["train"][i] for i in rng.permutation(len(splits["train"]))]
    if len(train) < 2:
        raise DataError(
            "unpaired training needs at least two training blocks or fields (one per domain): "
            "give larger frames, more files, or a smaller --patch"
        )
    val = [splits["val"][i] for i in rng.permutation(len(splits["val"]))]
    half, vhalf = len(train) // 2, max(1, len(val) // 2)
    return {
        "train_a": train[:half],
        "train_b": train[half:],
        "val_a": val[:vhalf],
        "val_b": val[vhalf:] or val[:vhalf],  # one validation block: cycle losses only
        "test": list(splits["test"]),
    }


def as_domain_b(fields: list[FieldData]) -> list[FieldData]:
    """The target images of paired fields as fields of their own (domain B's inputs)."""
    return [
        FieldData(f"{f.name}:{f.target_names[0]}", f.targets[0], z=f.z, context=dict(f.context))
        for f in fields
    ]


class UnpairedDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """(x_A, x_B) patch pairs drawn independently from the two domains, normalized."""

    def __init__(
        self,
        a: PatchSampler,
        b: PatchSampler,
        norm_a: Normalization,
        norm_b: Normalization,
        length: int,
    ) -> None:
        self.a, self.b, self.norm_a, self.norm_b, self.length = a, b, norm_a, norm_b, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        xa, _ = self.a.sample(i)
        xb, _ = self.b.sample(i)
        return (
            torch.from_numpy(self.norm_a.apply(xa[None])),
            torch.from_numpy(self.norm_b.apply(xb[None])),
        )


class ImagePool:
    """CycleGAN's history of generated images: half of each batch the discriminator sees
    is an earlier fake (it stops the generators and discriminators from oscillating)."""

    def __init__(self, size: int = 50, seed: int = 0) -> None:
        self.size, self.rng = size, random.Random(seed)
        self.images: list[torch.Tensor] = []

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for img in images.detach():
            img = img[None]
            if len(self.images) < self.size:
                self.images.append(img.clone())
                out.append(img)
            elif self.rng.random() > 0.5:
                k = self.rng.randrange(self.size)
                out.append(self.images[k].clone())
                self.images[k] = img.clone()
            else:
                out.append(img)
        return torch.cat(out)


def patch_discriminator(in_channels: int, base: int, *, norm: str, n_layers: int = 3) -> Any:
    """A PatchGAN. ``norm="instance"``: CycleGAN's 70×70 (three stride-2 4×4 convs, a
    stride-1 one, a 1-channel head); ``norm="batch"``: STABLE's (three stride-2 4×4 convs
    with batch norm after the first, a 3×3 head)."""
    norm_layer = nn.InstanceNorm2d if norm == "instance" else nn.BatchNorm2d
    layers = [nn.Conv2d(in_channels, base, 4, 2, 1), nn.LeakyReLU(0.2)]
    ch = base
    for _ in range(n_layers - 1):
        nxt = min(ch * 2, 512)
        layers += [nn.Conv2d(ch, nxt, 4, 2, 1), norm_layer(nxt), nn.LeakyReLU(0.2)]
        ch = nxt
    if norm == "instance":  # the 70×70 receptive field: one more 4×4 at stride 1
        nxt = min(ch * 2, 512)
        layers += [nn.Conv2d(ch, nxt, 4, 1, 1), norm_layer(nxt), nn.LeakyReLU(0.2)]
        layers += [nn.Conv2d(nxt, 1, 4, 1, 1)]
    else:
        layers += [nn.Conv2d(ch, 1, 3, 1, 1)]
    return nn.Sequential(*layers)


class UnpairedModule(L.LightningModule):
    """Both generators and both discriminators of ``method`` (`UNPAIRED`).

    ``gen_ab`` is what is packaged and runs live; ``arch`` is its manifest architecture
    (kind, params). Manual optimization: the generators' step, then the discriminators'.
    Validation loss: the cycle L1 both ways (no pairs needed, none used)."""

    def __init__(
        self,
        method: str,
        arch_kind: str,
        arch_params: dict[str, Any],
        *,
        lr: float,
        max_steps: int,
        adv_weight: float = 1.0,
        cycle_weight: float = 10.0,
        identity_weight: float = 0.5,
        info_weight: float = 10.0,
        info_consistency: bool = True,
        ramp_steps: int = 0,
        pool_size: int = 50,
        disc_base: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        from scopestream.inference.architectures import build

        if method not in UNPAIRED:
            raise ValueError(f"method must be one of {UNPAIRED}, got {method!r}")
        self.save_hyperparameters()
        self.method, self.lr, self.max_steps = method, lr, max_steps
        self.gen_ab = build(arch_kind, arch_params)  # type: ignore[arg-type]
        self.gen_ba = build(arch_kind, arch_params)  # type: ignore[arg-type]
        norm = "instance" if method == "cyclegan" else "batch"
        self.disc_a = patch_discriminator(1, disc_base, norm=norm)
        self.disc_b = patch_discriminator(1, disc_base, norm=norm)
        self.w = {
            "adv": adv_weight,
            "cycle": cycle_weight,
            "identity": identity_weight,
            "info": info_weight if info_consistency else 0.0,
        }
        self.ramp_steps = ramp_steps
        self.pool_a, self.pool_b = ImagePool(pool_size, seed), ImagePool(pool_size, seed + 1)
        self.automatic_optimization = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.gen_ab(x)
        return out

    def generator_losses(self, xa: torch.Tensor, xb: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every term of the generators' loss (unweighted), and the fakes for the
        discriminators (``fake_b`` = x_AB, ``fake_a`` = x_BA)."""
        mse = torch.nn.functional.mse_loss
        l1 = torch.nn.functional.l1_loss
        out: dict[str, torch.Tensor] = {}
        if self.method == "stable":
            gab: Any = self.gen_ab
            gba: Any = self.gen_ba
            e_a, d_b, e_b, d_a = gab.enc, gab.dec, gba.enc, gba.dec
            z_a, z_b = e_a(xa), e_b(xb)
            fake_b, fake_a = d_b(z_a), d_a(z_b)
            z_ab, z_ba = e_b(fake_b), e_a(fake_a)
            out["cycle"] = l1(d_a(z_ab), xa) + l1(d_b(z_ba), xb)
            out["info"] = info_consistency_loss(z_ab, z_a, z_ba, z_b)
        else:
            fake_b, fake_a = self.gen_ab(xa), self.gen_ba(xb)
            out["cycle"] = l1(self.gen_ba(fake_b), xa) + l1(self.gen_ab(fake_a), xb)
            if self.w["identity"] > 0:
                out["identity"] = l1(self.gen_ab(xb), xb) + l1(self.gen_ba(xa), xa)
        pb, pa = self.disc_b(fake_b), self.disc_a(fake_a)
        out["adv"] = mse(pb, torch.ones_like(pb)) + mse(pa, torch.ones_like(pa))
        out["fake_a"], out["fake_b"] = fake_a, fake_b
        return out

    def disc_loss(self, disc: Any, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """LSGAN: (D(real) − 1)² + D(fake)² (CycleGAN halves it)."""
        mse = torch.nn.functional.mse_loss
        pr, pf = disc(real), disc(fake.detach())
        loss = mse(pr, torch.ones_like(pr)) + mse(pf, torch.zeros_like(pf))
        return 0.5 * loss if self.method == "cyclegan" else loss

    def cycle_weight(self) -> float:
        ramp = cycle_ramp(self._gen_steps(), self.ramp_steps) if self.method == "stable" else 1.0
        return self.w["cycle"] * ramp

    def _gen_steps(self) -> int:
        return int(self.global_step) // 2

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt_g, opt_d = self.optimizers()  # type: ignore[misc,attr-defined]
        xa, xb = batch
        t = self.generator_losses(xa, xb)
        cyc_w = self.cycle_weight()
        g_loss = self.w["adv"] * t["adv"] + cyc_w * t["cycle"]
        if "identity" in t:
            g_loss = g_loss + cyc_w * self.w["identity"] * t["identity"]
        if "info" in t and self.w["info"] > 0:
            g_loss = g_loss + self.w["info"] * t["info"]
        if not math.isfinite(float(g_loss.detach())):
            from scopestream.training.module import NaNLoss

            raise NaNLoss(f"the training loss became {float(g_loss)} at step {self.global_step}")
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        fake_a, fake_b = t["fake_a"], t["fake_b"]
        if self.method == "cyclegan":
            fake_a, fake_b = self.pool_a.query(fake_a), self.pool_b.query(fake_b)
        d_loss = self.disc_loss(self.disc_a, xa, fake_a) + self.disc_loss(self.disc_b, xb, fake_b)
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        for sched in self._schedulers():
            sched.step()
        self.log("train_loss", t["cycle"], prog_bar=True, on_step=True, on_epoch=False)
        self.log("d_loss", d_loss, on_step=True, on_epoch=False)
        self.log("g_adv", t["adv"], on_step=True, on_epoch=False)
        if "info" in t:
            self.log("g_info", t["info"], on_step=True, on_epoch=False)
        return torch.as_tensor(g_loss.detach())

    def _schedulers(self) -> list[Any]:
        s = self.lr_schedulers()
        if s is None:
            return []
        return list(s) if isinstance(s, list) else [s]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        xa, xb = batch
        t = self.generator_losses(xa, xb)
        self.log("val_loss", t["cycle"], prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> Any:
        import itertools

        g_params = itertools.chain(self.gen_ab.parameters(), self.gen_ba.parameters())
        d_params = itertools.chain(self.disc_a.parameters(), self.disc_b.parameters())
        if self.method == "stable":  # AdamW without weight decay, constant
            return [
                torch.optim.AdamW(g_params, lr=self.lr, betas=(0.5, 0.999), weight_decay=0),
                torch.optim.AdamW(d_params, lr=self.lr, betas=(0.5, 0.999), weight_decay=0),
            ]
        opt_g = torch.optim.Adam(g_params, lr=self.lr, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(d_params, lr=self.lr, betas=(0.5, 0.999))
        half = max(1, self.max_steps // 2)

        def decay(step: int) -> float:  # constant, then linearly to zero
            return 1.0 if step < half else max(0.0, (self.max_steps - step) / half)

        scheds = [torch.optim.lr_scheduler.LambdaLR(o, decay) for o in (opt_g, opt_d)]
        return [opt_g, opt_d], [{"scheduler": s, "interval": "step"} for s in scheds]


def architecture_for(cfg: TrainConfig) -> tuple[str, dict[str, Any]]:
    """The live generator's manifest architecture for an unpaired training."""
    if cfg.mode == "stable":
        return "stable", {
            "in_channels": 1, "out_channels": 1, "n_info": cfg.n_info, "base": cfg.base,
            "depth": 3, "norm": "none", "upsample": cfg.upsample,
        }  # fmt: skip
    if cfg.generator == "unet":
        return "stain_unet", {"base": cfg.base * 2, "depth": 3, "out_channels": 1}
    return "resnet", {"in_channels": 1, "out_channels": 1, "base": cfg.base * 4, "blocks": 9}


def _unpaired_data(
    cfg: TrainConfig,
) -> tuple[list[FieldData], list[FieldData], dict[str, list[Region]], list[FieldData], str]:
    """Domain A's and B's fields, their regions, the paired fields to evaluate on (none
    for two unpaired folders) and the name of B's channel."""
    from pathlib import Path

    from scopestream.training.data import load_tiff_pairs, split_regions
    from scopestream.training.train import _eval_fields, _load

    if cfg.inputs_b:
        if not cfg.inputs or cfg.targets or cfg.data:
            raise DataError("--inputs-b goes with --inputs-a (domain A's TIFFs) only")
        fa, fb = load_tiff_pairs(cfg.inputs), load_tiff_pairs(cfg.inputs_b)
        sa, sb = split_regions(fa, cfg.patch, cfg.seed), split_regions(fb, cfg.patch, cfg.seed + 1)
        regions = {
            "train_a": sa["train"] + sa["test"],
            "val_a": sa["val"],
            "train_b": sb["train"] + sb["test"],
            "val_b": sb["val"],
            "test": [],
        }
        return fa, fb, regions, [], Path(cfg.inputs_b).name.split(".")[0]
    if not cfg.unpaired:
        raise DataError(
            f"--mode {cfg.mode} learns from unpaired images: give --inputs-a A/ --inputs-b B/, "
            "or paired data (--data with --target-channel, or --inputs and --targets) with "
            "--unpaired (split so no block or field gives both domains)"
        )
    fields = _load(cfg)
    if len(fields[0].targets) != 1:
        raise DataError(f"--mode {cfg.mode} translates to one target channel; give one")
    regions = unpaired_split(split_regions(fields, cfg.patch, cfg.seed), cfg.seed)
    target = fields[0].target_names[0]
    return fields, as_domain_b(fields), regions, _eval_fields(cfg, fields), target


def train_unpaired(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """`train` for the unpaired modes: both generators and discriminators, the A → B
    generator packaged, evaluated on the withheld pairs (when there are any) and
    published like every model."""
    import datetime as _dt
    import shutil
    import time
    import warnings
    from dataclasses import asdict
    from pathlib import Path

    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from scopestream import __version__
    from scopestream.inference.architectures import receptive_radius
    from scopestream.inference.manifest import Architecture, Manifest
    from scopestream.inference.package import save_package
    from scopestream.inference.predictor import halo_for
    from scopestream.training.data import PatchSampler
    from scopestream.training.train import (
        _checkpoint_step,
        _norm_from,
        evaluate,
        publish_trained,
        training_fingerprint,
    )

    t0 = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.spatial != "2d":
        raise DataError(f"--mode {cfg.mode} is 2D (--spatial 2d)")
    if cfg.mode == "cyclegan" and cfg.generator not in ("resnet", "unet"):
        raise DataError(f"--generator must be resnet or unet, got {cfg.generator!r}")
    if cfg.upsample not in ("dysample", "bilinear"):
        raise DataError(f"--upsample must be dysample or bilinear, got {cfg.upsample!r}")
    fa, fb, regions, eval_fields, target_name = _unpaired_data(cfg)
    norm_a = _norm_from(fa, regions["train_a"], None, cfg.norm)
    norm_b = _norm_from(fb, regions["train_b"], None, cfg.target_norm)
    steps = cfg.max_steps if cfg.epochs is None else cfg.epochs * 200

    def sampler(fields: list[FieldData], key: str, seed: int, augment: bool) -> PatchSampler:
        return PatchSampler(
            fields, regions[key], cfg.patch, seed=seed, augment=augment, foreground=False
        )

    ds_train = UnpairedDataset(
        sampler(fa, "train_a", cfg.seed, True), sampler(fb, "train_b", cfg.seed + 7, True),
        norm_a, norm_b, steps * cfg.batch,
    )  # fmt: skip
    ds_val = UnpairedDataset(
        sampler(fa, "val_a", cfg.seed + 1, False), sampler(fb, "val_b", cfg.seed + 8, False),
        norm_a, norm_b, max(cfg.batch * 4, 32),
    )  # fmt: skip
    kind, params = architecture_for(cfg)
    module = UnpairedModule(
        cfg.mode,
        kind,
        params,
        lr=float(cfg.lr or 2e-4),
        max_steps=steps,
        cycle_weight=float(cfg.cycle_weight or 0.0),
        info_consistency=cfg.info_consistency,
        ramp_steps=cfg.ramp_steps or 0,
        seed=cfg.seed,
    )
    work = (
        Path(cfg.work_dir or Path.home() / ".scopestream" / "train")
        / f"{Path(cfg.out).name}-{cfg.key()}"
    )
    ckpt_dir = work / "checkpoints"
    gpu = torch.cuda.is_available()
    # a GAN's validation loss does not rank its checkpoints: the last one is the model
    last_ckpt = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0)
    trainer = L.Trainer(
        max_steps=steps * 2,  # the generators' and the discriminators' optimizer per batch
        accelerator="gpu" if gpu else "cpu",
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy="ddp" if cfg.devices * cfg.num_nodes > 1 else "auto",
        precision="32-true",
        callbacks=[last_ckpt],
        logger=CSVLogger(str(work), name="logs"),
        val_check_interval=min(cfg.val_every, steps),
        check_val_every_n_epoch=None,
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=max(1, min(50, steps // 4)),
        num_sanity_val_steps=0,
    )
    last = ckpt_dir / "last.ckpt"
    resumed = cfg.resume and last.exists()
    resumed_from = _checkpoint_step(last) // 2 if resumed else None
    loader = DataLoader(ds_train, batch_size=cfg.batch, shuffle=False, num_workers=0)
    val_loader = DataLoader(ds_val, batch_size=cfg.batch, num_workers=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(module, loader, val_loader, ckpt_path=str(last) if resumed else None)
    if trainer.global_rank != 0:
        return {}
    net = module.gen_ab.cpu().eval()
    mult = net.size_multiple
    done_steps = int(trainer.global_step) // 2
    split = {k: len(v) for k, v in regions.items()}
    manifest = Manifest(
        name=Path(cfg.out).name,
        task="stain",
        spatial="2d",
        architecture=Architecture(kind=kind, params=params),  # type: ignore[arg-type]
        inputs=(cfg.input_channel or "brightfield",),
        outputs=(target_name,),
        size_multiple=mult,
        halo=halo_for(receptive_radius(net), mult),
        input_norm=norm_a,
        output_norm=norm_b,
        fingerprint=training_fingerprint(fa, regions["train_a"]),
        training={
            "mode": cfg.mode,
            "data": cfg.data or [cfg.inputs, cfg.inputs_b or cfg.targets],
            "config": asdict(cfg),
            "steps": done_steps,
            "resumed": resumed,
            "resumed_from_step": resumed_from,
            "world_size": 1,
            "unpaired": "two folders" if cfg.inputs_b else "disjoint blocks of paired data",
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "code_version": __version__,
            "split": split,
        },
    )
    staging = work / "package"
    if staging.exists():
        shutil.rmtree(staging)
    pkg = save_package(staging, net, manifest)
    if eval_fields and regions["test"]:
        ev = evaluate(pkg, eval_fields, regions["test"])
    else:
        ev = evaluate(pkg, [], [])
    seconds = round(time.perf_counter() - t0, 1)
    published = publish_trained(
        cfg, pkg, ev, work, steps=done_steps, seconds=seconds,
        eval_target=cfg.eval_target or "the withheld pairs",
    )  # fmt: skip
    return {
        "model": published.name,
        "version": published.version,
        "package": str(published.path),
        "sha256": published.sha256,
        "metrics": ev["metrics"],
        "baseline_metrics": ev["baseline_metrics"],
        "steps": done_steps,
        "seconds": seconds,
        "device": "cuda" if gpu else "cpu",
        "resumed": resumed,
        "resumed_from_step": resumed_from,
        "world_size": 1,
        "split": split,
    }
