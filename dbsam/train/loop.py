"""The training run: the paper's recipe, resumable exactly, on one process or under torchrun.

Recipe (docs/model.md, paper §3.1): loss = Dice(sigmoid) + BCE-with-logits, 1:1, on the low-res
logits against the mask resized to that size; AdamW (lr 1e-4, weight decay 0.01) over the
trainable parameters only; linear warm-up for one epoch then polynomial decay (power 0.9) per
step; boxes from the masks moved outward by a random 0-20 px per side; bf16 autocast on GPUs.
"""
from __future__ import annotations

import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, Subset

from dbsam.data import split_by_case

from . import checkpoint as ckpt_io
from . import distributed, methods
from .data import PromptedSamples, ResumableDistributedSampler
from .losses import segmentation_loss
from .schedule import lr_factor, set_lr

LOG_FIELDS = ["step", "epoch", "loss", "dice_loss", "bce_loss", "lr", "seconds", "val_dsc", "val_nsd"]


@dataclass
class TrainOptions:
    out: str = "runs/dbsam"
    method: str = "dbsam"
    model: str = "tiny"
    sam_checkpoint: Optional[str] = None
    model_options: dict = field(default_factory=dict)  # DBSAMConfig overrides (e.g. dropout 0)
    epochs: int = 12
    steps: Optional[int] = None          # total optimiser steps (overrides epochs)
    batch_size: int = 2                  # per rank; global batch = batch_size x world size
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: Optional[int] = None   # None: one epoch
    power: float = 0.9
    val_fraction: float = 0.1
    split_seed: int = 0
    seed: int = 0
    checkpoint_every: int = 100
    resume: Optional[str] = None
    grad_checkpointing: bool = False
    amp: bool = True                     # bf16 autocast, GPU only
    device: str = "auto"
    workers: int = 0
    margin: int = 0                      # evaluation box margin (validation)
    max_jitter: int = 20
    val_every: int = 0                   # steps; 0: at the end of every epoch
    tolerance_mm: float = 1.0
    log_every: int = 10
    minutes: Optional[float] = None      # stop (with a checkpoint) after this much training time
    stop_after: Optional[int] = None     # stop at this step as if killed (checkpoints as usual)


class Progress:
    """tqdm when installed, else a printed line every `every` steps."""

    def __init__(self, total: int, initial: int, every: int, enabled: bool):
        self.enabled, self.every, self.bar = enabled, max(1, every), None
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
            except ImportError:
                pass
        self.total = total

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text)
        elif step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total} {text}", flush=True)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLog:
    """metrics.csv (always) and TensorBoard (when installed), written by rank 0."""

    def __init__(self, out: Path, resume_step: Optional[int]):
        self.path = out / "metrics.csv"
        rows = []
        if resume_step is not None and self.path.exists():
            # Steps logged after the checkpoint we resume from will be run again: drop them.
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self.file = self.path.open("w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=LOG_FIELDS)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def write(self, row: dict) -> None:
        self.writer.writerow({k: row.get(k, "") for k in LOG_FIELDS})
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, float):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _say(info, text: str) -> None:
    if info.main:
        print(text, flush=True)


def train(opts: TrainOptions, dataset) -> dict:
    """Train on `dataset` (a dbsam.data dataset built with train=False). Returns a summary dict.

    Under torchrun every rank calls this with the same options; rank 0 logs and checkpoints.
    """
    info = distributed.init(opts.device)
    try:
        return _train(opts, dataset, info)
    finally:
        distributed.close(info)


