"""One forward + backward of each op's CUDA kernels, for Nsight Compute (gpu_check.sh's `ncu` step).

    ncu --clock-control none --kernel-name regex:'msda_|dw_|ln_|fold|grad_pre|gate_dot' \\
        --section SpeedOfLight --section WarpStateStats --section Occupancy --section MemoryWorkloadAnalysis \\
        python benchmarks/ncu_case.py

Shapes: the ViT-Adapter injector at N = 8 (bf16 value, fp32 locations; model-like locations) and the
adapter at 8x64x64x768 bf16, where the first H100 runs missed their goals (NOTES.md section 7).
No warm-up: ncu replays each profiled launch itself. `--clock-control none` keeps the card's
clocks as they are (ncu would otherwise lock them to base for the measurement).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    if not torch.cuda.is_available():
        print("ncu_case: needs a CUDA device")
        return 0
    from msda_inputs import INJECTOR, case_inputs

    from dbsam.ops import ChannelAttention, ms_deform_attn, use_backend

    g = torch.Generator("cuda").manual_seed(0)
    value, spatial, starts, loc, attn = case_inputs(8, **INJECTOR, dtype=torch.bfloat16, device="cuda", generator=g)
    value.requires_grad_(), loc.requires_grad_(), attn.requires_grad_()
    out = ms_deform_attn(value, spatial, starts, loc, attn, backend="cuda")
    torch.autograd.grad(out, (value, loc, attn), torch.randn_like(out))

    mod = ChannelAttention(768).cuda().to(torch.bfloat16)
    x = torch.randn(8, 64, 64, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with use_backend("cuda"):
        y = mod(x)
        torch.autograd.grad(y, (x, *mod.parameters()), torch.randn_like(y))
    torch.cuda.synchronize()
    print("ncu_case: ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
