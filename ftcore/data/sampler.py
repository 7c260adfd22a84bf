"""Deterministic, resumable, data-parallel sampler.

An epoch's order depends only on (seed, epoch) and the global batch G = batch_size x grad_accum x
world_size: a seeded permutation, cut to a multiple of G (the few left over sit out this epoch), and
with bucketing sorted by length within windows of `bucket_window` global batches, whose order is then
shuffled. Global micro-batch m is order[m*B : (m+1)*B]; rank r's j-th micro-batch is m = j*W + r, so
after j micro-steps on every rank exactly the first j*W*B examples of the order are used, and each
optimizer step covers the same G examples for any split of G into ranks and accumulation steps.
An epoch is therefore floor(n / G) optimizer steps, each of G examples: the n mod G left over (a partial
last batch) are never a short step; train.epochs counts these epochs (TrainConfig.total_steps).

State (epoch, seed, position, split): position counts the examples of this epoch's order already handed
out on all ranks together; state_dict() taken after a step resumes on the exact next batch. split is the
saved run's [batch_size, grad_accum, world_size]: a resume with another global batch is refused in one line.
"""

import numpy as np

from ftcore.errors import FtcoreError


class Sampler:
    def __init__(self, lengths: list[int], batch_size: int, *, grad_accum: int = 1, world_size: int = 1,
                 rank: int = 0, seed: int = 0, shuffle: bool = True, bucketing: bool = False,
                 bucket_window: int = 64):  # fmt: skip
        if not 0 <= rank < world_size:
            raise FtcoreError(f"rank {rank} is outside world_size {world_size}")
        self.lengths = list(lengths)
        self.B, self.A, self.W, self.rank = batch_size, grad_accum, world_size, rank
        self.global_batch = batch_size * grad_accum * world_size
        if len(self.lengths) < self.global_batch:
            raise FtcoreError(
                f"the training split has {len(self.lengths)} items, fewer than one global batch of "
                f"{self.global_batch} (batch_size {batch_size} x grad_accum {grad_accum} x world size {world_size})"
            )
        self.shuffle, self.bucketing, self.bucket_window = shuffle, bucketing, bucket_window
        self.epoch, self.seed, self.position = 0, seed, 0

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: whole global batches only."""
        return len(self.lengths) // self.global_batch

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank."""
        return self.steps_per_epoch * self.global_batch // (self.B * self.W)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All item indices used in `epoch`, in order (a multiple of the global batch long)."""
        n, G = len(self.lengths), self.global_batch
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        order = order[: n // G * G]
        if self.bucketing:
            lengths = np.asarray(self.lengths)
            window = G * self.bucket_window
            chunks = [order[i : i + window] for i in range(0, len(order), window)]
            order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
            batches = order.reshape(-1, G)
            order = batches[rng.permutation(len(batches))].reshape(-1)
        return order

    def __iter__(self):
        """The rest of the current epoch's micro-batches for this rank (lists of item indices)."""
        order, step = self.epoch_order(self.epoch), self.B * self.W
        while self.position + step <= len(order):
            start = self.position + self.rank * self.B
            self.position += step  # counted before the yield: a state_dict() after the step is the next batch
            yield order[start : start + self.B].tolist()
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "seed": self.seed, "position": self.position,
                "split": [self.B, self.A, self.W]}  # fmt: skip

    def load_state_dict(self, state: dict):
        (b, a, w), G = state.get("split", (self.B, self.A, self.W)), self.global_batch
        if b * a * w != G:  # the order depends on the global batch: another one would not continue this run
            raise FtcoreError(f"sampler: the saved run's global batch is {b} x {a} x {w} = {b * a * w} (train.batch_size "
                              f"x train.grad_accum x processes), this run's {self.B} x {self.A} x {self.W} = {G}; "
                              "resume with the same global batch")  # fmt: skip
        if state["position"] % (self.B * self.W):
            raise FtcoreError(
                f"sampler position {state['position']} is not a multiple of batch_size x world size "
                f"({self.B} x {self.W}): resume with the batch settings of the saved run"
            )
        self.epoch, self.seed, self.position = int(state["epoch"]), int(state["seed"]), int(state["position"])


def eval_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Every index exactly once, in batches of similar length (longest first); ranks take batches r::W."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
