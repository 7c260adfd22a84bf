"""DataConfig: defaults validate, demo presets fill only what is unset, wrong keys/values/types fail naming the key."""

import pytest

from ftcore.data.config import DEMOS, GENERIC, DataConfig, resolve_path
from ftcore.data.tasks import TASKS
from ftcore.errors import FtcoreError
from ftcore.schema import build


def data(values) -> DataConfig:
    return build(DataConfig, values, "data.")


def test_defaults_validate():
    cfg = DataConfig()
    assert cfg.split == [0.70, 0.15, 0.15] and cfg.template == "chat" and cfg.clean.dedup


@pytest.mark.parametrize("name", list(DEMOS))
def test_demo_presets(name):
    cfg = DataConfig(path=name)
    assert cfg.task == name and cfg.metric == TASKS[name].metric
    assert cfg.system_prompt == DEMOS[name].system_prompt and cfg.max_length == cfg.seq_len == DEMOS[name].max_length
    assert resolve_path(cfg.path).is_file()
    # what a user sets wins over the preset
    cfg = DataConfig(path=name, system_prompt="Be brief.", max_length=100, task="text", labels=["a"])
    assert (cfg.system_prompt, cfg.max_length, cfg.task, cfg.labels) == ("Be brief.", 100, "text", ["a"])
    assert cfg.metric == "exact_match" and cfg.seq_len == DEMOS[name].max_length


def test_demo_values():
    assert DataConfig().system_prompt == "Solve the problem. Reply with the number only."
    assert DataConfig(path="tickets").labels == ["billing", "technical", "account", "shipping", "refund"]
    assert (DataConfig(path="rewrite").schema, DataConfig(path="rewrite").seq_len) == ("chat", 384)


def test_a_users_file_gets_no_demo_settings():
    cfg = data({"path": "my.jsonl"})
    assert {k: getattr(cfg, k) for k in GENERIC} == GENERIC
    assert cfg.system_prompt == "" and cfg.task == "text" and cfg.max_length == 1024
    assert (cfg.metric, cfg.labels) == ("exact_match", [])  # the task's


def test_metric_and_labels_follow_the_task():
    assert DataConfig(task="tickets").metric == "f1"  # on the arithmetic demo's path, still the task's metric
    assert DataConfig(path="my.jsonl", task="tickets").labels == list(TASKS["tickets"].labels)
    assert DataConfig(path="my.jsonl", task="label", labels=["yes", "no"]).labels == ["yes", "no"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"template": "alpaca"}, "data.template='alpaca': expected one of plain, instruction, chat"),
        ({"loss_on": "prompt"}, "data.loss_on='prompt': expected one of assistant, response, all"),
        ({"split": [0.8, 0.1]}, "data.split=[0.8, 0.1]: expected three fractions"),
        ({"split": [0.5, 0.3, 0.3]}, "expected fractions summing to 1"),
        ({"split": [0.5, "x", 0.5]}, "data.split[1]='x': expected float"),
        ({"max_length": 0}, "data.max_length=0: expected a positive number"),
        ({"seq_len": "long"}, "data.seq_len='long': expected int"),
        ({"packing": True, "max_length": 512, "seq_len": 256}, "data.max_length=512 > data.seq_len=256"),
        ({"fields": {"answer": "x"}}, "data.fields.answer: unknown name; allowed: prompt, completion"),
        ({"fields": {"prompt": 3}}, "data.fields.prompt=3: expected str"),
        ({"task": "math"}, "data.task='math': expected one of arithmetic"),
        ({"metric": "bertscore"}, "data.metric='bertscore': expected one of '', accuracy"),
        ({"clean": {"max_chars": -1}}, "data.clean.max_chars=-1: expected >= 0"),
        ({"path": ""}, "data.path='': expected a data file or a demo name"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(FtcoreError) as e:
        data(overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_keys_list_the_allowed_ones():
    with pytest.raises(FtcoreError, match=r"data\.pth: unknown key; allowed: path, format"):
        data({"pth": "x.jsonl"})
    with pytest.raises(FtcoreError, match=r"data\.clean\.html: unknown key; allowed: strip_html"):
        data({"clean": {"html": False}})


def test_nested_clean_and_int_for_float():
    cfg = data({"clean": {"dedup": False}, "split": [1, 0, 0]})
    assert cfg.clean.dedup is False and cfg.clean.strip_html is True and cfg.split == [1, 0, 0]


def test_from_omegaconf_containers():
    omegaconf = pytest.importorskip("omegaconf")
    node = omegaconf.OmegaConf.create({"split": [0.8, 0.1, 0.1], "fields": {"prompt": "q"}, "clean": {"dedup": False}})
    cfg = data(node)
    assert cfg.split == [0.8, 0.1, 0.1] and type(cfg.split) is list and cfg.fields == {"prompt": "q"}
    assert cfg.clean.dedup is False


def test_resolve_path_demo_names_and_repo_relative(tmp_path, monkeypatch):
    for name in DEMOS:
        assert resolve_path(name).is_file()
    monkeypatch.chdir(tmp_path)  # a repo-relative path still resolves from another cwd
    assert resolve_path("ftcore/data/demo/arithmetic.jsonl").is_file()
    with pytest.raises(FtcoreError, match=r"data.path='nope.jsonl': no such file"):
        resolve_path("nope.jsonl")
