"""Triton backend of ms_deform_attn (forward and backward kernels): not written yet.

Interface the dispatcher relies on (op.py):
    unavailable_reason(device) -> str            '' when the backend can run on `device`
    ms_deform_attn_triton(value, spatial_shapes, level_start_index, locations, weights) -> Tensor
        differentiable; locations/weights already in the kernels' coordinate dtype.
"""
import torch


def unavailable_reason(device: torch.device) -> str:
    return "the Triton kernels of ms_deform_attn are not written yet"


def ms_deform_attn_triton(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    raise RuntimeError(unavailable_reason(value.device))
