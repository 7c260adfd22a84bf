"""Property-based fuzzing of every reader of user files: arbitrary bytes, and arbitrary JSON records, either
load or fail with an FtcoreError that names the file, never another exception (hypothesis; 500 inputs per
reader, derandomized so CI sees the same inputs every run)."""

import json
import struct

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ftcore.errors import FtcoreError  # noqa: E402

FUZZ = settings(max_examples=500, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip

# JSON values: scalars (with the edge cases: huge ints, NaN/Infinity, odd text) nested in lists and objects
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                    max_size=4), max_leaves=12)  # fmt: skip
KEYS = ["prompt", "completion", "system", "instruction", "input", "output", "messages", "conversations", "role",
        "content", "from", "value"]  # fmt: skip
MESSAGE = st.dictionaries(st.sampled_from(["role", "content", "from", "value"]), JSON | st.sampled_from(
    ["user", "assistant", "system", "human", "gpt"]), max_size=3)  # fmt: skip
RECORD = st.dictionaries(st.sampled_from(KEYS), JSON | st.text(max_size=30) | st.lists(MESSAGE, max_size=3),
                         max_size=4)  # fmt: skip
RECORDS = st.lists(RECORD | JSON, max_size=5)


def loads_or_names_the_file(read, path):
    """Call read(); an FtcoreError must name `path`; any other exception fails the test."""
    try:
        read()
    except FtcoreError as e:
        assert str(path) in str(e) or path.name in str(e), str(e)


def dumps(value) -> str:
    return json.dumps(value, allow_nan=True)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
@FUZZ
@given(data=st.binary(max_size=300))
def test_data_files_of_arbitrary_bytes(tmp_path, suffix, data):
    from ftcore.data.io import load_examples

    path = tmp_path / f"data{suffix}"
    path.write_bytes(data)
    loads_or_names_the_file(lambda: load_examples(path), path)


@FUZZ
@given(records=RECORDS)
def test_jsonl_files_of_arbitrary_records(tmp_path, records):
    from ftcore.data.io import load_examples

    path = tmp_path / "data.jsonl"
    path.write_text("".join(dumps(r) + "\n" for r in records))
    loads_or_names_the_file(lambda: load_examples(path), path)


@FUZZ
@given(records=RECORDS)
def test_json_files_of_arbitrary_records(tmp_path, records):
    from ftcore.data.io import load_examples

    path = tmp_path / "data.json"
    path.write_text(dumps(records))
    loads_or_names_the_file(lambda: load_examples(path), path)


@FUZZ
@given(rows=st.lists(st.dictionaries(st.sampled_from(KEYS), st.text(max_size=20), max_size=4), max_size=5))
def test_csv_files_of_arbitrary_rows(tmp_path, rows):
    import csv

    from ftcore.data.io import load_examples

    path = tmp_path / "data.csv"
    header = sorted({k for r in rows for k in r})
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=header)
        if header:
            w.writeheader()
        w.writerows(rows)
    loads_or_names_the_file(lambda: load_examples(path), path)


CONFIG_KEYS = ["architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
               "rope_parameters", "rope_scaling", "max_position_embeddings", "tie_word_embeddings", "hidden_act",
               "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window"]  # fmt: skip
VALID_CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip


@FUZZ
@given(change=st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON | st.integers(-2, 70), max_size=4),
       drop=st.sets(st.sampled_from(sorted(VALID_CONFIG)), max_size=2))  # fmt: skip
def test_config_json_of_arbitrary_values(tmp_path, change, drop):
    """A valid config with a few keys replaced or removed: a ModelConfig, or one error naming config.json."""
    from ftcore.formats.hf import read_config

    config = {k: v for k, v in {**VALID_CONFIG, **change}.items() if k not in drop}
    (tmp_path / "config.json").write_text(dumps(config))
    loads_or_names_the_file(lambda: read_config(tmp_path), tmp_path / "config.json")


