"""FrozenLinear (dbsam/model/vit_branch.py): a frozen nn.Linear whose autocast copies are kept
between calls, with nn.Linear's results, and new copies whenever the weights change."""
import collections

import pytest
import torch
from torch import nn

from dbsam.model.vit_branch import FrozenLinear, frozen_linears


def _pair(requires_grad=False):
    torch.manual_seed(0)
    ref = nn.Linear(24, 40).requires_grad_(requires_grad)
    ours = FrozenLinear(24, 40).requires_grad_(requires_grad)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _casts(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    with Count() as c:
        fn()
    return c.ops["aten._to_copy"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_same_result_as_linear_under_autocast_and_copies_kept(dtype):
    ref, ours = _pair()
    x = torch.randn(3, 7, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        want = ref(x)
        got = ours(x)
        copies = ours._autocast_copies[1]
        assert copies[0].dtype == dtype and ours(x) is not None and ours._autocast_copies[1] is copies
        h = x * 1.0  # not a leaf: autocast's own cache would keep a leaf x's cast
        assert _casts(lambda: ours(h)) == 1 and _casts(lambda: ref(h)) == 3  # h only, against h, W, b
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)
    g = torch.randn_like(want)
    assert torch.equal(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0])


def test_new_copies_when_the_weights_change():
    ref, ours = _pair()
    x = torch.randn(5, 24)

    def check():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(ours(x), ref(x))

    check()
    first = ours._autocast_copies[1]
    with torch.no_grad():  # in place (an optimiser step would do this)
        ref.weight.add_(1.0)
        ours.weight.add_(1.0)
    check()
    assert ours._autocast_copies[1] is not first
    state = {k: torch.randn_like(v) for k, v in ref.state_dict().items()}
    ref.load_state_dict(state)
    ours.load_state_dict(state)
    check()
    ours.bias = nn.Parameter(ref.bias.detach().clone(), requires_grad=False)  # a replaced parameter
    check()
    ref.double(), ours.double()  # .to(): new storages
    x = x.double()
    check()


def test_no_copies_outside_autocast_or_when_trainable():
    ref, ours = _pair()
    x = torch.randn(5, 24)
    assert torch.equal(ours(x), ref(x)) and "_autocast_copies" not in ours.__dict__
    ref, ours = _pair(requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x)
        assert torch.equal(out, ref(x)) and "_autocast_copies" not in ours.__dict__
    out.float().sum().backward()
    assert ours.weight.grad is not None  # a trainable weight still trains


def test_compiles_in_one_graph():
    torch._dynamo.reset()
    _, ours = _pair()
    x = torch.randn(5, 24, requires_grad=True)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(compiled(x), ours(x), rtol=0, atol=0)


def test_frozen_linears_swaps_only_linears_and_keeps_the_state_dict():
    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Sequential(nn.Linear(4, 2)))
    keys = list(m.state_dict())
    frozen_linears(m)
    assert [type(t) for t in m.modules()][1:] == [FrozenLinear, nn.LayerNorm, nn.Sequential, FrozenLinear]
    assert list(m.state_dict()) == keys


def test_dbsam_vit_blocks_use_it():
    pytest.importorskip("segment_anything")
    from dbsam.model import build_dbsam

    m = build_dbsam("tiny")
    linears = [t for t in m.image_encoder.blocks.modules() if isinstance(t, nn.Linear)]
    assert linears and all(type(t) is FrozenLinear for t in linears)
    assert not any(type(t) is FrozenLinear for t in m.cross_attention.modules())  # trainable parts untouched


def test_copies_made_in_inference_mode_do_not_reach_autograd():
    """A predictor under inference_mode, then training: the inference-tensor copies are not reused
    where autograd must save them."""
    ref, ours = _pair()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours(torch.randn(2, 24))
    x = torch.randn(2, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x * 1.0)
        assert torch.equal(out, ref(x * 1.0))
    out.float().sum().backward()
    assert x.grad is not None


def test_meta_tensors_take_the_plain_path():
    """A shape-only run on the meta device: autocast has no meta device (torch raises when asked)."""
    with torch.device("meta"):
        ours = FrozenLinear(24, 40).requires_grad_(False)
    assert ours(torch.randn(5, 24, device="meta")).shape == (5, 40)
