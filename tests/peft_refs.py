"""HF PEFT references for the ftcore.peft tests: matching configs per method, random adapters, a tiny tokenizer."""

import copy
import json

import torch

from ftcore.model import ModelConfig

VOCAB = 97
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# id -> (our PeftConfig kwargs, PEFT config kwargs). The regex spec also targets lm_head.
SPECS = {
    "lora": (dict(method="lora", r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]),
             dict(kind="LoraConfig", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "lora_regex": (dict(method="lora", r=2, alpha=3, dropout=0.0, target_modules=r".*\.(k_proj|up_proj)|lm_head"),
                   dict(kind="LoraConfig", r=2, lora_alpha=3, target_modules=r".*\.(k_proj|up_proj)|lm_head")),
    # LoRA on the token embedding too (lora_embedding_A/B; PEFT's Embedding layer)
    "lora_embed": (dict(method="lora", r=4, alpha=8, dropout=0.0, target_modules=["embed_tokens", "q_proj", "v_proj"]),
                   dict(kind="LoraConfig", r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"])),
    "rslora": (dict(method="lora", r=4, alpha=8, dropout=0.0, use_rslora=True, target_modules=ALL_LINEAR),
               dict(kind="LoraConfig", r=4, lora_alpha=8, use_rslora=True, target_modules=ALL_LINEAR)),
    "dora": (dict(method="dora", r=4, alpha=8, dropout=0.0, target_modules=ALL_LINEAR),
             dict(kind="LoraConfig", r=4, lora_alpha=8, use_dora=True, target_modules=ALL_LINEAR)),
    "pissa": (dict(method="lora", r=4, alpha=8, dropout=0.0, init="pissa", target_modules=["q_proj", "v_proj", "down_proj"]),
              dict(kind="LoraConfig", r=4, lora_alpha=8, init_lora_weights="pissa",
                   target_modules=["q_proj", "v_proj", "down_proj"])),
    "olora_rslora": (dict(method="lora", r=4, alpha=8, dropout=0.0, init="olora", use_rslora=True, target_modules=ALL_LINEAR),
                     dict(kind="LoraConfig", r=4, lora_alpha=8, init_lora_weights="olora", use_rslora=True,
                          target_modules=ALL_LINEAR)),
    "pissa_dora": (dict(method="dora", r=2, alpha=4, dropout=0.0, init="pissa", target_modules=["k_proj", "up_proj"]),
                   dict(kind="LoraConfig", r=2, lora_alpha=4, init_lora_weights="pissa", use_dora=True,
                        target_modules=["k_proj", "up_proj"])),
    "adalora": (dict(method="adalora", init_r=4, target_r=2, total_step=10, alpha=8, dropout=0.0,
                     target_modules=["q_proj", "v_proj", "down_proj"]),
                dict(kind="AdaLoraConfig", init_r=4, target_r=2, total_step=10, lora_alpha=8,
                     target_modules=["q_proj", "v_proj", "down_proj"])),
    "vera": (dict(method="vera", r=8, dropout=0.0, projection_prng_key=7, d_initial=0.5,
                  target_modules=["q_proj", "v_proj", "down_proj"]),
             dict(kind="VeraConfig", r=8, projection_prng_key=7, d_initial=0.5,
                  target_modules=["q_proj", "v_proj", "down_proj"])),
    "vera_unsaved": (dict(method="vera", r=4, dropout=0.0, save_projection=False, target_modules=ALL_LINEAR),
                     dict(kind="VeraConfig", r=4, save_projection=False, target_modules=ALL_LINEAR)),
    "hira": (dict(method="hira", r=4, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]),
             dict(kind="HiraConfig", r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    "hira_gaussian": (dict(method="hira", r=2, dropout=0.0, init="gaussian", target_modules=ALL_LINEAR),
                      dict(kind="HiraConfig", r=2, init_weights="gaussian", target_modules=ALL_LINEAR)),
    "hra": (dict(method="hra", r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
            dict(kind="HRAConfig", r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    # Gram-Schmidt, odd r (PEFT's init_weights=True is then random too), lm_head by regex
    "hra_gs": (dict(method="hra", r=3, apply_GS=True, target_modules=r".*\.(k_proj|o_proj|up_proj)|lm_head"),
               dict(kind="HRAConfig", r=3, apply_GS=True, target_modules=r".*\.(k_proj|o_proj|up_proj)|lm_head")),
    "hra_random": (dict(method="hra", r=2, init="random", target_modules=ALL_LINEAR),
                   dict(kind="HRAConfig", r=2, init_weights=False, target_modules=ALL_LINEAR)),
    # LN tuning: PEFT's Llama default (every RMSNorm), a list, a regex
    "ln_tuning": (dict(method="ln_tuning"), dict(kind="LNTuningConfig")),
    "ln_tuning_list": (dict(method="ln_tuning", ln_tuning_target_modules=["input_layernorm", "norm"]),
                       dict(kind="LNTuningConfig", target_modules=["input_layernorm", "norm"])),
    "ln_tuning_regex": (dict(method="ln_tuning", ln_tuning_target_modules=r"model\.layers\.1\..*layernorm"),
                        dict(kind="LNTuningConfig", target_modules=r"model\.layers\.1\..*layernorm")),
    "loha": (dict(method="loha", r=4, alpha=8, rank_dropout=0.2, module_dropout=0.1,
                  target_modules=["q_proj", "v_proj", "down_proj"]),
             dict(kind="LoHaConfig", r=4, alpha=8, rank_dropout=0.2, module_dropout=0.1,
                  target_modules=["q_proj", "v_proj", "down_proj"])),
    "loha_regex": (dict(method="loha", r=2, alpha=3, target_modules=r".*\.(k_proj|up_proj)|lm_head"),
                   dict(kind="LoHaConfig", r=2, alpha=3, target_modules=r".*\.(k_proj|up_proj)|lm_head")),
    # default split: q/o w1 (8, 8) x w2 (8, 8); k/v (4, 8) x (8, 8); gate/up (8, 8) x w2_a (12, 4) w2_b (4, 8)
    "lokr": (dict(method="lokr", r=4, alpha=8, target_modules=ALL_LINEAR),
             dict(kind="LoKrConfig", r=4, alpha=8, target_modules=ALL_LINEAR)),
    # factor 16: w1 low-rank everywhere (w1_a [16, 2]; lm_head's 97 is prime: [1, 2]), w2 full for q/v, low-rank for
    # down ([4, 2] x [2, 6]) and lm_head ([97, 2] x [2, 4])
    "lokr_decompose": (dict(method="lokr", r=2, alpha=3, decompose_both=True, decompose_factor=16,
                            rank_dropout=0.3, rank_dropout_scale=True, init="lycoris",
                            target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]),
                       dict(kind="LoKrConfig", r=2, alpha=3, decompose_both=True, decompose_factor=16,
                            rank_dropout=0.3, rank_dropout_scale=True, init_weights="lycoris",
                            target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])),
    # factor 4 without decompose_both: w1 [4, 4] full, w2 full but for down_proj ([16, 8] x [8, 24]); scale 1/4
    "lokr_factor": (dict(method="lokr", r=8, alpha=2, decompose_factor=4, module_dropout=0.5,
                         target_modules=["q_proj", "k_proj", "down_proj"]),
                    dict(kind="LoKrConfig", r=8, alpha=2, decompose_factor=4, module_dropout=0.5,
                         target_modules=["q_proj", "k_proj", "down_proj"])),
    # OFT: block 8 (q/v [8, 28]; down_proj's in 96: [12, 28]); Cayley-Neumann, PEFT's default
    "oft": (dict(method="oft", oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"]),
            dict(kind="OFTConfig", oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    # sized by r (4 blocks of 16; down_proj 4 x 24), the exact Cayley transform, lm_head (in 64) too
    "oft_r_cayley": (dict(method="oft", r=4, oft_block_size=0, use_cayley_neumann=False,
                          target_modules=["k_proj", "o_proj", "down_proj", "lm_head"]),
                     dict(kind="OFTConfig", r=4, oft_block_size=0, use_cayley_neumann=False,
                          target_modules=["k_proj", "o_proj", "down_proj", "lm_head"])),
    # one shared block; block 12 moves to a divisor (64: 8, the tie to the smaller; 96: 12); 3 Neumann terms
    "oft_share": (dict(method="oft", oft_block_size=12, block_share=True, num_cayley_neumann_terms=3,
                       target_modules=ALL_LINEAR),
                  dict(kind="OFTConfig", oft_block_size=12, block_share=True, num_cayley_neumann_terms=3,
                       target_modules=ALL_LINEAR)),
    # COFT: the random vectors are projected (in place) into the eps ball at the first forward
    "coft": (dict(method="oft", oft_block_size=16, coft=True, eps=0.5, target_modules=["q_proj", "up_proj"]),
             dict(kind="OFTConfig", oft_block_size=16, coft=True, eps=0.5, target_modules=["q_proj", "up_proj"])),
    # Lily: q/v/down each a group (one A per 2 layers, 3 experts); the regex groups by shape (k/v [32, 64], up [96, 64])
    "lily": (dict(method="lily", r=4, stride_A=2, num_B=3, target_modules=["q_proj", "v_proj", "down_proj"]),
             dict(kind="LilyConfig", r=4, stride_A=2, num_B=3, target_modules=["q_proj", "v_proj", "down_proj"])),
    "lily_regex": (dict(method="lily", r=3, num_B=2, scaling=0.5, init_weights=False,
                        target_modules=r".*\.(k_proj|v_proj|up_proj)|lm_head"),
                   dict(kind="LilyConfig", r=3, num_B=2, scaling=0.5, init_weights=False,
                        target_modules=r".*\.(k_proj|v_proj|up_proj)|lm_head")),
    # BOFT: q/v 8 blocks of 8 (down_proj: 12 of 8); block_num 8 with 2 butterfly factors (down_proj: 8 blocks of 12);
    # 3 factors of 16 blocks of 4 on k/up and lm_head. (PEFT's factors > 1 need fbd_cuda: use_fbd_standin)
    "boft": (dict(method="boft", boft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"]),
             dict(kind="BOFTConfig", boft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "boft_butterfly": (dict(method="boft", boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=2,
                            boft_dropout=0.1, target_modules=ALL_LINEAR),
                       dict(kind="BOFTConfig", boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=2,
                            boft_dropout=0.1, target_modules=ALL_LINEAR)),
    "boft_regex": (dict(method="boft", boft_block_size=4, boft_n_butterfly_factor=3,
                        target_modules=r".*\.(k_proj|up_proj)|lm_head"),
                   dict(kind="BOFTConfig", boft_block_size=4, boft_n_butterfly_factor=3,
                        target_modules=r".*\.(k_proj|up_proj)|lm_head")),
    "ia3": (dict(method="ia3"),
            dict(kind="IA3Config", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "ia3_regex": (dict(method="ia3", ia3_target_modules=r".*\.(q_proj|o_proj|gate_proj)", feedforward_modules=r".*o_proj"),
                  dict(kind="IA3Config", target_modules=r".*\.(q_proj|o_proj|gate_proj)", feedforward_modules=r".*o_proj")),
    "prefix": (dict(method="prefix", num_virtual_tokens=3),
               dict(kind="PrefixTuningConfig", num_virtual_tokens=3)),
    "prefix_proj": (dict(method="prefix", num_virtual_tokens=3, prefix_projection=True, prefix_hidden_size=16),
                    dict(kind="PrefixTuningConfig", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16)),
    # P-tuning: PEFT saves (and ftcore writes) the encoder's output; both load it as fixed soft tokens
    "ptuning_mlp": (dict(method="ptuning", num_virtual_tokens=3, encoder_hidden_size=16),
                    dict(kind="PromptEncoderConfig", num_virtual_tokens=3, encoder_hidden_size=16)),
    "ptuning_lstm": (dict(method="ptuning", num_virtual_tokens=4, encoder_reparameterization_type="LSTM",
                          encoder_hidden_size=8, encoder_num_layers=2, encoder_dropout=0.1),
                     dict(kind="PromptEncoderConfig", num_virtual_tokens=4, encoder_reparameterization_type="LSTM",
                          encoder_hidden_size=8, encoder_num_layers=2, encoder_dropout=0.1)),
    "prompt_random": (dict(method="prompt", num_virtual_tokens=4),
                      dict(kind="PromptTuningConfig", num_virtual_tokens=4)),
    "prompt_vocab": (dict(method="prompt", num_virtual_tokens=4, prompt_init="sample_vocab"),
                     dict(kind="PromptTuningConfig", num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB")),
    "prompt_text": (dict(method="prompt", num_virtual_tokens=5, prompt_init="text", init_text="t5 t9 t7"),
                    dict(kind="PromptTuningConfig", num_virtual_tokens=5, prompt_tuning_init="TEXT",
                         prompt_tuning_init_text="t5 t9 t7")),
}  # fmt: skip

# Specs for Phi-3's fused layers (qkv_proj, gate_up_proj), and PEFT's "all-linear", tested per family (test_peft_parity)
FAMILY_SPECS = {
    "lora_all_linear": (dict(method="lora", r=4, alpha=8, dropout=0.0, target_modules="all-linear"),
                        dict(kind="LoraConfig", r=4, lora_alpha=8, target_modules="all-linear")),
    "dora_fused": (dict(method="dora", r=4, alpha=8, dropout=0.0, target_modules=["qkv_proj", "gate_up_proj"]),
                   dict(kind="LoraConfig", r=4, lora_alpha=8, use_dora=True, target_modules=["qkv_proj", "gate_up_proj"])),
    "ia3_fused": (dict(method="ia3", ia3_target_modules=["qkv_proj", "down_proj"], feedforward_modules=["down_proj"]),
                  dict(kind="IA3Config", target_modules=["qkv_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "oft_fused": (dict(method="oft", oft_block_size=8, target_modules=["qkv_proj", "gate_up_proj", "o_proj"]),
                  dict(kind="OFTConfig", oft_block_size=8, target_modules=["qkv_proj", "gate_up_proj", "o_proj"])),
}  # fmt: skip


class FbdStandin:
    """A plain-PyTorch stand-in for HF PEFT's BOFT CUDA extension (fbd_cuda: forward/backward of a batched block
    diagonal), so that PEFT itself runs boft_n_butterfly_factor > 1 on the CPU. Without it PEFT silently uses
    one factor. Test-only: ftcore never uses PEFT or this."""

    @staticmethod
    def forward(x):  # [N, D, H, H] -> [N, D H, D H], each of the N a block diagonal
        return [torch.stack([torch.block_diag(*blocks.unbind(0)) for blocks in x])]

    @staticmethod
    def backward(grad, x):  # the diagonal blocks of the gradient
        h = x.shape[-1]
        return [torch.stack([grad[:, d * h : (d + 1) * h, d * h : (d + 1) * h] for d in range(x.shape[1])], 1)]


def use_fbd_standin():
    import peft.tuners.boft.layer as boft_layer

    boft_layer._FBD_CUDA = FbdStandin()


def peft_config(spec: str, tokenizer_dir=None):
    import peft

    kwargs = dict({**SPECS, **FAMILY_SPECS}[spec][1])
    kind = kwargs.pop("kind")
    if kind == "BOFTConfig":
        use_fbd_standin()
    if kind in ("PrefixTuningConfig", "PromptTuningConfig", "PromptEncoderConfig"):
        kwargs["task_type"] = "CAUSAL_LM"
    if kwargs.get("prompt_tuning_init") == "TEXT":
        kwargs["tokenizer_name_or_path"] = str(tokenizer_dir)
    return getattr(peft, kind)(**kwargs)


def our_config(spec: str, tokenizer_dir=None):
    from ftcore.peft import PeftConfig

    kwargs = dict({**SPECS, **FAMILY_SPECS}[spec][0])
    if kwargs.get("prompt_init") == "text":
        kwargs["tokenizer_path"] = str(tokenizer_dir)
    return PeftConfig(**kwargs)


@torch.no_grad()
def randomize_(params, seed: int = 0, std: float = 0.3):
    """Non-trivial adapter values: IA3, DoRA and BOFT scales (and LN tuning's norm weights) 1 + N(0, std), everything
    else ~ N(0, std)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in params:
        noise = torch.randn(p.shape, generator=g)
        if "ia3_l" in name or "boft_s" in name:
            p.copy_(1 + std * noise)
        elif "lora_magnitude_vector" in name or "ln_tuning_layers" in name:
            p.mul_(1 + std * noise)
        else:
            p.copy_(std * noise)


# SmolLM2-135M's shape, for the budget tests (no weights)
SMOLLM2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                      num_kv_heads=3, tie_word_embeddings=True)  # fmt: skip


def save_both(ref, path, spec: str, tmp_path):
    """A new adapter of `spec` saved by PEFT (over the transformers model `ref`) to tmp_path/peft and by ftcore (over
    the same checkpoint at `path`) to tmp_path/ours."""
    import peft

    from ftcore.formats.hf import load_model
    from ftcore.peft import apply, save_adapter

    peft.get_peft_model(copy.deepcopy(ref), peft_config(spec)).save_pretrained(tmp_path / "peft")
    save_adapter(apply(load_model(path), our_config(spec)), tmp_path / "ours")


def adapter_configs(tmp_path) -> tuple[dict, dict]:
    """(PEFT's, ours): tmp_path/{peft,ours}/adapter_config.json, without the bookkeeping PEFT adds itself
    (auto_mapping, peft_version, task_type), target_modules lists sorted (PEFT saves a set)."""
    configs = []
    for d in ("peft", "ours"):
        config = json.loads((tmp_path / d / "adapter_config.json").read_text())
        for key in ("auto_mapping", "peft_version", "task_type"):
            config.pop(key, None)
        if isinstance(config["target_modules"], list):
            config["target_modules"] = sorted(config["target_modules"])
        configs.append(config)
    return configs[0], configs[1]


def peft_model(base, spec: str, tokenizer_dir=None, seed: int = 0, randomize: bool = True):
    """A PEFT-wrapped deep copy of the transformers model `base`, with random adapter values (eval mode)."""
    import peft

    model = peft.get_peft_model(copy.deepcopy(base), peft_config(spec, tokenizer_dir))
    if randomize:
        randomize_([(n, p) for n, p in model.named_parameters() if p.requires_grad], seed)
    return model.eval()


def peft_logits(model, tokens, mask=None):
    """PEFT's logits for the real tokens [B, T, V] (prompt tuning returns the soft tokens' too)."""
    with torch.no_grad():
        out = model(input_ids=tokens, attention_mask=mask).logits
    return out[:, -tokens.shape[1] :]


def make_tokenizer(out_dir):
    """A word-level tokenizer over t0..t96 (no special-token post-processing), loadable by transformers and ftcore.

    NOTE: transformers matches the special token "t1" inside "t10".."t19", so test texts avoid those.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "t1", "eos_token": "t2", "unk_token": "t0",
              "add_bos_token": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return out_dir
