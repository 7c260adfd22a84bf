"""data.augment: rewrites join the training split only, are counted, cached (a hit loads no model), and the
filters drop what they should. The pipeline tests generate with the tiny random checkpoint."""

import json
import shutil

import pytest
import torch
from test_data_common import write_jsonl
from test_train import TOKENIZER_FILES, data_cache, tiny_dir, tiny_run  # noqa: F401 (fixtures)

import ftcore.data.augment
import ftcore.formats.hf
import ftcore.model.generate
from ftcore.config import EvalConfig, run_config
from ftcore.data import cache
from ftcore.data.augment import clean_output, drop_reason, last_user_turn, numbers, picked_for
from ftcore.data.config import DataConfig
from ftcore.data.pipeline import build_datasets
from ftcore.errors import FtcoreError
from ftcore.eval.run import EvalRunConfig, evaluate
from ftcore.formats.hf import save_pretrained
from ftcore.formats.tokenizer import Tokenizer
from ftcore.model import ModelConfig, Transformer
from ftcore.train import train

COUNTS = ("dropped_empty", "dropped_identical", "dropped_untranslated", "dropped_length", "dropped_numbers",
          "dropped_question", "dropped_clean", "dropped_duplicate", "removed_over_max_length", "added")  # fmt: skip


@pytest.fixture(scope="module")
def short_rewriter(tiny_dir, tmp_path_factory):  # noqa: F811
    """A tiny random checkpoint like tiny_dir's, with an untied lm_head (tiny_dir's tied one repeats the prompt's
    last token forever) and every fifth token id a stop token: its random replies vary and end after a few tokens."""
    out = tmp_path_factory.mktemp("rewriter") / "model"
    cfg = ModelConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, tie_word_embeddings=False)  # fmt: skip
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    save_pretrained(model, out)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_dir / name, out / name)
    gen = json.loads((out / "generation_config.json").read_text())
    gen["eos_token_id"] = list(range(0, 49152, 5))
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out


@pytest.fixture
def random_rewriter(monkeypatch):
    """A random model's "translation back" continues its pivot text's tokens, so the untranslated rule (more words
    shared with the pivot than with the prompt) would drop every one: off for the pipeline tests."""
    monkeypatch.setattr(ftcore.data.augment, "word_overlap", lambda a, b: 0.0)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Prompts without a "?" (a random model's rewrites have none: the question rule would drop them all)."""
    records = [{"prompt": f"q {i}: add {i} and {i}.", "completion": str(2 * i)} for i in range(40)]
    return write_jsonl(tmp_path_factory.mktemp("aug") / "d.jsonl", records)


def config(data_file, cache_dir="", **kw) -> DataConfig:
    settings = {"augment": "backtranslate", "augment_keep_numbers": False, "augment_length_ratio": 50.0,
                "augment_max_new_tokens": 12, "augment_batch_size": 8, **kw}  # fmt: skip
    return DataConfig(path=str(data_file), cache_dir=str(cache_dir), **settings)


def prompt_of(ex) -> str:
    return ex["messages"][last_user_turn(ex["messages"])]["content"]


# -- the filters, on hand-made strings -------------------------------------------------------------------


def test_drop_reasons():
    q = "Omar has 31 cards and gets 7 more. How many cards does he have?"
    assert drop_reason(q, "Omar owns 31 cards and receives 7 more. How many cards has he got?", 2.0) is None
    assert drop_reason(q, "   ", 2.0) == "empty"
    assert drop_reason(q, "  omar has 31 cards and gets 7 more.   How many cards does he have? ", 2.0) == "identical"
    assert drop_reason(q, "Omar a 31 cartes.", 2.0, pivot="Omar a 31 cartes.") == "identical"  # never translated back
    pivot = "Omar a 31 cartes et en reçoit 7 de plus. Combien de cartes a-t-il ?"
    assert drop_reason(q, "Omar has 31 cards and receives 7 more. How many cards has he?", 2.0, pivot=pivot) is None
    assert drop_reason(q, "Omar a 31 cartes et 7 de plus. Combien de cartes ?", 2.0, pivot=pivot) == "untranslated"
    assert drop_reason(q, "Omar: 31 + 7?", 2.0) == "length"  # under half as long
    assert drop_reason(q, q + " " + q + " " + q, 2.0) == "length"  # over twice as long
    cut = "Omar owns 31 cards and receives 7 more. How many cards has he?"
    assert drop_reason(q, cut, 2.0, truncated=True) == "length"  # hit the token budget
    assert drop_reason(q, "Omar owns 31 cards and receives 8 more. How many cards has he got?", 2.0) == "numbers"
    assert drop_reason(q, "Omar owns 31 cards and receives 8 more. How many cards has he got?", 2.0, False) is None
    answered = "Omar owns 31 cards and then receives 7 more cards, so he has 38 cards."
    assert drop_reason(q, answered, 2.0, keep_numbers=False) == "question"
    assert numbers("3.5 and 3,5 and 12") == ["12", "3", "3", "5", "5"]


def test_clean_output_and_the_rewritten_turn():
    assert clean_output(' "Bonjour le monde." ') == "Bonjour le monde."
    assert clean_output("French: Bonjour.", labels=("English", "French")) == "Bonjour."
    assert clean_output("Translation: « Salut »") == "Salut"
    assert clean_output("Paris: a city") == "Paris: a city"
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]  # fmt: skip
    assert last_user_turn(chat) == 3


