"""Batching: padding, packing (block-diagonal attention, per-document positions and labels), static shapes,
and packed batches giving the same per-token losses as each document alone."""

import random

import pytest
import torch
import torch.nn.functional as F
from test_data_common import FakeTokenizer

from ftcore.data.collate import Batcher, collate, pack
from ftcore.data.format import IGNORE, encode_example
from ftcore.errors import FtcoreError
from ftcore.model import ModelConfig, Transformer

TOK = FakeTokenizer()


def doc(ids, learn_from=1):
    return {"input_ids": list(ids), "labels": [IGNORE] * learn_from + list(ids[learn_from:])}


def test_pack_best_fit_decreasing():
    lengths = [6, 4, 5, 5, 3, 7, 10, 1]
    rows = pack(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 5 and [10] in [[lengths[i] for i in r] for r in rows]
    with pytest.raises(FtcoreError, match="does not fit in data.seq_len=10"):
        pack([11], 10)


def test_padding_batch_shifts_targets_within_each_example():
    batch = collate([[doc([5, 6, 7, 8], learn_from=2)], [doc([9, 10])]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["targets"].tolist() == [[IGNORE, 7, 8, IGNORE], [10, IGNORE, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[True] * 4, [True, True, False, False]]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3]
    static = collate([[doc([9, 10])]], pad_id=0, length=6)
    assert static["input_ids"].shape == (1, 6) and static["attention_mask"].dtype == torch.bool
    assert static["position_ids"].tolist() == [[0, 1, 0, 0, 0, 0]]  # padding at 0 (LongRoPE reads the largest)


def test_packed_row_positions_targets_and_block_diagonal_mask():
    batch = collate([[doc([1, 2, 3]), doc([4, 5])]], pad_id=0, length=6, packed=True)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert batch["targets"].tolist() == [[2, 3, IGNORE, 5, IGNORE, IGNORE]]  # 3 never predicts 4
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)  # fmt: skip
    assert batch["attention_mask"].shape == (1, 1, 6, 6)
    assert torch.equal(batch["attention_mask"][0, 0], expected)


def tiny_model(vocab_size):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2)  # fmt: skip
    model = Transformer(cfg)
    model.init_weights(std=0.1)
    return model.eval()


def token_losses(model, batch):
    logits = model(batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"])
    return F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE, reduction="none")


def conversations(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": "q" * rng.randint(1, 20)}, {"role": "assistant", "content": "a" * rng.randint(1, 12)}]
        if i % 3 == 0:
            msgs += [{"role": "user", "content": "more?"}, {"role": "assistant", "content": "b" * rng.randint(1, 6)}]
        out.append(encode_example(msgs, "chat", TOK))
    return out


def test_packed_losses_equal_unpacked_per_document():
    docs = conversations(12)
    model = tiny_model(TOK.vocab_size)
    batcher = Batcher(docs, TOK.pad_id, packing=True, seq_len=160)
    assert len(batcher) < len(docs)  # several documents share rows
    packed = batcher(list(range(len(batcher))))
    assert packed["input_ids"].shape == (len(batcher), 160)
    with torch.no_grad():
        got = token_losses(model, packed).view(len(batcher), 160)
        checked = 0
        for r, row in enumerate(batcher.rows):
            t = 0
            for i in row:
                alone = collate([[docs[i]]], TOK.pad_id)  # no padding: plain causal attention
                n = alone["input_ids"].shape[1]
                want = token_losses(model, alone)
                mask = alone["targets"][0] != IGNORE
                assert torch.equal(packed["targets"][r, t : t + n] != IGNORE, mask)
                torch.testing.assert_close(got[r, t : t + n][mask], want[mask], rtol=0, atol=1e-5)
                checked += int(mask.sum())
                t += n
    assert checked == sum(sum(lab != IGNORE for lab in d["labels"][1:]) for d in docs)


def test_padded_losses_equal_unpadded():
    docs = conversations(5, seed=1)
    model = tiny_model(TOK.vocab_size)
    batch = Batcher(docs, TOK.pad_id)(list(range(5)))
    with torch.no_grad():
        got = token_losses(model, batch).view(5, -1)
        for i, d in enumerate(docs):
            alone = collate([[d]], TOK.pad_id)
            n, mask = alone["input_ids"].shape[1], alone["targets"][0] != IGNORE
            torch.testing.assert_close(got[i, :n][mask], token_losses(model, alone)[mask], rtol=0, atol=1e-5)


def test_static_shape_always_batch_by_seq_len():
    docs = conversations(10, seed=2)
    for packing in (False, True):
        batcher = Batcher(docs, TOK.pad_id, packing=packing, seq_len=200, static_shape=True)
        assert len(batcher) >= 2
        for idx in ([0], [0, 1]):
            b = batcher(idx)
            assert b["input_ids"].shape == (len(idx), 200) and b["position_ids"].shape == (len(idx), 200)
    assert Batcher(docs, TOK.pad_id)([0, 1])["input_ids"].shape[1] == max(len(d["input_ids"]) for d in docs[:2])
    # a last, short batch padded with empty rows keeps the shape (and the empty rows carry no loss)
    for packing in (False, True):
        b = Batcher(docs, TOK.pad_id, packing=packing, seq_len=200, static_shape=True)([0], pad_to=3)
        assert b["input_ids"].shape == (3, 200) and (b["targets"][1:] == IGNORE).all()
        with torch.no_grad():
            logits = tiny_model(TOK.vocab_size)(b["input_ids"], position_ids=b["position_ids"],
                                                attention_mask=b["attention_mask"])  # fmt: skip
        assert torch.isfinite(logits).all()
