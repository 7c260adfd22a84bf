"""Faults a run must survive without losing anything, and bad files that must fail with one line: a full disk
while a metrics line is appended or a checkpoint is written, a damaged newest checkpoint, a kill while one is
written, the leftovers of a killed run, a partial last line in metrics.jsonl, signals in and outside the loop,
files that are not UTF-8 JSON, a config.json with values of the wrong type."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from test_train import ROOT, data_cache, losses, tiny_dir, tiny_run  # noqa: F401 - pytest fixtures

import ftcore.train.checkpoint
import ftcore.train.log
import ftcore.train.loop
from ftcore.cli import STOPPED_EXIT
from ftcore.config import run_config
from ftcore.data.io import load_examples
from ftcore.errors import FtcoreError
from ftcore.train import train
from ftcore.train.log import read_metrics


def full_disk_at(step: int):
    """An `open` for ftcore.train.log whose append of the `step` event writes half a line, then fails (ENOSPC)."""
    real_open = open

    class Filling:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            if json.loads(text).get("step") == step:
                self.f.write(text[: len(text) // 2])
                self.f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

    return lambda path, mode="r", *a, **k: Filling(real_open(path, mode, *a, **k)) if mode == "a" else \
        real_open(path, mode, *a, **k)  # fmt: skip


def test_full_disk_while_logging_then_resume_equals_uninterrupted(tiny_dir, data_cache, tmp_path, monkeypatch):  # noqa: F811
    train(run_config(tiny_run(tiny_dir, data_cache, tmp_path / "straight", eval__baseline=False)))
    run_dir = tmp_path / "full"
    monkeypatch.setattr(ftcore.train.log, "open", full_disk_at(6), raising=False)
    with pytest.raises(FtcoreError, match=r"metrics.jsonl: cannot append the step 6 event \(No space left on device\)"):
        train(run_config(tiny_run(tiny_dir, data_cache, run_dir, eval__baseline=False)))
    assert not (run_dir / "metrics.jsonl").read_text().endswith("\n")  # the partial line is there
    monkeypatch.undo()  # space freed
    with pytest.warns(UserWarning, match=r"metrics.jsonl:7: a partial last line \(an interrupted write\) is ignored"):
        train(run_config(tiny_run(tiny_dir, data_cache, run_dir, eval__baseline=False, train__resume="auto")))
    assert losses(run_dir) == losses(tmp_path / "straight")  # exactly: resumed from step 4
    assert (run_dir / "metrics.jsonl").read_text().endswith("\n")


def test_fresh_start_removes_leftovers_and_keeps_the_old_metrics(tiny_dir, data_cache, tmp_path):  # noqa: F811
    """A run killed before its first checkpoint: an unfinished .tmp_ checkpoint and a metrics.jsonl of its steps."""
    old = [{"step": 1, "loss": 9.0, "lr": 0.1}, {"step": 2, "loss": 8.0, "lr": 0.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in old))
    orphan = tmp_path / "checkpoints" / ".tmp_step_abc"
    orphan.mkdir(parents=True)
    (orphan / "trainable.safetensors").write_bytes(b"\0" * 1000)
    train(run_config(tiny_run(tiny_dir, data_cache, tmp_path, eval__baseline=False, train__max_steps=3,
                              train__eval_every=0)))  # fmt: skip
    assert [e["step"] for e in read_metrics(tmp_path) if "loss" in e] == [1, 2, 3]  # each step once
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl.prev").read_text().splitlines()] == old
    assert not orphan.exists()


def test_read_metrics_skips_a_partial_last_line_and_names_a_bad_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:2: a partial last line"):
        assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]
    path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 2.0}\n')
    with pytest.raises(FtcoreError, match=r"metrics.jsonl:1: expected one JSON object per line"):
        read_metrics(tmp_path)


def test_cli_stopped_by_sigterm_exits_143_after_saving(tiny_dir, data_cache, tmp_path):  # noqa: F811
    """A scheduler can tell "stopped, resumable" (143 for SIGTERM, 130 for SIGINT) from "finished" (0)."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), f"model.path={tiny_dir}", "train.max_steps=400",
           "train.eval_every=0", "train.batch_size=2", "eval.baseline=false", "logger.wandb.mode=disabled",
           "logger.progress=false", f"data.cache_dir={data_cache}", f"hydra.run.dir={run_dir}"]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").is_file() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == STOPPED_EXIT["SIGTERM"] == 143, out[-2000:]
    assert "stopped by SIGTERM at step" in out and "resume with train.resume=auto" in out
    assert list((run_dir / "checkpoints").glob("step_*")) and not (run_dir / "final").exists()