ADAPTER_KEYS = ["peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora",
                "init_lora_weights", "feedforward_modules", "num_virtual_tokens", "prompt_tuning_init",
                "prompt_tuning_init_text", "num_transformer_submodules", "bias", "base_model_name_or_path",
                "boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "boft_dropout"]  # fmt: skip
PEFT_TYPES = st.sampled_from(["LORA", "IA3", "PREFIX_TUNING", "PROMPT_TUNING", "ADALORA", "BOFT"])


@FUZZ
@given(peft_type=PEFT_TYPES, change=st.dictionaries(st.sampled_from(ADAPTER_KEYS), JSON, max_size=4))
def test_adapter_config_of_arbitrary_values(tmp_path, peft_type, change):
    from ftcore.peft.io import config_from_peft

    d = {"peft_type": peft_type, "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "num_virtual_tokens": 4,
         **change}  # fmt: skip
    path = tmp_path / "adapter_config.json"
    loads_or_names_the_file(lambda: config_from_peft(d, path), path)


@FUZZ
@given(data=st.binary(max_size=300))
def test_json_objects_of_arbitrary_bytes(tmp_path, data):
    from ftcore.textfile import read_json_object

    path = tmp_path / "adapter_config.json"
    path.write_bytes(data)
    loads_or_names_the_file(lambda: read_json_object(path), path)


SAFETENSORS_ENTRY = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F4", "x"]) | JSON,
    "shape": st.lists(st.integers(-2, 5), max_size=3) | JSON,
    "data_offsets": st.lists(st.integers(-4, 64), min_size=0, max_size=3) | JSON})  # fmt: skip


@FUZZ
@given(header=st.dictionaries(st.text(max_size=5), SAFETENSORS_ENTRY | JSON, max_size=3), body=st.binary(max_size=64),
       declared=st.none() | st.integers(0, 2**64 - 1))  # fmt: skip
def test_safetensors_of_arbitrary_headers(tmp_path, header, body, declared):
    from ftcore.formats.safetensors import SafetensorsFile

    raw = dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if declared is None else declared) + raw + body)

    def read():
        f = SafetensorsFile(path)
        for name in f.names():
            f.get(name)

    loads_or_names_the_file(read, path)


@FUZZ
@given(data=st.binary(max_size=200))
def test_gguf_of_arbitrary_bytes(tmp_path, data):
    from ftcore.formats.gguf import GGUFReader

    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + data)

    def read():
        with GGUFReader(path) as r:
            for name in r.tensors:
                r.tensor(name)

    loads_or_names_the_file(read, path)


@pytest.mark.filterwarnings("ignore:.*a partial last line")
@FUZZ
@given(data=st.binary(max_size=300))
def test_metrics_of_arbitrary_bytes(tmp_path, data):
    from ftcore.train.log import read_metrics

    (tmp_path / "metrics.jsonl").write_bytes(data)
    loads_or_names_the_file(lambda: read_metrics(tmp_path), tmp_path / "metrics.jsonl")


@pytest.fixture(scope="module")
def state_bytes(tmp_path_factory) -> bytes:
    import torch

    from ftcore.train import checkpoint

    model = torch.nn.Linear(4, 2)
    ckpt = checkpoint.save(tmp_path_factory.mktemp("ckpt"), 1, model, {"optimizer": {"x": torch.zeros(8)}})
    return (ckpt / "state.pt").read_bytes()


@FUZZ
@given(cut=st.integers(0, 10**6), flip=st.none() | st.integers(0, 10**6))
def test_checkpoint_state_truncated_or_flipped(tmp_path, state_bytes, cut, flip):
    from ftcore.train.checkpoint import load_torch

    data = bytearray(state_bytes[: cut % (len(state_bytes) + 1)])
    if flip is not None and data:
        data[flip % len(data)] ^= 0xFF
    path = tmp_path / "state.pt"
    path.write_bytes(bytes(data))
    loads_or_names_the_file(lambda: load_torch(path), path)


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> bytes:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2, "a": 3, "b": 4}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str().encode()


TOKENIZER_CONFIG = st.dictionaries(st.sampled_from(["bos_token", "eos_token", "unk_token", "pad_token",
                                                    "add_bos_token", "chat_template"]),
                                   JSON | st.sampled_from(["<s>", "</s>", "a", "zz"]), max_size=4)  # fmt: skip
GENERATION_CONFIG = st.dictionaries(st.sampled_from(["bos_token_id", "eos_token_id", "pad_token_id"]),
                                    JSON | st.integers(0, 6), max_size=3)  # fmt: skip


@FUZZ
@given(config=TOKENIZER_CONFIG, generation=GENERATION_CONFIG, tokenizer=st.none() | st.binary(max_size=100))
def test_tokenizer_files_of_arbitrary_values(tmp_path, tokenizer_json, config, generation, tokenizer):
    """tokenizer_config.json and generation_config.json with arbitrary values (tokenizer.json valid, or bytes)."""
    from ftcore.formats.tokenizer import Tokenizer

    (tmp_path / "tokenizer.json").write_bytes(tokenizer_json if tokenizer is None else tokenizer)
    (tmp_path / "tokenizer_config.json").write_text(dumps(config))
    (tmp_path / "generation_config.json").write_text(dumps(generation))

    def read():
        tok = Tokenizer.from_dir(tmp_path)
        tok.bos_id, tok.pad_id, tok.stop_ids, tok.encode("a b")

    loads_or_names_the_file(read, tmp_path)
