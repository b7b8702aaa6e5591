"""channel_attention in ONNX: the fused op as standard ONNX nodes, for `torch.onnx.export(..., dynamo=True)`.

LayerNormalization (its mean and inverse std are the op's saved statistics), the depthwise 3x3 as a
grouped Conv on the NCHW view, GELU in its erf form, the SE MLP as two MatMuls, the 1x1 conv and the
residual: the reference composition, which every backend matches. Written with onnxscript's opset 18
(GELU became an ONNX op only in opset 20) and traced by the exporter. The op's five outputs are all
produced (y, the LN mean and rstd [B, H, W], the pooled SE input [B, C], the DW output pre), in the
dtypes of its fake kernel, so the translation fits any graph the op appears in; an inference graph
uses y only and ONNX optimisers drop the rest.
"""
import math

from onnxscript import ir
from onnxscript import opset18 as op


def _gelu(t):
    return op.Mul(op.Mul(t, op.CastLike(0.5, t)),
                  op.Add(op.CastLike(1.0, t), op.Erf(op.Div(t, op.CastLike(math.sqrt(2.0), t)))))


def channel_attention_onnx(x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight, branch_scale=None,
                           eps: float = 1e-6, residual: bool = True):
    C = x.shape[3]
    stat_type = ir.DataType.DOUBLE if x.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT
    ln_w, ln_b = op.CastLike(ln_weight, x), op.CastLike(ln_bias, x)
    n, mean, inv_std = op.LayerNormalization(x, ln_w, ln_b, axis=-1, epsilon=eps, stash_type=1)
    pre = op.Conv(op.Transpose(n, perm=[0, 3, 1, 2]), op.CastLike(dw_weight, x), group=C, pads=[1, 1, 1, 1],
                  kernel_shape=[3, 3])  # [B, C, H, W]
    u = _gelu(pre)
    pooled = op.ReduceMean(u, op.Constant(value_ints=[2, 3]), keepdims=0)  # [B, C]
    w1 = op.Reshape(op.CastLike(fc1_weight, x), op.Constant(value_ints=[0, -1]))  # [R, C]
    w2 = op.Reshape(op.CastLike(fc2_weight, x), op.Constant(value_ints=[0, -1]))  # [C, R]
    gate = op.Sigmoid(op.MatMul(_gelu(op.MatMul(pooled, op.Transpose(w1, perm=[1, 0]))), op.Transpose(w2, perm=[1, 0])))
    if branch_scale is not None:  # drop-path: keep_b / (1 - p) per sample
        gate = op.Mul(gate, op.Unsqueeze(op.CastLike(branch_scale, x), op.Constant(value_ints=[1])))
    gated = op.Mul(u, op.Unsqueeze(gate, op.Constant(value_ints=[2, 3])))
    branch = op.Conv(gated, op.CastLike(pw_weight, x), kernel_shape=[1, 1])
    branch = op.Transpose(branch, perm=[0, 2, 3, 1])
    y = op.Add(x, branch) if residual else branch
    squeeze_c = op.Constant(value_ints=[3])
    return (y, op.Cast(op.Squeeze(mean, squeeze_c), to=stat_type), op.Cast(op.Squeeze(inv_std, squeeze_c), to=stat_type),
            op.Cast(pooled, to=stat_type), op.Transpose(pre, perm=[0, 2, 3, 1]))
