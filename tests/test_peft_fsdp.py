"""Every method trains under FSDP2 (fully_shard per block, then the root) with the unsharded loss and gradients.

AdaLoRA's loss also holds its orthogonality penalty, computed on the sharded A and B after the forward (as the
training step does); its rank allocator then scores and masks the same triplets as the unsharded model.
COFT projects the gathered copy in its forward, so the stored shards are projected by project_shards (the training
step's OftStep), after which they equal the one-process parameters that the forward projected in place."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ftcore.model import ModelConfig, Transformer
from ftcore.peft import PeftConfig, apply
from ftcore.peft.adalora import orth_regularizer, whole
from ftcore.peft.oft import project_shards
from ftcore.train.step import set_fast_paths

# lora-fused: train.fused_lora under FSDP2; lora-embed: embed_tokens too (in the root's FSDP2 group)
METHODS = ["lora", "lora-fused", "lora-embed", "dora", "ia3", "prefix", "prompt", "pissa", "vera", "hira", "hra", "hra-gs",
           "loha", "lokr", "adalora", "ln_tuning", "oft", "coft", "lily", "ptuning", "ptuning-lstm", "boft"]  # fmt: skip


LORA = dict(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
OPTIONS = {"lora": LORA, "dora": LORA, "lora-embed": {**LORA, "target_modules": ["embed_tokens", "q_proj"]}, "prefix": dict(num_virtual_tokens=3, prefix_projection=True),
           "prompt": dict(num_virtual_tokens=3), "pissa": {**LORA, "init": "pissa"}, "vera": dict(r=8, dropout=0.0),
           "hira": dict(r=4, dropout=0.0), "hra": dict(r=4, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]),
           "hra-gs": dict(r=3, apply_GS=True), "loha": dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
           "lokr": dict(r=2, alpha=4, decompose_both=True, decompose_factor=8),
           "adalora": dict(init_r=4, target_r=2, tinit=0, tfinal=0, deltaT=1, total_step=4, dropout=0.0),
           "oft": dict(oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]),
           # one shared block ([1, 120]: one rank's shard is empty); lm_head is in the root's FSDP2 group
           "coft": dict(oft_block_size=16, coft=True, eps=0.2, block_share=True,
                        target_modules=["q_proj", "up_proj", "lm_head"]),
           "ptuning": dict(num_virtual_tokens=3, encoder_hidden_size=16),
           "ptuning-lstm": dict(num_virtual_tokens=3, encoder_reparameterization_type="LSTM", encoder_hidden_size=8),
           "lily": dict(r=4, stride_A=2, num_B=3, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]),
           "boft": dict(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=["q_proj", "v_proj", "down_proj"])}  # fmt: skip
METHOD = {"pissa": "lora", "lora-embed": "lora", "hra-gs": "hra", "coft": "oft", "ptuning-lstm": "ptuning"}


def build(method):
    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)
    model = Transformer(cfg)
    model.init_weights(std=0.08, generator=torch.Generator().manual_seed(0))
    name = method.removesuffix("-fused")
    apply(model, PeftConfig(method=METHOD.get(name, name), **OPTIONS.get(name, {})))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the no-op init, so that every adapter tensor matters
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def loss_of(model, rank):
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2 + rank))
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, 97), tokens[:, 1:].reshape(-1))


def penalty(model):
    """AdaLoRA's orthogonality penalty (the same on every rank), 0 for the other methods."""
    return 0.1 * orth_regularizer(list(model.adalora.layers.values())) if getattr(model, "adalora", None) else 0.0


def allocate(model):
    """One allocator step (after the gradients): the rank pattern it fixes and the masked E's, whole."""
    if getattr(model, "adalora", None) is None:
        return None, None
    model.adalora.steps = 2  # a masking step of the cubic schedule: budget int(28 * 0.5^3 + 28) = 31 of 56
    model.adalora.step()
    return model.adalora.rank_pattern, [whole(m.lora_E.detach()) for m in model.adalora.layers.values()]


def worker(rank, world, init_file):
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    for method in METHODS:
        ref = build(method)
        # the data-parallel mean, unsharded
        (sum(loss_of(ref, r) for r in range(world)).div(world) + penalty(ref)).backward()
        model = build(method)
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        set_fast_paths(model, fused_kernels=False, loss_chunk_size=0, fused_lora=method == "lora-fused")
        loss = loss_of(model, rank)
        (loss + penalty(model)).backward()
        for (name, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
            assert (p.grad is None) == (p_ref.grad is None), (method, name)
            if p.grad is not None:
                assert (p.grad.full_tensor() - p_ref.grad).abs().max() < 1e-5, (method, name)
        if method == "coft":
            sharded = dict(model.named_parameters())
            moved = max((sharded[n].full_tensor() - p).abs().max() for n, p in ref.named_parameters() if "oft_R" in n)
            assert moved > 1e-2  # the forward projected the gathered copies, not the shards
            project_shards(model)
            for name, p in ref.named_parameters():
                assert (sharded[name].full_tensor() - p).abs().max() < 1e-6, name
        (pattern, e), (pattern_ref, e_ref) = allocate(model), allocate(ref)
        assert pattern == pattern_ref, method
        if e is not None:
            assert sum(not k for kept in pattern.values() for k in kept) == 56 - 31  # 14 layers x 4 triplets, budget 31
            assert all(torch.equal(a, b) for a, b in zip(e, e_ref)), method
    dist.destroy_process_group()


@pytest.mark.dist
def test_fsdp2_gradients_match_unsharded(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)
