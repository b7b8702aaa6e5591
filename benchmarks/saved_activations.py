"""Bytes autograd saves for backward: the activation memory of a forward, device-independent.

`saved_bytes(run, exclude)` counts the unique storages packed by autograd while `run()` executes
(torch.autograd.graph.saved_tensors_hooks), apart from the excluded tensors (parameters, the input).
Used by the adapter and model benchmarks; as a script it prints the DB-SAM training forward's
saved activations per configuration (any device; on a CPU it predicts what the GPU will keep):

    python benchmarks/saved_activations.py --variant vit_b --batch 1 [--device cuda] [--bf16]

(ViT-B at 1024 on a CPU: about a minute and 20 GB of host memory at batch 1.)

Storages are counted once, whatever views point into them; tensors saved inside gradient
checkpointing's own hooks are not seen (checkpointed runs are not measured).
"""
import argparse
import contextlib
from typing import Callable, Iterable, Tuple

import torch


def saved_bytes(run: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> Tuple[int, int]:
    """(bytes saved for backward apart from `exclude`, all saved bytes) of one call of run()."""
    seen = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        # Not `t` itself: a tensor saved as an output of the op that saved it (sigmoid, softmax, our
        # ops' statistics) would then hold its own grad_fn through the packed value, a cycle through
        # C++ that no garbage collection frees. H100 run 5 lost each measured forward's activations
        # that way, row after row, until the model benchmark ran out of memory. A detached view
        # keeps the same storage (the same bytes, the same values) without the grad_fn.
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    total = sum(seen.values())
    return sum(n for ptr, n in seen.items() if ptr not in skip), total


def model_saved_bytes(model, images, boxes, backend: str, attention: str, dtype: torch.dtype) -> int:
    """Activation bytes a training forward of DB-SAM keeps, with the given op backend and ViT attention."""
    import dbsam.ops

    model.train().set_grad_checkpointing(False).set_vit_attention(attention)
    amp = torch.autocast(images.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def run():
        with amp:
            return model(images, boxes)

    with dbsam.ops.use_backend(backend):
        act, _ = saved_bytes(run, exclude=list(model.parameters()) + [images])
    return act


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="vit_b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU autocast's op lists differ from CUDA's)")
    args = p.parse_args()

    from dbsam.model import build_dbsam

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_dbsam(args.variant).to(device)
    S = model.config.img_size
    images = torch.randn(args.batch, 3, S, S, device=device)
    boxes = torch.tensor([[S * 0.1, S * 0.2, S * 0.6, S * 0.7]] * args.batch, device=device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    print(f"DB-SAM {args.variant}, batch {args.batch}, {device}, {dtype}: activation memory saved for backward")
    # The model benchmark's rows: reference (the original composition), auto (the fast path), and our
    # ops with SAM's attention (splits the two gains).
    rows = [("reference", "sam"), ("auto", "sdpa"), ("auto", "sam")]
    for backend, attention in rows:
        mib = model_saved_bytes(model, images, boxes, backend, attention, dtype) / 2**20
        print(f"  ops {backend:9}  ViT attention {attention:4}  {mib:9.1f} MiB")


if __name__ == "__main__":
    main()
