"""The networks: a small fast denoiser U-Net and a label-free (virtual staining) U-Net.

Both are plain convolutional U-Nets with zero-padded 3×3 convolutions, 2×2
pooling, nearest-neighbour upsampling followed by a convolution, skip
connections by concatenation, and no normalization layers or global
operations. That makes them equivariant to shifts by multiples of
``2**depth``, which is what lets flush-border tiling reproduce the whole-frame
result exactly (see `scopestream.inference.tiling`).

``DenoiseUNet``
    2D, depth 3, 16–32 channels (139 k parameters); the input may carry a
    temporal window (k frames as channels). ``n2v2=True`` gives the N2V2 variant
    used for self-supervised training: no top-level skip connection and
    blur-pooling instead of max-pooling (no checkerboard artefacts).
``StainUNet``
    Several stains out at once from a brightfield input: 2D (optionally a
    window of z-planes as channels, "2.5D") or 3D, where anisotropic stacks
    are pooled in y/x only until z is as finely sampled as y/x.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F


def _conv(dims: int, cin: int, cout: int, k: int = 3) -> nn.Module:
    cls = nn.Conv2d if dims == 2 else nn.Conv3d
    return cls(cin, cout, k, padding=k // 2)


class _Block(nn.Module):
    """Two 3×3 convolutions with ReLU."""

    def __init__(self, dims: int, cin: int, cout: int) -> None:
        super().__init__()
        self.c1 = _conv(dims, cin, cout)
        self.c2 = _conv(dims, cout, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.c2(F.relu(self.c1(x))))


class BlurPool2d(nn.Module):
    """Anti-aliased downsampling (a fixed [1 2 1]² blur, then stride 2)."""

    kernel: torch.Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        k2 = (k[:, None] * k[None, :]) / 16.0
        self.register_buffer("kernel", k2.expand(channels, 1, 3, 3).contiguous())
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel, stride=2, padding=1, groups=self.channels)


class UNet(nn.Module):
    """A generic U-Net (2D or 3D) as described in the module docstring.

    Parameters
    ----------
    dims
        2 or 3 spatial dimensions.
    in_channels, out_channels
        Channels in and out.
    base
        Channels at the top level (doubled per level).
    depth
        Number of poolings.
    pool_z
        3D only: for each level, whether z is pooled too (anisotropic stacks: False).
    top_skip
        Keep the top-level skip connection (N2V2 drops it).
    blurpool
        Blur-pool instead of max-pool (2D only).
    max_channels
        Cap on the channels of the deeper levels (keeps the denoiser small).
    """

    def __init__(
        self,
        *,
        dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        base: int = 16,
        depth: int = 3,
        pool_z: tuple[bool, ...] | None = None,
        top_skip: bool = True,
        blurpool: bool = False,
        max_channels: int | None = None,
    ) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError("dims must be 2 or 3")
        if blurpool and dims != 2:
            raise ValueError("blur-pooling is implemented for 2D")
        self.dims = dims
        self.in_channels = in_channels
        self.depth = depth
        self.top_skip = top_skip
        self.pool_z = tuple(pool_z) if pool_z is not None else (True,) * depth
        if len(self.pool_z) != depth:
            raise ValueError("pool_z needs one entry per level")
        cap = max_channels or base * 2**depth
        ch = [min(base * 2**i, cap) for i in range(depth + 1)]
        self.enc = nn.ModuleList()
        self.pools = nn.ModuleList()
        cin = in_channels
        for i in range(depth):
            self.enc.append(_Block(dims, cin, ch[i]))
            cin = ch[i]
            self.pools.append(BlurPool2d(ch[i]) if blurpool else nn.Identity())
        self.bottom = _Block(dims, ch[depth - 1], ch[depth])
        self.up_convs = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in reversed(range(depth)):
            self.up_convs.append(_conv(dims, ch[i + 1], ch[i]))
            skip = ch[i] if (i > 0 or top_skip) else 0
            self.dec.append(_Block(dims, ch[i] + skip, ch[i]))
        self.head = _conv(dims, ch[0], out_channels, k=1)
        self._blurpool = blurpool

    def _scale(self, level: int) -> tuple[int, ...]:
        if self.dims == 2:
            return (2, 2)
        return (2 if self.pool_z[level] else 1, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, (block, pool) in enumerate(zip(self.enc, self.pools, strict=True)):
            x = block(x)
            skips.append(x)
            if self._blurpool:
                x = pool(F.relu(x))
            elif self.dims == 2:
                x = F.max_pool2d(x, 2)
            else:
                x = F.max_pool3d(x, self._scale(i))
        x = self.bottom(x)
        for j, (up, block) in enumerate(zip(self.up_convs, self.dec, strict=True)):
            i = self.depth - 1 - j
            x = F.interpolate(x, scale_factor=self._scale(i), mode="nearest")
            x = F.relu(up(x))
            if i > 0 or self.top_skip:
                x = torch.cat([x, skips[i]], dim=1)
            x = block(x)
        out: torch.Tensor = self.head(x)
        return out

    @property
    def size_multiple(self) -> tuple[int, ...]:
        """Input sizes must be multiples of these (per spatial axis)."""
        xy = 2**self.depth
        if self.dims == 2:
            return (xy, xy)
        return (2 ** sum(self.pool_z), xy, xy)


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _support_twin(module: UNet) -> UNet:
    """The same U-Net with one channel at every level.

    With every weight positive and no bias, which pixels of an output are non-zero
    depends only on the kernels' sizes, the poolings and the skips, never on how
    many channels carry the signal: every channel of a layer has the same support.
    The twin measures the same receptive field at a fraction of the cost (a 3D
    stain network's probe is large).
    """
    return UNet(
        dims=module.dims,
        depth=module.depth,
        pool_z=module.pool_z,
        top_skip=module.top_skip,
        blurpool=module._blurpool,
        base=1,
        max_channels=1,
    )


@torch.no_grad()
def receptive_radius(module: Any, probe: int = 64, *, twin: bool = True) -> tuple[int, ...]:
    """Measured receptive-field radius (pixels) per spatial axis.

    A copy of the network with all weights made positive and biases zeroed (so no
    path cancels and nothing lights up on its own) is fed a single bright pixel;
    the extent of the non-zero response is the receptive field, whatever the
    weights. The probe grows until the response fits well inside it. With
    ``twin`` (the default) the copy is the one-channel `_support_twin`, which
    has the same support.
    """
    import copy

    if hasattr(module, "halo_px"):  # a global network: its stated tile overlap
        return tuple(module.halo_px)
    if twin and isinstance(module, UNet):
        m: nn.Module = _support_twin(module)
    elif twin and hasattr(module, "support_twin"):
        m = module.support_twin()
    else:
        m = copy.deepcopy(module)
    m = m.float().eval()
    for name, p in m.named_parameters():
        if name.endswith("bias"):
            p.zero_()  # a bias would light up every pixel
        else:
            p.abs_()
            p.add_(1e-3)
    mult = module.size_multiple
    cin = int(getattr(m, "in_channels", module.in_channels))  # the twin's (one channel)
    sizes = [max(probe, 4 * k) // k * k for k in mult]
    while True:
        x = torch.zeros(1, cin, *sizes)
        centre = tuple(s // 2 for s in sizes)
        point: tuple[Any, ...] = (0, slice(None), *centre)
        x[point] = 1.0
        y = m(x)[0].abs().sum(0)
        nz = torch.nonzero(y > 0)
        radius = []
        for ax, c in enumerate(centre):
            lo, hi = int(nz[:, ax].min()), int(nz[:, ax].max())
            radius.append(max(c - lo, hi - c))
        grow = [r >= s // 2 - k for r, s, k in zip(radius, sizes, mult, strict=True)]
        if not any(grow):
            return tuple(radius)
        sizes = [s * 2 if g else s for s, g in zip(sizes, grow, strict=True)]


# --- the seeds' translation layers, re-implemented from their equations (one
# self-contained file: a bioimage.io export ships it as the architecture's source) ---
#
# Layers of the seeds' translation networks, re-implemented from their equations.
#
# ``DemodConv2d``
#     STABLE's weight-demodulated convolution (StyleGAN2's demodulation without a
#     style): every output channel's kernel scaled to unit norm, no bias.
# ``DySample``
#     Learnable dynamic upsampling (Liu et al., ICCV 2023; STABLE's up-sampler, style
#     "lp", static scope): each output pixel samples the input bilinearly at its
#     sub-pixel position plus a learned offset, 0.25 × a 1×1 convolution of the input.
#     With the offsets' convolution at zero it *is* bilinear ×2 upsampling.
# ``GPTLayer``
#     The Global Pixel Transformer layer (Liu et al., IEEE TMI 2020): O = V·softmax(KᵀQ)
#     with K, V from 1×1 convolutions and Q from a 3×3 convolution of stride 1 ("same"),
#     stride 2 ("down") or a stride-2 transposed convolution ("up"): one layer samples
#     down, keeps or samples up, and each output pixel sees the whole input.
# ``DenseBlock``
#     GPT's dense block: each 3×3 convolution sees every earlier one's output
#     (growth 16 channels per layer).
#
# Global attention has no bounded receptive field, so a GPT network is not tiled
# exactly like our U-Nets; memory grows with the square of the pixels attended over.


class DemodConv2d(nn.Module):
    """A 3×3 (or k×k) convolution whose kernels are demodulated: for every output
    channel o, w'_o = w_o / sqrt(Σ w_o² + 1e-8). No bias; standard-normal init."""

    def __init__(self, cin: int, cout: int, k: int = 3) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.padding = k // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.weight
        w = raw * torch.rsqrt((raw * raw).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        return F.conv2d(x, w, padding=self.padding)


class DySample(nn.Module):
    """×``scale`` learnable upsampling of ``channels`` channels in ``groups`` groups.

    O_lr = 0.25·Conv1×1(X) + P0 (P0: the sub-pixel positions ±1/4 for ×2), pixel-shuffled
    to one (dx, dy) per output pixel and group, added to the input's pixel centres, and
    sampled bilinearly (align_corners=False, border padding): X' has ``channels``
    channels at ``scale``× the size. The offsets' convolution starts near zero
    (N(0, 0.001)), i.e. near bilinear upsampling.
    """

    init_pos: torch.Tensor

    def __init__(self, channels: int, scale: int = 2, groups: int = 4) -> None:
        super().__init__()
        if channels % groups:
            raise ValueError(f"DySample: {channels} channels do not split into {groups} groups")
        self.scale, self.groups = scale, groups
        self.offset = nn.Conv2d(channels, 2 * groups * scale * scale, 1)
        nn.init.normal_(self.offset.weight, std=0.001)
        nn.init.zeros_(self.offset.bias)  # type: ignore[arg-type]
        h = (torch.arange(scale, dtype=torch.float32) - (scale - 1) / 2) / scale
        # (1, 2·g·s², 1, 1): x offsets for every group and sub-pixel, then y offsets
        gy, gx = torch.meshgrid(h, h, indexing="ij")
        pos = torch.stack([gx, gy]).reshape(2, 1, scale * scale).repeat(1, groups, 1)
        self.register_buffer("init_pos", pos.reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sample(x, self.offset(x) * 0.25 + self.init_pos)

    def sample(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """``x`` sampled at its pixel centres + ``offset`` (B, 2·g·s², H, W; in low-res px)."""
        b, c, h, w = x.shape
        s, g = self.scale, self.groups
        ys = torch.arange(h, dtype=x.dtype, device=x.device) + 0.5
        xs = torch.arange(w, dtype=x.dtype, device=x.device) + 0.5
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        off = offset.reshape(b, 2, g * s * s, h, w)
        # normalized to [-1, 1] per axis (sizes from the input, so an ONNX export follows
        # the frame's size instead of freezing the export's)
        gx = 2 * (cx + off[:, 0]) / w - 1
        gy = 2 * (cy + off[:, 1]) / h - 1
        coords = torch.stack([gx, gy], 1)
        # (B, 2·g·s², H, W) → (B, 2·g, sH, sW) → (B·g, sH, sW, 2)
        coords = F.pixel_shuffle(coords.reshape(b, 2 * g * s * s, h, w), s)
        coords = coords.reshape(b, 2, g, s * h, s * w).permute(0, 2, 3, 4, 1).reshape(
            b * g, s * h, s * w, 2
        )
        out = F.grid_sample(
            x.reshape(b * g, c // g, h, w),
            coords,
            mode="bilinear",
            align_corners=False,
            padding_mode="border",
        )
        return out.reshape(b, c, s * h, s * w)


class GPTLayer(nn.Module):
    """O = V·softmax(KᵀQ/√C_K) over every input position (one head).

    ``mode``: "same" (Q from a 3×3 convolution, stride 1), "down" (stride 2: half the
    size) or "up" (a 3×3 transposed convolution, stride 2: twice the size). K and V
    are 1×1 convolutions of the input with ``cin`` channels; a final 1×1 convolution
    gives ``cout`` (default: ``cin``, half of it for "up", as in the seed). Each
    projection is convolution + ReLU (+ dropout in training, the seed's 0.5).
    """

    def __init__(
        self, cin: int, mode: str = "same", cout: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if mode not in ("same", "down", "up"):
            raise ValueError(f"GPTLayer mode must be same, down or up, got {mode!r}")
        self.mode = mode
        if mode == "up":
            self.q: nn.Module = nn.ConvTranspose2d(cin, cin, 3, 2, padding=1, output_padding=1)
        else:
            self.q = nn.Conv2d(cin, cin, 3, 1 if mode == "same" else 2, padding=1)
        self.k = nn.Conv2d(cin, cin, 1)
        self.v = nn.Conv2d(cin, cin, 1)
        if cout is None:
            cout = cin // 2 if mode == "up" else cin
        self.out = nn.Conv2d(cin, cout, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        q = self.drop(F.relu(self.q(x)))
        hq, wq = q.shape[-2:]
        k = self.drop(F.relu(self.k(x))).flatten(2)  # (B, C, HW)
        v = self.drop(F.relu(self.v(x))).flatten(2)
        attn = torch.softmax(k.transpose(1, 2) @ q.flatten(2) / c**0.5, dim=1)  # (B, HW, HqWq)
        o = (v @ self.drop(attn)).reshape(b, c, hq, wq)
        out: torch.Tensor = self.drop(F.relu(self.out(o)))
        return out


class DenseBlock(nn.Module):
    """``layers`` × [3×3 conv → ReLU (→ dropout)] on the concatenation of the input and
    every earlier layer's output; out: ``cin + growth·layers`` channels."""

    def __init__(self, cin: int, layers: int, growth: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(cin + growth * i, growth, 3, padding=1) for i in range(layers)
        )
        self.drop = nn.Dropout(dropout)
        self.out_channels = cin + growth * layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in self.convs:
            feats.append(self.drop(F.relu(conv(torch.cat(feats, 1)))))
        return torch.cat(feats, 1)


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    raise ValueError(f"norm must be none, batch or instance, got {kind!r}")


class _DoubleConv(nn.Module):
    """STABLE's [3×3 conv (demodulated, no bias) → norm → ReLU] × 2."""

    def __init__(self, cin: int, cout: int, mid: int | None = None, norm: str = "none") -> None:
        super().__init__()
        mid = mid or cout
        self.net = nn.Sequential(
            DemodConv2d(cin, mid), _norm2d(norm, mid), nn.ReLU(),
            DemodConv2d(mid, cout), _norm2d(norm, cout), nn.ReLU(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class StableUNet(nn.Module):
    """One of STABLE's four U-Nets (an encoder E or a decoder D).

    ``inc`` DoubleConv(in → c0); per level max-pool 2×2 → DoubleConv(c_i → c_i+1) with
    c_i = base·2^i; per up level DySample ×2 (or fixed bilinear, the ablation) → 3×3
    conv (c_i+1 → c_i) → concatenation with the skip → DoubleConv(c_i+1 → c_i); out
    3×3 conv → ReLU → 1×1 conv (linear: information maps and images are unbounded).
    ``norm`` "none" (the default here, as the seed's calcium experiment: quantitative
    intensities, exact tiling), "batch" (the seed's other experiments) or "instance".
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        *,
        base: int = 16,
        depth: int = 3,
        norm: str = "none",
        upsample: str = "dysample",
    ) -> None:
        super().__init__()
        if upsample not in ("dysample", "bilinear"):
            raise ValueError(f"upsample must be dysample or bilinear, got {upsample!r}")
        ch = [base * 2**i for i in range(depth + 1)]
        self.depth, self.in_channels = depth, in_channels
        self.inc = _DoubleConv(in_channels, ch[0], norm=norm)
        self.downs = nn.ModuleList(_DoubleConv(ch[i], ch[i + 1], norm=norm) for i in range(depth))
        self.ups = nn.ModuleList()
        self.up_convs = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in reversed(range(depth)):
            self.ups.append(
                DySample(ch[i + 1])
                if upsample == "dysample"
                else nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
            )
            self.up_convs.append(DemodConv2d(ch[i + 1], ch[i]))
            self.dec.append(_DoubleConv(ch[i + 1], ch[i], mid=ch[i], norm=norm))
        self.out = nn.Sequential(
            nn.Conv2d(ch[0], ch[0], 3, padding=1), nn.ReLU(), nn.Conv2d(ch[0], out_channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inc(x)
        skips = [x]
        for down in self.downs:
            x = down(F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for up, conv, block in zip(self.ups, self.up_convs, self.dec, strict=True):
            x = block(torch.cat([skips.pop(), conv(up(x))], 1))
        out: torch.Tensor = self.out(x)
        return out


class StableGenerator(nn.Module):
    """STABLE's translation A → B as it runs live: D_B(E_A(x)), an encoder to the
    information map Z (``n_info`` channels at full resolution) and a decoder from it.
    No min–max rescaling of the output (the reference code's, which discards absolute
    intensities)."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        *,
        n_info: int = 3,
        base: int = 16,
        depth: int = 3,
        norm: str = "none",
        upsample: str = "dysample",
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"base": base, "depth": depth, "norm": norm, "upsample": upsample}
        self.enc = StableUNet(in_channels, n_info, **kw)
        self.dec = StableUNet(n_info, out_channels, **kw)
        self.kwargs: dict[str, Any] = {
            "in_channels": in_channels, "out_channels": out_channels, "n_info": n_info, **kw
        }  # fmt: skip
        self.dims, self.in_channels, self.depth = 2, in_channels, depth

    @property
    def size_multiple(self) -> tuple[int, ...]:
        return (2**self.depth, 2**self.depth)

    def support_twin(self) -> nn.Module:
        """A copy whose positive-weight probe has the same support: bilinear upsampling
        (DySample's offsets move samples by a fraction of a pixel), no norm."""
        return StableGenerator(**{**self.kwargs, "upsample": "bilinear", "norm": "none",
                                  "base": 4})  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.dec(self.enc(x))
        return out


class _ResBlock(nn.Module):
    def __init__(self, ch: int, norm: str) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), _norm2d(norm, ch), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), _norm2d(norm, ch),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.net(x)
        return out


class ResnetGenerator(nn.Module):
    """CycleGAN's reference generator (Johnson et al.): 7×7 conv, two stride-2 convs,
    ``blocks`` residual blocks, two stride-2 transposed convs, 7×7 conv; reflection
    padding, instance norm (``norm="none"`` drops it). No final tanh: the output is in
    the target's normalized units, unbounded. Instance norm uses each image's own
    statistics, so tiles differ from the whole frame: run it on whole frames."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        *,
        base: int = 64,
        blocks: int = 9,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        self.kwargs: dict[str, Any] = {"in_channels": in_channels, "out_channels": out_channels,
                                       "base": base, "blocks": blocks, "norm": norm}  # fmt: skip
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3), nn.Conv2d(in_channels, base, 7), _norm2d(norm, base), nn.ReLU()
        ]  # fmt: skip
        ch = base
        for _ in range(2):
            layers += [nn.Conv2d(ch, ch * 2, 3, 2, 1), _norm2d(norm, ch * 2), nn.ReLU()]
            ch *= 2
        layers += [_ResBlock(ch, norm) for _ in range(blocks)]
        for _ in range(2):
            layers += [
                nn.ConvTranspose2d(ch, ch // 2, 3, 2, 1, output_padding=1),
                _norm2d(norm, ch // 2),
                nn.ReLU(),
            ]
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, out_channels, 7)]
        self.net = nn.Sequential(*layers)
        self.dims, self.in_channels = 2, in_channels

    @property
    def size_multiple(self) -> tuple[int, ...]:
        return (4, 4)

    def support_twin(self) -> nn.Module:
        """One-channel copy without norm: the same support for the positive-weight probe."""
        return ResnetGenerator(**{**self.kwargs, "base": 1, "norm": "none"})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class _ConvReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, dropout: float = 0.0) -> None:
        super().__init__(nn.Conv2d(cin, cout, k, padding=k // 2), nn.ReLU(), nn.Dropout(dropout))


class GPTNet(nn.Module):
    """The Global Pixel Transformer network (Liu et al., IEEE TMI 2020; Table II).

    Multi-scale input → 1×1 conv (``base``) → encoder: dense blocks of 2, 4, 8 layers
    (growth 16), each with a 1×1 conv to 2·, 4·, 8·``base`` channels (the skips), then a
    down-sampling GPT layer (GDT) → bottom: dense block of 8 and a same-size GPT layer
    (GST) → decoder: up-sampling GPT layers (GUT, halving the channels), the skip
    concatenated, a 1×1 conv halving again, dense blocks of 4, 2, 1 → 1×1 conv to
    ``out_channels`` (several stains at once). With ``base`` 32: 64/128/256 channels,
    384 at the bottom, 288/168/90 up — the seed's arithmetic.

    Multi-scale input: the seed crops 2× and ½× the field around each patch's centre
    and rescales them with learned layers. For whole-frame prediction the three scales
    are here the same field at three resolutions: x itself (2 convs), x average-pooled
    ×2 (2 convs, a transposed conv back) and x upsampled ×2 (2 convs, max-pooled back),
    concatenated and mixed by a 1×1 conv; the wider context reaches every pixel anyway
    through the global attention.

    Attention costs (H·W)·(H'·W') entries: ``attention_from`` is the first level (0:
    full resolution, as in the seed) whose transitions are GPT layers; shallower ones
    are a stride-2 conv / transposed conv. The default 2 uses attention where the
    feature maps are ¼ and ⅛ of the frame and at the bottom: a 512² frame then needs
    128²·64² = 67 M weights (268 MB fp32) per attention layer.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        *,
        base: int = 32,
        attention_from: int = 2,
        dropout: float = 0.0,
        growth: int = 16,
    ) -> None:
        super().__init__()
        if not 0 <= attention_from <= 3:
            raise ValueError(
                f"attention_from must be 0..3 (3: the bottom only), got {attention_from}"
            )
        d = dropout
        self.dims, self.in_channels, self.depth = 2, in_channels, 3
        self.attention_from = attention_from
        self.ms_same = nn.Sequential(
            _ConvReLU(in_channels, base, 3, d), _ConvReLU(base, base, 3, d)
        )
        self.ms_coarse = nn.Sequential(
            nn.AvgPool2d(2), _ConvReLU(in_channels, base, 3, d), _ConvReLU(base, base, 3, d),
            nn.ConvTranspose2d(base, base, 2, 2),
        )  # fmt: skip
        self.ms_fine = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), _ConvReLU(in_channels, base, 3, d),
            _ConvReLU(base, base, 3, d), nn.MaxPool2d(2),
        )  # fmt: skip
        self.ms_mix = nn.Conv2d(3 * base, base, 1)
        self.enc_blocks = nn.ModuleList()
        self.enc_proj = nn.ModuleList()
        self.downs = nn.ModuleList()
        ch = base
        skips = []
        for level, layers in enumerate((2, 4, 8)):
            block = DenseBlock(ch, layers, growth, d)
            out = base * 2 ** (level + 1)
            self.enc_blocks.append(block)
            self.enc_proj.append(nn.Conv2d(block.out_channels, out, 1))
            self.downs.append(
                GPTLayer(out, "down", dropout=d)
                if level >= attention_from
                else nn.Sequential(nn.Conv2d(out, out, 3, 2, 1), nn.ReLU())
            )
            skips.append(out)
            ch = out
        self.bottom = DenseBlock(ch, 8, growth, d)
        ch = self.bottom.out_channels
        self.bottom_attn = GPTLayer(ch, "same", dropout=d)
        self.ups = nn.ModuleList()
        self.dec_proj = nn.ModuleList()
        self.dec_blocks = nn.ModuleList()
        for level, layers in zip((2, 1, 0), (4, 2, 1), strict=True):
            half = ch // 2
            self.ups.append(
                GPTLayer(ch, "up", cout=half, dropout=d)
                if level >= attention_from
                else nn.Sequential(nn.ConvTranspose2d(ch, half, 2, 2), nn.ReLU())
            )
            cat = half + skips[level]
            self.dec_proj.append(nn.Conv2d(cat, cat // 2, 1))
            block = DenseBlock(cat // 2, layers, growth, d)
            self.dec_blocks.append(block)
            ch = block.out_channels
        self.head = nn.Conv2d(ch, out_channels, 1)
        self.channels_up = ch

    @property
    def size_multiple(self) -> tuple[int, ...]:
        return (8, 8)

    #: attention reaches every pixel, so no halo makes tiles exact: tiles overlap by this
    #: margin (the error against whole frames is measured in the tests and README)
    halo_px = (64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ms_mix(torch.cat([self.ms_same(x), self.ms_coarse(x), self.ms_fine(x)], 1))
        skips = []
        for block, proj, down in zip(self.enc_blocks, self.enc_proj, self.downs, strict=True):
            x = F.relu(proj(block(x)))
            skips.append(x)
            x = down(x)
        x = self.bottom_attn(self.bottom(x))
        for up, proj, block in zip(self.ups, self.dec_proj, self.dec_blocks, strict=True):
            x = F.relu(proj(torch.cat([up(x), skips.pop()], 1)))
            x = block(x)
        out: torch.Tensor = self.head(x)
        return out


ArchKind = Literal["denoise_unet", "stain_unet", "stable", "resnet", "gpt"]
Network = UNet | StableGenerator | ResnetGenerator | GPTNet


def unet_kwargs(kind: ArchKind, params: dict[str, Any]) -> dict[str, Any]:
    """The `UNet` constructor arguments of an architecture in a manifest."""
    match kind:
        case "denoise_unet":
            p = {"dims": 2, "base": 16, "depth": 3, "max_channels": 32, **params}
            if p.pop("n2v2", False):
                p.update(top_skip=False, blurpool=True)
            if p["dims"] != 2:
                raise ValueError("the denoiser is 2D (a temporal window goes in as channels)")
            return p
        case "stain_unet":
            return {"dims": 2, "base": 32, "depth": 3, **params}
        case _:
            raise ValueError(f"unknown architecture {kind!r}")


def arch_callable(kind: ArchKind, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The class (in this file) and its constructor arguments for an architecture."""
    if kind == "stable":
        return "StableGenerator", dict(params)
    if kind == "resnet":
        return "ResnetGenerator", dict(params)
    if kind == "gpt":
        return "GPTNet", dict(params)
    return "UNet", unet_kwargs(kind, params)


def build(kind: ArchKind, params: dict[str, Any]) -> Network:
    """An architecture from its manifest description."""
    name, kwargs = arch_callable(kind, params)
    classes: dict[str, Any] = {
        "UNet": UNet, "StableGenerator": StableGenerator, "ResnetGenerator": ResnetGenerator,
        "GPTNet": GPTNet,
    }  # fmt: skip
    net: Network = classes[name](**kwargs)
    return net
