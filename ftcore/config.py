"""The run configuration: typed dataclasses for every group of conf/, validated on construction.

`run_config(d)` turns the plain dict that Hydra composes (or a test writes) into a RunConfig;
a wrong key or value fails naming the dotted key and the allowed values.
"""

from dataclasses import dataclass, field

from ftcore.cli import DEMO_MODEL
from ftcore.data.config import DataConfig
from ftcore.errors import FtcoreError
from ftcore.peft.config import PeftConfig
from ftcore.schema import build

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("single", "ddp", "fsdp")
NONFINITE = ("stop", "skip")
SCHEDULES = ("cosine", "linear", "constant")
WANDB_MODES = ("offline", "online", "disabled")


def one_of(key: str, value, allowed):
    if value not in allowed:
        raise FtcoreError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")


@dataclass
class ModelSpec:
    path: str = DEMO_MODEL  # local dir, .gguf file, pkg://package/file or hub repo id
    dtype: str = "float32"  # dtype of the frozen base weights (trainable ones stay float32)

    def __post_init__(self):
        one_of("model.dtype", self.dtype, DTYPES)


@dataclass
class TrainConfig:
    max_steps: int = 100
    seed: int = 0  # init, data order and dropout
    batch_size: int = 8  # per-device micro-batch
    grad_accum: int = 1
    eval_every: int = 50  # validation every N steps (and at the end); 0 = only at the end
    eval_batches: int = 0  # validation batches per evaluation; 0 = the whole split
    precision: str = "fp32"  # autocast dtype: fp32 | bf16 | fp16 (GradScaler)
    resume: str = ""  # "" = fresh, "auto" = latest checkpoint in the run dir, or a checkpoint path
    gradient_checkpointing: bool = False
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0 = never
    save_every: int = 0  # checkpoint every N steps; 0 = at every evaluation
    keep_checkpoints: int = 2
    on_nonfinite: str = "stop"  # stop | skip a step whose loss is NaN/inf
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # speed switches (ftcore/model/ops.py, ftcore/model/loss.py, ftcore/train/step.py): same results up to rounding
    fused_kernels: bool = False  # kernels/ (CUDA C++) for RMSNorm, RoPE, SwiGLU on a GPU; CPU runs eager
    loss_chunk_size: int = 1024  # lm_head + cross-entropy in chunks of N tokens, no full logits; 0 = plain
    fused_lora: bool = True  # LoRA/rsLoRA layers as one autograd node (ops.lora_linear): less memory, fewer passes
    cuda_graph: bool = False  # capture the whole step once, replay it (needs data.packing or data.static_shape)

    def __post_init__(self):
        one_of("train.precision", self.precision, PRECISIONS)
        one_of("train.on_nonfinite", self.on_nonfinite, NONFINITE)
        for key in ("max_steps", "batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                raise FtcoreError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        if self.loss_chunk_size < 0:
            raise FtcoreError(f"train.loss_chunk_size: must be >= 0 (0 = plain), got {self.loss_chunk_size}")


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the floor the decay ends at, as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.schedule not in SCHEDULES:
            raise FtcoreError(f"optim.schedule: {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.lr <= 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise FtcoreError(
                f"optim: need lr > 0, warmup_steps >= 0, 0 <= min_lr_ratio <= 1; "
                f"got lr={self.lr}, warmup_steps={self.warmup_steps}, min_lr_ratio={self.min_lr_ratio}"
            )


@dataclass
class WandbConfig:
    mode: str = "offline"
    project: str = "ftcore"
    name: str | None = None
    group: str | None = None
    tags: list = field(default_factory=list)

    def __post_init__(self):
        if self.mode not in WANDB_MODES:
            raise FtcoreError(f"logger.wandb.mode: {self.mode!r} is not one of {', '.join(WANDB_MODES)}")


@dataclass
class LogConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True  # tqdm progress bar
    log_every: int = 1

    def __post_init__(self):
        if isinstance(self.wandb, dict):
            self.wandb = WandbConfig(**self.wandb)


@dataclass
class EvalConfig:
    baseline: bool = True  # also evaluate the base model (before training) on the same examples
    split: str = "test"
    max_examples: int = 0  # 0 = the whole split
    batch_size: int = 32
    max_new_tokens: int = 0  # 0 = the task's default

    def __post_init__(self):
        one_of("eval.split", self.split, ("train", "validation", "test"))


@dataclass
class DistConfig:
    backend: str = "single"  # single | ddp | fsdp (launch ddp/fsdp with torchrun)
    timeout_minutes: int = 60  # how long ranks wait at a collective (e.g. while rank 0 evaluates alone)

    def __post_init__(self):
        one_of("dist.backend", self.backend, BACKENDS)
        if self.timeout_minutes < 1:
            raise FtcoreError(f"dist.timeout_minutes: must be >= 1, got {self.timeout_minutes}")


@dataclass
class RunConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run_dir: str = "runs/default"

    def __post_init__(self):
        if self.dist.backend == "fsdp" and self.train.precision == "fp16":
            raise FtcoreError("train.precision=fp16 is not supported with dist=fsdp (the grad scaler would see "
                              "only this rank's shards); use train.precision=bf16")  # fmt: skip


def run_config(d: dict) -> RunConfig:
    """A validated RunConfig from a plain nested dict (missing groups and keys take their defaults)."""
    d = dict(d)
    groups = {"peft": PeftConfig.from_dict, "data": DataConfig.from_dict}
    built = {name: make(d.pop(name) or {}) for name, make in groups.items() if name in d}
    cfg = build(RunConfig, d)
    for name, value in built.items():
        setattr(cfg, name, value)
    return cfg
