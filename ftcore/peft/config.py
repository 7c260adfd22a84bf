"""PeftConfig: one typed, validated dataclass for every method (Hydra's `peft` group maps onto it).

Field names are ours; io.py translates them to and from HF PEFT's adapter_config.json.
"""

import re
from dataclasses import MISSING, dataclass, field, fields

from ftcore.schema import invalid, one_of

METHODS = ("none", "full", "lora", "dora", "ia3", "prefix", "prompt", "ptuning", "vera", "hira", "hra", "loha", "lokr",
           "adalora", "oft", "boft", "lily", "ln_tuning")
# PEFT's init_lora_weights=True / "gaussian" (B starts at zero), "pissa" / "pissa_niter_<N>" / "olora" (the
# adapter starts at W's principal / QR part and the base keeps the residual: see lora_init.py)
LORA_INITS = ("kaiming-uniform", "gaussian", "pissa", "pissa_niter_<N>", "olora")
# LoHa / LoKr: PEFT's init_weights=True (one factor at zero) / LoKr's "lycoris" (the other factor at zero)
LYCORIS_INITS = {"loha": ("kaiming-uniform",), "lokr": ("kaiming-uniform", "lycoris")}
# HRA: PEFT's init_weights=True (symmetric pairs of equal columns for even r: the identity) / False ("random")
HRA_INITS = ("kaiming-uniform", "random")
PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def is_principal(init: str) -> bool:
    """PiSSA/OLoRA: the adapter starts at a part of W and the base weight keeps the residual."""
    return init == "pissa" or init == "olora" or PISSA_NITER.fullmatch(init) is not None
