"""Cache: a second build is a hit with identical splits; the key follows data, tokenizer and settings."""

from test_data_common import FakeTokenizer, pairs, write_jsonl

from ftcore.data import cache
from ftcore.data.config import DataConfig
from ftcore.data.pipeline import build_datasets


def build(path, cache_dir, tok=None, **kw):
    return build_datasets(DataConfig(path=str(path), cache_dir=str(cache_dir), **kw), tok or FakeTokenizer())


def test_second_build_hits_and_matches(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", pairs(60))
    s1, r1 = build(data, tmp_path / "c")
    s2, r2 = build(data, tmp_path / "c")
    assert r1["cache"]["hit"] is False and r2["cache"]["hit"] is True and r1["cache"]["key"] == r2["cache"]["key"]
    assert s1 == s2
    assert {k: v for k, v in r1.items() if k != "cache"} == {k: v for k, v in r2.items() if k != "cache"}
    assert list((tmp_path / "c").iterdir()) == [tmp_path / "c" / r1["cache"]["key"]]  # no temporary left


def test_key_follows_contents_tokenizer_and_settings(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", pairs(20))
    tok = FakeTokenizer()
    files = {"train": data, "validation": None, "test": None}
    base = cache.cache_key(files, tok, DataConfig())
    assert cache.cache_key(files, tok, DataConfig(packing=True, seq_len=4096, cache_dir="x", task="arithmetic")) == base
    assert cache.cache_key(files, tok, DataConfig(template="plain")) != base
    assert cache.cache_key(files, tok, DataConfig(seed=1)) != base
    assert cache.cache_key(files, FakeTokenizer(template="llama3"), DataConfig()) != base
    copy = write_jsonl(tmp_path / "copy.jsonl", pairs(20))  # same bytes elsewhere: same key
    assert cache.cache_key({**files, "train": copy}, tok, DataConfig()) == base
    write_jsonl(data, pairs(21))
    assert cache.cache_key(files, tok, DataConfig()) != base


def test_tokenizer_directory_files_are_hashed(tmp_path):
    tok = FakeTokenizer()
    tok.path = tmp_path
    (tmp_path / "tokenizer_config.json").write_text("{}")
    a = cache.tokenizer_fingerprint(tok)
    (tmp_path / "tokenizer_config.json").write_text('{"x": 1}')
    assert cache.tokenizer_fingerprint(tok) != a


def test_unreadable_entry_is_a_miss_and_gets_rewritten(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", pairs(30))
    s1, r1 = build(data, tmp_path / "c")
    (tmp_path / "c" / r1["cache"]["key"] / "tokens.npz").write_bytes(b"garbage")
    assert cache.load(tmp_path / "c", r1["cache"]["key"]) is None
    s2, r2 = build(data, tmp_path / "c")
    assert r2["cache"]["hit"] is False and s2 == s1
