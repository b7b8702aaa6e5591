from .module import ChannelAttention
from .op import channel_attention
from .reference import channel_attention_branch_reference, channel_attention_reference

__all__ = ["ChannelAttention", "channel_attention", "channel_attention_branch_reference",
           "channel_attention_reference"]
