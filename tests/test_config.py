"""One schema: the dataclass defaults are the demo run, and the CLI's conf/ adds only what a group option changes.

The CLI side is composed with Hydra's compose API on the base the scripts register (scripts/hydra_schema.py).
"""

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from ftcore.compare import CompareConfig, compare_config
from ftcore.config import RunConfig, TrainConfig, run_config
from ftcore.errors import FtcoreError
from ftcore.eval.run import EvalRunConfig, eval_run_config
from ftcore.peft.config import PeftConfig
from ftcore.schema import build, declared, one_of

hydra = pytest.importorskip("hydra")
yaml = pytest.importorskip("yaml")
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

ROOT = Path(__file__).parents[1]
CONF = ROOT / "conf"
GROUPS = {"model": "path", "peft": "method", "data": "path", "dist": "backend"}  # group -> the key naming its option
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
ABLATIONS = sorted(p.stem for p in (CONF / "compare").glob("*.yaml"))


def load_hydra_schema():
    spec = importlib.util.spec_from_file_location("hydra_schema", ROOT / "scripts" / "hydra_schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


load_hydra_schema().register()


def composed(config: str, *overrides: str) -> dict:
    """What a script's main() gets for these command-line overrides, as plain values."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return OmegaConf.to_container(compose(config, overrides=list(overrides)), resolve=True)


def values(group: str, option: str) -> dict:
    return yaml.safe_load((CONF / group / f"{option}.yaml").read_text()) or {}


def test_python_defaults_are_the_cli_defaults():
    assert run_config(composed("config")) == run_config({}) == RunConfig()


def test_the_defaults_are_the_demo_run():
    cfg = run_config({})
    assert (cfg.peft.method, cfg.peft.r, cfg.peft.alpha, cfg.peft.dropout) == ("lora", 16, 32.0, 0.05)
    assert cfg.peft.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    optim = cfg.optim
    assert (optim.lr, optim.warmup_steps, optim.min_lr_ratio, optim.schedule) == (1e-3, 10, 0.1, "cosine")
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.train.eval_every, cfg.train.eval_batches) == (120, 8, 40, 5)
    assert (cfg.eval.max_examples, cfg.data.path, cfg.data.task) == (200, "arithmetic", "arithmetic")
    assert (cfg.data.max_length, cfg.data.seq_len, cfg.data.schema) == (256, 256, "pair")
    assert cfg.data.system_prompt == "Solve the problem. Reply with the number only."


@pytest.mark.parametrize("group, option", OPTIONS)
def test_every_group_option_is_its_values_over_the_defaults(group, option):
    assert run_config(composed("config", f"{group}={option}")) == run_config({group: values(group, option)})


@pytest.mark.parametrize("group, option", OPTIONS)
def test_group_files_hold_only_what_differs(group, option):
    found = values(group, option)
    assert GROUPS[group] in found  # each file names its option
    base = declared(RunConfig)[group]
    same = [k for k, v in found.items() if k != GROUPS[group] and base[k] == v]
    assert not same, f"conf/{group}/{option}.yaml repeats defaults: {same}"


@pytest.mark.parametrize("name", ABLATIONS)
def test_ablation_files_hold_only_what_differs(name):
    base = declared(CompareConfig)
    same = [k for k, v in values("compare", name).items() if base[k] == v]
    assert not same, f"conf/compare/{name}.yaml repeats defaults: {same}"


def test_compare_yaml_composes_to_the_compare_defaults():
    d = composed("compare")
    cc = compare_config(d.pop("compare"))
    assert dataclasses.replace(cc, peft={}) == CompareConfig()
    for method, settings in cc.peft.items():  # each method as `peft=<method>` would train it
        assert build(PeftConfig, settings, "peft.") == run_config({"peft": values("peft", method)}).peft
    assert run_config(d) == run_config({})  # the runs' shared base (peft aside) is the defaults


@pytest.mark.parametrize("name", ABLATIONS)
def test_ablations_compose(name):
    cc = compare_config(composed("compare", f"compare={name}")["compare"])
    assert dataclasses.replace(cc, peft={}) == build(CompareConfig, values("compare", name))


def test_evaluate_yaml_composes_to_the_eval_defaults():
    assert eval_run_config(composed("evaluate")) == EvalRunConfig()


def test_every_key_is_overridable_and_unknown_keys_fail():
    d = composed("config", "train.max_steps=5", "data.system_prompt=Be brief.", "logger.wandb.name=x", "peft=prompt",
                 "peft.num_virtual_tokens=4")  # fmt: skip
    cfg = run_config(d)
    assert (cfg.train.max_steps, cfg.data.system_prompt, cfg.logger.wandb.name) == (5, "Be brief.", "x")
    assert (cfg.peft.method, cfg.peft.num_virtual_tokens, cfg.peft.prompt_init) == ("prompt", 4, "sample_vocab")
    cc = composed("compare", "compare.peft.lora.r=4", "compare.method_lrs.prompt=[0.1]", "compare.lr.ia3=0.01")
    cc = cc["compare"]
    assert (cc["peft"]["lora"]["r"], cc["method_lrs"]["prompt"], cc["lr"]["ia3"]) == (4, [0.1], 0.01)
    # the hint a file with other field names gets (data/io.py) works as written, and overrides again without +
    assert composed("config", "+data.fields.completion=answer")["data"]["fields"] == {"completion": "answer"}
    with pytest.raises(Exception, match="max_stepz"):
        composed("config", "train.max_stepz=3")
    with pytest.raises(FtcoreError, match=r"^train\.max_stepz: unknown key; allowed: max_steps, epochs, seed"):
        run_config(composed("config", "+train.max_stepz=3"))


def test_the_runs_length_is_max_steps_or_epochs():
    """train.epochs alone on the command line replaces the default max_steps; both set fail in one line."""
    default, epochs = run_config(composed("config")).train, run_config(composed("config", "train.epochs=2")).train
    assert (default.max_steps, default.epochs, default.total_steps(7)) == (120, 0.0, 120)
    assert (epochs.max_steps, epochs.epochs, epochs.total_steps(10)) == (None, 2.0, 20)
    assert run_config(dataclasses.asdict(run_config({"train": {"epochs": 2}}))).train == epochs  # saved configs reload
    with pytest.raises(FtcoreError) as e:
        run_config(composed("config", "train.epochs=2", "train.max_steps=50"))
    assert str(e.value) == ("train.epochs=2 and train.max_steps=50: expected one of them; set the other to null "
                            "(max_steps) or 0 (epochs)")  # fmt: skip
    # epochs x steps per epoch, to the nearest step (halves up), at least one
    lengths = [(1.5, 10, 15), (0.25, 10, 3), (0.3, 10, 3), (0.24, 10, 2), (0.01, 10, 1), (3, 33, 99)]
    assert [TrainConfig(epochs=e).total_steps(n) for e, n, _ in lengths] == [s for *_, s in lengths]


def test_a_users_file_does_not_inherit_the_demo():
    cli = run_config(composed("config", "data.path=my.jsonl"))
    assert cli == run_config({"data": {"path": "my.jsonl"}})
    assert (cli.data.system_prompt, cli.data.task, cli.data.max_length, cli.data.schema) == ("", "text", 1024, "auto")


def test_run_dir_names():
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        for overrides, suffix in [([], "_lora_arithmetic"), (["data=tickets", "peft=ia3"], "_ia3_tickets"),
                                  (["data.path=dir/my.jsonl"], "_lora_my"), (["data.task=number"], "_lora_number")]:
            assert compose("config", overrides, return_hydra_config=True).hydra.run.dir.endswith(suffix), overrides
        run_dir = compose("compare", ["compare=lora_rank"], return_hydra_config=True).hydra.run.dir
        assert run_dir == "comparisons/lora_rank_arithmetic"


def test_declared_keeps_the_unset_markers():
    d = declared(RunConfig)
    assert d["data"]["system_prompt"] is None and d["optim"]["betas"] == [0.9, 0.999]
    assert RunConfig().data.system_prompt  # filled in when built


def test_one_of_message():
    with pytest.raises(FtcoreError, match=r"^data\.template='alpaca': expected one of plain, instruction, chat$"):
        one_of("data.template", "alpaca", ("plain", "instruction", "chat"))


@pytest.mark.parametrize(
    "d, message",
    [
        ({"train": {"cuda_graph": True}}, "needs fixed batch shapes: set data.packing=true or data.static_shape=true"),
        ({"train": {"cuda_graph": True, "precision": "fp16"}, "data": {"static_shape": True}}, "precision=fp16"),
        ({"train": {"cuda_graph": True, "on_nonfinite": "skip"}, "data": {"static_shape": True}}, "on_nonfinite=stop"),
        ({"train": {"cuda_graph": True}, "data": {"static_shape": True}, "dist": {"backend": "ddp"}}, "single only"),
        ({"train": {"cuda_graph": True, "gradient_checkpointing": True}, "data": {"packing": True}},
         "gradient_checkpointing=false"),
        ({"train": {"cuda_graph": True}, "data": {"static_shape": True}, "peft": {"method": "adalora"}},
         "adalora's rank allocator masks on a host-side schedule"),
    ],
)  # fmt: skip
def test_cross_group_rules(d, message):
    with pytest.raises(FtcoreError, match=f"^train.cuda_graph: .*{message}"):
        run_config(d)


def test_cross_group_rules_allow_a_valid_graph_run():
    cfg = run_config({"train": {"cuda_graph": True, "device": "cuda"}, "data": {"static_shape": True}})
    assert cfg.train.cuda_graph
    with pytest.raises(FtcoreError, match="train.precision=fp16 is not supported with dist=fsdp"):
        run_config({"train": {"precision": "fp16"}, "dist": {"backend": "fsdp"}})
