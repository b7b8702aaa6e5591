"""DB-SAM end to end: forward and training step, fast ops vs reference ops.

GPU: ViT-B at 1024 x 1024, batch 1, 2, 4; forward (no grad) and training step (forward, Dice + BCE
on the low-res logits, backward, AdamW step), in fp32 and bf16 autocast, the training step also
with gradient checkpointing of the frozen ViT blocks. Rows of a group (one configuration):
  auto                  the fast path: our ops as `auto` picks them (the CUDA kernels where built) and the ViT
                        attention through SDPA (model/vit_attention.py)
  reference             the pure-PyTorch reference ops and segment_anything's own attention: DB-SAM
                        as the original code runs it
  auto_sam_attention    (train steps at batch 2, the goal's batch) our ops with SAM's attention:
                        splits the gain between the two
Peak memory (torch.cuda.max_memory_allocated over the timed rounds) and, for training steps without
checkpointing, the activation bytes saved for backward (saved_activations.py) go into `extra_info`.
CPU: the `tiny` config, the same rows (C++ cpu kernels as the fast ops).

    pytest benchmarks/test_model.py --benchmark-columns=median,iqr --benchmark-group-by=group
"""
import contextlib
import gc
import os
import sys

import pytest
import torch

pytest.importorskip("segment_anything")

import dbsam.ops  # noqa: E402
from conftest import host_and_wall_us  # noqa: E402
from op_count import aten_ops  # noqa: E402
from saved_activations import model_saved_bytes  # noqa: E402
from dbsam.model import build_dbsam  # noqa: E402

