"""Sampler: deterministic, exact resume, sharding across ranks matches one rank, bucketing, eval order."""

import random

import pytest

from ftcore.config import TrainConfig
from ftcore.data.sampler import Sampler, eval_batches
from ftcore.errors import FtcoreError

_rng = random.Random(0)
LENGTHS = [_rng.randint(5, 200) for _ in range(103)]


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def epochs(sampler, n):
    out = []
    for _ in range(n):
        out.append([b for b in sampler])
    return out


def test_deterministic_and_epochs_differ():
    a, b = Sampler(LENGTHS, 4, seed=1), Sampler(LENGTHS, 4, seed=1)
    ea, eb = epochs(a, 2), epochs(b, 2)
    assert ea == eb and ea[0] != ea[1]
    assert len(ea[0]) == len(a) == 103 // 4
    used = [i for batch in ea[0] for i in batch]
    assert len(used) == len(set(used)) == 100  # the 3 left over sit out this epoch
    assert a.state_dict() == {"epoch": 2, "seed": 1, "position": 0, "split": [4, 1, 1]}
    assert epochs(Sampler(LENGTHS, 4, seed=2), 1) != ea[:1]


def test_train_epochs_count_whole_global_batches():
    """train.epochs=1.5 over 103 items in global batches of 5 x 2: 10 steps per epoch (3 items sit out each epoch,
    other ones each time), 15 steps of 10 examples, the last 5 from the second epoch's order."""
    sampler = Sampler(LENGTHS, 5, grad_accum=2, seed=1)
    steps = TrainConfig(epochs=1.5).total_steps(sampler.steps_per_epoch)
    stream = (b for _ in range(3) for b in sampler)  # the loop's iter_forever
    batches = [next(stream) + next(stream) for _ in range(steps)]  # grad_accum micro-batches per step
    assert (sampler.steps_per_epoch, steps, {len(b) for b in batches}) == (10, 15, {10})
    first, second = sampler.epoch_order(0), sampler.epoch_order(1)
    assert [i for b in batches[:10] for i in b] == first.tolist() and len(set(first)) == 100
    assert [i for b in batches[10:] for i in b] == second[:50].tolist()
    assert set(range(103)) - set(first) != set(range(103)) - set(second)


@pytest.mark.parametrize("bucketing", [False, True])
def test_resume_continues_on_the_exact_next_batch(bucketing):
    kw = {"grad_accum": 2, "seed": 5, "bucketing": bucketing, "bucket_window": 2}
    full = Sampler(LENGTHS, 4, **kw)
    reference = epochs(full, 3)  # uninterrupted: 3 epochs of 24 micro-batches
    run = Sampler(LENGTHS, 4, **kw)
    epochs(run, 1)
    got = take(run, 10)  # stop 10 micro-batches into epoch 1 ...
    state = run.state_dict()
    assert state == {"epoch": 1, "seed": 5, "position": 40, "split": [4, 2, 1]}
    resumed = Sampler(LENGTHS, 4, **{**kw, "seed": 0})  # ... and resume in a fresh process
    resumed.load_state_dict(state)
    got += [b for b in resumed]
    assert got == reference[1] and epochs(resumed, 1) == reference[2:]


def test_state_saved_at_epoch_end_resumes_in_next_epoch():
    s = Sampler(LENGTHS, 5)
    first = list(iter(s))
    r = Sampler(LENGTHS, 5)
    r.load_state_dict({"epoch": 0, "seed": 0, "position": 100})
    assert list(iter(r)) == [] and r.state_dict()["epoch"] == 1
    assert list(iter(r)) == list(iter(s)) and first


@pytest.mark.parametrize("bucketing", [False, True])
def test_two_ranks_see_the_same_examples_per_step_as_one(bucketing):
    kw = {"seed": 3, "bucketing": bucketing, "bucket_window": 3}
    one = Sampler(LENGTHS, 4, grad_accum=4, **kw)  # global batch 16 on one rank
    ranks = [Sampler(LENGTHS, 4, grad_accum=2, world_size=2, rank=r, **kw) for r in range(2)]  # 16 on two
    for epoch in range(2):
        single, shards = list(one), [list(r) for r in ranks]
        assert len(shards[0]) == len(shards[1]) == len(single) // 2
        for step in range(one.steps_per_epoch):
            want = {i for b in single[step * 4 : (step + 1) * 4] for i in b}
            got = [i for s in shards for b in s[step * 2 : (step + 1) * 2] for i in b]
            assert len(got) == len(set(got)) == 16 and set(got) == want, (epoch, step)
        # together the ranks cover exactly what one rank covers, and never the same example twice
        assert sorted(i for s in shards for b in s for i in b) == sorted(i for b in single for i in b)


def test_rank_states_resume_in_lockstep():
    ranks = [Sampler(LENGTHS, 4, world_size=2, rank=r) for r in range(2)]
    for r in ranks:
        take(r, 3)
    assert ranks[0].state_dict() == ranks[1].state_dict() == {"epoch": 0, "seed": 0, "position": 24, "split": [4, 1, 2]}
    with pytest.raises(FtcoreError, match=r"^sampler: the saved run's global batch is 4 x 1 x 2 = 8 \(train.batch_size x "
                                          r"train.grad_accum x processes\), this run's 5 x 1 x 1 = 5; resume with the same "
                                          r"global batch$"):  # fmt: skip
        Sampler(LENGTHS, 5).load_state_dict(ranks[0].state_dict())
    old = {"epoch": 0, "seed": 0, "position": 24}  # a checkpoint from before the split was saved
    with pytest.raises(FtcoreError, match="not a multiple of batch_size x world size"):
        Sampler(LENGTHS, 5).load_state_dict(old)


def test_the_same_global_batch_split_another_way_resumes():
    """The order depends on the global batch only: 2 ranks x accumulation 1 -> 1 rank x accumulation 2 continues with
    the same examples per step."""
    ranks = [Sampler(LENGTHS, 4, world_size=2, rank=r, seed=2) for r in range(2)]
    for r in ranks:
        take(r, 3)
    one = Sampler(LENGTHS, 4, grad_accum=2, seed=2)
    one.load_state_dict(ranks[0].state_dict())
    after = [take(r, 2) for r in ranks]
    assert sorted(i for b in take(one, 4) for i in b) == sorted(i for s in after for b in s for i in b)


def test_bucketing_groups_similar_lengths():
    def padding(sampler):
        return sum(max(LENGTHS[i] for i in b) * len(b) - sum(LENGTHS[i] for i in b) for b in sampler)

    assert padding(Sampler(LENGTHS, 4, bucketing=True)) < 0.3 * padding(Sampler(LENGTHS, 4))
    bucketed = [i for b in Sampler(LENGTHS, 4, bucketing=True) for i in b]
    assert len(set(bucketed)) == 100  # still every example once


def test_too_few_items_and_bad_rank():
    with pytest.raises(FtcoreError, match="the training split has 3 items, fewer than one global batch of 8"):
        Sampler([1, 2, 3], 4, grad_accum=2)
    with pytest.raises(FtcoreError, match="rank 2 is outside world_size 2"):
        Sampler(LENGTHS, 4, world_size=2, rank=2)


def test_eval_batches_cover_everything_once():
    flat = [i for b in eval_batches(LENGTHS, 8) for i in b]
    assert sorted(flat) == list(range(103))
    first = eval_batches(LENGTHS, 8)[0]
    assert [LENGTHS[i] for i in first] == sorted(LENGTHS, reverse=True)[:8]
