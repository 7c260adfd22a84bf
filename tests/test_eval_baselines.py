"""The references next to a fine-tuned model: the few-shot base model and the forgetting probe."""

import json

import pytest
import torch
from test_train import data_cache, tiny_dir, tiny_run  # noqa: F401  (fixtures)

from ftcore.config import EvalConfig, run_config
from ftcore.data.format import split_prompt
from ftcore.data.pipeline import build_datasets
from ftcore.errors import FtcoreError
from ftcore.eval.few_shot import select_shots, with_shots
from ftcore.eval.forgetting import make_probe, probe_loss
from ftcore.formats.hf import load_pretrained
from ftcore.peft import PeftConfig, apply
from ftcore.train import train


def chat(q, a, system="Be brief."):
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": q},
                         {"role": "assistant", "content": a}], "where": f"train:{q}"}  # fmt: skip


def test_shots_are_k_training_examples_before_the_question():
    train_split = [chat(f"q{i}", f"a{i}") for i in range(20)]
    picked = select_shots(train_split, 3, seed=7)
    assert picked == select_shots(train_split, 3, seed=7) and len(set(picked)) == 3
    assert picked != select_shots(train_split, 3, seed=8)
    messages, _ = split_prompt(chat("test question", "secret")["messages"])
    prompt = with_shots(messages, [train_split[i] for i in picked])
    assert [m["role"] for m in prompt] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert [m["content"] for m in prompt[1::2][:3]] == [f"q{i}" for i in picked]
    assert [m["content"] for m in prompt[2::2][:3]] == [f"a{i}" for i in picked]
    assert prompt[-1]["content"] == "test question" and "secret" not in json.dumps(prompt)
    with pytest.raises(FtcoreError, match="eval.few_shot=21: the training split has only 20 examples"):
        select_shots(train_split, 21, 0)


def test_probe_is_reproducible_cached_and_zero_for_an_untrained_adapter(tiny_dir, tmp_path):  # noqa: F811
    model, tok = load_pretrained(tiny_dir)
    cfg = EvalConfig(forgetting_samples=4, forgetting_tokens=12, forgetting_seed=3)
    a = make_probe(model, tok, cfg)
    assert a == make_probe(model, tok, cfg) and a["source"] == "sampled"
    assert [len(x) for x in a["ids"]] == [13] * 4 and all(x[0] == tok.bos_id for x in a["ids"])
    assert a != make_probe(model, tok, EvalConfig(forgetting_samples=4, forgetting_tokens=12, forgetting_seed=4))
    cached = make_probe(model, tok, cfg, tiny_dir, str(tmp_path))
    assert cached == a and len(list((tmp_path / "probes").glob("*.json"))) == 1
    assert make_probe(None, tok, cfg, tiny_dir, str(tmp_path)) == a  # a hit never runs the model
    base = probe_loss(model, a, "cpu")
    expected = torch.nn.functional.cross_entropy(model(torch.tensor(a["ids"])[:, :-1]).flatten(0, 1),
                                                 torch.tensor(a["ids"])[:, 1:].flatten())  # fmt: skip
    assert base == pytest.approx(expected.item(), rel=1e-6)
    apply(model, PeftConfig(method="lora", r=4, target_modules="all-linear"))  # B = 0: the base model's function
    assert probe_loss(model, a, "cpu") == pytest.approx(base, abs=1e-6)


def test_corpus_probe_and_its_errors(tiny_dir, tmp_path):  # noqa: F811
    _, tok = load_pretrained(tiny_dir)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "the cat sat"}\n\n{"text": "a much longer line of plain text here"}\n{"text": "x"}\n')
    probe = make_probe(None, tok, EvalConfig(forgetting_path=str(corpus), forgetting_samples=2, forgetting_tokens=5))
    assert probe["source"] == str(corpus) and len(probe["ids"]) == 2 and len(probe["ids"][1]) == 6
    corpus.write_text('{"text": 3}\n')
    with pytest.raises(FtcoreError, match=r"c.jsonl:1: expected an object with a string 'text'"):
        make_probe(None, tok, EvalConfig(forgetting_path=str(corpus)))
    with pytest.raises(FtcoreError, match="eval.forgetting_path: .*missing.txt not found"):
        make_probe(None, tok, EvalConfig(forgetting_path=str(tmp_path / "missing.txt")))


def test_a_run_reports_few_shot_and_forgetting(tiny_dir, data_cache, tmp_path):  # noqa: F811
    cfg = tiny_run(tiny_dir, data_cache, tmp_path, train__max_steps=6, train__eval_every=0, optim__lr=3e-2,
                   eval__few_shot=2, eval__forgetting=True, eval__forgetting_samples=4, eval__forgetting_tokens=16)  # fmt: skip
    train(run_config(cfg))
    ev = json.loads((tmp_path / "eval.json").read_text())
    shots = ev["few_shot"]["shots"]
    assert ev["few_shot"]["k"] == 2 and len(shots) == 2 and all("arithmetic.jsonl:" in w for w in shots)
    base = json.loads((tmp_path / "baseline_eval.json").read_text())
    splits, _ = build_datasets(run_config(cfg).data, load_pretrained(tiny_dir)[1])
    where = {name: {ex["where"] for ex in exs} for name, exs in splits.items()}
    assert set(shots) <= where["train"] and not set(shots) & (where["test"] | where["validation"])
    f = ev["forgetting"]
    assert f["source"] == "sampled" and f["sequences"] == 4 and f["tokens"] == 64
    assert f["increase"] == pytest.approx(f["tuned_loss"] - f["base_loss"]) and f["increase"] > 1e-4  # it trained
    report = (tmp_path / "report.md").read_text()
    assert "| baseline, 2-shot |" in report and "Forgetting: loss on 4 sequences (64 tokens)" in report
    # a second run of the same base measures the same probe (cached)
    other = tmp_path / "again"
    train(run_config(tiny_run(tiny_dir, data_cache, other, train__max_steps=2, train__eval_every=0, eval__baseline=False,
                              eval__forgetting=True, eval__forgetting_samples=4, eval__forgetting_tokens=16)))  # fmt: skip
    assert json.loads((other / "baseline_eval.json").read_text())["probe"] == base["probe"]
