"""Split: 70/15/15 by default, seeded, stable under shuffling of the file, duplicates never straddle."""

import random

from test_data_common import FakeTokenizer, pairs, write_jsonl

from ftcore.data.clean import content_key
from ftcore.data.config import DataConfig
from ftcore.data.pipeline import build_datasets
from ftcore.data.split import split_examples


def examples(n, prefix="q"):
    return [{"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["completion"]}],
             "where": f"f:{i}"} for i, p in enumerate(pairs(n, prefix))]  # fmt: skip


def keys(exs):
    return {content_key(e["messages"]) for e in exs}


def test_fractions_are_close_to_70_15_15():
    splits = split_examples(examples(4000), [0.7, 0.15, 0.15], seed=0)
    sizes = [len(splits[k]) for k in ("train", "validation", "test")]
    assert sum(sizes) == 4000
    assert abs(sizes[0] / 4000 - 0.70) < 0.03 and all(abs(s / 4000 - 0.15) < 0.03 for s in sizes[1:])


def test_stable_under_shuffling_and_seeded():
    exs = examples(500)
    a = split_examples(exs, [0.7, 0.15, 0.15], seed=3)
    shuffled = exs[:]
    random.Random(1).shuffle(shuffled)
    b = split_examples(shuffled, [0.7, 0.15, 0.15], seed=3)
    assert all(keys(a[k]) == keys(b[k]) for k in a)
    c = split_examples(exs, [0.7, 0.15, 0.15], seed=4)
    assert keys(a["test"]) != keys(c["test"])
    assert [e["where"] for e in a["train"]] == sorted((e["where"] for e in a["train"]), key=lambda w: int(w[2:]))


def test_duplicates_and_same_prompts_never_straddle():
    exs = examples(300) * 3  # exact duplicates (as when dedup is off)
    splits = split_examples(exs, [0.7, 0.15, 0.15], seed=0)
    seen = [keys(splits[k]) for k in splits]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    # split_by="prompt": one prompt with different answers lands in one split
    same_prompt = [{"messages": [{"role": "user", "content": f"p{i % 50}"}, {"role": "assistant", "content": str(i)}],
                    "where": ""} for i in range(500)]  # fmt: skip
    splits = split_examples(same_prompt, [0.7, 0.15, 0.15], seed=0, by="prompt")
    prompts = [{e["messages"][0]["content"] for e in splits[k]} for k in splits]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])


def test_pipeline_split_is_stable_under_shuffling_the_file(tmp_path):
    records = pairs(300)
    a = write_jsonl(tmp_path / "a.jsonl", records)
    random.Random(0).shuffle(records)
    b = write_jsonl(tmp_path / "b.jsonl", records)
    sa, _ = build_datasets(DataConfig(path=str(a), cache_dir=""), FakeTokenizer())
    sb, _ = build_datasets(DataConfig(path=str(b), cache_dir=""), FakeTokenizer())
    for name in sa:
        assert keys(sa[name]) == keys(sb[name]) and len(sa[name]) > 0


def test_separate_files_and_overlap_removal(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", pairs(200))
    test = write_jsonl(tmp_path / "test.jsonl", pairs(10))  # all 10 also appear in train
    cfg = DataConfig(path=str(train), test_path=str(test), cache_dir="")
    splits, report = build_datasets(cfg, FakeTokenizer())
    assert len(splits["test"]) == 10 and keys(splits["test"]).isdisjoint(keys(splits["train"]))
    assert keys(splits["test"]).isdisjoint(keys(splits["validation"]))
    # the main file splits into train and validation only: 0.70 : 0.15 renormalized
    assert len(splits["train"]) + len(splits["validation"]) + sum(report["removed_overlap"].values()) == 200
    assert sum(report["removed_overlap"].values()) == 10
    assert 0.1 < len(splits["validation"]) / 190 < 0.26
