"""oneDNN-packed linear weights (essa.packed_weights): same products, swapped in and out, re-packed on change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from essa.packed_weights import PackedLinear, PackedLinears, packable, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="this PyTorch build has no oneDNN packed linear")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 24), (3, 7, 24)])
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_packed_linear_computes_the_linear(bias, shape, dtype, atol):
    torch.manual_seed(0)
    linear = nn.Linear(24, 40, bias=bias).to(dtype)
    x = torch.randn(shape).to(dtype)
    with torch.inference_mode():
        packed = PackedLinear(linear, rows_hint=8)
        assert packed(x).dtype == dtype
        assert torch.allclose(packed(x).float(), linear(x).float(), atol=atol)
    assert packed.weight is linear.weight and (packed.in_features, packed.out_features) == (24, 40)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)
        self.fp16 = nn.Linear(8, 8).to(torch.float16)

    def forward(self, x):
        return self.head(self.inner(x)), self.fp16(x.to(torch.float16))


def test_swapped_in_packs_fp32_linears_only_and_restores_them():
    net = _Net()
    originals = [net.inner[0], net.inner[2], net.head, net.fp16]
    packed = PackedLinears(net, rows_hint=4)
    x = torch.randn(4, 8)
    expected = net(x)[0]
    with torch.inference_mode(), packed.swapped_in():
        assert all(isinstance(m, PackedLinear) for m in (net.inner[0], net.inner[2], net.head))
        assert net.fp16 is originals[3]  # fp16 runs as is
        assert torch.allclose(net(x)[0], expected, atol=1e-5)
    assert [net.inner[0], net.inner[2], net.head, net.fp16] == originals
    with pytest.raises(RuntimeError, match="boom"), packed.swapped_in():
        raise RuntimeError("boom")
    assert net.head is originals[2]  # restored after an error too
    assert packable(nn.Linear(2, 2)) and packable(nn.Linear(2, 2).to(torch.bfloat16))
    assert not packable(nn.Linear(2, 2).to(torch.float16))


def test_weights_are_packed_once_and_again_when_they_change():
    net = _Net()
    packed = PackedLinears(net, rows_hint=4)
    x = torch.randn(2, 8)
    with torch.inference_mode(), packed.swapped_in():
        first = net.head
        before = net(x)[0]
    with torch.inference_mode(), packed.swapped_in():
        assert net.head is first  # kept between uses
    with torch.no_grad():
        net.head.weight.mul_(2.0)  # an in-place update
    with torch.inference_mode(), packed.swapped_in():
        assert net.head is not first
        after = net(x)[0]
    assert torch.allclose(after - net.head.bias, 2.0 * (before - net.head.bias), atol=1e-5)
    net.head.weight = nn.Parameter(torch.zeros(3, 8))  # a new tensor
    with torch.inference_mode(), packed.swapped_in():
        assert torch.allclose(net(x)[0], net.head.linear.bias.expand(2, 3))