def _train(opts: TrainOptions, dataset, info) -> dict:
    out = Path(opts.out)
    resume, resume_path = None, None
    if opts.resume:
        resume_path = out / "last.pt" if opts.resume == "auto" else Path(opts.resume)
        if resume_path.exists() or opts.resume != "auto":
            resume = ckpt_io.read_checkpoint(resume_path)
            _say(info, f"resuming from {resume_path}")

    # Model: drawn from the init seed (identical on every rank), or rebuilt from the checkpoint.
    if resume is not None:
        extra = resume.get("extra") or {}
        if "train" not in extra:
            raise ValueError(f"{resume_path} holds a model without training state (a model.pt?): "
                             "resume from the run's last.pt")
        if extra.get("method", "dbsam") != opts.method:
            raise ValueError(f"{resume_path}: trained with --method {extra.get('method')}, not {opts.method}")
        model, core = ckpt_io.build_from_checkpoint(resume, opts.sam_checkpoint, str(resume_path))
        core.set_grad_checkpointing(opts.grad_checkpointing)
        init_seed = int(extra.get("init_seed", opts.seed))
    else:
        model = methods.build_model(opts.method, opts.model, opts.sam_checkpoint, opts.seed,
                                    opts.grad_checkpointing, **opts.model_options)
        core, init_seed = methods.core(model), opts.seed
    model = model.to(info.device)
    if info.enabled:
        model = distributed.synchronise_batchnorm(model, info.device)
    model.train()
    cfg = core.config

    # Data: split by case; the order is a function of (seed, epoch, position).
    train_idx, val_idx = split_by_case(dataset, opts.val_fraction, opts.split_seed)
    samples = PromptedSamples(dataset, cfg.img_size, cfg.pixel_mean, cfg.pixel_std, seed=opts.seed,
                              margin=opts.margin, max_jitter=opts.max_jitter)
    sampler = ResumableDistributedSampler(train_idx, opts.batch_size, info.world_size, info.rank, opts.seed)
    if sampler.steps_per_epoch == 0:
        raise ValueError(f"{len(train_idx)} training samples cannot fill one global batch of "
                         f"{sampler.global_batch} (batch size {opts.batch_size} x {info.world_size} ranks)")
    # Own generator: creating a DataLoader iterator must not draw from the global torch RNG, or a
    # resumed run (which creates one mid-epoch) would diverge from an uninterrupted one.
    loader = DataLoader(samples, batch_size=opts.batch_size, sampler=sampler, num_workers=opts.workers,
                        drop_last=True, generator=torch.Generator().manual_seed(opts.seed))

    params = [p for p in model.parameters() if p.requires_grad]
    # fused on CUDA: one multi-tensor kernel for DB-SAM's ~350 trainable tensors instead of the
    # foreach path's dozen Python-driven launches, the same update (the step is host-bound at batch 1-2).
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay,
                                  fused=bool(params) and params[0].is_cuda)

    state = {"step": 0, "epoch": 0, "position": 0}
    total = opts.steps or opts.epochs * sampler.steps_per_epoch
    warmup = opts.warmup_steps if opts.warmup_steps is not None else sampler.steps_per_epoch
    if resume is not None:
        t = resume["extra"]["train"]
        optimizer.load_state_dict(t["optimizer"])
        state = {k: int(t[k]) for k in state}
        total, warmup = int(t["total_steps"]), int(t["warmup_steps"])
        if int(t["global_batch"]) != sampler.global_batch:
            _say(info, f"note: global batch {sampler.global_batch} differs from the checkpoint's "
                       f"{t['global_batch']}: the run continues from the same sample position")
        rngs = t["rng"]
        if info.rank < len(rngs) and len(rngs) == info.world_size:
            ckpt_io.set_rng_state(rngs[info.rank])
        elif info.rank == 0:
            ckpt_io.set_rng_state(rngs[0])
        else:  # a new rank: a fresh stream for its dropout, derived from seed, rank and step
            torch.manual_seed(opts.seed * 100003 + info.rank * 1009 + state["step"])
    else:
        torch.manual_seed(opts.seed + info.rank)  # per-rank dropout streams

    if info.enabled:
        ddp_args = {"device_ids": [info.local_rank]} if info.device.type == "cuda" else {}
        # The IoU head is outside the loss (as in the paper): let DDP skip parameters without grads.
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True, **ddp_args)

    use_amp = opts.amp and info.device.type == "cuda"
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out, state["step"] if resume is not None else None) if info.main else None
    if info.main:
        (out / "options.json").write_text(json.dumps(asdict(opts), indent=2, default=str) + "\n")
        (out / "split.json").write_text(json.dumps({
            "train": sorted({dataset.cases[i] for i in train_idx}),
            "val": sorted({dataset.cases[i] for i in val_idx})}, indent=1) + "\n")
    n_trainable = sum(p.numel() for p in params)
    _say(info, f"{opts.method} ({opts.model}): {n_trainable:,} trainable parameters; "
               f"{len(train_idx)} train / {len(val_idx)} val samples; global batch {sampler.global_batch} "
               f"({info.world_size} rank(s)); {total} steps, warm-up {warmup}; device {info.device}"
               f"{', bf16 autocast' if use_amp else ''}")

    def save(name="last.pt"):
        rngs = distributed.gather(ckpt_io.rng_state(), info)
        if not info.main:
            return None
        extra = {"method": opts.method, "init_seed": init_seed, "train": {
            **state, "optimizer": optimizer.state_dict(), "total_steps": total, "warmup_steps": warmup,
            "global_batch": sampler.global_batch, "world_size": info.world_size, "rng": rngs}}
        try:
            return ckpt_io.atomic_save(core, out / name, opts.sam_checkpoint, extra)
        except OSError as err:
            # Keep training: the previous checkpoint is intact and the next save may succeed.
            print(f"warning: could not write checkpoint {out / name} ({err}); the previous one is kept",
                  file=sys.stderr, flush=True)
            return None

    def validate():
        if not (info.main and val_idx):
            return {}
        from dbsam.evaluate import evaluate_dataset
        from dbsam.metrics import summarize
        net = getattr(model, "module", model)
        rows = evaluate_dataset(net, dataset, val_idx, opts.tolerance_mm, opts.margin, info.device)
        net.train()
        o = summarize(rows)["overall"]
        return {"val_dsc": o["dsc"], "val_nsd": o["nsd"]}

    progress = Progress(total, state["step"], opts.log_every, info.main)
    started, last_loss, reason = time.time(), math.nan, "done"
    while state["step"] < total and reason == "done":
        sampler.set_epoch(state["epoch"], state["position"])
        for batch in loader:
            step = state["step"]
            set_lr(optimizer, opts.lr * lr_factor(step, warmup, total, opts.power))
            images = batch["image"].to(info.device, non_blocking=True)
            boxes = batch["box"].to(info.device)
            target = batch["target"].to(info.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                logits, _ = model(images, boxes)
            loss, dice, bce = segmentation_loss(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            state["step"] += 1
            state["position"] += sampler.global_batch
            if state["position"] + sampler.global_batch > len(train_idx):
                state["epoch"], state["position"] = state["epoch"] + 1, 0
            epoch_done = state["position"] == 0
            done = state["step"] >= total
            loss_v, dice_v, bce_v = distributed.mean_over_ranks([loss.item(), dice.item(), bce.item()], info)
            last_loss = loss_v
            row = {"step": state["step"], "epoch": state["epoch"], "loss": loss_v, "dice_loss": dice_v,
                   "bce_loss": bce_v, "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - started}
            if opts.checkpoint_every and state["step"] % opts.checkpoint_every == 0 and not done:
                save()
            if not done and ((opts.val_every and state["step"] % opts.val_every == 0)
                             or (not opts.val_every and epoch_done)):
                row.update(validate())
                if "val_dsc" in row:
                    progress.write(f"step {state['step']}: val DSC {row['val_dsc']:.4f} "
                                   f"NSD@{opts.tolerance_mm:g}mm {row['val_nsd']:.4f}")
            if log is not None:
                log.write(row)
            progress.update(state["step"], f"loss {loss_v:.4f} lr {row['lr']:.2e}")
            out_of_time = opts.minutes is not None and time.time() - started > 60 * opts.minutes
            if done:
                break
            if opts.stop_after is not None and state["step"] >= opts.stop_after:
                reason = "killed"
                break
            if distributed.any_rank(out_of_time, info):
                reason = "time"
                break
    progress.close()

    summary = {"steps": state["step"], "total_steps": total, "loss": last_loss, "stopped": reason}
    if reason == "killed":
        # As after a real kill: only the periodic checkpoints exist.
        if log is not None:
            log.close()
        return summary
    if reason == "time":
        _say(info, f"time budget of {opts.minutes:g} min reached at step {state['step']}/{total}")
    last = save()
    if info.main:
        final = {"method": opts.method, "init_seed": init_seed, "step": state["step"]}
        model_path = ckpt_io.atomic_save(core, out / "model.pt", opts.sam_checkpoint, final)
        val = validate()
        if val:
            _say(info, f"final val DSC {val['val_dsc']:.4f} NSD@{opts.tolerance_mm:g}mm {val['val_nsd']:.4f}")
            summary.update(val)
        summary.update(checkpoint=str(last) if last else None, model=str(model_path))
        _say(info, f"checkpoint {last}; model {model_path}")
        log.close()
    return summary
