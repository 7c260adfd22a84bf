"""scripts/monitor.py and ftcore/monitor/check.py: a run re-scored on fresh files, drift, history, exit codes.

The tiny random model cannot learn arithmetic in a test's time, and a stored score of 0 could never drop; so the
run learns a trivially learnable task (the arithmetic demo's prompts, every answer "7") to a stored test score of
1.0, which the changed answers ("8": every answer + 1) must then fail.
"""

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import ROOT, data_cache, tiny_dir, tiny_run  # noqa: F401 (fixtures)

from ftcore.config import run_config
from ftcore.data.collate import pad_token_id
from ftcore.data.config import DataConfig
from ftcore.data.pipeline import build_datasets, build_file
from ftcore.errors import FtcoreError
from ftcore.eval.run import EvalRunConfig, score_model
from ftcore.formats.hf import load_pretrained
from ftcore.monitor.check import MonitorConfig, read_history, run_check
from ftcore.monitor.config import DriftThresholds
from ftcore.monitor.drift import SCORES, DriftReference
from ftcore.monitor.plot import plot_history
from ftcore.monitor.reference import prompt_embeddings, prompt_ids
from ftcore.schema import build
from ftcore.train import train

DEMO = ROOT / "ftcore" / "data" / "demo"
LIMIT = 100  # fresh prompts a check scores: length_psi's noise is about 9 / n = 0.09 here


def load_script():
    spec = importlib.util.spec_from_file_location("monitor_script", ROOT / "scripts" / "monitor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


monitor = load_script()


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def learned(tiny_dir, data_cache, tmp_path_factory):  # noqa: F811
    """(run dir, files): a LoRA run that learned to answer 7, and fresh files in its data format: its own test
    split, the same with every answer + 1, and the tickets demo's prompts."""
    root = tmp_path_factory.mktemp("monitor")
    prompts = [json.loads(line)["prompt"] for line in (DEMO / "arithmetic.jsonl").read_text().splitlines()]
    data = write_jsonl(root / "sevens.jsonl", ({"prompt": p, "completion": "7"} for p in prompts))
    cfg = tiny_run(tiny_dir, data_cache, root / "run", train__max_steps=21, train__eval_every=0, optim__lr=3e-2,
                   data__path=str(data), data__schema="pair", data__task="arithmetic", eval__max_examples=16,
                   eval__drift_reference=True, eval__drift_prompts=128)  # fmt: skip
    train(run_config(cfg))
    stored = json.loads((root / "run" / "eval.json").read_text())
    assert stored["finetuned"]["accuracy"] == 1.0 and stored["baseline"]["accuracy"] == 0.0  # the check can fail
    _, tok = load_pretrained(tiny_dir)
    test = build_datasets(run_config(cfg).data, tok)[0]["test"]
    lines = data.read_text().splitlines()
    own = [json.loads(lines[int(ex["where"].rsplit(":", 1)[1]) - 1]) for ex in test]  # the test split's records
    tickets = [json.loads(line) for line in (DEMO / "tickets.jsonl").read_text().splitlines()[:LIMIT]]
    plus_one = [{**r, "completion": str(int(r["completion"]) + 1)} for r in own]
    other = [{"prompt": f"{r['instruction']}\n{r['input']}", "completion": r["output"]} for r in tickets]
    files = {
        "own": write_jsonl(root / "own_test.jsonl", own),
        "plus_one": write_jsonl(root / "plus_one.jsonl", plus_one),
        "tickets": write_jsonl(root / "tickets.jsonl", other),
    }
    return root / "run", files


def test_passes_on_its_own_test_split_and_fails_on_changed_answers(learned, tiny_dir, tmp_path):  # noqa: F811
    run, files = learned
    history = tmp_path / "monitor.jsonl"
    args = [str(run), "--history", str(history), "--limit", str(LIMIT), "--device", "cpu"]
    assert monitor.main([*args, "--data", str(files["own"]), "--score-base"]) == 0
    assert monitor.main([*args, "--data", str(files["plus_one"])]) == 1
    own, changed = read_history(history)
    assert len(history.read_text().splitlines()) == 2  # one line per check
    assert own["score"] == 1.0 and own["passed"] and own["n"] == LIMIT and own["examples"] > LIMIT
    assert changed["score"] == 0.0 and changed["drop"] == 1.0 and not changed["passed"]
    assert own["stored_score"] == changed["stored_score"] == 1.0 and own["base_score"] == 0.0
    assert own["base_fresh_score"] == 0.0 and changed["base_fresh_score"] is None  # the base never says 7
    assert own["file"] == str(files["own"]) and len(own["sha256"]) == 64 and own["sha256"] != changed["sha256"]
    assert own["git"]["sha"] and own["versions"]["torch"] and math.isfinite(own["perplexity"])
    # drawn like the training prompts: under every threshold; the prompts are the same, so are the drift scores
    assert own["drift_over"] == [] and set(own["drift"]) == set(SCORES) and changed["drift"] == own["drift"]
    # the drift scores are those of the base model's embeddings of the prompts as the model sees them
    model, tok = load_pretrained(tiny_dir)
    data_cfg = build(DataConfig, json.loads((run / "config.json").read_text())["data"])
    ids = prompt_ids(build_file(files["own"], data_cfg, tok)[0][:LIMIT], data_cfg.template, tok)
    expected = DriftReference.load(run / "drift_reference.json").scores(
        ids, prompt_embeddings(model, ids, pad_token_id(tok), "cpu"))  # fmt: skip
    assert own["drift"] == pytest.approx(expected, rel=1e-6)
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "monitor.png").stat().st_size > 1000


