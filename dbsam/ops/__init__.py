"""dbsam.ops: the fused kernels of DB-SAM as torch custom ops, with their drop-in modules.

    from dbsam.ops import MSDeformAttn, MSDeformAttnFunction, ms_deform_attn
    from dbsam.ops import ChannelAttention, channel_attention
    with dbsam.ops.use_backend("reference"): ...   # or DBSAM_BACKEND=reference
    python -m dbsam.ops                              # what is built, available, and picked
"""
from ._backends import BACKENDS, get_backend, report, set_backend, use_backend
from .channel_attention import ChannelAttention, channel_attention, channel_attention_reference
from .ms_deform_attn import MSDeformAttn, MSDeformAttnFunction, ms_deform_attn, ms_deform_attn_reference

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
    "report",
    "set_backend",
    "use_backend",
]
