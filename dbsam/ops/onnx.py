"""Export to ONNX: the translation table that turns dbsam's custom ops into standard ONNX nodes.

    import torch, dbsam.ops
    torch.onnx.export(model, args, "model.onnx", dynamo=True,
                      custom_translation_table=dbsam.ops.onnx_translation_table())

Without it the exporter stops at the first dbsam op ("No ONNX function found"). With it,
MSDeformAttn becomes one GridSample per level and ChannelAttention a LayerNormalization, two Convs
and the SE MLP (opset 18), so ONNX Runtime, TensorRT and other runtimes run the model with no
custom-op plugin, at their own speed (not our kernels'). Needs the `onnx` extra (onnx, onnxscript).
"""
from typing import Callable, Dict

import torch


def onnx_translation_table() -> Dict[torch._ops.OpOverload, Callable]:
    """{op overload: onnxscript function} for every dbsam forward op a traced model can hold (the
    native ops and the Triton backend's)."""
    try:
        from .channel_attention.onnx import channel_attention_onnx
        from .ms_deform_attn.onnx import ms_deform_attn_onnx
    except ImportError as exc:
        raise ImportError("dbsam.ops.onnx_translation_table needs onnxscript: pip install 'dbsam[onnx]' "
                          f"(or pip install onnx onnxscript): {exc}") from exc
    table = {}
    for name, fn in (("ms_deform_attn_forward", ms_deform_attn_onnx),
                     ("ms_deform_attn_triton_forward", ms_deform_attn_onnx),
                     ("channel_attention_forward", channel_attention_onnx),
                     ("channel_attention_triton_forward", channel_attention_onnx)):
        packet = getattr(torch.ops.dbsam, name, None) if hasattr(torch.ops, "dbsam") else None
        if packet is not None:
            table[packet.default] = fn
    return table
