"""PeftConfig: one typed, validated dataclass for every method (Hydra's `peft` group maps onto it).

Field names are ours; io.py translates them to and from HF PEFT's adapter_config.json.
"""

from dataclasses import dataclass, field

from ftcore.schema import invalid, one_of

METHODS = ("none", "full", "lora", "dora", "ia3", "prefix", "prompt")
LORA_INITS = ("kaiming-uniform", "gaussian")  # PEFT's init_lora_weights=True / "gaussian"; B starts at zero
PROMPT_INITS = ("random", "sample_vocab", "text")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class PeftConfig:
    method: str = "lora"
    # LoRA / DoRA
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: list(ALL_LINEAR))  # names, or one regex
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    init: str = "kaiming-uniform"  # kaiming-uniform (PEFT's default) | gaussian
    # IA3 (feedforward modules scale their input, the others their output)
    ia3_target_modules: list[str] | str = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward_modules: list[str] | str = field(default_factory=lambda: ["down_proj"])
    # prefix / prompt tuning
    num_virtual_tokens: int = 20
    prefix_projection: bool = False  # reparameterize the prefix by a 2-layer MLP (folded away when saved)
    prefix_hidden_size: int = 0  # the MLP's hidden size; 0 = n_kv_heads * head_dim (PEFT's default)
    prompt_init: str = "random"  # random | sample_vocab | text (then set init_text)
    init_text: str = ""
    tokenizer_path: str = ""  # prompt_init="text" without a tokenizer object; saved as tokenizer_name_or_path
    # full fine-tuning: parameters whose names match one of these globs stay frozen ("embed_tokens.*")
    freeze: list[str] = field(default_factory=list)
    seed: int = 0  # adapter initialization
    base_model_name_or_path: str = ""  # recorded in adapter_config.json

    def __post_init__(self):
        one_of("peft.method", self.method, METHODS)
        if self.r <= 0:
            raise invalid("peft.r", self.r, "a positive integer")
        if self.alpha <= 0:
            raise invalid("peft.alpha", self.alpha, "a positive number")
        if not 0.0 <= self.dropout < 1.0:
            raise invalid("peft.dropout", self.dropout, "a probability in [0, 1)")
        for key in ("target_modules", "ia3_target_modules", "feedforward_modules"):
            value = getattr(self, key)
            if isinstance(value, str) and not value:
                raise invalid(f"peft.{key}", value, "a list of module names or one regex")
            if not isinstance(value, str) and not all(value):
                raise invalid(f"peft.{key}", value, "module names (non-empty strings)")
        if not self.target_modules:
            raise invalid("peft.target_modules", self.target_modules, "at least one module name")
        one_of("peft.init", self.init, LORA_INITS)
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
        if self.method == "prompt" and self.prompt_init == "text" and not self.init_text:
            raise invalid("peft.init_text", self.init_text, "the text to start from with prompt_init='text'")