def test_fraction_picks_a_seeded_share():
    exs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
           for i in range(400)]  # fmt: skip
    picked = [picked_for(ex, 0, 0.25) for ex in exs]
    assert 60 < sum(picked) < 140 and picked == [picked_for(ex, 0, 0.25) for ex in exs]
    assert picked != [picked_for(ex, 1, 0.25) for ex in exs] and all(picked_for(ex, 0, 1.0) for ex in exs)


@pytest.mark.parametrize("key, value, message", [
    ("augment", "french", "data.augment='french': expected one of none, backtranslate, paraphrase"),
    ("augment_fraction", 0.0, "data.augment_fraction=0.0: expected a fraction in (0, 1]"),
    ("augment_length_ratio", 0.5, "data.augment_length_ratio=0.5: expected a ratio >= 1"),
    ("augment_batch_size", 0, "data.augment_batch_size=0: expected a positive number"),
    ("augment_max_new_tokens", -1, "data.augment_max_new_tokens=-1: expected a positive number"),
    ("augment_pivot", "english", "data.augment_pivot='english': expected a language other than data.augment_source"),
    ("augment_pivot", " ", "data.augment_pivot=' ': expected a language name, e.g. French"),
])  # fmt: skip
def test_bad_values_fail_in_one_line(key, value, message):
    with pytest.raises(FtcoreError) as e:
        DataConfig(**{"augment": "backtranslate", key: value})
    assert str(e.value) == message


def test_no_model_to_rewrite_with_fails_clearly(data_file, tiny_dir):  # noqa: F811
    with pytest.raises(FtcoreError, match="data.augment=backtranslate: no model to rewrite with; set data.augment_mod"):
        build_datasets(config(data_file), Tokenizer.from_dir(tiny_dir))


def test_cache_key_follows_the_augmentation(data_file, tiny_dir):  # noqa: F811
    tok, files = Tokenizer.from_dir(tiny_dir), {"train": data_file, "validation": None, "test": None}
    plain = cache.cache_key(files, tok, DataConfig())
    assert cache.cache_key(files, tok, DataConfig(augment_pivot="German", augment_fraction=0.5)) == plain  # off
    on = cache.cache_key(files, tok, DataConfig(augment="backtranslate"), "m")
    others = [cache.cache_key(files, tok, DataConfig(augment="backtranslate", augment_pivot="German"), "m"),
              cache.cache_key(files, tok, DataConfig(augment="backtranslate"), "other model"),
              cache.cache_key(files, tok, DataConfig(augment="paraphrase"), "m")]  # fmt: skip
    assert len({plain, on, *others}) == 5


