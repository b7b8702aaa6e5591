"""Checkpoints: atomic writes, exact resume, weights-only loading.

A training checkpoint is a DB-SAM checkpoint (dbsam.model.save_dbsam: config + trainable weights +
fingerprint of the frozen ones) whose `extra` holds:
  method, init_seed (to rebuild random frozen parts when no SAM file was used) and, in `train`,
  everything a resume needs: optimiser state, step, epoch, global sample position in the epoch,
  the schedule lengths, global batch, and the RNG states of torch (per rank), CUDA, numpy and
  python, stored as tensors and plain containers so `torch.load(weights_only=True)` reads them.
A file that would need pickled code is refused (dbsam.model.build reads every file weights-only).

Writes go to a temporary file in the same folder, are fsync'ed, then os.replace'd over the old
file: a crash or a full disk during the write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from dbsam.model import CheckpointError, DBSAM, DBSAMConfig, load_sam_weights, read_sam_checkpoint, save_dbsam
from dbsam.model.build import frozen_fingerprint, load_trainable, read_dbsam_checkpoint

from . import methods


# --- atomic writing ---------------------------------------------------------------------------


def _write_payload(model: DBSAM, path: Path, sam_checkpoint, extra) -> None:
    save_dbsam(model, path, sam_checkpoint=sam_checkpoint, extra=extra)


def atomic_save(model: DBSAM, path, sam_checkpoint=None, extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write a DB-SAM checkpoint to `path` so that `path` is always either the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        _write_payload(model, tmp, sam_checkpoint, extra)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # some filesystems cannot fsync a folder; the file itself is safe
    return path


# --- RNG states as plain data ---------------------------------------------------------------------


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss": py_state[2]},
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


# --- reading -----------------------------------------------------------------------------------------


def read_checkpoint(path) -> Dict[str, Any]:
    """A DB-SAM checkpoint as plain data; CheckpointError (clear message) for anything else."""
    return read_dbsam_checkpoint(path)


def build_from_checkpoint(ckpt: Dict[str, Any], sam_checkpoint=None, path: str = "checkpoint"):
    """(model of the checkpoint's method, DB-SAM core) with its trained weights, on CPU.

    The frozen parts come from `sam_checkpoint`, or, for runs trained without SAM weights, are
    drawn again from the stored init seed; either way their fingerprint must match the file's."""
    extra = ckpt.get("extra") or {}
    method = extra.get("method", "dbsam")
    trained_on = ckpt.get("sam_checkpoint")
    if trained_on and sam_checkpoint is None:
        raise CheckpointError(f"{path} was trained on SAM weights {trained_on!r}: pass them with --sam-checkpoint")
    config = DBSAMConfig.from_dict(ckpt["config"])
    torch.manual_seed(int(extra.get("init_seed", 0)))
    model = DBSAM(config)
    if sam_checkpoint is not None:
        load_sam_weights(model, read_sam_checkpoint(sam_checkpoint), os.fspath(sam_checkpoint))
    saved = ckpt.get("frozen_fingerprint") or {}
    now = frozen_fingerprint(model)
    off = [p for p, v in saved.items() if p in now and abs(now[p] - v) > 1e-6 * max(1.0, abs(v))]
    if off:
        message = f"{path}: the frozen weights differ from those it was trained with (parts {off})"
        if sam_checkpoint is None:
            raise CheckpointError(message + "; it was trained without SAM weights and its init seed no longer "
                                  "reproduces them (another dbsam version?)")
        warnings.warn(message)
    load_trainable(model, ckpt["state_dict"], path)
    return methods.wrap(method, model), model


def load_trained(path, sam_checkpoint=None, device="cpu"):
    """(model ready for DBSAMPredictor, description) from a `dbsam train` checkpoint."""
    ckpt = read_checkpoint(path)
    model, _ = build_from_checkpoint(ckpt, sam_checkpoint, os.fspath(path))
    extra = ckpt.get("extra") or {}
    step = (extra.get("train") or {}).get("step", extra.get("step"))
    what = f"{extra.get('method', 'dbsam')} checkpoint {os.fspath(path)}" + (f" (step {step})" if step else "")
    return model.to(device).eval(), what
