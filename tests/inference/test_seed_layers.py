"""The seeds' layers: DySample, the GPT layer, demodulated convolutions, STABLE's losses."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.nn import functional as F

from scopestream.inference.architectures import DemodConv2d, DenseBlock, DySample, GPTLayer
from scopestream.training.translation import cycle_ramp, info_consistency_loss


def test_dysample_with_zero_offsets_is_bilinear_upsampling() -> None:
    torch.manual_seed(0)
    up = DySample(8, scale=2, groups=4)
    x = torch.randn(2, 8, 13, 10)
    with torch.no_grad():
        up.offset.weight.zero_()
        got = up(x)
    want = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert got.shape == (2, 8, 26, 20)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dysample_learns_offsets_per_group() -> None:
    torch.manual_seed(0)
    up = DySample(8, groups=4)
    x = torch.randn(1, 8, 16, 16)
    with torch.no_grad():
        up.offset.weight.normal_(std=0.5)
    y = up(x)
    assert not torch.allclose(y, F.interpolate(x, scale_factor=2, mode="bilinear"))
    y.square().mean().backward()
    assert up.offset.weight.grad is not None and up.offset.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="groups"):
        DySample(6, groups=4)


@pytest.mark.parametrize(
    ("mode", "size", "channels"), [("same", 16, 32), ("down", 8, 32), ("up", 32, 16)]
)
def test_gpt_layer_samples_down_keeps_or_samples_up(mode: str, size: int, channels: int) -> None:
    torch.manual_seed(0)
    layer = GPTLayer(32, mode)
    x = torch.randn(2, 32, 16, 16)
    assert layer(x).shape == (2, channels, size, size)


def test_gpt_layer_is_global_one_pixel_reaches_every_output() -> None:
    torch.manual_seed(0)
    layer = GPTLayer(8, "same").eval()
    x = torch.randn(1, 8, 24, 24, requires_grad=True)
    out = layer(x)
    # the output at one corner depends on the input at the opposite corner
    (g,) = torch.autograd.grad(out[0, :, 0, 0].sum(), x)
    assert g[0, :, -1, -1].abs().sum() > 0


def test_dense_block_concatenates_every_layer() -> None:
    block = DenseBlock(32, layers=4)
    assert block.out_channels == 32 + 4 * 16
    x = torch.randn(1, 32, 8, 8)
    y = block(x)
    assert y.shape == (1, 96, 8, 8) and torch.equal(y[:, :32], x)


def test_demodulated_kernels_have_unit_norm() -> None:
    torch.manual_seed(0)
    conv = DemodConv2d(4, 6)
    with torch.no_grad():
        conv.weight.mul_(7.0)  # the scale of the raw weights does not matter
    x = torch.randn(1, 4, 9, 9)
    centre = torch.zeros(1, 4, 3, 3)
    centre[0, 0, 1, 1] = 1.0  # one unit input: the output is the kernel taps it meets
    w = conv.weight / conv.weight.square().sum(dim=(1, 2, 3), keepdim=True).sqrt()
    torch.testing.assert_close(conv(x), F.conv2d(x, w, padding=1))
    assert conv(centre).shape == (1, 6, 3, 3)


@pytest.mark.parametrize("layer", ["dysample", "gpt-up"])
def test_seed_layers_export_to_onnx_and_match_torch(layer: str) -> None:
    torch.manual_seed(0)
    net = (DySample(8) if layer == "dysample" else GPTLayer(8, "up")).eval()
    if layer == "dysample":
        with torch.no_grad():
            net.offset.weight.normal_(std=0.3)  # learned offsets, not just bilinear
    buf = io.BytesIO()
    axes = {0: "n", 2: "y", 3: "x"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation
        torch.onnx.export(
            net, (torch.zeros(1, 8, 8, 8),), buf, input_names=["input"],
            output_names=["output"], dynamic_axes={"input": axes, "output": axes},
            opset_version=17, dynamo=False,
        )  # fmt: skip  (grid_sample needs opset ≥ 16)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 8, 12, 16)  # another size than the export's: the grid follows it
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_information_consistency_is_zero_for_identical_maps_only() -> None:
    torch.manual_seed(0)
    z_a, z_b = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    assert float(info_consistency_loss(z_a.clone(), z_a, z_b.clone(), z_b)) == 0.0
    shifted = info_consistency_loss(z_a + 0.5, z_a, z_b, z_b)
    assert float(shifted) == pytest.approx(0.5)
    # the stop-gradients: no gradient reaches E_A(x_A) nor E_A(x_BA)
    za = z_a.clone().requires_grad_()
    eba = z_b.clone().requires_grad_()
    eab = (z_a + 1).requires_grad_()
    zb = (z_b + 1).requires_grad_()
    info_consistency_loss(eab, za, eba, zb).backward()
    assert za.grad is None and eba.grad is None
    assert eab.grad is not None and zb.grad is not None


def test_cycle_weight_grows_as_a_sigmoid() -> None:
    assert cycle_ramp(0, 100) == pytest.approx(1 / (1 + np.exp(6)))
    assert cycle_ramp(50, 100) == pytest.approx(0.5)
    assert cycle_ramp(100, 100) == 1.0 and cycle_ramp(5, 0) == 1.0