@pytest.mark.parametrize(
    "data, expected",
    [
        ('{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1"), r":1: byte 0xe9 at column 16 is not UTF-8"),
        ('{"prompt": "a", "completion": "b"}\n'.encode("utf-16"), r": UTF-16 text .*expected UTF-8"),
        (b'{"prompt": "a", "completion": "b"}\n\x00\xff\xfe garbage\n', r":2: byte 0xff at column 2 is not UTF-8"),
        (b'{"prompt": "a", "completion": NaN}\n', r":1: NaN is not a JSON number"),
        (b'{"prompt": "a", "completion": -Infinity}\n', r":1: -Infinity is not a JSON number"),
    ],
)
def test_data_files_that_are_not_utf8_json_fail_naming_file_and_line(tmp_path, data, expected):
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    with pytest.raises(FtcoreError, match=f"^{re.escape(str(path))}{expected}"):
        load_examples(path)


def test_a_utf8_bom_is_fine(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a", "completion": "b"}\n')
    assert len(load_examples(path)) == 1


@pytest.mark.parametrize(
    "content, expected", [(bytes(range(256)), "is not UTF-8"), (b"[1, 2]", "expected a JSON object, got list")]
)
def test_a_corrupt_adapter_config_fails_naming_it(hf_checkpoint, tmp_path, content, expected):
    from ftcore.formats.hf import load_model
    from ftcore.peft import load_adapter

    path, _ = hf_checkpoint("llama_tied")
    (tmp_path / "adapter_config.json").write_bytes(content)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(FtcoreError, match=f"adapter_config.json.*{expected}"):
        load_adapter(load_model(path), tmp_path)


LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "tie_word_embeddings": True}  # fmt: skip


@pytest.mark.parametrize("change, expected", [
    ({"hidden_size": "64"}, r": hidden_size='64': expected int"),
    ({"num_hidden_layers": 2.5}, r": num_hidden_layers=2.5: expected int"),
    ({"vocab_size": 0}, r": vocab_size=0: expected a positive integer"),
    ({"num_key_value_heads": [2]}, r": num_key_value_heads=\[2\]: expected int or null"),
    ({"tie_word_embeddings": "yes"}, r": tie_word_embeddings='yes': expected bool"),
    ({"rope_theta": "1e4"}, r": rope_theta='1e4': expected float"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": None}}, r": rope_parameters.rope_theta=None: expected float"),
    ({"architectures": "LlamaForCausalLM"}, r": architectures='LlamaForCausalLM': expected list or null"),
    ({"architectures": [7]}, r": architectures\[0\]=7: expected str"),
])  # fmt: skip
def test_config_json_values_of_the_wrong_type_fail_naming_the_key(tmp_path, change, expected):
    from ftcore.formats.hf import read_config

    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_CONFIG, **change}))
    with pytest.raises(FtcoreError, match=f"^{re.escape(str(tmp_path / 'config.json'))}{expected}$"):
        read_config(tmp_path)


def test_a_config_json_that_is_a_list_fails_naming_it(tmp_path):
    from ftcore.formats.hf import read_config

    (tmp_path / "config.json").write_text(json.dumps([LLAMA_CONFIG]))
    with pytest.raises(FtcoreError, match=r"config.json: expected a JSON object, got list$"):
        read_config(tmp_path)


@pytest.mark.parametrize("change, expected", [
    ({"r": "8"}, r": r='8': expected int"),
    ({"lora_alpha": None}, r": lora_alpha=None: expected float"),
    ({"target_modules": [1, 2]}, r": target_modules\[0\]=1: expected str"),
])  # fmt: skip
def test_adapter_config_values_of_the_wrong_type_fail_naming_the_key(tmp_path, change, expected):
    from ftcore.peft.io import config_from_peft

    d = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], **change}
    with pytest.raises(FtcoreError, match=f"^adapter_config.json{expected}$"):
        config_from_peft(d, "adapter_config.json")


def test_cli_warnings_are_one_line():
    code = ("import warnings\nfrom ftcore.cli import user_errors\nwith user_errors():\n"
            "    warnings.warn('checkpoints/step_00000012: state.pt is missing; skipped')")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.stderr == "warning: checkpoints/step_00000012: state.pt is missing; skipped\n" and p.returncode == 0


def run_to(tmp_path, tiny_dir, data_cache, name, **overrides):  # noqa: F811
    cfg = tiny_run(tiny_dir, data_cache, tmp_path / name, **{"eval__baseline": False, **overrides})
    return train(run_config(cfg))


def test_a_truncated_newest_checkpoint_resumes_from_the_previous_one(tiny_dir, data_cache, tmp_path, capsys):  # noqa: F811
    """Checkpoints at steps 4, 8, 12; the newest truncated: resume=auto warns, redoes steps 9-12 from step 8
    and ends exactly where the run that was never damaged ended."""
    run_to(tmp_path, tiny_dir, data_cache, "run", train__max_steps=12)
    straight = losses(tmp_path / "run")
    final = json.loads((tmp_path / "run" / "eval.json").read_text())["finetuned"]
    state = tmp_path / "run" / "checkpoints" / "step_00000012" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.warns(UserWarning, match=r"step_00000012: state\.pt has 1000 bytes, the manifest says \d+ "
                      r"\(truncated\?\); skipped \(moved to step_00000012\.corrupt\)"):  # fmt: skip
        run_to(tmp_path, tiny_dir, data_cache, "run", train__max_steps=12, train__resume="auto")
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / 'step_00000008'} at step 8" in capsys.readouterr().out
    assert losses(tmp_path / "run") == straight
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["finetuned"] == final