# -- the pipeline, on the tiny checkpoint ------------------------------------------------------------------


def test_rewrites_join_the_training_split_only_and_are_counted(data_file, tiny_dir, short_rewriter,  # noqa: F811
                                                               random_rewriter, one_thread):  # fmt: skip
    tok = Tokenizer.from_dir(tiny_dir)
    plain, _ = build_datasets(DataConfig(path=str(data_file), cache_dir=""), tok)
    splits, report = build_datasets(config(data_file, augment_model=str(short_rewriter)), tok)
    aug = report["augment"]
    assert aug["method"] == "backtranslate" and aug["pivot"] == "French" and aug["model"] == str(short_rewriter)
    assert aug["augmented_candidates"] == len(plain["train"]) == sum(aug[k] for k in COUNTS)
    assert aug["added"] > 0 and aug["dropped_duplicate"] > 0  # the random model rewrites prompts to the same text
    assert splits["validation"] == plain["validation"] and splits["test"] == plain["test"]
    added = [ex for ex in splits["train"] if "augmented" in ex]
    assert splits["train"][: len(plain["train"])] == plain["train"] and len(added) == aug["added"]
    held_out = {prompt_of(ex) for name in ("validation", "test") for ex in splits[name]}
    originals = {ex["where"]: ex for ex in plain["train"]}
    for ex in added:
        source = originals[ex["where"].removesuffix(" (backtranslate)")]
        assert ex["messages"][-1] == source["messages"][-1]  # the answer is kept
        assert prompt_of(ex) != prompt_of(source) and prompt_of(ex) not in held_out
    assert report["tokenize"]["train"]["examples"] == len(splits["train"])
    assert len(aug["samples"]) == 8 and {"prompt", "pivot", "rewrite", "dropped"} <= set(aug["samples"][0])


def test_the_base_model_is_the_default_rewriter(data_file, tiny_dir, one_thread):  # noqa: F811
    """tiny_dir's model repeats the prompt's last token ("\\n") to the budget: every reply is empty once stripped."""
    tok = Tokenizer.from_dir(tiny_dir)
    splits, report = build_datasets(config(data_file, augment="paraphrase"), tok, base_model=str(tiny_dir))
    aug = report["augment"]
    assert aug["model"] == str(tiny_dir) and "pivot" not in aug
    assert aug["added"] == 0 and aug["dropped_empty"] == aug["augmented_candidates"] > 0


def test_a_rerun_is_served_from_the_cache(data_file, tiny_dir, short_rewriter, tmp_path, monkeypatch,  # noqa: F811
                                          random_rewriter, one_thread):  # fmt: skip
    tok, cfg = Tokenizer.from_dir(tiny_dir), config(data_file, tmp_path / "c", augment_model=str(short_rewriter))
    calls = {"load": 0, "generate": 0}
    real_load, real_generate = ftcore.formats.hf.load_pretrained, ftcore.model.generate.generate

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(ftcore.formats.hf, "load_pretrained", counted("load", real_load))
    monkeypatch.setattr(ftcore.model.generate, "generate", counted("generate", real_generate))
    first, r1 = build_datasets(cfg, tok)
    assert r1["cache"]["hit"] is False and calls["load"] == 1 and calls["generate"] > 0
    calls.update(load=0, generate=0)
    second, r2 = build_datasets(cfg, tok)
    assert r2["cache"]["hit"] is True and calls == {"load": 0, "generate": 0}
    assert second == first and r2["augment"] == r1["augment"]


