"""Training: loss, schedule, sampler, samples, methods, atomic checkpoints, exact resume, DDP."""
import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("segment_anything")

from dbsam.data import synthetic_dataset  # noqa: E402
from dbsam.model import CheckpointError  # noqa: E402
from dbsam.train import checkpoint as ckpt_io  # noqa: E402
from dbsam.train.data import PromptedSamples, ResumableDistributedSampler  # noqa: E402
from dbsam.train.losses import segmentation_loss  # noqa: E402
from dbsam.train.loop import TrainOptions, train  # noqa: E402
from dbsam.train.methods import DecoderOnlySAM, build_model  # noqa: E402
from dbsam.train.schedule import lr_factor  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
# A smaller tiny (64 px, 2 ViT blocks): the same code paths at a fraction of the CPU time.
MICRO = dict(img_size=64, depth=2, num_stages=2, global_attn_indexes=(1,))
NO_DROPOUT = dict(adapter_drop_path=0.0, cross_attn_dropout=0.0, cross_attn_drop_path=0.0, fusion_drop_path=0.0)


# --- recipe pieces ---------------------------------------------------------------------------


def test_loss_is_dice_plus_bce_per_sample():
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    good = (target * 2 - 1) * 20
    total, dice, bce = segmentation_loss(good, target)
    assert total.item() == pytest.approx(dice.item() + bce.item())
    assert total.item() < 1e-3
    # Per-sample Dice: the loss of a batch is the mean of its halves' losses (what DDP averages).
    logits = torch.randn(4, 1, 8, 8)
    t4 = torch.cat([target, target])
    halves = [segmentation_loss(logits[i:i + 2], t4[i:i + 2])[0] for i in (0, 2)]
    assert segmentation_loss(logits, t4)[0].item() == pytest.approx(sum(h.item() for h in halves) / 2, rel=1e-6)


def test_schedule_warms_up_linearly_then_decays_polynomially():
    f = [lr_factor(s, 4, 14) for s in range(14)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == 1.0 and f[9] == pytest.approx(0.5 ** 0.9)
    assert all(a > b for a, b in zip(f[4:], f[5:]))
    assert lr_factor(14, 4, 14) == 0.0


def test_sampler_ranks_together_deal_the_global_batch_and_resume_anywhere():
    indices = list(range(100, 123))  # 23 samples, global batch 6: 3 full steps, 5 dropped
    one = ResumableDistributedSampler(indices, 6, 1, 0, seed=3)
    two = [ResumableDistributedSampler(indices, 3, 2, r, seed=3) for r in range(2)]
    for s in [one, *two]:
        s.set_epoch(1)
    single = [i for _, i in one]
    per_rank = [[i for _, i in s] for s in two]
    assert len(single) == 18 and one.steps_per_epoch == 3
    for step in range(3):
        assert sorted(single[6 * step:6 * step + 6]) == sorted(per_rank[0][3 * step:3 * step + 3] +
                                                               per_rank[1][3 * step:3 * step + 3])
    one.set_epoch(1, start=6)  # resume after one step, e.g. with another world size
    assert [i for _, i in one] == single[6:]
    one.set_epoch(2)
    assert [i for _, i in one] != single  # a new order every epoch


def test_prompted_samples_jitter_is_seeded_by_epoch_and_index():
    ds = synthetic_dataset(2, size=64, seed=1)
    samples = PromptedSamples(ds, 128, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), seed=5, margin=3)
    a, b, c = samples[(0, 0)], samples[(0, 0)], samples[(1, 0)]
    assert torch.equal(a["box"], b["box"]) and not torch.equal(a["box"], c["box"])
    tight = samples[0]["box"].numpy() / 2  # eval: fixed margin 3 px, in the 128 frame (x2)
    assert a["image"].shape == (3, 128, 128) and a["target"].shape == (1, 32, 32)
    assert set(a["target"].unique().tolist()) <= {0.0, 1.0}
    grown = a["box"].numpy() / 2
    tight_box = ds[0]["box"].numpy()
    assert (grown[:2] <= tight_box[:2]).all() and (grown[2:] >= np.minimum(tight_box[2:], 63)).all()
    assert (tight == np.clip(tight_box + [-3, -3, 3, 3], 0, 63)).all()


