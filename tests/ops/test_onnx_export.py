"""Both ops through torch.onnx.export(dynamo=True) with dbsam.ops.onnx_translation_table(), run in ONNX
Runtime against our own kernels: MSDeformAttn (locations off the map, dynamic batch, queries and level
sizes) and ChannelAttention."""
import sys

import pytest
import torch

import dbsam.ops as ops
from dbsam.ops import ChannelAttention, MSDeformAttn, _native

from _msda_cases import level_tensors

from _shared import needs_onnx as _needs_onnx_extras

_needs_native = pytest.mark.skipif(not _native.HAS_NATIVE, reason=f"dbsam._C not built: {_native.LOAD_ERROR}")


def needs_onnx(test):
    """The onnx extras, and dbsam._C: the exports are compared with our own kernels."""
    return _needs_native(_needs_onnx_extras(test))


def _run_onnx(module, args, path, dynamic_shapes=None, run_args=None):
    import onnxruntime

    program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic_shapes,
                                custom_translation_table=ops.onnx_translation_table())
    program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feed = run_args if run_args is not None else args
    return torch.from_numpy(session.run(None, {n: a.numpy() for n, a in zip(names, feed)})[0])


def _msda_module():
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3).eval()
    for p in module.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)  # offsets large enough to send points off the map
    return module


def _msda_args(N, Lq, levels, seed):
    g = torch.Generator().manual_seed(seed)
    spatial, starts, S = level_tensors(levels)
    return (torch.randn(N, Lq, 32, generator=g), torch.rand(N, Lq, 2, 2, generator=g) * 1.2 - 0.1,
            torch.randn(N, S, 32, generator=g), spatial, starts)


@needs_onnx
def test_msdeformattn_exports_and_matches_in_onnxruntime(tmp_path):
    module = _msda_module()
    args = _msda_args(2, 7, [(6, 5), (3, 3)], seed=1)
    got = _run_onnx(module, args, tmp_path / "msda.onnx")
    torch.testing.assert_close(got, module(*args).detach(), atol=1e-5, rtol=1e-5)


@needs_onnx
def test_msdeformattn_onnx_keeps_batch_queries_and_level_sizes_dynamic(tmp_path):
    from torch.export import Dim

    module = _msda_module()
    N, Lq, S = Dim("N"), Dim("Lq"), Dim("S")
    dynamic = ({0: N, 1: Lq}, {0: N, 1: Lq}, {0: N, 1: S}, None, None)
    other = _msda_args(3, 11, [(9, 4), (5, 2)], seed=2)  # another batch, query count and image size
    got = _run_onnx(module, _msda_args(2, 7, [(6, 5), (3, 3)], seed=1), tmp_path / "msda_dyn.onnx",
                    dynamic_shapes=dynamic, run_args=other)
    torch.testing.assert_close(got, module(*other).detach(), atol=1e-5, rtol=1e-5)


@needs_onnx
def test_channel_attention_exports_and_matches_in_onnxruntime(tmp_path):
    torch.manual_seed(0)
    module = ChannelAttention(24, drop_path=0.1).eval()
    for p in module.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    x = torch.randn(2, 7, 5, 24)
    got = _run_onnx(module, (x,), tmp_path / "ca.onnx")
    torch.testing.assert_close(got, module(x).detach(), atol=1e-5, rtol=1e-5)


def test_translation_table_without_onnxscript_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript -> ImportError
    for name in ("dbsam.ops.ms_deform_attn.onnx", "dbsam.ops.channel_attention.onnx"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ImportError, match=r"dbsam\[onnx\]"):
        ops.onnx_translation_table()
