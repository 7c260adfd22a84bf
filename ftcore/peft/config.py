"""PeftConfig: one typed, validated dataclass for every method (Hydra's `peft` group maps onto it).

Field names are ours; io.py translates them to and from HF PEFT's adapter_config.json.
"""

import dataclasses
from dataclasses import dataclass, field

from ftcore.errors import FtcoreError
from ftcore.schema import build

METHODS = ("none", "full", "lora", "dora", "ia3", "prefix", "prompt")
LORA_INITS = ("kaiming-uniform", "gaussian")  # PEFT's init_lora_weights=True / "gaussian"; B starts at zero
PROMPT_INITS = ("random", "sample_vocab", "text")


@dataclass
class PeftConfig:
    method: str = "lora"
    # LoRA / DoRA
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])  # names, or one regex
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    init: str = "kaiming-uniform"
    # IA3 (feedforward modules scale their input, the others their output)
    ia3_target_modules: list[str] | str = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward_modules: list[str] | str = field(default_factory=lambda: ["down_proj"])
    # prefix / prompt tuning
    num_virtual_tokens: int = 20
    prefix_projection: bool = False  # reparameterize the prefix by a 2-layer MLP (folded away when saved)
    prefix_hidden_size: int = 0  # the MLP's hidden size; 0 = n_kv_heads * head_dim (PEFT's default)
    prompt_init: str = "random"
    init_text: str = ""
    tokenizer_path: str = ""  # prompt_init="text" without a tokenizer object; saved as tokenizer_name_or_path
    # full fine-tuning: parameters whose names match one of these globs stay frozen ("embed_tokens.*")
    freeze: list[str] = field(default_factory=list)
    seed: int = 0  # adapter initialization
    base_model_name_or_path: str = ""  # recorded in adapter_config.json

    def __post_init__(self):
        self.validate()

    @classmethod
    def from_dict(cls, d: dict) -> "PeftConfig":
        """Build from a mapping (a dict or Hydra's `cfg.peft`); unknown keys and wrong types fail naming the key."""
        return build(cls, d, "peft.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self):
        def bad(key, msg):
            raise FtcoreError(f"peft.{key}: {msg}")

        if self.method not in METHODS:
            bad("method", f"{self.method!r} is not supported; expected one of {', '.join(METHODS)}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            bad("r", f"expected a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            bad("alpha", f"expected a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            bad("dropout", f"expected a probability in [0, 1), got {self.dropout!r}")
        for key in ("target_modules", "ia3_target_modules", "feedforward_modules"):
            value = getattr(self, key)
            if isinstance(value, (list, tuple)):
                if not all(isinstance(v, str) and v for v in value):
                    bad(key, f"expected module names (strings), got {value!r}")
                setattr(self, key, list(value))
            elif not isinstance(value, str) or not value:
                bad(key, f"expected a list of module names or one regex string, got {value!r}")
        if not self.target_modules:
            bad("target_modules", "expected at least one module name")
        if self.init not in LORA_INITS:
            bad("init", f"{self.init!r} is not supported; expected one of {', '.join(LORA_INITS)}")
        if isinstance(self.ia3_target_modules, list) and isinstance(self.feedforward_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.ia3_target_modules))
            if extra:
                bad("feedforward_modules", f"{extra[0]!r} is not in ia3_target_modules {self.ia3_target_modules}")
        if isinstance(self.num_virtual_tokens, bool) or not isinstance(self.num_virtual_tokens, int) \
                or self.num_virtual_tokens <= 0:
            bad("num_virtual_tokens", f"expected a positive integer, got {self.num_virtual_tokens!r}")
        if not isinstance(self.prefix_hidden_size, int) or self.prefix_hidden_size < 0:
            bad("prefix_hidden_size", f"expected a non-negative integer, got {self.prefix_hidden_size!r}")
        if self.prompt_init not in PROMPT_INITS:
            bad("prompt_init", f"{self.prompt_init!r} is not supported; expected one of {', '.join(PROMPT_INITS)}")
        if self.method == "prompt" and self.prompt_init == "text" and not self.init_text:
            bad("init_text", "required when prompt_init='text'")
        if not isinstance(self.freeze, (list, tuple)) or not all(isinstance(p, str) for p in self.freeze):
            bad("freeze", f"expected a list of name globs, got {self.freeze!r}")
        self.freeze = list(self.freeze)