def test_medsam_trains_only_the_mask_decoder_on_sam_encoder():
    model = build_model("medsam", "tiny")
    assert isinstance(model, DecoderOnlySAM)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("dbsam.mask_decoder.") for n in names)
    x = torch.randn(1, 3, 128, 128)
    emb = model.encode(x)
    assert torch.equal(emb, model.dbsam.image_encoder(x))  # SAM's own encoder path
    logits, _ = model(x, torch.tensor([[10.0, 10, 90, 90]]))
    logits.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if not n.startswith("dbsam.mask_decoder."))
    assert any(g is not None for n, g in grads.items() if n.startswith("dbsam.mask_decoder."))


# --- checkpoints --------------------------------------------------------------------------------


def _tiny_core():
    torch.manual_seed(0)
    return build_model("dbsam", "tiny")


def test_atomic_save_keeps_the_previous_checkpoint_when_the_disk_is_full(tmp_path, monkeypatch):
    model = _tiny_core()
    path = ckpt_io.atomic_save(model, tmp_path / "last.pt", extra={"method": "dbsam", "step": 1})
    before = path.read_bytes()

    def disk_full(model, tmp, sam, extra):
        Path(tmp).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_io, "_write_payload", disk_full)
    with pytest.raises(OSError) as info:
        ckpt_io.atomic_save(model, path, extra={"step": 2})
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["last.pt"]
    assert ckpt_io.read_checkpoint(path)["extra"]["step"] == 1


class _Evil:
    def __reduce__(self):  # would create a file if ever unpickled
        return (Path.touch, (Path(os.environ["DBSAM_EVIL_MARKER"]),))


def test_checkpoints_with_pickled_code_or_truncated_are_refused(tmp_path, monkeypatch):
    marker = tmp_path / "executed"
    monkeypatch.setenv("DBSAM_EVIL_MARKER", str(marker))
    model = _tiny_core()
    good = ckpt_io.atomic_save(model, tmp_path / "good.pt", extra={"method": "dbsam", "init_seed": 0})
    evil = tmp_path / "evil.pt"
    payload = torch.load(good, weights_only=True)
    payload["extra"]["payload"] = _Evil()
    torch.save(payload, evil)
    with pytest.raises(CheckpointError, match="refusing"):
        ckpt_io.load_trained(evil)
    assert not marker.exists()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt_io.load_trained(truncated)
    # A good one rebuilds the model, random frozen parts included (from its init seed).
    loaded, what = ckpt_io.load_trained(good)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert "dbsam checkpoint" in what


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = ckpt_io.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    draws = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    ckpt_io.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), draws[0])
    assert np.array_equal(np.random.rand(3), draws[1]) and [random.random() for _ in range(3)] == draws[2]


# --- whole runs -------------------------------------------------------------------------------------


def _options(out, **changes):
    base = dict(out=str(out), model="tiny", steps=4, batch_size=2, warmup_steps=2, val_fraction=0.0,
                checkpoint_every=2, log_every=100, seed=7, model_options=MICRO)
    base.update(changes)
    return TrainOptions(**base)


def test_resume_after_a_kill_is_exact(tmp_path):
    # 3 cases give ~6 targets: 3 steps an epoch, so the resumed part crosses an epoch boundary.
    ds = synthetic_dataset(3, size=64, seed=4)
    straight = train(_options(tmp_path / "a"), ds)
    assert straight["steps"] == 4
    killed = train(_options(tmp_path / "b", stop_after=2), ds)
    assert killed["stopped"] == "killed" and not (tmp_path / "b" / "model.pt").exists()
    with pytest.raises(ValueError, match="without training state"):
        train(_options(tmp_path / "c", resume=str(tmp_path / "a" / "model.pt")), ds)
    resumed = train(_options(tmp_path / "b", resume="auto"), ds)
    assert resumed["steps"] == 4
    a = ckpt_io.read_checkpoint(tmp_path / "a" / "last.pt")
    b = ckpt_io.read_checkpoint(tmp_path / "b" / "last.pt")
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    opt_a, opt_b = a["extra"]["train"]["optimizer"]["state"], b["extra"]["train"]["optimizer"]["state"]
    for i in opt_a:
        for k in opt_a[i]:
            assert torch.equal(opt_a[i][k], opt_b[i][k])
    for k in ("step", "epoch", "position"):
        assert a["extra"]["train"][k] == b["extra"]["train"][k]
    log_a = (tmp_path / "a" / "metrics.csv").read_text().splitlines()
    log_b = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert len(log_b) == 5  # header + 4 steps, none doubled by the resume
    assert [r.split(",")[2] for r in log_a] == [r.split(",")[2] for r in log_b]  # same losses