def test_another_tasks_prompts_drift_over_the_thresholds(learned, tmp_path):
    run, files = learned
    history = tmp_path / "monitor.jsonl"
    args = [str(run), "--data", str(files["tickets"]), "--history", str(history), "--limit", str(LIMIT),
            "--device", "cpu", "--max-drop", "1", "--no-plot"]  # fmt: skip
    assert monitor.main([*args, "--fail-on-drift"]) == 1  # the score's check passes (--max-drop 1); drift fails it
    (record,) = read_history(history)
    assert record["passed"] and record["drift_over"] == list(SCORES), record["drift"]
    assert not (tmp_path / "monitor.png").exists()


def test_missing_run_files_name_the_file(learned, tmp_path):
    run, files = learned
    partial = tmp_path / "run"
    partial.mkdir()
    for name in ("config.json", "eval.json"):
        (partial / name).write_text((run / name).read_text())
    (partial / "final").symlink_to(run / "final")
    with pytest.raises(FtcoreError, match=r"drift_reference.json: no such file .*--no-drift"):
        run_check(MonitorConfig(str(partial), str(files["own"])))
    (partial / "eval.json").unlink()
    with pytest.raises(FtcoreError, match=r"eval.json: no such file \(the run's stored test score"):
        run_check(MonitorConfig(str(partial), str(files["own"]), drift=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for argv, named in (([str(partial), "--data", str(files["own"]), "--no-drift"], partial / "eval.json"),
                        ([str(run), "--data", str(tmp_path / "nope.jsonl"), "--no-drift"], tmp_path / "nope.jsonl"),
                        ([str(tmp_path / "none"), "--data", str(files["own"])], tmp_path / "none")):  # fmt: skip
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "monitor.py"), *argv, "--device", "cpu"],
                           capture_output=True, text=True, cwd=ROOT, env=env)  # fmt: skip
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
        assert r.stderr.startswith("error: ") and str(named) in r.stderr
    assert not (partial / "monitor.jsonl").exists() and not (run / "monitor.jsonl").exists()


