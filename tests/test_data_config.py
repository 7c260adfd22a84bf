"""DataConfig: defaults validate, wrong keys/values/types fail naming the key, conf/data/*.yaml agree."""

from pathlib import Path

import pytest

from ftcore.data.config import DEMOS, DataConfig, resolve_path
from ftcore.data.tasks import TASKS
from ftcore.errors import FtcoreError

CONF = Path(__file__).parents[1] / "conf" / "data"


def test_defaults_validate():
    cfg = DataConfig().validate()
    assert cfg.split == [0.70, 0.15, 0.15] and cfg.template == "chat" and cfg.clean.dedup


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"template": "alpaca"}, "data.template='alpaca': expected one of plain, instruction, chat"),
        ({"loss_on": "prompt"}, "data.loss_on='prompt': expected one of assistant, response, all"),
        ({"split": [0.8, 0.1]}, "data.split=[0.8, 0.1]: expected three fractions"),
        ({"split": [0.5, 0.3, 0.3]}, "expected fractions summing to 1"),
        ({"max_length": 0}, "data.max_length=0: expected a positive number"),
        ({"seq_len": "long"}, "data.seq_len='long': expected int"),
        ({"packing": True, "max_length": 512, "seq_len": 256}, "data.max_length=512 > data.seq_len=256"),
        ({"fields": {"answer": "x"}}, "data.fields.answer: unknown name; allowed: prompt, completion"),
        ({"task": "math"}, "data.task='math': expected one of arithmetic"),
        ({"metric": "bertscore"}, "data.metric='bertscore'"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(FtcoreError) as e:
        DataConfig.from_dict(overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_keys_list_the_allowed_ones():
    with pytest.raises(FtcoreError, match=r"data\.pth: unknown key; allowed: path, format"):
        DataConfig.from_dict({"pth": "x.jsonl"})
    with pytest.raises(FtcoreError, match=r"data\.clean\.html: unknown key; allowed: strip_html"):
        DataConfig.from_dict({"clean": {"html": False}})


def test_from_dict_nested_clean_and_int_for_float():
    cfg = DataConfig.from_dict({"clean": {"dedup": False}, "split": [1, 0, 0]})
    assert cfg.clean.dedup is False and cfg.clean.strip_html is True and cfg.split == [1, 0, 0]


def test_from_omegaconf_containers():
    omegaconf = pytest.importorskip("omegaconf")
    node = omegaconf.OmegaConf.create({"split": [0.8, 0.1, 0.1], "fields": {"prompt": "q"}, "clean": {"dedup": False}})
    cfg = DataConfig.from_dict(node)
    assert cfg.split == [0.8, 0.1, 0.1] and type(cfg.split) is list and cfg.fields == {"prompt": "q"}
    assert cfg.clean.dedup is False


def test_resolve_path_demo_names_and_repo_relative(tmp_path, monkeypatch):
    for name in DEMOS:
        assert resolve_path(name).is_file()
    monkeypatch.chdir(tmp_path)  # the yaml's repo-relative path still resolves from another cwd
    assert resolve_path("ftcore/data/demo/arithmetic.jsonl").is_file()
    with pytest.raises(FtcoreError, match=r"data.path='nope.jsonl': no such file"):
        resolve_path("nope.jsonl")


@pytest.mark.parametrize("name", ["arithmetic", "tickets", "rewrite"])
def test_conf_files_mirror_dataconfig(name):
    yaml = pytest.importorskip("yaml")
    values = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    cfg = DataConfig.from_dict(values, where=f"conf/data/{name}.yaml")
    assert set(values) == set(DataConfig().to_dict())  # every key present, so each can be overridden
    assert set(values["clean"]) == set(DataConfig().to_dict()["clean"])
    assert cfg.task == name and cfg.metric == TASKS[name].metric
    assert resolve_path(cfg.path).name == Path(cfg.path).name and resolve_path(cfg.path).is_file()
