"""Training: train(cfg) (loop.py) over one step (step.py), the optimizer and schedules, checkpoints,
parallelism (torchrun, activation checkpointing, FSDP2/DDP), FLOP accounting, logging and run info."""

from ftcore.train.loop import train

__all__ = ["train"]
