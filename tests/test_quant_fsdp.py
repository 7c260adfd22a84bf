"""QLoRA under FSDP2 (gloo, 2 processes): the 4-bit storage (and a GGUF base's blocks) shards by rows with
fully_shard and all-gathers to the same bytes, so the gathered weight dequantizes to exactly the unsharded one;
LoRA gradients reach every adapter parameter and equal the unsharded model's; gather_model rebuilds the whole
quantized model on rank 0."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_gguf import tiny_gguf  # noqa: F401 (fixture)
from torch import nn

from ftcore.formats.hf import load_model
from ftcore.model import ModelConfig, Transformer
from ftcore.peft import PeftConfig, apply
from ftcore.quant import Linear4bit, QuantStorage
from ftcore.quant.linear import QuantSpec

# (quantization, method): NF4 with double quantization (uint8 absmax codes) and FP4 without (float32 absmax as bits)
CASES = [(QuantSpec("nf4", 64, True), dict(method="lora", r=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])),
         (QuantSpec("fp4", 32, False), dict(method="dora", r=4, alpha=8, target_modules=["k_proj", "o_proj", "up_proj"])),
         # a GGUF base (test_gguf's tiny file: Q4_0/Q4_1/Q5_x/Q8_0 linears, a Q8_0 embedding tied to lm_head)
         (QuantSpec("gguf", 64, True), dict(method="lora", r=4, alpha=8, target_modules=["q_proj", "down_proj", "lm_head"]))]  # fmt: skip


def build(spec: QuantSpec, peft: dict, gguf: str) -> Transformer:
    if spec.quant_type == "gguf":
        model = load_model(gguf, quant=spec)
    else:  # 1 KV head: k/v have 16 rows (8 per rank)
        cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=1)
        model = Transformer(cfg)
        model.init_weights(std=0.08, generator=torch.Generator().manual_seed(0))
        for name, m in list(model.layers.named_modules()):
            if isinstance(m, nn.Linear):
                parent, _, leaf = name.rpartition(".")
                setattr(model.layers.get_submodule(parent), leaf, Linear4bit.from_weight(m.weight.detach(), None, spec))
    apply(model, PeftConfig(dropout=0.0, **peft))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the no-op init (B = 0), so that every adapter tensor gets a gradient
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def loss_of(model, rank):
    v = model.cfg.vocab_size
    tokens = torch.randint(0, v, (2, 12), generator=torch.Generator().manual_seed(2 + rank))
    return F.cross_entropy(model(tokens[:, :-1]).reshape(-1, v), tokens[:, 1:].reshape(-1))


def worker(rank, world, init_file, fused_lora, gguf):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ftcore.train.parallel import World, gather_model
    from ftcore.train.step import set_fast_paths

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    for spec, peft in CASES:
        ref = build(spec, peft, gguf)
        sum(loss_of(ref, r) for r in range(world)).div(world).backward()  # the data-parallel mean, unsharded
        model = build(spec, peft, gguf)
        mp_policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mp_policy=mp_policy)
        fully_shard(model, mp_policy=mp_policy)
        set_fast_paths(model, fused_kernels=False, loss_chunk_size=0, fused_lora=fused_lora)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantStorage)}
        storage = [p for m in layers.values() for n, p in m.named_parameters() if n != "bias"]
        assert storage and all(type(p).__name__ == "DTensor" for p in storage)  # sharded by rows
        if spec.quant_type != "gguf":
            shard = layers["layers.0.mlp.down_proj" + (".base_layer" if peft["method"] == "lora" else "")]
            assert shard.packed.to_local().shape == (32, 64)  # 64 rows / 2 ranks, 128 / 2 packed bytes
        loss_of(model, rank).backward()
        params = dict(model.named_parameters())
        for name, p_ref in ref.named_parameters():
            p = params[name]
            assert (p.grad is None) == (p_ref.grad is None), name
            if p_ref.requires_grad:  # every adapter parameter gets its (nonzero) gradient: nothing trains silently
                assert p_ref.grad.abs().max() > 0 and (p.grad.full_tensor() - p_ref.grad).abs().max() < 1e-5, name
        whole = gather_model(model, World("fsdp", rank, world, torch.device("cpu")))
        if rank == 0:  # the gathered 4-bit tensors are the unsharded ones, byte for byte, and dequantize the same
            ref_layers = {n: m for n, m in ref.named_modules() if isinstance(m, QuantStorage)}
            got = {n: m for n, m in whole.named_modules() if isinstance(m, QuantStorage)}
            assert got.keys() == ref_layers.keys()
            for name, m in got.items():
                mine, theirs = dict(m.named_parameters()), dict(ref_layers[name].named_parameters())
                assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
                assert torch.equal(m.dequantized(), ref_layers[name].dequantized()), name
            if whole.cfg.tie_word_embeddings:  # the gathered head shares the embedding's blocks again
                assert whole.lm_head.base_layer.blocks is whole.embed_tokens.blocks
            tokens = torch.randint(0, whole.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
            with torch.no_grad():
                assert (whole(tokens) - ref(tokens)).abs().max() < 1e-5
    dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.parametrize("fused_lora", [False, True])
def test_fsdp2_qlora_gradients_match_unsharded(tmp_path, tiny_gguf, fused_lora):  # noqa: F811
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    gguf, _ = tiny_gguf(tied=True)
    mp.spawn(worker, args=(2, str(tmp_path / "rendezvous"), fused_lora, str(gguf)), nprocs=2, join=True)
