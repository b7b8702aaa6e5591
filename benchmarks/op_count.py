"""ATen ops a callable dispatches: the host's share of a step, device-independent.

`aten_ops(run)` counts every op that reaches the dispatcher below autograd while `run()` executes
(forward and backward alike: the autograd engine carries the mode to its threads), by name. Each
one costs the host a dispatch, and on a GPU usually a launch: H200 run 6 timed DB-SAM's bf16
training step at 94 ms for batch 1, 108 for batch 2 and 190 for batch 4, i.e. about as long for
one image as for two, which is a host-bound step (benchmarks/NOTES.md section 16). The model
benchmark records the count of its training rows; as a script it prints a configuration's count by
phase and the ops it dispatches most:

    python benchmarks/op_count.py --variant vit_b --img-size 256 --bf16 [--top 25] [--by-module 4]

(The count does not depend on the image size, nor, since the decoder takes the whole batch in one call
(dbsam/model/decoder.py), much on the batch.)
"""
import argparse
import collections
import contextlib
import dataclasses
import sys
from typing import Callable, Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def aten_ops(run: Callable[[], object]) -> Counter[str]:
    """Op name -> how many times one call of run() dispatched it."""
    mode = _Count()
    with mode:
        run()
    return mode.ops


def forward_ops_by_module(model: torch.nn.Module, run: Callable[[], object], depth: int = 3) -> Counter[str]:
    """Module -> ATen ops its own forward code dispatched during run() (its submodules' ops count
    for them), the module paths cut to `depth` names with numeric indices as `*` (the twelve ViT
    blocks add up as image_encoder.blocks.*.attn). Forward only: backward ops run outside any module."""
    stack = ["(outside any module)"]
    per_module: Counter[str] = collections.Counter()

    def label(name: str) -> str:
        return ".".join("*" if part.isdigit() else part for part in name.split(".")[:depth])

    def leave(module, args, output):  # returns None: the module's output stays as it is
        stack.pop()

    handles = []
    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_pre_hook(lambda m, a, lab=label(name): stack.append(lab)))
            handles.append(mod.register_forward_hook(leave))

    class _ByModule(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            per_module[stack[-1]] += 1
            return func(*args, **(kwargs or {}))

    try:
        with _ByModule():
            run()
    finally:
        for h in handles:
            h.remove()
    return per_module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="vit_b")
    parser.add_argument("--img-size", type=int, default=256, help="input size (the variant's own with 0)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="under bf16 autocast")
    parser.add_argument("--backend", default="auto", help="op backend (dbsam.ops.use_backend)")
    parser.add_argument("--vit-attention", default="sdpa", choices=("sdpa", "sam"))
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--by-module", type=int, default=0, metavar="DEPTH",
                        help="also the forward's ops by module, paths cut to DEPTH names")
    args = parser.parse_args(argv)

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import dbsam.ops
    from dbsam.model.config import VARIANTS
    from dbsam.model.dbsam import DBSAM
    from test_model import dice_bce, make_inputs

    cfg = VARIANTS[args.variant]
    if args.img_size:
        cfg = dataclasses.replace(cfg, img_size=args.img_size)
    model = DBSAM(cfg).set_vit_attention(args.vit_attention).train()
    images, boxes, target = make_inputs(model, args.batch, torch.device("cpu"))
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    with dbsam.ops.use_backend(args.backend):
        def forward():
            with amp():
                low, _ = model(images, boxes)
            return dice_bce(low, target)

        forward().backward()  # the first step builds what later steps keep (the ViT's rel-pos tables)
        model.zero_grad(set_to_none=True)
        box = {}
        fwd = aten_ops(lambda: box.setdefault("loss", forward()))
        bwd = aten_ops(lambda: box["loss"].backward())
        by_module = forward_ops_by_module(model, forward, args.by_module) if args.by_module else None
    for name, ops in (("forward", fwd), ("backward", bwd)):
        print(f"{name}: {sum(ops.values())} aten ops")
        for op, n in ops.most_common(args.top):
            print(f"  {n:6d} {op}")
    print(f"forward + backward: {sum(fwd.values()) + sum(bwd.values())} aten ops")
    if by_module:
        print(f"forward by module (depth {args.by_module}):")
        for name, n in by_module.most_common(args.top):
            print(f"  {n:6d} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
