"""benchmarks/op_count.py: the ATen ops a step dispatches, forward and backward, our ops included."""
import pytest
import torch
from _paths import import_from

from dbsam.ops import ChannelAttention, _backends, use_backend


def test_counts_forward_and_backward():
    aten_ops = import_from("benchmarks", "op_count").aten_ops
    x = torch.randn(8, 8, requires_grad=True)
    fwd = aten_ops(lambda: (x @ x).relu().sum())
    assert fwd["aten.mm"] == 1 and fwd["aten.relu"] == 1 and fwd["aten.sum"] == 1
    y = (x @ x).relu().sum()
    bwd = aten_ops(lambda: y.backward())
    assert bwd["aten.mm"] == 2 and bwd["aten.threshold_backward"] == 1  # both mm grads, relu's


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])

    def forward(self, x):
        x = self.a(x)
        for b in self.blocks:
            x = b(x)
        return x.relu()


def test_forward_ops_by_module():
    by_module = import_from("benchmarks", "op_count").forward_ops_by_module
    model = _Net()
    x = torch.randn(3, 4)
    with torch.no_grad():  # (with grad, relu's saved output adds a detach)
        ops = by_module(model, lambda: model(x).sum(), depth=2)
    # Each Linear: t + addmm; the two blocks add up under blocks.*; the root's relu and the sum are
    # outside any named module.
    assert ops == {"a": 2, "blocks.*": 4, "(outside any module)": 2}, ops
    assert not model.a._forward_hooks and not model.a._forward_pre_hooks  # hooks removed


_NO_CPU_OP = _backends.why_not("channel_attention", "cpu", torch.device("cpu"))


@pytest.mark.skipif(bool(_NO_CPU_OP), reason=f"the native CPU op is needed: {_NO_CPU_OP}")
def test_counts_our_ops_and_their_cpp_backward():
    aten_ops = import_from("benchmarks", "op_count").aten_ops
    m = ChannelAttention(8)
    a = torch.randn(1, 3, 3, 8, requires_grad=True)
    with use_backend("cpu"):
        ops = aten_ops(lambda: m(a).sum().backward())
    assert ops["dbsam.channel_attention_forward"] == 1 and ops["dbsam.channel_attention_backward"] == 1
