"""The run configuration: typed dataclasses for every group, validated on construction.

Their defaults are the only defaults, and they are the demo run: `run_config({})` is what
`python scripts/train.py` trains with no overrides (conf/ holds only what a group option changes).
`run_config(d)` turns the plain dict that Hydra composes (or a test writes) into a RunConfig;
a wrong key or value fails naming the dotted key and the allowed values.
"""

import math
from dataclasses import dataclass, field

from ftcore.cli import DEMO_MODEL
from ftcore.data.config import DataConfig
from ftcore.dtypes import AUTOCAST, DTYPES
from ftcore.errors import FtcoreError
from ftcore.peft.config import PeftConfig, is_principal
from ftcore.quant.gguf import not_a_gguf_file
from ftcore.quant.linear import QuantSpec
from ftcore.schema import build, invalid, one_of

PRECISIONS = ("fp32", *AUTOCAST)  # fp32 | bf16 | fp16
BACKENDS = ("single", "ddp", "fsdp")
NONFINITE = ("stop", "skip")
SCHEDULES = ("cosine", "linear", "constant")
WANDB_MODES = ("offline", "online", "disabled")
SPLITS = ("train", "validation", "test")
QUANTIZE = ("none", "nf4", "fp4", "gguf")
QUANT_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' 4-bit block sizes
DEFAULT_MAX_STEPS = 120  # train.max_steps when neither it nor train.epochs is set


@dataclass
class ModelSpec:
    path: str = DEMO_MODEL  # local dir, .gguf file, pkg://package/file or hub repo id
    dtype: str = "float32"  # dtype of the frozen base weights (trainable ones stay float32)
    # QLoRA: the decoder's linear layers stored 4-bit (nf4 | fp4), quantized tensor by tensor while loading;
    # gguf: model.path is a .gguf file whose weights (embeddings and lm_head too) keep the file's blocks
    quantize: str = "none"
    quant_block_size: int = 64  # weights per absmax (bitsandbytes' blocksize); ignored by gguf (the file's blocks)
    double_quant: bool = True  # the absmax in 8 bits, blocks of 256 (QLoRA's double quantization); ignored by gguf

    def __post_init__(self):
        one_of("model.dtype", self.dtype, tuple(DTYPES))
        one_of("model.quantize", self.quantize, QUANTIZE)
        one_of("model.quant_block_size", self.quant_block_size, QUANT_BLOCK_SIZES)
        if self.quantize == "gguf" and not self.path.endswith(".gguf"):
            raise not_a_gguf_file(self.path)

    def quant_spec(self) -> QuantSpec | None:
        return None if self.quantize == "none" else QuantSpec(self.quantize, self.quant_block_size, self.double_quant)


