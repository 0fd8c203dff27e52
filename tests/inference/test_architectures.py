from __future__ import annotations

import numpy as np
import pytest
import torch

from scopestream.inference.architectures import UNet, build, count_parameters, receptive_radius


def test_denoiser_is_small_and_has_no_normalization_layers() -> None:
    for params in ({}, {"base": 24}, {"n2v2": True}, {"in_channels": 5}):
        m = build("denoise_unet", params)
        assert count_parameters(m) <= 500_000
        assert m.depth == 3
        kinds = {type(x).__name__ for x in m.modules()}
        assert not kinds & {
            "BatchNorm2d",
            "InstanceNorm2d",
            "GroupNorm",
            "LayerNorm",
            "AdaptiveAvgPool2d",
        }


def test_n2v2_variant_drops_the_top_skip_and_blurpools() -> None:
    m = build("denoise_unet", {"n2v2": True})
    assert m.top_skip is False
    assert any(type(x).__name__ == "BlurPool2d" for x in m.modules())


def test_stain_unet_outputs_several_stains_2d_and_3d() -> None:
    m2 = build("stain_unet", {"in_channels": 5, "out_channels": 3, "base": 8})
    assert m2(torch.zeros(1, 5, 64, 64)).shape == (1, 3, 64, 64)
    m3 = build(
        "stain_unet", {"dims": 3, "out_channels": 2, "base": 8, "pool_z": (False, False, True)}
    )
    assert m3.size_multiple == (2, 8, 8)  # anisotropic: z pooled once only
    assert m3(torch.zeros(1, 1, 6, 32, 32)).shape == (1, 2, 6, 32, 32)


@torch.no_grad()
def test_receptive_radius_is_the_true_dependency_range() -> None:
    torch.manual_seed(0)
    m = UNet(dims=2, base=8, depth=2).eval()
    r = receptive_radius(m)[0]
    x = torch.rand(1, 1, 128, 128)
    base = m(x)
    centre = 64
    # a change just outside the radius does not reach the centre pixel ...
    far = x.clone()
    far[0, 0, centre, centre + r + 2 :] += 1.0
    assert torch.equal(m(far)[0, 0, centre, centre], base[0, 0, centre, centre])
    # ... one inside it does
    near = x.clone()
    near[0, 0, centre, centre + r - 1] += 10.0
    assert not torch.equal(m(near)[0, 0, centre, centre], base[0, 0, centre, centre])


@torch.no_grad()
def test_shift_equivariant_by_the_size_multiple() -> None:
    torch.manual_seed(1)
    m = build("denoise_unet", {"base": 8})
    x = torch.rand(1, 1, 96, 96)
    k = m.size_multiple[0]
    a = m(x)[0, 0, 40:56, 40:56]
    b = m(torch.roll(x, (k, k), (2, 3)))[0, 0, 40 + k : 56 + k, 40 + k : 56 + k]
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        build("vgg16", {})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "arch",
    [
        ("denoise_unet", {"in_channels": 3}),
        ("denoise_unet", {"n2v2": True}),
        ("stain_unet", {"base": 8, "out_channels": 2}),
        ("stain_unet", {"dims": 3, "base": 4, "pool_z": (False, True, False)}),
    ],
)
def test_one_channel_twin_measures_the_same_receptive_field(arch: tuple) -> None:  # type: ignore[type-arg]
    m = build(*arch)
    assert receptive_radius(m) == receptive_radius(m, twin=False)
