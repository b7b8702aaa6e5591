from .module import MSDeformAttn
from .op import MSDeformAttnFunction, level_layout, ms_deform_attn
from .reference import ms_deform_attn_reference

__all__ = ["MSDeformAttn", "MSDeformAttnFunction", "level_layout", "ms_deform_attn", "ms_deform_attn_reference"]
