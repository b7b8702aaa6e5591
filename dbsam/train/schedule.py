"""Learning rate: linear warm-up, then polynomial decay (power 0.9) per step, as in the paper.

The rate is a pure function of the step, so resuming needs only the step (and the two lengths,
stored in the checkpoint so that a resumed run keeps its original schedule).
"""


def lr_factor(step: int, warmup_steps: int, total_steps: int, power: float = 0.9) -> float:
    """Multiplier of the base rate for optimiser step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    done = min(step - warmup_steps, decay_steps)
    return (1 - done / decay_steps) ** power


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