class Killed(BaseException):
    """What a SIGKILL does to the code after it: nothing runs (no except clause catches this)."""


def test_a_kill_while_a_checkpoint_is_written_resumes_from_the_previous_one(tiny_dir, data_cache, tmp_path,  # noqa: F811
                                                                            monkeypatch):  # fmt: skip
    run_to(tmp_path, tiny_dir, data_cache, "straight")
    real, calls = ftcore.train.checkpoint.write_manifest, []

    def killed_at_the_second(ckpt_dir, files):  # checkpoints at steps 4 and 8: killed writing step 8's
        calls.append(ckpt_dir)
        if len(calls) == 2:
            raise Killed
        real(ckpt_dir, files)

    monkeypatch.setattr(ftcore.train.checkpoint, "write_manifest", killed_at_the_second)
    with pytest.raises(Killed):
        run_to(tmp_path, tiny_dir, data_cache, "killed")
    assert [p.name for p in (tmp_path / "killed" / "checkpoints").glob(".tmp_step_*")]  # what a kill leaves
    monkeypatch.undo()
    run_to(tmp_path, tiny_dir, data_cache, "killed", train__resume="auto")
    assert not list((tmp_path / "killed" / "checkpoints").glob(".tmp_step_*"))
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")


def test_a_full_disk_at_a_checkpoint_stops_the_run_with_one_error(tiny_dir, data_cache, tmp_path, monkeypatch):  # noqa: F811
    real = ftcore.train.checkpoint.save_torch

    def full_at_step_8(obj, path):
        if obj.get("step") == 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, path)

    monkeypatch.setattr(ftcore.train.checkpoint, "save_torch", full_at_step_8)
    with pytest.raises(FtcoreError, match=r"step_00000008: cannot write the checkpoint \(No space left on device"):
        run_to(tmp_path, tiny_dir, data_cache, "run")
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000004"]  # the older one intact, no .tmp_step_*
    assert ftcore.train.checkpoint.verify(ckpts / "step_00000004") is None


def sigterm_on_call(n: int):
    """An evaluate_task that sends this process SIGTERM on its n-th call (1-based), as a scheduler would."""
    real, calls = ftcore.train.loop.evaluate_task, []

    def evaluate_task(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        return real(*args, **kwargs)

    return evaluate_task


def test_sigterm_during_the_baseline_evaluation_says_nothing_was_saved(tiny_dir, data_cache, tmp_path,  # noqa: F811
                                                                       monkeypatch, capsys):  # fmt: skip
    monkeypatch.setattr(ftcore.train.loop, "evaluate_task", sigterm_on_call(1))
    summary = run_to(tmp_path, tiny_dir, data_cache, "run", eval__baseline=True)
    line = "stopped by SIGTERM during the baseline evaluation; no checkpoint was saved yet; run the command again"
    assert summary["signal"] == "SIGTERM" and summary["status"] == line
    assert line in capsys.readouterr().out
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sigterm_during_the_final_evaluation_resumes_to_the_evaluation(tiny_dir, data_cache, tmp_path,  # noqa: F811
                                                                       monkeypatch, capsys):  # fmt: skip
    run_to(tmp_path, tiny_dir, data_cache, "straight", train__eval_every=0, train__max_steps=6)
    monkeypatch.setattr(ftcore.train.loop, "evaluate_task", sigterm_on_call(1))
    summary = run_to(tmp_path, tiny_dir, data_cache, "run", train__eval_every=0, train__max_steps=6)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000006"  # saved at the last step though save_every=0
    line = (f"stopped by SIGTERM during the final export and evaluation; saved: checkpoint {ckpt}; "
            "resume with train.resume=auto")  # fmt: skip
    assert summary["signal"] == "SIGTERM" and summary["status"] == line and line in capsys.readouterr().out
    assert not (tmp_path / "run" / "eval.json").exists()
    monkeypatch.undo()
    summary = run_to(tmp_path, tiny_dir, data_cache, "run", train__eval_every=0, train__max_steps=6,
                     train__resume="auto")  # fmt: skip
    assert summary["step"] == 6 and losses(tmp_path / "run") == losses(tmp_path / "straight")  # no step twice
    a, b = (json.loads((tmp_path / n / "eval.json").read_text())["finetuned"] for n in ("straight", "run"))
    assert a == b