ON_GPU = torch.cuda.is_available()
gpu = pytest.mark.skipif(not ON_GPU, reason="ViT-B at 1024 needs a CUDA device; on CPU the tiny config is benchmarked")
GPU_ROUNDS = int(os.environ.get("DBSAM_BENCH_ROUNDS", "5"))
# Row label -> (op backend, ViT attention); see the module docstring.
ROWS = {"auto": ("auto", "sdpa"), "reference": ("reference", "sam"), "auto_sam_attention": ("auto", "sam")}
BACKENDS = ("auto", "reference")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolved_backend(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    try:
        return dbsam.ops._backends.resolve("ms_deform_attn", device)
    except Exception:  # report only
        return "auto"


def dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    prob = logits.sigmoid()
    inter = (prob * target).sum((-2, -1))
    dice = 1 - (2 * inter + 1) / (prob.sum((-2, -1)) + target.sum((-2, -1)) + 1)
    return dice.mean() + torch.nn.functional.binary_cross_entropy_with_logits(logits, target)


def train_step(model, images, boxes, target, amp):
    """One training step as the benchmarks time it: Dice + BCE on the low-res logits under `amp()`,
    backward, AdamW (a fresh optimiser per call of train_step; its state appears at the first step)."""
    params = list(model.trainable_parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=params[0].is_cuda)  # as dbsam.train does

    def step():
        opt.zero_grad(set_to_none=True)
        with amp():
            low, _ = model(images, boxes)
        dice_bce(low, target).backward()
        opt.step()

    return step


def make_inputs(model, batch: int, device: torch.device):
    S = model.config.img_size
    g = torch.Generator(device="cpu").manual_seed(batch)
    images = torch.randn(batch, 3, S, S, generator=g).to(device)
    lo = torch.rand(batch, 2, generator=g) * S * 0.4
    boxes = torch.cat([lo, lo + S * 0.4], 1).to(device)
    target = (torch.rand(batch, 1, S // 4, S // 4, generator=g) > 0.5).float().to(device)
    return images, boxes, target


def bench(benchmark, model, batch: int, mode: str, row: str, device: torch.device, rounds: int,
          grad_checkpointing: bool = False, dtype: torch.dtype = torch.float32) -> None:
    backend, attention = ROWS[row]
    images, boxes, target = make_inputs(model, batch, device)
    model.set_grad_checkpointing(grad_checkpointing)
    model.set_vit_attention(attention)

    def amp():
        return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    if mode == "forward":
        model.eval()

        def step():
            with torch.no_grad(), amp():
                model(images, boxes)
    else:
        model.train()
        step = train_step(model, images, boxes, target, amp)

    def timed():
        step()
        sync(device)

    oom = None
    try:
        with dbsam.ops.use_backend(backend):
            timed()  # warm-up outside the peak-memory window: kernels, allocator, optimiser state
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
    except torch.OutOfMemoryError as e:
        # Failed here, with the traceback gone: a failure report keeps its frames, and with them
        # this row's activations, which would fail every later row too.
        oom = str(e).split(". ")[0]
    model.zero_grad(set_to_none=True)
    if oom is not None:  # pytest.fail's traceback holds this frame: drop what it would keep alive
        del step, timed, images, boxes, target  # the step's closure holds the optimiser
        gc.collect()
        torch.cuda.empty_cache()
        pytest.fail(f"out of memory: {oom}", pytrace=False)

    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        config=model.config.embed_dim, img_size=model.config.img_size, batch=batch, mode=mode,
        backend=resolved_backend(backend, device), vit_attention=attention, grad_checkpointing=grad_checkpointing,
        dtype=str(dtype))
    if device.type == "cuda":
        benchmark.extra_info["peak_memory_MiB"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if mode == "train" and not grad_checkpointing:  # after the peak window: one more forward
        saved = model_saved_bytes(model, images, boxes, backend, attention, dtype)
        benchmark.extra_info["saved_for_backward_MiB"] = round(saved / 2**20, 1)
    with dbsam.ops.use_backend(backend):
        if device.type == "cuda" and batch <= 2:
            # Host time of a step (until it returns, its launches queued) against the row's median:
            # near it, the step is host-bound (run 6: batch 1 bf16 94 ms, batch 2 108, batch 4 190).
            benchmark.extra_info["host_us"] = round(host_and_wall_us(step, reps=3)[0], 1)
        if mode == "train" and not grad_checkpointing:
            # ATen ops a step dispatches (op_count.py), optimiser included: each a dispatch on the host.
            benchmark.extra_info["aten_ops_per_step"] = sum(aten_ops(step).values())
    model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------
# GPU: ViT-B at 1024

@pytest.fixture(scope="module")
def vit_b():
    if not ON_GPU:
        pytest.skip("needs a CUDA device")
    model = build_dbsam("vit_b").cuda()
    yield model
    del model
    torch.cuda.empty_cache()


def _live_cuda_tensors():
    """[(kind, (count, MiB))] of the CUDA tensors Python can reach, grouped by type and autograd state,
    the most MiB first: what a leak holds."""
    owners = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.is_cuda:
                kind = type(obj).__name__ + (" requires_grad" if obj.requires_grad else "") + (
                    " with grad_fn" if obj.grad_fn is not None else "")
                n, mib = owners.get(kind, (0, 0.0))
                owners[kind] = (n + 1, mib + obj.untyped_storage().nbytes() / 2**20)
        except Exception:  # objects that fail isinstance/attribute access while being torn down
            continue
    return sorted(owners.items(), key=lambda kv: -kv[1][1])


@pytest.fixture
def cuda_memory_guard(request, benchmark):
    """Every ViT-B benchmark starts from the same device memory (the model alone) and says whether it
    left anything behind. In H100 run 5 the allocated memory grew from row to row until batch 2 bf16
    ran out of memory (results/h100_2026-11-27_dfbc80c/bench_model.log), inflating every later
    row's peak: saved_bytes' pack hook returned each tensor itself, so every output saved for
    backward in the measured forward held its own grad_fn, a cycle through C++ (fixed in
    saved_activations.py; tests/test_saved_bytes_helpers.py). The guard stays, so that a leak is
    seen at its row: `allocated_at_start_MiB` and `left_behind_MiB` in extra_info, and the live
    CUDA tensors printed when a row leaves over 64 MiB."""
    gc.collect()
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    benchmark.extra_info["allocated_at_start_MiB"] = round(start / 2**20, 1)
    yield
    gc.collect()
    left = torch.cuda.memory_allocated() - start
    benchmark.extra_info["left_behind_MiB"] = round(left / 2**20, 1)
    if left > 64 * 2**20:
        print(f"\n{request.node.name}: {left / 2**20:.0f} MiB of device memory still allocated after the row; "
              f"live CUDA tensors: {_live_cuda_tensors()[:6]}", file=sys.stderr)


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 2, 4])
def test_vit_b_forward(benchmark, vit_b, cuda_memory_guard, batch, backend):
    benchmark.group = f"vit_b forward batch {batch}"
    bench(benchmark, vit_b, batch, "forward", backend, torch.device("cuda"), GPU_ROUNDS)


TRAIN_CASES = [
    pytest.param(batch, dtype, ckpt, row,
                 id=f"{batch}-{'bf16' if dtype == torch.bfloat16 else 'fp32'}-{'grad_ckpt' if ckpt else 'no_ckpt'}-{row}")
    for batch in (1, 2, 4) for dtype in (torch.float32, torch.bfloat16) for ckpt in (False, True)
    for row in ROWS if row != "auto_sam_attention" or batch == 2]


@gpu
@pytest.mark.parametrize("batch,dtype,ckpt,backend", TRAIN_CASES)
def test_vit_b_train_step(benchmark, vit_b, cuda_memory_guard, batch, dtype, ckpt, backend):
    # Every configuration with both op sets, so each group (batch, dtype, checkpointing) holds the
    # fast-vs-reference pair the model goals are stated on (bf16, batch 2: time and peak memory).
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    benchmark.group = f"vit_b train step batch {batch} {'bf16' if dtype == torch.bfloat16 else 'fp32'}" + (
        " grad-ckpt" if ckpt else "")
    bench(benchmark, vit_b, batch, "train", backend, torch.device("cuda"), GPU_ROUNDS, grad_checkpointing=ckpt,
          dtype=dtype)


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 2, 4])
def test_vit_b_bf16_forward(benchmark, vit_b, cuda_memory_guard, batch, backend):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    benchmark.group = f"vit_b forward batch {batch} bf16"
    bench(benchmark, vit_b, batch, "forward", backend, torch.device("cuda"), GPU_ROUNDS, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# CPU: tiny

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_dbsam("tiny")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["forward", "train"])
def test_tiny_cpu(benchmark, tiny, mode, backend):
    benchmark.group = f"tiny cpu {mode}"
    bench(benchmark, tiny, 2, mode, backend, torch.device("cpu"), rounds=5)


@pytest.mark.parametrize("variant", ["grad_checkpointing", "bf16"])
def test_tiny_cpu_train_variants(benchmark, tiny, variant):
    """The GPU variants' code paths, cheaply (bf16 on CPU is emulated: slow, not a speed figure)."""
    benchmark.group = "tiny cpu train"
    bench(benchmark, tiny, 2, "train", "auto", torch.device("cpu"), rounds=3,
          grad_checkpointing=variant == "grad_checkpointing",
          dtype=torch.bfloat16 if variant == "bf16" else torch.float32)