def test_a_failed_checkpoint_write_does_not_stop_training(tmp_path, monkeypatch, capsys):
    calls = []
    real = ckpt_io._write_payload

    def flaky(model, tmp, sam, extra):
        calls.append(tmp)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(model, tmp, sam, extra)

    monkeypatch.setattr(ckpt_io, "_write_payload", flaky)
    ds = synthetic_dataset(3, size=64, seed=4)
    out = train(_options(tmp_path, steps=3, checkpoint_every=1), ds)
    assert out["steps"] == 3 and "could not write checkpoint" in capsys.readouterr().err
    assert ckpt_io.read_checkpoint(tmp_path / "last.pt")["extra"]["train"]["step"] == 3


def _write_folder(root, n, seed=0, size=64):
    from PIL import Image

    from dbsam.data.datasets import synthetic_case
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True), (root / "masks").mkdir()
    for i in range(n):
        image, labels = synthetic_case(rng, size)
        Image.fromarray(image).save(root / "images" / f"{i:03d}.png")
        Image.fromarray((labels > 0).astype(np.uint8) * 255).save(root / "masks" / f"{i:03d}.png")
    return root


def test_ddp_two_cpu_ranks_follow_the_single_process_loss_curve(tmp_path):
    """2 gloo ranks x batch 2 against 1 process x batch 4, dropout off so only the reduction order
    differs. BatchNorm statistics are synchronised across ranks (GlobalBatchNorm2d), so both runs
    normalise with the same global-batch statistics."""
    data = _write_folder(tmp_path / "data", 4)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    common = ["train", "--data", str(data), "--steps", "3", "--warmup-steps", "1", "--val-fraction", "0",
              "--lr", "1e-3", "--checkpoint-every", "0", "--seed", "1"]
    common += [f"--model-option={k}={v}" for k, v in {**MICRO, **NO_DROPOUT}.items()]
    one = subprocess.run([sys.executable, "-m", "dbsam.cli", *common, "--batch-size", "4",
                          "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "dbsam.cli", *common, "--batch-size", "2", "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "global batch 4 (2 rank(s))" in two.stdout

    def losses(run):
        rows = (tmp_path / run / "metrics.csv").read_text().splitlines()[1:]
        return [float(r.split(",")[2]) for r in rows]

    assert len(losses("two")) == 3
    assert losses("two") == pytest.approx(losses("one"), abs=1e-4)
    a = ckpt_io.read_checkpoint(tmp_path / "one" / "model.pt")["state_dict"]
    b = ckpt_io.read_checkpoint(tmp_path / "two" / "model.pt")["state_dict"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-4), k


def test_resume_with_another_world_size_continues_the_same_run(tmp_path):
    """Killed at step 2 on one process (batch 2), resumed on 2 gloo ranks x batch 1: the same
    global batch, so the same samples and, dropout off, the same losses as a run never stopped."""
    data = _write_folder(tmp_path / "data", 4)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    common = ["train", "--data", str(data), "--steps", "4", "--warmup-steps", "1", "--val-fraction", "0",
              "--lr", "1e-3", "--checkpoint-every", "2", "--seed", "1"]
    common += [f"--model-option={k}={v}" for k, v in {**MICRO, **NO_DROPOUT}.items()]

    def run(*args, ranks=1):
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
        out = subprocess.run([sys.executable, *launcher, "-m", "dbsam.cli", *common, *args], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    run("--batch-size", "2", "--out", str(tmp_path / "straight"))
    run("--batch-size", "2", "--out", str(tmp_path / "r"), "--stop-after", "2")
    text = run("--batch-size", "1", "--out", str(tmp_path / "r"), "--resume", ranks=2)
    assert "resuming from" in text

    def losses(name):
        return [float(r.split(",")[2]) for r in (tmp_path / name / "metrics.csv").read_text().splitlines()[1:]]

    assert len(losses("r")) == 4
    assert losses("r") == pytest.approx(losses("straight"), abs=1e-4)
    a = ckpt_io.read_checkpoint(tmp_path / "straight" / "last.pt")
    b = ckpt_io.read_checkpoint(tmp_path / "r" / "last.pt")
    assert b["extra"]["train"]["world_size"] == 2 and len(b["extra"]["train"]["rng"]) == 2
    for k in ("step", "epoch", "position"):
        assert a["extra"]["train"][k] == b["extra"]["train"][k]
    for k, v in a["state_dict"].items():
        assert torch.allclose(v.float(), b["state_dict"][k].float(), atol=1e-4), k