def test_training_run_writes_the_counts(tiny_dir, short_rewriter, tmp_path, monkeypatch, random_rewriter,  # noqa: F811
                                        one_thread):  # fmt: skip
    """The loop's wiring: a tiny run with data.augment on the arithmetic demo (a 5% share rewritten); evaluating
    the run's test split afterwards (another data cache) rewrites nothing."""
    cfg = tiny_run(tiny_dir, str(tmp_path / "cache"), tmp_path / "run", train__max_steps=1, train__eval_every=0,
                   eval__baseline=False, data__augment="backtranslate", data__augment_model=str(short_rewriter),
                   data__augment_fraction=0.05, data__augment_keep_numbers=False, data__augment_length_ratio=50.0,
                   data__augment_max_new_tokens=12)  # fmt: skip
    assert train(run_config(cfg))["status"] == "finished"
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    aug = report["augment"]
    assert 40 < aug["augmented_candidates"] == sum(aug[k] for k in COUNTS)  # the demo's questions: mostly dropped

    def no_rewrites(*args, **kwargs):
        raise AssertionError("evaluating the test split loaded the rewriting model")

    monkeypatch.setattr(ftcore.data.augment, "load_rewriter", no_rewrites)
    run = json.loads((tmp_path / "run" / "config.json").read_text())
    run["data"]["cache_dir"] = str(tmp_path / "other_cache")
    (tmp_path / "run" / "config.json").write_text(json.dumps(run))
    ev = EvalConfig(max_examples=2, max_new_tokens=2, baseline=False)
    assert evaluate(EvalRunConfig(run_dir=str(tmp_path / "run"), eval=ev, out_dir=str(tmp_path / "ev")))["n"] == 2


def test_rewrites_are_cleaned_length_filtered_and_counted_after_it(tiny_dir, tmp_path, monkeypatch):  # noqa: F811
    """A scripted rewriter: HTML in a rewrite is cleaned away as the data's was; a rewrite too long for
    data.max_length is counted as removed, not added; a chat record with no user turn before its answer is not a
    candidate (and does not crash)."""
    tok = Tokenizer.from_dir(tiny_dir)
    records = [{"messages": [{"role": "user", "content": f"Add {i} and {i}."},
                             {"role": "assistant", "content": str(2 * i)}]} for i in range(30)]  # fmt: skip
    records.append({"messages": [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "ok"}]})
    data = write_jsonl(tmp_path / "chat.jsonl", records)

    def scripted(model, tokenizer, texts, instruction, fill, cfg):
        out = []
        for t in texts:
            i = int(t.split()[1])
            if i % 3 == 0:
                out.append((f"Sum {i} plus {i}, " + "please " * 60, False))  # too long for max_length
            elif i % 3 == 1:
                out.append((f"<b>Sum</b> {i} plus {i}.", False))  # cleaned to "Sum i plus i."
            else:
                out.append((f"Sum {i} plus {i}.", False))
        return out

    monkeypatch.setattr(ftcore.data.augment, "load_rewriter", lambda ref, device, dtype: (None, tok))
    monkeypatch.setattr(ftcore.data.augment, "rewrite", scripted)
    cfg = DataConfig(path=str(data), schema="chat", cache_dir="", augment="paraphrase", augment_model=str(tiny_dir),
                     augment_length_ratio=100.0, max_length=64)  # fmt: skip
    splits, report = build_datasets(cfg, tok)
    aug = report["augment"]
    real = [ex for ex in splits["train"] if "augmented" not in ex]
    assert any(last_user_turn(ex["messages"]) is None for ex in real)  # the record without a user turn is in train
    assert aug["augmented_candidates"] == sum(last_user_turn(ex["messages"]) is not None for ex in real)
    added = [prompt_of(ex) for ex in splits["train"] if "augmented" in ex]
    assert added and all("<b>" not in p and "please" not in p for p in added)
    assert aug["added"] == len(added) and aug["removed_over_max_length"] > 0
    assert aug["augmented_candidates"] == sum(aug[k] for k in COUNTS)
