"""The `dbsam` command: info, train, evaluate, predict, export, demo.

Every subcommand imports torch, the model and the data code only when it runs, so `--help` works
anywhere (no GPU, no Triton, no checkpoint).
"""
import argparse
import sys
from typing import List, Optional

MODELS = ("tiny", "vit_b", "vit_l", "vit_h")


# --- options shared by several subcommands ----------------------------------------------------


def _data_options(p, required=False):
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="DIR", help="folder: images/ + masks/ (2D files), *.npz or imgs/ + gts/ "
                   "(.npy), or imagesTr/ + labelsTr/ (NIfTI); auto-detected")
    g.add_argument("--images", metavar="PATH", help="NIfTI image file or folder, or a DICOM series folder "
                   "(needs the dicom extra) or a folder of them (with --labels)")
    g.add_argument("--labels", metavar="PATH", help="NIfTI label file or folder (with --images)")
    g.add_argument("--axis", type=int, default=2, choices=(0, 1, 2), help="slice axis of volumes (default 2)")
    g.add_argument("--label-ids", type=int, nargs="+", metavar="ID", help="use only these label ids")
    g.add_argument("--binarize", action="store_true", help="one target per image: mask > 0")
    g.add_argument("--modality", default="auto", choices=("auto", "ct", "mr"),
                   help="intensity window for volumes (auto: CT window for HU data)")


def _model_options(p):
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", metavar="FILE", help="a model.pt / last.pt from `dbsam train` "
                   "(none: an untrained model, which the output says)")
    g.add_argument("--sam-checkpoint", metavar="FILE", help="SAM weights (sam_vit_b_01ec64.pth ...) for the "
                   "frozen parts; nothing is downloaded")
    g.add_argument("--model", default="tiny", choices=MODELS, help="variant of an untrained model (default tiny)")
    g.add_argument("--method", default="dbsam", choices=("dbsam", "medsam"), help="untrained model's method")
    g.add_argument("--seed", type=int, default=0, help="init seed of an untrained model")
    g.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")


def _open_data(args):
    import os

    from dbsam.train.data import open_dataset

    dataset = open_dataset(args.data, args.images, args.labels, args.axis, args.binarize, args.label_ids,
                           args.modality)
    if os.environ.get("RANK", "0") == "0":  # once under torchrun
        print(f"data: {dataset.summary()}", flush=True)  # skipped files: counted and named
    if len(dataset) == 0:
        raise ValueError("no usable samples (see the line above)")
    return dataset


def _device(name):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load_model(args, device):
    """(model, description): a trained checkpoint, or an untrained model said to be one."""
    if args.checkpoint:
        from dbsam.train.checkpoint import load_trained

        return load_trained(args.checkpoint, args.sam_checkpoint, device)
    from dbsam.train.methods import build_model

    model = build_model(args.method, args.model, args.sam_checkpoint, init_seed=args.seed).to(device).eval()
    weights = f"SAM weights {args.sam_checkpoint}" if args.sam_checkpoint else f"random weights, seed {args.seed}"
    return model, f"UNTRAINED {args.method} {args.model} ({weights}; no --checkpoint given)"


# --- subcommands ------------------------------------------------------------------------------------


def cmd_info(args):
    from dbsam.ops.__main__ import info

    print(info())
    return 0


def cmd_train(args):
    from dbsam.train.loop import TrainOptions, train

    dataset = _open_data(args)
    opts = TrainOptions(
        out=args.out, method=args.method, model=args.model, sam_checkpoint=args.sam_checkpoint,
        model_options=dict(_parse_option(o) for o in args.model_option), epochs=args.epochs,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, val_fraction=args.val_fraction, split_seed=args.split_seed,
        seed=args.seed, checkpoint_every=args.checkpoint_every, resume=args.resume,
        grad_checkpointing=args.grad_checkpointing, amp=not args.no_amp, device=args.device,
        workers=args.workers, margin=args.margin, val_every=args.val_every, tolerance_mm=args.tolerance_mm,
        log_every=args.log_every, minutes=args.minutes, stop_after=args.stop_after)
    train(opts, dataset)
    return 0


def _parse_option(text):
    import ast

    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"--model-option {text!r}: expected KEY=VALUE")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def cmd_evaluate(args):
    from pathlib import Path

    from dbsam.data import split_by_case
    from dbsam.evaluate import evaluate_dataset, write_results

    dataset = _open_data(args)
    device = _device(args.device)
    model, what = _load_model(args, device)
    indices = None
    if args.subset != "all":
        train_idx, val_idx = split_by_case(dataset, args.val_fraction, args.split_seed)
        indices = val_idx if args.subset == "val" else train_idx
    n = len(dataset) if indices is None else len(indices)
    print(f"evaluating {n} targets ({args.subset}), box margin {args.margin} px, NSD at {args.tolerance_mm:g} mm",
          flush=True)
    rows = evaluate_dataset(model, dataset, indices, args.tolerance_mm, args.margin, device)
    header = f"model: {what}\ndata: {args.data or args.images} ({args.subset}); NSD tolerance {args.tolerance_mm:g} mm"
    csv_path, summary_path, text = write_results(rows, Path(args.out), args.tolerance_mm, header)
    print(text)
    print(f"per-case CSV: {csv_path}\nsummary: {summary_path}")
    return 0


