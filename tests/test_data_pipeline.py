"""build_datasets end to end on the demo configs, then batches through the tiny model."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_data_common import FakeTokenizer, pairs, write_jsonl

from ftcore.data import Batcher, DataConfig, Sampler, build_datasets, encode_prompt, get_task, pad_token_id
from ftcore.data.format import IGNORE, split_prompt
from ftcore.data.tasks import extract_answer
from ftcore.errors import FtcoreError
from ftcore.model import ModelConfig, Transformer


@pytest.mark.parametrize("name", ["arithmetic", "tickets", "rewrite"])
def test_demo_configs_build(name, tmp_path):
    # byte-level ids are ~4x longer than a real tokenizer's
    cfg = DataConfig(path=name, cache_dir=str(tmp_path), max_length=1024, seq_len=1024)
    tok = FakeTokenizer()
    splits, report = build_datasets(cfg, tok)
    json.dumps(report)  # saved with the run as JSON
    sizes = {k: len(v) for k, v in splits.items()}
    total = sum(sizes.values())
    assert total > 1000 and abs(sizes["train"] / total - 0.70) < 0.04 and abs(sizes["test"] / total - 0.15) < 0.04
    assert report["clean"]["train"]["output"] == total
    assert report["tokenize"]["train"]["examples"] == sizes["train"] and report["cache"]["hit"] is False
    assert all(any(lab != IGNORE for lab in ex["labels"]) for ex in splits["train"])
    task = get_task(cfg)
    for ex in splits["test"][:50]:  # what evaluation will do with the test split
        prompt, reference = split_prompt(ex["messages"])
        ids = encode_prompt(prompt, cfg.template, tok)
        assert ex["input_ids"][: len(ids)] == ids
        answer = extract_answer(task, reference)
        assert answer and (task.kind != "label" or answer in task.labels)


def test_tickets_report_shows_cleaning_work():
    splits, report = build_datasets(DataConfig(path="tickets", cache_dir="", template="instruction"), FakeTokenizer())
    clean = report["clean"]["train"]
    assert clean["strip_html_changed"] > 0 and clean["removed_duplicates"] > 0
    assert not any("<p>" in m["content"] or "&amp;" in m["content"] for s in splits.values() for e in s
                   for m in e["messages"])  # fmt: skip


def test_system_prompt_is_added_after_the_split(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", pairs(200))
    plain, _ = build_datasets(DataConfig(path=str(data), cache_dir=""), FakeTokenizer())
    system, _ = build_datasets(DataConfig(path=str(data), cache_dir="", system_prompt="Be brief."), FakeTokenizer())
    for name in plain:
        assert [e["where"] for e in plain[name]] == [e["where"] for e in system[name]]
        assert all(e["messages"][0] == {"role": "system", "content": "Be brief."} for e in system[name])


def test_over_length_examples_are_dropped_and_an_empty_train_split_is_an_error(tmp_path):
    records = pairs(40) + [{"prompt": "x" * 300, "completion": "y"}]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    splits, report = build_datasets(DataConfig(path=str(data), cache_dir="", max_length=200), FakeTokenizer())
    assert sum(r["removed_over_max_length"] for r in report["tokenize"].values()) == 1
    assert max(len(e["input_ids"]) for s in splits.values() for e in s) <= 200
    with pytest.raises(FtcoreError, match=r"d.jsonl: the training split is empty; report: \{.*removed_over_max_length"):
        build_datasets(DataConfig(path=str(data), cache_dir="", max_length=5), FakeTokenizer())


def test_train_steps_on_packed_demo_batches():
    cfg = DataConfig(path="arithmetic", cache_dir="", packing=True, seq_len=160, max_length=160, template="plain")
    tok = FakeTokenizer()
    splits, _ = build_datasets(cfg, tok)
    batcher = Batcher.from_config(splits["train"], cfg, pad_token_id(tok))
    sampler = Sampler(batcher.lengths, 2, grad_accum=2, seed=cfg.seed)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_layers=2,
                                    num_heads=4, num_kv_heads=2))  # fmt: skip
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step, indices in zip(range(8), sampler):
        batch = batcher(indices)
        assert batch["input_ids"].shape == (2, 160) and batch["attention_mask"].shape == (2, 1, 160, 160)
        logits = model(batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
