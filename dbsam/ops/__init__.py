"""dbsam.ops: the fused kernels of DB-SAM as torch custom ops, with their drop-in modules.

    from dbsam.ops import MSDeformAttn, MSDeformAttnFunction, ms_deform_attn
    from dbsam.ops import ChannelAttention, channel_attention
    with dbsam.ops.use_backend("reference"): ...   # or DBSAM_BACKEND=reference
    python -m dbsam.ops                              # what is built, available, and picked
    torch.onnx.export(model, args, dynamo=True, custom_translation_table=dbsam.ops.onnx_translation_table())
"""
from ._backends import BACKENDS, get_backend, report, set_backend, use_backend
from .channel_attention import ChannelAttention, channel_attention, channel_attention_reference
from .ms_deform_attn import MSDeformAttn, MSDeformAttnFunction, ms_deform_attn, ms_deform_attn_reference
from .onnx import onnx_translation_table

__all__ = [
    "BACKENDS",
    "ChannelAttention",
    "channel_attention",
    "channel_attention_reference",
    "MSDeformAttn",
    "MSDeformAttnFunction",
    "get_backend",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "onnx_translation_table",
    "report",
    "set_backend",
    "use_backend",
]