def cmd_predict(args):
    from pathlib import Path

    from dbsam.data.io import IMAGE_SUFFIXES, is_volume
    from dbsam.model import DBSAMPredictor
    from dbsam.predict import parse_box, predict_2d_file, predict_volume, read_boxes_file

    source = Path(args.input)
    if not source.exists():
        raise FileNotFoundError(f"input not found: {source}")
    volume = is_volume(source)  # a NIfTI file or a DICOM series folder
    dims = 6 if volume else 4
    boxes_by_name = read_boxes_file(args.boxes, dims) if args.boxes else {}
    if args.box:
        boxes_by_name.setdefault("", []).extend(parse_box(b, dims) for b in args.box)
    if not boxes_by_name:
        raise ValueError("give at least one --box or a --boxes file")
    if source.is_dir() and not volume:
        files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no images in {source}")
    else:
        files = [source]
    device = _device(args.device)
    model, what = _load_model(args, device)
    print(f"model: {what}", flush=True)
    predictor = DBSAMPredictor(model)
    out = Path(args.out)
    written, skipped = [], []
    for path in files:
        boxes = boxes_by_name.get(path.name, boxes_by_name.get(path.stem, boxes_by_name.get("")))
        if not boxes:
            skipped.append(f"{path.name} (no box)")
            continue
        if volume:
            written += predict_volume(predictor, path, boxes, out, args.axis, args.modality, args.overlay)
        else:
            try:
                written += predict_2d_file(predictor, path, boxes, out, args.overlay)
            except ValueError as err:
                if len(files) == 1:
                    raise
                skipped.append(f"{path.name} ({err})")
            except OSError as err:  # an unreadable file in a folder: skip, keep the rest
                skipped.append(f"{path.name} (unreadable: {err})")
    for p in written:
        print(f"wrote {p}")
    if skipped:
        print(f"skipped {len(skipped)} files: " + ", ".join(skipped))
    return 0 if written else 1


def cmd_export(args):
    import torch

    import dbsam.ops

    if args.batch is not None and args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    try:
        table = dbsam.ops.onnx_translation_table()
    except ImportError as err:  # one line, as for bad input: the extra is missing
        raise ValueError(str(err)) from err
    model, what = _load_model(args, torch.device("cpu"))
    print(f"model: {what}", flush=True)
    S = model.config.img_size
    # The batch stays a dimension of the file (one decoder call for all images: model/decoder.py)
    # unless --batch fixes it. Traced at 2 images where dynamic: torch.export specialises a size of 1.
    B = args.batch or 2
    images = torch.zeros(B, 3, S, S)
    boxes = torch.tensor([[0.0, 0.0, S - 1.0, S - 1.0]]).repeat(B, 1)
    dynamic = None
    if args.batch is None:
        batch = torch.export.Dim("batch", min=1)
        dynamic = {"images": {0: batch}, "boxes": {0: batch}}
    with torch.no_grad():
        program = torch.onnx.export(model.eval(), (images, boxes), dynamo=True, input_names=["images", "boxes"],
                                    output_names=["low_res_logits", "iou"], custom_translation_table=table,
                                    dynamic_shapes=dynamic)
    program.save(args.out)
    n = args.batch or "B"
    print(f"wrote {args.out}: images ({n}, 3, {S}, {S}) normalised and padded as DBSAM.preprocess does, "
          f"boxes ({n}, 4) XYXY in that {S} x {S} frame -> low_res_logits ({n}, 1, {S // 4}, {S // 4}), "
          f"iou ({n}, 1){'' if args.batch else ', any batch B'}; resizing to the original image is the caller's "
          "(DBSAMPredictor does it in PyTorch)")
    return 0


def cmd_demo(args):
    from dbsam.demo import run_demo

    run_demo(args)
    return 0


