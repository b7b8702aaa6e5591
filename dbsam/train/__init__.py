"""Fine-tuning DB-SAM (and the decoder-only MedSAM baseline) with the paper's recipe.

Modules, each small: losses (Dice + BCE), schedule (warm-up + polynomial decay), data (model-ready
samples, resumable distributed order, folder auto-detection), methods (dbsam / medsam), checkpoint
(atomic, weights-only, exact resume), distributed (torchrun / DDP helpers), loop (the training run).
Import the submodules directly; this package imports nothing heavy on purpose.
"""