def test_full_fine_tuning_embeds_with_the_base_and_scores_the_tuned_model(tiny_dir, data_cache, tmp_path):  # noqa: F811
    """peft=full: final/ is the whole tuned model, which is scored; the drift embeddings come from the base."""
    cfg = tiny_run(tiny_dir, data_cache, tmp_path / "run", train__max_steps=3, train__eval_every=0, optim__lr=1e-2,
                   peft__method="full", eval__drift_reference=True, eval__drift_prompts=32)  # fmt: skip
    train(run_config(cfg))
    run, fresh, data_cfg = tmp_path / "run", DEMO / "arithmetic.jsonl", run_config(cfg).data
    record = run_check(MonitorConfig(str(run), str(fresh), limit=12, device="cpu"))
    reference = DriftReference.load(run / "drift_reference.json")
    shifts = {}
    for name, path in (("base", tiny_dir), ("tuned", run / "final")):
        model, tok = load_pretrained(path)
        examples = build_file(fresh, data_cfg, tok)[0][:12]
        ids = prompt_ids(examples, data_cfg.template, tok)
        shifts[name] = reference.scores(ids, prompt_embeddings(model, ids, pad_token_id(tok), "cpu"))["embedding_shift"]
    assert record["drift"]["embedding_shift"] == pytest.approx(shifts["base"], rel=1e-6) != shifts["tuned"]
    every = dataclasses.replace(run_config(cfg).eval, max_examples=0)  # the check scores all it is given
    direct = score_model(model, tok, examples, EvalRunConfig(data=data_cfg, eval=every), torch.device("cpu"))
    assert record["n"] == 12 and record["score"] == direct["score"]
    assert record["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-6)


def test_drift_thresholds_defaults_parse_and_over():
    default = DriftThresholds()
    assert default.as_dict() == {"length_psi": 0.25, "token_js": 0.1, "embedding_shift": 0.3}
    assert DriftThresholds.parse("") == default
    assert DriftThresholds.parse("token_js=0.2, embedding_shift=1") == DriftThresholds(0.25, 0.2, 1.0)
    over = default.over({"length_psi": 0.3, "token_js": 0.05, "embedding_shift": math.inf})
    assert over == ["length_psi", "embedding_shift"]
    assert default.over({"token_js": 0.1}) == []  # at the threshold is not over it
    for bad, message in (("psi=1", "name=value with a name in length_psi"), ("token_js=x", "a number >= 0"),
                         ("token_js=-1", "a number >= 0"), ("length_psi", "name=value")):  # fmt: skip
        with pytest.raises(FtcoreError, match=message):
            DriftThresholds.parse(bad)


def test_no_matplotlib_skips_the_plot_with_a_note(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert plot_history([{"score": 1.0}], tmp_path / "monitor.png") is None
    assert capsys.readouterr().out == "monitor: matplotlib is not installed, no plot (pip install 'ftcore[plots]')\n"
    assert not (tmp_path / "monitor.png").exists()


def test_a_served_adapter_scores_as_the_loaded_one(learned, tiny_dir, tmp_path):  # noqa: F811
    """--url: the run's adapter behind scripts/serve.py answers the same prompts (as token ids) with the same
    tokens, so the check's score equals the local one; the own-split check passes, the changed-answer one fails."""
    pytest.importorskip("uvicorn")
    from test_serve import Server

    run, files = learned
    server = Server(tiny_dir, {"sevens": run / "final"}, "--dtype", "float32")
    args = ["--limit", "40", "--device", "cpu", "--no-plot", "--url", server.url, "--served-model", "sevens",
            "--api-key", "test-key"]  # fmt: skip
    try:
        assert monitor.main([str(run), "--history", str(tmp_path / "h.jsonl"), "--data", str(files["own"]), *args]) == 0
        assert monitor.main([str(run), "--history", str(tmp_path / "h.jsonl"), "--data", str(files["plus_one"]),
                             *args]) == 1  # fmt: skip
        with pytest.raises(FtcoreError, match="HTTP 404"):
            run_check(MonitorConfig(run_dir=str(run), data=str(files["own"]), limit=4, device="cpu", drift=False,
                                    url=server.url, served_model="nope", api_key="test-key"))  # fmt: skip
    finally:
        server.stop()
    remote, changed = read_history(tmp_path / "h.jsonl")
    local = run_check(MonitorConfig(run_dir=str(run), data=str(files["own"]), limit=40, device="cpu"))
    assert remote["score"] == local["score"] == 1.0 and changed["score"] == 0.0
    assert remote["served"] == {"url": server.url, "model": "sevens"} and remote["perplexity"] is None
    assert remote["drift"] == pytest.approx(local["drift"], rel=1e-9)


def test_history_survives_a_torn_line_and_foreign_lines(tmp_path):
    from ftcore.monitor.check import append_history

    record = {"score": 0.5, "stored_score": 0.6, "max_drop": 0.05, "passed": False, "metric": "accuracy",
              "run_dir": "r"}  # fmt: skip
    history = tmp_path / "monitor.jsonl"
    history.write_text(json.dumps(record) + "\n" + '{"score": 0.7, "stor')  # a check killed mid-write
    append_history(history, {**record, "score": 0.9})
    history.write_text(history.read_text() + "null\n[1, 2]\n" + json.dumps({"score": 1}) + "\n")
    assert [r["score"] for r in read_history(history)] == [0.5, 0.9]
    if importlib.util.find_spec("matplotlib"):
        assert plot_history(read_history(history), tmp_path / "monitor.png") is not None