# --- parser -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dbsam", description="DB-SAM for medical image segmentation")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which kernels are built and available, and which backend each op uses")

    p = sub.add_parser("train", help="fine-tune DB-SAM (or the decoder-only MedSAM baseline)",
                       description="Train with the paper's recipe: Dice + BCE on the low-res logits, AdamW "
                       "(lr 1e-4, wd 0.01), one warm-up epoch then polynomial decay (0.9) per step, boxes "
                       "jittered 0-20 px. Runs unchanged under `torchrun --nproc_per_node N` (DDP; --batch-size "
                       "is per rank).")
    _data_options(p)
    p.add_argument("--out", default="runs/dbsam", help="run folder: last.pt, model.pt, metrics.csv (default runs/dbsam)")
    p.add_argument("--method", default="dbsam", choices=("dbsam", "medsam"),
                   help="dbsam: the paper's model; medsam: SAM's encoder frozen, only the mask decoder trained")
    p.add_argument("--model", default="tiny", choices=MODELS, help="variant (default tiny: CPU-sized, random)")
    p.add_argument("--sam-checkpoint", metavar="FILE", help="SAM weights for the frozen parts")
    p.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                   help="override a DBSAMConfig field, e.g. cross_attn_dropout=0 (repeatable)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--steps", type=int, help="total optimiser steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=2, help="per rank (default 2)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, help="default: one epoch")
    p.add_argument("--val-fraction", type=float, default=0.1, help="cases held out for validation (default 0.1)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="init, data order and jitter seed")
    p.add_argument("--checkpoint-every", type=int, default=100, metavar="N", help="steps (default 100)")
    p.add_argument("--resume", nargs="?", const="auto", metavar="FILE",
                   help="continue exactly from a checkpoint (no FILE: OUT/last.pt when present)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute frozen ViT blocks in backward")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on GPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--margin", type=int, default=0, help="validation box margin in px")
    p.add_argument("--val-every", type=int, default=0, help="validate every N steps (0: every epoch)")
    p.add_argument("--tolerance-mm", type=float, default=1.0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--minutes", type=float, help="time budget: stop and save when reached")
    p.add_argument("--stop-after", type=int, metavar="STEP",
                   help="stop at STEP without a final save, as if killed (to test --resume)")

    p = sub.add_parser("evaluate", help="DSC and NSD per case and label, with box prompts from the masks")
    _data_options(p)
    _model_options(p)
    p.add_argument("--tolerance-mm", type=float, default=1.0, help="NSD tolerance (default 1.0; MedSAM uses 2.0)")
    p.add_argument("--margin", type=int, default=0, help="box margin around the mask in px (default 0)")
    p.add_argument("--subset", default="all", choices=("all", "train", "val"),
                   help="all cases, or one side of train's split (same --val-fraction/--split-seed)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--out", default="eval", help="folder for cases.csv and summary.txt (default eval)")

    p = sub.add_parser("predict", help="masks for boxes on an image, a folder, a NIfTI volume or a DICOM series")
    p.add_argument("input", help="image file, folder of images, NIfTI volume, or a folder holding one DICOM "
                   "series (needs the dicom extra; the mask is written as NIfTI)")
    p.add_argument("--box", action="append", metavar="x0,y0,x1,y1",
                   help="a box in pixels (volumes: x0,y0,z0,x1,y1,z1); repeatable; write --box=-3,... when it starts with a minus")
    p.add_argument("--boxes", metavar="FILE", help="JSON ([boxes] or {image: [boxes]}) or CSV "
                   "(x0,y0,x1,y1[,z0,z1][,image])")
    p.add_argument("--out", default="predictions", help="output folder (default predictions)")
    p.add_argument("--overlay", action="store_true", help="also write a PNG with masks and boxes drawn")
    p.add_argument("--axis", type=int, default=2, choices=(0, 1, 2), help="slice axis of volumes")
    p.add_argument("--modality", default="auto", choices=("auto", "ct", "mr"))
    _model_options(p)

    p = sub.add_parser("export", help="the model (images and boxes in, mask logits and IoU out) as an ONNX "
                       "file that ONNX Runtime, TensorRT and the like run without custom ops (needs the onnx extra)")
    p.add_argument("--out", default="dbsam.onnx", help="output file (default dbsam.onnx)")
    p.add_argument("--batch", type=int, default=None,
                   help="fix the images per call in the file (default: any batch, one box per image)")
    _model_options(p)

    p = sub.add_parser("demo", help="synthetic data, short CPU fine-tuning of DB-SAM and the MedSAM "
                       "baseline, DSC/NSD before and after, an overlay PNG")
    p.add_argument("--data", metavar="DIR", help="a real folder instead of synthetic data")
    p.add_argument("--out", default="dbsam_demo", help="output folder (default dbsam_demo)")
    p.add_argument("--steps", type=int, default=150, help="optimiser steps per method (default 150)")
    p.add_argument("--minutes", type=float, default=2.0, help="time budget per method (default 2)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3,
                   help="AdamW learning rate (default 1e-3: in a few hundred steps from random weights the "
                   "paper's 1e-4 only moves the output bias; see the README's experiment)")
    p.add_argument("--cases", type=int, default=40, help="synthetic cases (default 40)")
    p.add_argument("--tolerance-mm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    return parser


COMMANDS = {"info": cmd_info, "train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict,
            "export": cmd_export, "demo": cmd_demo}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    # Bad input or files: one clear line, no traceback (dbsam.model's CheckpointError is a ValueError).
    except (FileNotFoundError, ValueError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"dbsam {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
