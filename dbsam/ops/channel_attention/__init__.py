from .module import ChannelAttention
from .reference import channel_attention_branch_reference, channel_attention_reference

__all__ = ["ChannelAttention", "channel_attention_branch_reference", "channel_attention_reference"]
