"""The paper's loss: Dice on sigmoid probabilities + BCE with logits, 1:1, on the low-res logits."""
import torch
import torch.nn.functional as F

SMOOTH = 1e-5  # keeps an empty target from dividing by zero; too small to bias real masks


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice per sample, averaged over the batch.

    Per sample (not over the whole batch) so that the mean over ranks of per-rank losses equals
    the loss of the global batch: DDP then matches one process with the same global batch.
    """
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    dice = (2 * (p * t).sum(1) + SMOOTH) / (p.sum(1) + t.sum(1) + SMOOTH)
    return (1 - dice).mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor):
    """-> (total, dice part, bce part); logits and target share the low-res shape (B, 1, s, s)."""
    d, b = dice_loss(logits, target), bce_loss(logits, target)
    return d + b, d, b
