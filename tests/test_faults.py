"""Faults a run must survive without losing anything, and bad files that must fail with one line (issue 23, first
part): a full disk while a metrics line is appended, the leftovers of a killed run, a partial last line in
metrics.jsonl, a signal, files that are not UTF-8 JSON."""

import errno
import json
import re
import signal
import subprocess
import sys
import time

import pytest
from test_train import ROOT, data_cache, losses, tiny_dir, tiny_run  # noqa: F401 - pytest fixtures

import ftcore.train.log
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