# The options that belong to some methods only: set on another method (away from the default) they are an error.
METHOD_OPTIONS = {
    "r": ("lora", "dora", "vera", "hira", "hra", "loha", "lokr", "oft", "lily"),
    "alpha": ("lora", "dora", "loha", "lokr", "adalora"),
    "dropout": ("lora", "dora", "vera", "hira", "adalora"),
    "target_modules": ("lora", "dora", "vera", "hira", "hra", "loha", "lokr", "adalora", "oft", "boft", "lily"),
    "use_rslora": ("lora", "dora"), "init": ("lora", "dora", "hira", "hra", "loha", "lokr"),
    "apply_GS": ("hra",),
    "projection_prng_key": ("vera",), "save_projection": ("vera",), "d_initial": ("vera",),
    **dict.fromkeys(("stride_A", "num_B", "scaling", "init_weights"), ("lily",)),
    "ia3_target_modules": ("ia3",), "feedforward_modules": ("ia3",),
    "ln_tuning_target_modules": ("ln_tuning",),
    "rank_dropout": ("loha", "lokr"), "module_dropout": ("loha", "lokr", "oft"), "decompose_both": ("lokr",),
    "decompose_factor": ("lokr",), "rank_dropout_scale": ("lokr",),
    **dict.fromkeys(("oft_block_size", "coft", "eps", "block_share", "use_cayley_neumann", "num_cayley_neumann_terms"),
                    ("oft",)),
    **dict.fromkeys(("boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "boft_dropout"), ("boft",)),
    "num_virtual_tokens": ("prefix", "prompt", "ptuning"),
    **dict.fromkeys(("encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout"),
                    ("ptuning",)), "prefix_projection": ("prefix",), "prefix_hidden_size": ("prefix",),
    "prompt_init": ("prompt",), "init_text": ("prompt",), "tokenizer_path": ("prompt",), "freeze": ("full",),
    **dict.fromkeys(("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                     "total_step"), ("adalora",)),
}  # fmt: skip
PROMPT_INITS = ("random", "sample_vocab", "text")
PTUNING_ENCODERS = ("MLP", "LSTM")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# LN tuning: PEFT's default targets for Llama (and Mistral, Gemma); its Qwen2/Qwen3 default is post_attention_layernorm
ALL_NORMS = ("input_layernorm", "post_attention_layernorm", "norm")


@dataclass
class PeftConfig:
    method: str = "lora"
    # LoRA / DoRA
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    # names, one regex, or "all-linear" (every linear layer but lm_head: Phi-3's qkv_proj, gate_up_proj, ...)
    target_modules: list[str] | str = field(default_factory=lambda: list(ALL_LINEAR))
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    init: str = "kaiming-uniform"  # kaiming-uniform (PEFT's default) | gaussian | pissa | pissa_niter_<N> | olora
    # (hira: kaiming-uniform | gaussian; loha: kaiming-uniform; lokr: kaiming-uniform | lycoris;
    #  hra: kaiming-uniform (PEFT's init_weights=True) | random (init_weights=False))
    # VeRA: frozen random A [r, max in] and B [max out, r] shared by all layers, drawn from projection_prng_key;
    # per layer the trainable scales lambda_d [r] (starting at d_initial) and lambda_b [out] (starting at 0)
    projection_prng_key: int = 0
    save_projection: bool = True  # write the shared A/B into the adapter (else regenerated from the key)
    d_initial: float = 0.1
    # AdaLoRA (PEFT's names): every layer starts at rank init_r; the total budget shrinks on a cubic schedule
    # from step tinit to step total_step - tfinal down to target_r per layer (masking every deltaT steps)
    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 - PEFT's name
    beta1: float = 0.85  # smoothing of the importance
    beta2: float = 0.85  # smoothing of its uncertainty
    orth_reg_weight: float = 0.5  # the orthogonality penalty on the loss
    total_step: int = 0  # 0 = the run's length in steps (train.max_steps, or train.epochs in steps)
    # HRA: W R with R = r Householder reflections of the columns of hra_u [in, r] (r, target_modules, init above)
    apply_GS: bool = False  # noqa: N815 - PEFT's name: R = I - 2 Q Q^T with Q the Gram-Schmidt of hra_u
    # LoHa / LoKr (LyCORIS; r, alpha, target_modules, init as above; no input dropout). Training mode only:
    rank_dropout: float = 0.0  # drop rows (output features) of the update dW
    module_dropout: float = 0.0  # skip a layer's whole update
    # LoKr: dW = alpha / r * kron(W1 [a, c], W2 [b, d]) with out = a b, in = c d (lokr.py)
    decompose_both: bool = False  # W1 low-rank too (W2 is whenever r < max(b, d) / 2)
    decompose_factor: int = -1  # a, c = this factor where it divides; -1: the divisor nearest the square root
    rank_dropout_scale: bool = False  # divide the rank-dropout mask by its mean (LoHa always does)
    # OFT (oft.py; PEFT's names and defaults): the input rotated by a block-diagonal orthogonal matrix, sized by
    # exactly one of r (the number of blocks) and oft_block_size (their size); 0 = unset. r left at its default
    # (16, LoRA's) counts as unset while oft_block_size is set, so PeftConfig(method="oft") is PEFT's block 32.
    # module_dropout is accepted and, as in PEFT 0.21.2's Linear layers, has no effect.
    oft_block_size: int = 32
    coft: bool = False  # constrained OFT: each block's skew matrix kept within eps / sqrt(n_blocks)
    eps: float = 6e-5
    block_share: bool = False  # one block, repeated (oft_R.weight [1, b (b - 1) / 2])
    use_cayley_neumann: bool = True  # R = I + 2Q + 2Q^2 + ... (num_cayley_neumann_terms); False: (I - Q)(I + Q)^-1
    num_cayley_neumann_terms: int = 5
    # Lily (PEFT's names; r, target_modules as above; lily.py): per target entry, one shared A [r, in] per block of
    # stride_A consecutive layers and one shared B of num_B experts [num_B * r, out] that a per-layer router mixes
    stride_A: int = 1  # noqa: N815 - PEFT's name
    num_B: int = 2  # noqa: N815 - PEFT's name (>= 2: the router needs two experts to learn anything)
    scaling: float = 1.0  # the update's plain multiplier (no alpha / r)
    init_weights: bool = True  # B starts at zero (the base model); False: kaiming-uniform like A
    # BOFT (PEFT's names and defaults; target_modules as above): W rotated on its input side by an orthogonal
    # R = B_{m-1} .. B_0 of m butterfly factors, each block-diagonal (D blocks of H x H, D H = in), boft.py.
    # Exactly one of boft_block_size (H) and boft_block_num (D) is non-zero.
    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1  # m; 1 = plain OFT
    boft_dropout: float = 0.0  # training mode: per forward, this share of one factor's blocks set to I
    # IA3 (feedforward modules scale their input, the others their output)
    ia3_target_modules: list[str] | str = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward_modules: list[str] | str = field(default_factory=lambda: ["down_proj"])
    # LN tuning: the RMSNorm layers whose (copied) weight trains, PEFT's target_modules (names or one regex)
    ln_tuning_target_modules: list[str] | str = field(default_factory=lambda: list(ALL_NORMS))
    # prefix / prompt tuning
    num_virtual_tokens: int = 20
    prefix_projection: bool = False  # reparameterize the prefix by a 2-layer MLP (folded away when saved)
    prefix_hidden_size: int = 0  # the MLP's hidden size; 0 = n_kv_heads * head_dim (PEFT's default)
    prompt_init: str = "random"  # random | sample_vocab | text (then set init_text)
    init_text: str = ""
    tokenizer_path: str = ""  # prompt_init="text" without a tokenizer object; saved as tokenizer_name_or_path
    # P-tuning (PEFT's names; ptuning.py): the soft tokens are an encoder's output, from an embedding [P, D]
    encoder_reparameterization_type: str = "MLP"  # MLP (3 linear layers) | LSTM (bidirectional, then 2 linear)
    encoder_hidden_size: int = 0  # H; 0 = the model's hidden size (PEFT has no usable default: None fails there)
    encoder_num_layers: int = 2  # LSTM layers (the MLP always has 3 linear layers: PEFT ignores it there)
    encoder_dropout: float = 0.0  # between LSTM layers (the MLP has none)
    # full fine-tuning: parameters whose names match one of these globs stay frozen ("embed_tokens.*")
    freeze: list[str] = field(default_factory=list)
    seed: int = 0  # adapter initialization
    base_model_name_or_path: str = ""  # recorded in adapter_config.json

    def __post_init__(self):
        one_of("peft.method", self.method, METHODS)
        if self.method not in ("none",):
            for f in fields(self):
                owners = METHOD_OPTIONS.get(f.name)
                if owners and self.method not in owners and getattr(self, f.name) != _default(f):
                    expected = f"it unset: it is an option of {', '.join(owners)}, not of {self.method}"
                    raise invalid(f"peft.{f.name}", getattr(self, f.name), expected)
        if self.method == "oft":
            self._resolve_oft()
        elif self.r <= 0:
            raise invalid("peft.r", self.r, "a positive integer")
        if self.alpha <= 0:
            raise invalid("peft.alpha", self.alpha, "a positive number")
        if not 0.0 <= self.dropout < 1.0:
            raise invalid("peft.dropout", self.dropout, "a probability in [0, 1)")
        for key in ("target_modules", "ia3_target_modules", "feedforward_modules", "ln_tuning_target_modules"):
            value = getattr(self, key)
            if isinstance(value, str) and not value:
                raise invalid(f"peft.{key}", value, "a list of module names or one regex")
            if not isinstance(value, str) and not all(value):
                raise invalid(f"peft.{key}", value, "module names (non-empty strings)")
        for key in ("target_modules", "ln_tuning_target_modules"):
            if not getattr(self, key):
                raise invalid(f"peft.{key}", getattr(self, key), "at least one module name")
        if self.method in LYCORIS_INITS:
            one_of("peft.init", self.init, LYCORIS_INITS[self.method])
        elif self.method == "hra":
            one_of("peft.init", self.init, HRA_INITS)
        elif not PISSA_NITER.fullmatch(self.init):
            one_of("peft.init", self.init, LORA_INITS)
        if self.method == "hira" and self.init not in ("kaiming-uniform", "gaussian"):
            raise invalid("peft.init", self.init, "kaiming-uniform or gaussian for hira")
        if self.init_r <= 0:
            raise invalid("peft.init_r", self.init_r, "a positive integer")
        if not 0 <= self.target_r < self.init_r:
            raise invalid("peft.target_r", self.target_r, f"an integer in [0, init_r={self.init_r})")
        for key in ("tinit", "tfinal", "total_step"):
            if getattr(self, key) < 0:
                raise invalid(f"peft.{key}", getattr(self, key), ">= 0")
        if self.deltaT < 1:
            raise invalid("peft.deltaT", self.deltaT, ">= 1")
        for key in ("beta1", "beta2"):
            if not 0 < getattr(self, key) < 1:
                raise invalid(f"peft.{key}", getattr(self, key), "a number in (0, 1)")
        if self.orth_reg_weight < 0:
            raise invalid("peft.orth_reg_weight", self.orth_reg_weight, ">= 0")
        if self.total_step and self.tinit >= self.total_step - self.tfinal:
            raise invalid("peft.tinit", self.tinit, f"< total_step - tfinal = {self.total_step - self.tfinal} "
                          "(no steps would be left to reallocate the ranks)")  # fmt: skip
        if self.stride_A < 1:
            raise invalid("peft.stride_A", self.stride_A, "a positive integer (1: every layer its own A)")
        if self.num_B < 2:
            raise invalid("peft.num_B", self.num_B, "an integer >= 2 (the router mixes at least two B experts)")
        if self.d_initial == 0 and self.method == "vera":
            raise invalid("peft.d_initial", self.d_initial, "a non-zero number (lambda_b then gets no gradient)")
        for key in ("rank_dropout", "module_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise invalid(f"peft.{key}", getattr(self, key), "a probability in [0, 1)")
        if self.decompose_factor != -1 and self.decompose_factor < 1:
            raise invalid("peft.decompose_factor", self.decompose_factor, "a positive integer, or -1 (the square root)")
        for key in ("boft_block_size", "boft_block_num"):
            if getattr(self, key) < 0:
                raise invalid(f"peft.{key}", getattr(self, key), ">= 0")
        if self.method == "boft" and (self.boft_block_size == 0) == (self.boft_block_num == 0):
            key = "boft_block_num" if self.boft_block_num else "boft_block_size"
            raise invalid(f"peft.{key}", getattr(self, key), "exactly one of boft_block_size and boft_block_num "
                          f"non-zero (boft_block_size={self.boft_block_size}, boft_block_num="
                          f"{self.boft_block_num}; set the other to 0)")  # fmt: skip
        if self.boft_n_butterfly_factor < 1:
            raise invalid("peft.boft_n_butterfly_factor", self.boft_n_butterfly_factor, "a positive integer")
        if not 0.0 <= self.boft_dropout < 1.0:
            raise invalid("peft.boft_dropout", self.boft_dropout, "a probability in [0, 1)")
        if not isinstance(self.ia3_target_modules, str) and not isinstance(self.feedforward_modules, str):
            extra = sorted(set(self.feedforward_modules) - set(self.ia3_target_modules))
            if extra:
                allowed = f"names in ia3_target_modules {self.ia3_target_modules} ({extra[0]!r} is not)"
                raise invalid("peft.feedforward_modules", self.feedforward_modules, allowed)
        if self.num_virtual_tokens <= 0:
            raise invalid("peft.num_virtual_tokens", self.num_virtual_tokens, "a positive integer")
        if self.prefix_hidden_size < 0:
            raise invalid("peft.prefix_hidden_size", self.prefix_hidden_size, ">= 0 (0 = PEFT's default)")
        one_of("peft.prompt_init", self.prompt_init, PROMPT_INITS)
        one_of("peft.encoder_reparameterization_type", self.encoder_reparameterization_type, PTUNING_ENCODERS)
        if self.encoder_hidden_size < 0:
            raise invalid("peft.encoder_hidden_size", self.encoder_hidden_size, ">= 0 (0 = the model's hidden size)")
        if self.encoder_num_layers < 1:
            raise invalid("peft.encoder_num_layers", self.encoder_num_layers, "a positive integer")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise invalid("peft.encoder_dropout", self.encoder_dropout, "a probability in [0, 1)")
        if self.encoder_reparameterization_type == "MLP":  # PEFT ignores them (with a warning): refuse instead
            for key, default in (("encoder_num_layers", 2), ("encoder_dropout", 0.0)):
                if getattr(self, key) != default:
                    raise invalid(f"peft.{key}", getattr(self, key), f"{default}: it is an option of the LSTM "
                                  "encoder (peft.encoder_reparameterization_type=LSTM), the MLP has fixed layers")
        if self.method == "prompt" and self.prompt_init == "text" and not self.init_text:
            raise invalid("peft.init_text", self.init_text, "the text to start from with prompt_init='text'")

    def _resolve_oft(self):
        """PEFT's rule: exactly one of r / oft_block_size non-zero; r at its (LoRA) default counts as 0."""
        if self.oft_block_size < 0:
            raise invalid("peft.oft_block_size", self.oft_block_size, "a block size >= 0 (0: size by peft.r)")
        if self.r < 0:
            raise invalid("peft.r", self.r, "a number of blocks >= 0 (0: size by peft.oft_block_size)")
        if self.oft_block_size and self.r == _R_DEFAULT:
            self.r = 0
        if not self.r and not self.oft_block_size:
            raise invalid("peft.oft_block_size", 0, "a positive block size, or peft.r > 0 (the number of blocks)")
        if self.r and self.oft_block_size:
            raise invalid("peft.r", self.r, f"0 with peft.oft_block_size={self.oft_block_size} (OFT is sized by one "
                          "of them: set peft.oft_block_size=0 to size it by r)")  # fmt: skip
        if not self.eps > 0 or self.eps == float("inf"):
            raise invalid("peft.eps", self.eps, "a positive finite number")
        if self.num_cayley_neumann_terms < 1:
            raise invalid("peft.num_cayley_neumann_terms", self.num_cayley_neumann_terms, "a positive integer")


def _default(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


_R_DEFAULT = next(_default(f) for f in fields(PeftConfig) if f.name == "r")