@dataclass
class TrainConfig:
    # the run's length: max_steps optimizer steps, or epochs passes over the train split; set one (max_steps null
    # and epochs 0 are unset; neither set: DEFAULT_MAX_STEPS). An epoch is floor(train items / global batch) steps
    # (the sampler leaves an epoch's last partial batch out); epochs x that, rounded to the nearest step
    max_steps: int | None = None
    epochs: float = 0.0
    seed: int = 0  # dropout, and with data.seed the data order (adapter init: peft.seed; the split: data.seed)
    batch_size: int = 8  # per-device micro-batch; global batch = batch_size x grad_accum x world size
    grad_accum: int = 1
    eval_every: int = 40  # validation every N steps (and at the end); 0 = only at the end
    eval_batches: int = 5  # validation batches per evaluation; 0 = the whole split
    precision: str = "fp32"  # autocast dtype: fp32 | bf16 | fp16 (GradScaler)
    resume: str = ""  # "" = fresh, "auto" = latest checkpoint in the run dir, or a checkpoint path
    gradient_checkpointing: bool = False
    activation_offload: bool = False  # CUDA: the activations backward needs kept in pinned host memory; CPU: no-op
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
        if self.epochs < 0:
            raise invalid("train.epochs", self.epochs, ">= 0 (0 = train.max_steps sets the length)")
        if self.epochs and self.max_steps is not None:
            raise FtcoreError(f"train.epochs={self.epochs:g} and train.max_steps={self.max_steps}: expected one of "
                              "them; set the other to null (max_steps) or 0 (epochs)")  # fmt: skip
        if not self.epochs and self.max_steps is None:
            self.max_steps = DEFAULT_MAX_STEPS
        for key in ("max_steps", "batch_size", "grad_accum", "keep_checkpoints"):
            value = getattr(self, key)
            if value is not None and value < 1:  # max_steps is None only when train.epochs is set
                raise invalid(f"train.{key}", value, ">= 1")
        for key, zero in (("eval_every", "only at the end"), ("eval_batches", "the whole split"),
                          ("save_every", "at every evaluation"), ("early_stopping_patience", "never"),
                          ("loss_chunk_size", "plain")):  # fmt: skip
            if getattr(self, key) < 0:
                raise invalid(f"train.{key}", getattr(self, key), f">= 0 (0 = {zero})")

    def total_steps(self, steps_per_epoch: int) -> int:
        """The run's length in optimizer steps: train.max_steps, or train.epochs x steps_per_epoch (nearest, >= 1)."""
        return self.max_steps or max(1, math.floor(self.epochs * steps_per_epoch + 0.5))


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # the floor the decay ends at, as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # LoRA+ (PEFT's create_loraplus_optimizer): lora_B and 1-d trainables learn at lr * ratio; 0 = off
    loraplus_lr_ratio: float = 0.0
    loraplus_lr_embedding: float = 1e-6  # LoRA+'s lr for the embedding's adapter (embed_tokens targeted)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        one_of("optim.schedule", self.schedule, SCHEDULES)
        if self.lr <= 0:
            raise invalid("optim.lr", self.lr, "> 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise invalid("optim.betas", list(self.betas), "two numbers in [0, 1), e.g. [0.9, 0.999]")
        if self.eps <= 0:
            raise invalid("optim.eps", self.eps, "> 0")
        if self.weight_decay < 0:
            raise invalid("optim.weight_decay", self.weight_decay, ">= 0")
        if self.grad_clip < 0:
            raise invalid("optim.grad_clip", self.grad_clip, ">= 0 (0 = no clipping)")
        if self.warmup_steps < 0:
            raise invalid("optim.warmup_steps", self.warmup_steps, ">= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise invalid("optim.min_lr_ratio", self.min_lr_ratio, "a fraction in [0, 1]")
        if self.loraplus_lr_ratio < 0:
            raise invalid("optim.loraplus_lr_ratio", self.loraplus_lr_ratio, ">= 0 (0 = no LoRA+)")
        if self.loraplus_lr_embedding <= 0:
            raise invalid("optim.loraplus_lr_embedding", self.loraplus_lr_embedding, "> 0")


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "ftcore"
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        one_of("logger.wandb.mode", self.mode, WANDB_MODES)


@dataclass
class LogConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True  # tqdm progress bar


@dataclass
class EvalConfig:
    baseline: bool = True  # also evaluate the base model (before training) on the same examples
    split: str = "test"
    max_examples: int = 200  # first N examples of the split (0 = all): keeps the CPU demo under 10 minutes
    batch_size: int = 32
    max_new_tokens: int = 0  # 0 = the task's default
    # the prompting baseline: the base model with this many training examples in context (0 = none; few_shot.py)
    few_shot: int = 0
    few_shot_seed: int = 0  # which training examples (the same for every test item)
    # forgetting (forgetting.py): the loss on a probe set before and after training; the probe is text sampled
    # from the base model (KL(base || tuned) per token), or the corpus at forgetting_path (.jsonl {"text"} or .txt)
    forgetting: bool = True
    forgetting_path: str = ""
    forgetting_samples: int = 32  # sequences (documents of a corpus)
    forgetting_tokens: int = 64  # tokens each (a corpus document is cut to this)
    forgetting_seed: int = 0
    report_failures: int = 10  # failures report.md lists (prompt, reference, output); 0 = none
    # drift_reference.json: the training prompts' lengths, tokens and (for drift_prompts of them) the base model's
    # mean final hidden state, what served or fresh prompts are compared with (ftcore/monitor/)
    drift_reference: bool = True
    drift_prompts: int = 256

    def __post_init__(self):
        one_of("eval.split", self.split, SPLITS)
        if self.few_shot < 0:
            raise invalid("eval.few_shot", self.few_shot, ">= 0 (0 = no few-shot baseline)")
        if self.few_shot and self.split == "train":
            raise FtcoreError("eval.few_shot: the shots come from the train split, so eval.split=train would show "
                              "test items as their own shots; evaluate on validation or test")  # fmt: skip
        if self.drift_prompts < 0:
            raise invalid("eval.drift_prompts", self.drift_prompts, ">= 0 (0 = no embedding summary)")
        if self.report_failures < 0:
            raise invalid("eval.report_failures", self.report_failures, ">= 0")
        for key in ("forgetting_samples", "forgetting_tokens"):
            if getattr(self, key) < 1:
                raise invalid(f"eval.{key}", getattr(self, key), ">= 1")
        if self.batch_size < 1:
            raise invalid("eval.batch_size", self.batch_size, ">= 1")
        if self.max_examples < 0:
            raise invalid("eval.max_examples", self.max_examples, ">= 0 (0 = the whole split)")
        if self.max_new_tokens < 0:
            raise invalid("eval.max_new_tokens", self.max_new_tokens, ">= 0 (0 = the task's default)")


@dataclass
class DistConfig:
    backend: str = "single"  # single | ddp | fsdp (launch ddp/fsdp with torchrun)
    timeout_minutes: int = 60  # how long ranks wait at a collective (e.g. while rank 0 writes final/)
    # HSDP (dist=fsdp): N replicas of the model, each sharded over world / N ranks (e.g. N nodes, shard within a node)
    replicate: int = 1
    cpu_offload: bool = False  # dist=fsdp: sharded parameters, gradients and optimizer state on the host (FSDP2)

    def __post_init__(self):
        one_of("dist.backend", self.backend, BACKENDS)
        if self.timeout_minutes < 1:
            raise invalid("dist.timeout_minutes", self.timeout_minutes, ">= 1")
        if self.replicate < 1:
            raise invalid("dist.replicate", self.replicate, "a positive number of replicas")
        for key, off in (("replicate", self.replicate == 1), ("cpu_offload", not self.cpu_offload)):
            if not off and self.backend != "fsdp":
                raise FtcoreError(f"dist.{key}={getattr(self, key)}: an FSDP2 setting; use dist=fsdp "
                                  f"(dist.backend is {self.backend})")  # fmt: skip


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
        """Rules across groups (each group checks its own values)."""
        if self.dist.backend == "fsdp" and self.train.precision == "fp16":
            raise FtcoreError("train.precision=fp16 is not supported with dist=fsdp (the grad scaler would see "
                              "only this rank's shards); use train.precision=bf16")  # fmt: skip
        if self.train.cuda_graph and (why := self.cuda_graph_conflict()):
            raise FtcoreError(f"train.cuda_graph: {why}")
        if self.model.quantize != "none" and self.peft.method == "full":
            raise FtcoreError(f"model.quantize={self.model.quantize}: full fine-tuning trains the base weights, "
                              "which a quantized base keeps frozen; use a PEFT method or model.quantize=none")
        if self.model.quantize != "none" and self.peft.method in ("lora", "dora") and is_principal(self.peft.init):
            raise FtcoreError(f"peft.init={self.peft.init}: PiSSA/OLoRA replace the base weights by a residual, which a "
                              f"quantized base (model.quantize={self.model.quantize}) keeps frozen; use "
                              "peft.init=kaiming-uniform or gaussian")  # fmt: skip

    def cuda_graph_conflict(self) -> str | None:
        """Why train.cuda_graph cannot work with the other settings (the device is checked when train() starts)."""
        if not (self.data.packing or self.data.static_shape):
            return "it needs fixed batch shapes: set data.packing=true or data.static_shape=true"
        if self.train.precision == "fp16":
            return "train.precision=fp16's GradScaler reads the inf check on the host; use bf16 or fp32"
        if self.train.on_nonfinite != "stop":
            return "train.on_nonfinite=skip cannot undo a replayed step; use train.on_nonfinite=stop"
        if self.dist.backend != "single":
            return "it runs with dist=single only"
        if self.train.gradient_checkpointing:
            return "capturing activation checkpointing is not supported; set train.gradient_checkpointing=false"
        if self.train.activation_offload:
            return "train.activation_offload copies to the host in every step; set it to false"
        if self.peft.method in ("loha", "lokr") and (self.peft.rank_dropout or self.peft.module_dropout):
            return ("peft.rank_dropout and peft.module_dropout draw on the host at every forward (a replayed graph "
                    "would repeat one draw); set them to 0")  # fmt: skip
        if self.peft.method == "boft" and self.peft.boft_dropout:
            return ("peft.boft_dropout draws on the host at every forward (a replayed graph would repeat one draw); "
                    "set it to 0")  # fmt: skip
        if self.model.quantize != "none":
            return f"model.quantize={self.model.quantize}: capturing 4-bit layers is not tested yet; use eager steps"
        if self.peft.method == "adalora":
            return "peft.method=adalora's rank allocator masks on a host-side schedule after each step; use eager steps"
        return None


def run_config(d: dict) -> RunConfig:
    """A validated RunConfig from a plain nested dict (missing groups and keys take their defaults)."""
    return build(RunConfig, d)
