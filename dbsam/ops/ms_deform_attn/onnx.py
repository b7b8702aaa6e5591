"""ms_deform_attn in ONNX: the op as standard ONNX nodes, for `torch.onnx.export(..., dynamo=True)`.

The contract is grid_sample's (bilinear, zeros, align_corners=False on 2*loc - 1), so each level is one
ONNX GridSample (opset 16+): the level's rows of value sliced by value_level_start_index and reshaped
to [N*M, D, H, W] with H, W read from value_spatial_shapes at run time (the exported graph keeps them
as inputs, so one file serves every image size), the level's grid [N*M, Lq, P, 2], the weights
multiplied in and summed over points, the levels added. ONNX Runtime, TensorRT and other runtimes
then run the exported model without a custom-op plugin. Written with onnxscript's opset 18 and
traced by the exporter (Python loops over the L levels unroll; L, P, M and D are the export's static
sizes, N, Lq and the level sizes stay dynamic).
"""
from onnxscript import opset18 as op


def ms_deform_attn_onnx(value, value_spatial_shapes, value_level_start_index, sampling_locations,
                        attention_weights):
    M, D = value.shape[2], value.shape[3]
    L, P = sampling_locations.shape[3], sampling_locations.shape[4]
    n = op.Shape(value, start=0, end=1)
    lq = op.Shape(sampling_locations, start=1, end=2)
    if L * P == 0:  # no sample points: zeros, as the kernels return
        return op.Expand(op.CastLike(0.0, value), op.Concat(n, lq, op.Constant(value_ints=[M * D]), axis=0))
    # Locations and weights may be float32 beside a float16/bfloat16 value (AMP): GridSample takes the
    # grid in its own float type, the weights are cast to value's.
    grids = op.Sub(op.Mul(sampling_locations, op.CastLike(2.0, sampling_locations)),
                   op.CastLike(1.0, sampling_locations))
    out = None
    for lvl in range(L):
        idx = op.Constant(value_ints=[lvl])
        hw = op.Reshape(op.Gather(value_spatial_shapes, idx, axis=0), op.Constant(value_ints=[2]))
        start = op.Gather(value_level_start_index, idx, axis=0)
        end = op.Add(start, op.ReduceProd(hw, keepdims=1))
        # [N, H*W, M, D] -> [N*M, D, H, W]
        v = op.Transpose(op.Slice(value, start, end, op.Constant(value_ints=[1])), perm=[0, 2, 3, 1])
        v = op.Reshape(v, op.Concat(op.Constant(value_ints=[-1, D]), hw, axis=0))
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        g = op.Transpose(op.Squeeze(op.Gather(grids, idx, axis=3), op.Constant(value_ints=[3])), perm=[0, 2, 1, 3, 4])
        g = op.Reshape(g, op.Concat(op.Constant(value_ints=[-1]), lq, op.Constant(value_ints=[P, 2]), axis=0))
        sampled = op.GridSample(v, g, mode="bilinear", padding_mode="zeros", align_corners=0)  # [N*M, D, Lq, P]
        # [N, Lq, M, P] -> [N*M, 1, Lq, P]
        a = op.Transpose(op.Squeeze(op.Gather(attention_weights, idx, axis=3), op.Constant(value_ints=[3])),
                         perm=[0, 2, 1, 3])
        a = op.Reshape(op.CastLike(a, value),
                       op.Concat(op.Constant(value_ints=[-1, 1]), lq, op.Constant(value_ints=[P]), axis=0))
        term = op.ReduceSum(op.Mul(sampled, a), op.Constant(value_ints=[3]), keepdims=0)  # [N*M, D, Lq]
        out = term if out is None else op.Add(out, term)
    # [N*M, D, Lq] -> [N, Lq, M*D]
    out = op.Transpose(op.Reshape(out, op.Concat(n, op.Constant(value_ints=[M, D]), lq, axis=0)), perm=[0, 3, 1, 2])
    return op.Reshape(out, op.Concat(n, lq, op.Constant(value_ints=[M * D]), axis=0))
