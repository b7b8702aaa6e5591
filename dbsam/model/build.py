"""The DB-SAM registry and every checkpoint load/save, none of which executes code.

    model = dbsam_model_registry["vit_b"](checkpoint="sam_vit_b_01ec64.pth")   # SAM weights, strictly
    model = dbsam_model_registry["tiny"]()                                     # random, for CPU tests
    save_dbsam(model, "run.pt"); model = load_dbsam("run.pt", sam_checkpoint="sam_vit_b_01ec64.pth")

SAM checkpoints are plain state dicts (`image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`)
loaded strictly into the SAM parts under SAM's own names. DB-SAM checkpoints are a dict
{format: "dbsam", version, config, state_dict: trainable parameters and buffers, frozen_fingerprint,
sam_checkpoint}: the frozen SAM weights come from the SAM file again. Files are read with
`torch.load(weights_only=True)` (or safetensors for *.safetensors): a file that would need to run
pickled code is refused.
"""
import contextlib
import os
import pickle
import warnings
import zipfile
from collections import OrderedDict
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch

from .config import SAM_CHECKPOINT_NAMES, VARIANTS, DBSAMConfig
from .dbsam import DBSAM, SAM_PREFIXES, part_of

FORMAT = "dbsam"
FORMAT_VERSION = 1
PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be (or must not be) loaded, with the reason."""


# ----------------------------------------------------------------------------------------------
# Reading files safely

def _read(path: PathLike, what: str, missing_hint: str = "") -> Any:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path!r}.{missing_hint}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise CheckpointError(f"{path!r} is a safetensors file but the safetensors package is not installed") from exc
        try:
            return load_file(path, device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path!r}: truncated or not a safetensors file ({exc})") from exc
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path!r}: truncated or not a torch file (a zip archive without its central directory)")
    try:  # mmap: a multi-GB ViT-H file is not read into memory twice
        return torch.load(path, map_location="cpu", weights_only=True, mmap=magic == b"PK\x03\x04")
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
            raise CheckpointError(
                f"refusing to load {path!r}: it holds pickled Python objects beyond tensors and plain "
                "containers, which could run code when loaded. Re-save it as a plain state dict of tensors "
                f"(torch.save(model.state_dict(), ...)). Loader said: {str(exc).splitlines()[0]}") from exc
        raise CheckpointError(f"{path!r}: truncated or not a torch file ({(str(exc).splitlines() or [''])[0]})") from exc
    except Exception as exc:  # the unpickler fails on garbage in many ways (KeyError, EOFError, RuntimeError...)
        first = (str(exc).splitlines() or [""])[0]
        raise CheckpointError(f"{path!r}: truncated or not a torch file ({type(exc).__name__}: {first})") from exc


def _as_state_dict(obj: Any, path: PathLike) -> Mapping[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{os.fspath(path)!r}: not a state dict (a {type(obj).__name__}, expected a dict of tensors)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{os.fspath(path)!r}: not a state dict of tensors (entries {bad[:3]} are not tensors)")
    return obj


# ----------------------------------------------------------------------------------------------
# SAM checkpoints

def _missing_sam_hint(variant: Optional[str]) -> str:
    expected = SAM_CHECKPOINT_NAMES.get(variant or "", "sam_vit_{b,l,h}_*.pth")
    return (f" DB-SAM needs the SAM weights ({expected} for {variant or 'this variant'}); nothing is downloaded. "
            "SAM checkpoints are published by Meta in the segment-anything repository "
            "(https://github.com/facebookresearch/segment-anything#model-checkpoints): download it and pass its path.")


def read_sam_checkpoint(path: PathLike, variant: Optional[str] = None) -> Mapping[str, torch.Tensor]:
    obj = _read(path, "SAM checkpoint", _missing_sam_hint(variant))
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        raise CheckpointError(f"{os.fspath(path)!r} is a DB-SAM checkpoint, not a SAM one: load it with load_dbsam()")
    state = _as_state_dict(obj, path)
    if not any(k.startswith("image_encoder.") for k in state):
        raise CheckpointError(f"{os.fspath(path)!r}: not a SAM checkpoint: no image_encoder.* keys "
                              f"(first keys: {list(state)[:3]})")
    return state


def _copy_strictly(model: DBSAM, expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                   unexpected: list, what: str, hint: str = "") -> None:
    """Copies `state` into the model's tensors named by `expected`, refusing any missing key, any key
    in `unexpected` and any shape that differs: one error that lists a few of each."""
    missing = [k for k in expected if k not in state]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{what}{hint}: {len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected "
                              f"{unexpected[:3]}, {len(mismatched)} with other shapes {mismatched[:3]}")
    if model.pixel_mean.device.type == "meta":
        raise ValueError("cannot load weights into a model built on the meta device: build it on cpu or cuda")
    own = model.state_dict()
    with torch.no_grad():
        for k in expected:
            own[k].copy_(state[k])


def load_sam_weights(model: DBSAM, state: Mapping[str, torch.Tensor], source: str = "SAM state dict") -> None:
    """Strictly load SAM's image_encoder/prompt_encoder/mask_decoder weights under SAM's names."""
    expected = model.sam_state_dict()
    unexpected = [k for k in state if k not in expected]
    hint = ""
    if "image_encoder.pos_embed" in state and state["image_encoder.pos_embed"].shape != expected[
            "image_encoder.pos_embed"].shape:
        hint = (f" (the file's ViT has embed dim {state['image_encoder.pos_embed'].shape[-1]}, the model's "
                f"{model.config.embed_dim}: wrong variant?)")
    _copy_strictly(model, expected, state, unexpected, f"{source} does not match the SAM parts of this DB-SAM", hint)


# ----------------------------------------------------------------------------------------------
# DB-SAM checkpoints

def frozen_fingerprint(model: DBSAM) -> Dict[str, float]:
    """A cheap signature of the frozen weights (float64 sum of each part), to notice a checkpoint
    being loaded over SAM weights other than those it was trained on."""
    sums: Dict[str, float] = OrderedDict()
    for k, v in model.state_dict().items():
        part, trainable = part_of(k)
        if not trainable and v.is_floating_point() and v.device.type != "meta":
            sums[part] = sums.get(part, 0.0) + float(v.double().sum())
    return sums


def save_dbsam(model: DBSAM, path: PathLike, sam_checkpoint: Optional[PathLike] = None,
               extra: Optional[Dict[str, Any]] = None) -> None:
    """Save config + trainable parameters/buffers (+ which SAM file and a fingerprint of it).
    `extra`: plain data (numbers, strings, lists, dicts, tensors) such as the epoch."""
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "state_dict": OrderedDict((k, v.detach().cpu()) for k, v in model.trainable_state_dict().items()),
        "sam_checkpoint": os.path.basename(os.fspath(sam_checkpoint)) if sam_checkpoint else None,
        "frozen_fingerprint": frozen_fingerprint(model),
        "extra": extra or {},
    }
    torch.save(payload, os.fspath(path))


def read_dbsam_checkpoint(path: PathLike) -> Dict[str, Any]:
    obj = _read(path, "DB-SAM checkpoint")
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        if isinstance(obj, Mapping) and any(isinstance(k, str) and k.startswith("image_encoder.") for k in obj):
            raise CheckpointError(f"{os.fspath(path)!r} is a SAM checkpoint, not a DB-SAM one: pass it as "
                                  "checkpoint= / sam_checkpoint=")
        raise CheckpointError(f"{os.fspath(path)!r}: not a DB-SAM checkpoint (no format tag {FORMAT!r})")
    if obj.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{os.fspath(path)!r}: DB-SAM checkpoint format version {obj.get('version')!r}, "
                              f"this dbsam reads version {FORMAT_VERSION}")
    _as_state_dict(obj["state_dict"], path)
    return dict(obj)


def load_trainable(model: DBSAM, state: Mapping[str, torch.Tensor], source: str = "DB-SAM checkpoint") -> None:
    expected = model.trainable_state_dict()
    unexpected = [k for k in state if k not in expected]
    _copy_strictly(model, expected, state, unexpected, f"{source} does not match this model's trainable parts")


def load_dbsam(path: PathLike, sam_checkpoint: Optional[PathLike] = None, **options) -> DBSAM:
    """Rebuild a DB-SAM from its checkpoint: its config (training options such as
    grad_checkpointing may be overridden), SAM's weights from `sam_checkpoint`, then its trainable
    weights. Without `sam_checkpoint` the frozen parts stay random (a warning says so)."""
    ckpt = read_dbsam_checkpoint(path)
    config = DBSAMConfig.from_dict(ckpt["config"]).replace(**options)
    model = DBSAM(config)
    if sam_checkpoint is not None:
        load_sam_weights(model, read_sam_checkpoint(sam_checkpoint), os.fspath(sam_checkpoint))
    else:
        warnings.warn(f"load_dbsam({os.fspath(path)!r}) without sam_checkpoint: the frozen SAM parts are random "
                      f"(trained on {ckpt.get('sam_checkpoint')!r})", stacklevel=2)
    load_trainable(model, ckpt["state_dict"], os.fspath(path))
    if sam_checkpoint is not None:
        _check_fingerprint(model, ckpt.get("frozen_fingerprint") or {}, path)
    return model


def _check_fingerprint(model: DBSAM, saved: Mapping[str, float], path: PathLike) -> None:
    now = frozen_fingerprint(model)
    off = [p for p, v in saved.items() if p in now and abs(now[p] - v) > 1e-6 * max(1.0, abs(v))]
    if off:
        warnings.warn(f"{os.fspath(path)!r} was trained over other frozen SAM weights (parts {off} differ)",
                      stacklevel=3)


# ----------------------------------------------------------------------------------------------
# Registry

def build_dbsam(variant: str, checkpoint: Optional[PathLike] = None, dbsam_checkpoint: Optional[PathLike] = None,
                device: Optional[Union[str, torch.device]] = None, **options) -> DBSAM:
    """A DB-SAM of `variant` ("vit_b", "vit_l", "vit_h", "tiny"), `options` overriding config fields.
    checkpoint: SAM weights (sam_vit_b_01ec64.pth ...); dbsam_checkpoint: trained DB-SAM weights
    (its config must match). device="meta" builds without memory (parameter counting)."""
    if variant not in VARIANTS:
        raise KeyError(f"unknown DB-SAM variant {variant!r}: expected one of {sorted(VARIANTS)}")
    config = VARIANTS[variant].replace(**options)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = DBSAM(config)
    if checkpoint is not None:
        load_sam_weights(model, read_sam_checkpoint(checkpoint, variant), os.fspath(checkpoint))
    if dbsam_checkpoint is not None:
        ckpt = read_dbsam_checkpoint(dbsam_checkpoint)
        saved = DBSAMConfig.from_dict(ckpt["config"])
        ignore = {"grad_checkpointing"}
        diff = {k: (v, getattr(config, k)) for k, v in saved.to_dict().items()
                if k not in ignore and v != getattr(config, k)}
        if diff:
            raise CheckpointError(f"{os.fspath(dbsam_checkpoint)!r} was saved with another config "
                                  f"(field: (file, model)) {diff}")
        load_trainable(model, ckpt["state_dict"], os.fspath(dbsam_checkpoint))
        if checkpoint is not None:
            _check_fingerprint(model, ckpt.get("frozen_fingerprint") or {}, dbsam_checkpoint)
    return model


def _builder(variant: str) -> Callable[..., DBSAM]:
    def build(checkpoint: Optional[PathLike] = None, **options) -> DBSAM:
        return build_dbsam(variant, checkpoint=checkpoint, **options)

    build.__name__ = f"build_dbsam_{variant}"
    build.__doc__ = f"DB-SAM {variant}: see build_dbsam."
    return build


dbsam_model_registry: Dict[str, Callable[..., DBSAM]] = {name: _builder(name) for name in VARIANTS}
dbsam_model_registry["default"] = dbsam_model_registry["vit_b"]
