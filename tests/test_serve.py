"""scripts/serve.py over real HTTP on 127.0.0.1: answers equal offline generate(), batching across adapters,
streaming, /v1/models, /metrics, errors that keep the server serving, the API key, SIGTERM.

The server runs in float64 so a batch's rounding cannot flip a greedy argmax against the one-prompt reference.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from test_train import tiny_dir  # noqa: F401 (a fixture)

from ftcore.formats.hf import load_pretrained
from ftcore.model.generate import generate
from ftcore.peft import load_adapter, save_adapter
from ftcore.peft.attach import apply
from ftcore.peft.config import PeftConfig

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

ROOT = Path(__file__).parents[1]
ADAPTERS = {  # name -> the method's config; prefix tuning is batched on its own, the others share batches
    "lora": dict(method="lora", r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "ia3": dict(method="ia3"),
    "prefix": dict(method="prefix", num_virtual_tokens=4),
}
NOISE = {"lora": 0.5, "ia3": 3.0, "prefix": 2.0}  # enough that each adapter changes the tiny model's answers
KEY = "test-key"
QUESTIONS = ["What is 2 + 3?", "Name a colour.", "Count to five.", "Say hello.", "What is 7 times 6?",
             "Spell cat.", "Is ice cold?", "Pick a number."]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_served(tmp_path_factory, tiny_dir):  # noqa: F811
    """(base dir, {adapter name: dir}): the 2-layer random model with SmolLM2's tokenizer (test_train's) and three
    adapters whose weights are random (so each one changes the answers)."""
    out = tmp_path_factory.mktemp("serve")
    adapters = {}
    for i, (name, spec) in enumerate(ADAPTERS.items()):
        m, _ = load_pretrained(tiny_dir)
        apply(m, PeftConfig(**spec, base_model_name_or_path=str(tiny_dir)))
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * NOISE[name])
        save_adapter(m, out / name)
        adapters[name] = out / name
    return tiny_dir, adapters


class Server:
    def __init__(self, base, adapters, *extra):
        args = [sys.executable, str(ROOT / "scripts" / "serve.py"), "--model", str(base), "--port", "0",
                "--dtype", "float64", "--name", "base", "--api-key", KEY, "--log-level", "warning", *extra]
        args += [a for name, d in adapters.items() for a in ("--adapter", f"{name}={d}")]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        m = re.search(r"http://([\d.]+):(\d+)", line)
        if not m:
            self.proc.kill()
            raise AssertionError(f"server did not start: {line}{self.proc.stderr.read()}")
        self.url = f"http://{m.group(1)}:{m.group(2)}"
        self.client = httpx.Client(base_url=self.url, timeout=120, headers={"Authorization": f"Bearer {KEY}"})

    def post(self, path, body, **kw):
        return self.client.post(path, json=body, **kw)

    def stop(self):
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


@pytest.fixture(scope="module")
def server(tiny_served):
    base, adapters = tiny_served
    s = Server(base, adapters, "--max-batch", "32")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def offline(tiny_served):
    """name -> (model, tokenizer) in float64, loaded as a user would without the server."""
    base, adapters = tiny_served
    out = {"base": load_pretrained(base, dtype=torch.float64)}
    for name, d in adapters.items():
        m, tok = load_pretrained(base, dtype=torch.float64)
        out[name] = (load_adapter(m, d), tok)
    for m, _ in out.values():
        m.eval()
    return out


def offline_chat(offline, name, question, n):
    model, tok = offline[name]
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]))
    new = generate(model, [ids], n, stop_ids=tok.stop_ids, pad_id=tok.pad_id)[0]
    return new, tok.decode(new)


def chat(server, model, question, n=8, **kw):
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": n,
            "temperature": 0, "return_token_ids": True, **kw}  # fmt: skip
    return server.post("/v1/chat/completions", body)


@pytest.mark.parametrize("name", ["base", "lora", "ia3", "prefix"])
def test_greedy_chat_and_completion_equal_offline_generate(server, offline, name):
    r = chat(server, name, QUESTIONS[0])
    assert r.status_code == 200, r.text
    body = r.json()
    ids, text = offline_chat(offline, name, QUESTIONS[0], 8)
    assert body["choices"][0]["token_ids"] == ids
    assert body["choices"][0]["message"]["content"] == text
    assert body["object"] == "chat.completion" and body["model"] == name
    assert body["usage"]["completion_tokens"] == len(ids)

    model, tok = offline[name]
    prompt = "The capital of France is"
    want = generate(model, [tok.encode(prompt)], 6, stop_ids=tok.stop_ids, pad_id=tok.pad_id)[0]
    r = server.post("/v1/completions", {"model": name, "prompt": prompt, "max_tokens": 6, "temperature": 0,
                                        "return_token_ids": True})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == want
    assert r.json()["choices"][0]["text"] == tok.decode(want)


def test_adapters_change_the_answers(server):
    """The check above would pass for adapters the server ignored, if they changed nothing: they do change it."""
    answers = {name: chat(server, name, QUESTIONS[1]).json()["choices"][0]["token_ids"] for name in
               ("base", "lora", "ia3", "prefix")}  # fmt: skip
    assert len({tuple(a) for a in answers.values()}) == 4


def test_concurrent_requests_over_adapters_batch_and_equal_offline(server, offline):
    jobs = [(("lora", "ia3", "prefix", "base")[i % 4], QUESTIONS[i % len(QUESTIONS)], 4 + i % 5) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda j: chat(server, j[0], j[1], j[2]), jobs))
    assert [r.status_code for r in replies] == [200] * 32
    for (name, question, n), r in zip(jobs, replies):
        assert r.json()["choices"][0]["token_ids"] == offline_chat(offline, name, question, n)[0], (name, question)
    families = {f.name: f for f in text_string_to_metric_families(server.client.get("/metrics").text)}
    steps = {(s.name, s.labels.get("le")): s.value for s in families["ftcore_batch_size"].samples}
    # rows per decode step: lora, ia3 and the base share one engine, so some steps held more than one model's rows
    # (more than 8 = prefix's own engine could hold alone: a batch of the shared engine mixed adapters)
    assert steps[("ftcore_batch_size_bucket", "8.0")] < steps[("ftcore_batch_size_count", None)]


def test_sampling_with_a_seed_equals_offline(server, offline):
    model, tok = offline["lora"]
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": QUESTIONS[2]}]))
    want = generate(model, [ids], 10, temperature=0.9, top_p=0.8, seed=123, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    r = chat(server, "lora", QUESTIONS[2], 10, temperature=0.9, top_p=0.8, seed=123)
    assert r.json()["choices"][0]["token_ids"] == want[0]


def test_stop_strings_cut_the_text(server, offline):
    full = chat(server, "lora", QUESTIONS[3], 12).json()["choices"][0]["message"]["content"]
    assert len(full) > 4
    stop = full[2:4]
    cut = chat(server, "lora", QUESTIONS[3], 12, stop=[stop]).json()["choices"][0]
    assert cut["message"]["content"] == full[: full.index(stop)]
    assert cut["finish_reason"] == "stop"


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_streaming_yields_the_same_text(server, endpoint):
    body = {"model": "ia3", "max_tokens": 10, "temperature": 0}
    body.update({"messages": [{"role": "user", "content": QUESTIONS[4]}]} if endpoint == "chat" else {"prompt": "Once"})
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    whole = server.post(path, body).json()["choices"][0]
    whole = whole["message"]["content"] if endpoint == "chat" else whole["text"]
    pieces, finish, done = [], None, False
    with server.client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            choice = json.loads(line[6:])["choices"][0]
            pieces.append(choice["delta"].get("content", "") if endpoint == "chat" else choice["text"])
            finish = choice["finish_reason"] or finish
    assert done and finish in ("stop", "length")
    assert "".join(pieces) == whole and len(pieces) > 2


def test_models_lists_the_base_and_adapters(server):
    data = server.client.get("/v1/models").json()["data"]
    assert {(m["id"], m["method"]) for m in data} == {("base", "base"), ("lora", "lora"), ("ia3", "ia3"),
                                                       ("prefix", "prefix")}  # fmt: skip


BAD = [  # (body or raw bytes, status, a word the message must contain)
    (b"{not json", 400, "JSON"),
    ({"model": "base"}, 400, "messages"),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "nope"),
    ({"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "base", "messages": [{"role": "user", "content": "hi " * 3000}]}, 400, "tokens"),
    ({"model": "base", "messages": "hi"}, 400, "messages"),
    ({"model": "base", "messages": [{"role": "user", "content": 3}]}, 400, "messages[0]"),
    ({"model": "base", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2.5}, 400, "max_tokens"),
    ({"model": "base", "messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "'n'"),
    ([1, 2], 400, "JSON object"),
    (b"[" * 50000, 400, "nested"),
    (b'{"model": "base", "messages": [{"role": "user", "content": "\\ud800"}]}', 400, "tokenized"),  # lone surrogate
    ({"model": "base", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
     400, "response_format"),
    ({"model": "base", "messages": [{"role": "user", "content": "x" * 200_000}]}, 413, "bytes"),
]


@pytest.mark.parametrize("body,status,word", BAD)
def test_bad_requests_get_a_json_error_and_the_server_keeps_serving(server, body, status, word):
    if isinstance(body, bytes):
        r = server.client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    else:
        r = server.post("/v1/chat/completions", body)
    assert r.status_code == status, r.text
    assert word in r.json()["error"]["message"]
    assert chat(server, "base", "hi", 2).status_code == 200


def test_prompt_over_the_context(server):
    r = server.post("/v1/completions", {"model": "base", "prompt": "word " * 1900, "max_tokens": 500})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_a_missing_or_wrong_api_key_is_401(server, headers):
    r = httpx.post(server.url + "/v1/chat/completions", headers=headers,
                   json={"model": "base", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


def test_metrics_parse_and_count_the_requests(tiny_served):
    base, adapters = tiny_served
    s = Server(base, {"lora": adapters["lora"]})
    try:
        for _ in range(3):
            assert chat(s, "lora", "hi", 3).status_code == 200
        assert chat(s, "base", "hi", 3).status_code == 200
        assert chat(s, "nope", "hi", 3).status_code == 404
        assert s.post("/v1/completions", {"model": "base"}).status_code == 400
        families = {f.name: f for f in text_string_to_metric_families(s.client.get("/metrics").text)}
    finally:
        s.stop()
    requests = {(x.labels["endpoint"], x.labels["model"], x.labels["code"]): x.value
                for x in families["ftcore_requests"].samples if x.name == "ftcore_requests_total"}  # fmt: skip
    assert requests == {("chat", "lora", "200"): 3, ("chat", "base", "200"): 1, ("chat", "-", "404"): 1,
                        ("completions", "-", "400"): 1}  # fmt: skip
    errors = {x.labels["code"]: x.value for x in families["ftcore_errors"].samples if x.name == "ftcore_errors_total"}
    assert errors == {"404": 1, "400": 1}
    generated = {x.labels["model"]: x.value for x in families["ftcore_generated_tokens"].samples
                 if x.name == "ftcore_generated_tokens_total"}  # fmt: skip
    assert 0 < generated["lora"] <= 9 and 0 < generated["base"] <= 3
    for name in ("ftcore_request_latency_seconds", "ftcore_time_to_first_token_seconds", "ftcore_batch_size",
                 "ftcore_queue_depth", "ftcore_tokens_per_second"):  # fmt: skip
        assert name in families
    ttft = {x.name: x.value for x in families["ftcore_time_to_first_token_seconds"].samples}
    assert ttft["ftcore_time_to_first_token_seconds_count"] == 4


def test_sigterm_finishes_in_flight_requests_then_exits(tiny_served):
    base, adapters = tiny_served
    s = Server(base, {"lora": adapters["lora"]}, "--max-batch", "1")
    try:
        replies = []
        threads = [threading.Thread(target=lambda q=q: replies.append(chat(s, "lora", q, 40))) for q in QUESTIONS[:3]]
        for t in threads:
            t.start()
        time.sleep(1.0)  # the requests are in: one decoding, two queued
        s.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        code = s.proc.wait(60)
    finally:
        s.stop()
    assert [r.status_code for r in replies] == [200] * 3
    assert [len(r.json()["choices"][0]["token_ids"]) for r in replies] == [40] * 3  # nothing cut short
    assert code == -signal.SIGTERM  # uvicorn re-raises the signal once it has shut down, as a signalled exit


def test_drift_scores_of_served_prompts(tiny_served, tmp_path):
    """A served run's adapter is scored against its run's drift reference: the arithmetic test prompts stay under
    the thresholds, the tickets prompts go over them (gauges and alert counters in /metrics)."""
    from ftcore.data.config import DataConfig
    from ftcore.data.format import split_prompt
    from ftcore.data.pipeline import build_datasets
    from ftcore.monitor.config import DriftThresholds
    from ftcore.monitor.reference import build_reference

    base, adapters = tiny_served
    model, tok = load_pretrained(base)
    data_cfg = DataConfig(path="arithmetic")
    splits, _ = build_datasets(data_cfg, tok)
    run = tmp_path / "run"
    shutil.copytree(adapters["lora"], run / "final")
    build_reference(model, splits["train"], data_cfg, tok, tok.pad_id, "cpu", 256).save(run / "drift_reference.json")
    shifted = build_datasets(DataConfig(path="tickets"), tok)[0]["test"]
    s = Server(base, {"lora": run / "final"}, "--drift-window", "64", "--drift-every", "64")

    def send(examples, before=None):
        bodies = [{"model": "lora", "messages": split_prompt(ex["messages"])[0], "max_tokens": 1, "temperature": 0}
                  for ex in examples[:64]]  # fmt: skip
        with ThreadPoolExecutor(16) as pool:
            assert {r.status_code for r in pool.map(lambda b: s.post("/v1/chat/completions", b), bodies)} == {200}
        for _ in range(600):  # the worker scores the window after the batch that filled it
            families = {f.name: f for f in text_string_to_metric_families(s.client.get("/metrics").text)}
            scores = {x.labels["score"]: x.value for x in families["ftcore_drift_score"].samples}
            if scores and scores != before:
                break
            time.sleep(0.1)
        alerts = {x.labels["score"]: x.value for x in families["ftcore_drift_alerts"].samples
                  if x.name == "ftcore_drift_alerts_total"}  # fmt: skip
        return scores, alerts

    try:
        assert len(splits["test"]) >= 64 and len(shifted) >= 64
        same, alerts = send(splits["test"])
        limits = DriftThresholds()
        assert set(same) == {"length_psi", "token_js", "embedding_shift"}
        assert all(same[k] < getattr(limits, k) for k in same), same
        assert not alerts
        moved, alerts = send(shifted, same)
    finally:
        s.stop()
    over = {k for k in moved if moved[k] > getattr(limits, k)}
    assert {"length_psi", "token_js"} <= over, moved
    assert set(alerts) == over


def test_a_full_queue_is_429_and_the_rest_are_answered(tiny_served):
    base, _ = tiny_served
    s = Server(base, {}, "--max-batch", "1", "--max-queue", "1")
    try:
        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda q: chat(s, "base", q, 30).status_code, QUESTIONS[:6]))
        full = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    finally:
        s.stop()
    assert set(codes) == {200, 429} and codes.count(200) >= 2
    assert full.status_code == 200  # the model defaults to the base


def test_comparison_adapters_name_each_final_by_arm_and_seed(tmp_path):
    from ftcore.errors import FtcoreError
    from ftcore.serve.models import comparison_adapters

    runs = []
    for arm, seed in (("lora", 0), ("lora", 1), ("ia3", 0)):
        final = tmp_path / "runs" / f"{arm}_seed{seed}_abc" / "final"
        final.mkdir(parents=True)
        runs.append({"arm": arm, "seed": seed, "run_dir": str(final.parent)})
    runs.append({"arm": "dora", "seed": 0, "run_dir": str(tmp_path / "runs" / "unfinished")})
    (tmp_path / "plan.json").write_text(json.dumps({"runs": runs}))
    assert comparison_adapters(tmp_path) == {"lora-seed0": str(tmp_path / "runs/lora_seed0_abc/final"),
                                             "lora-seed1": str(tmp_path / "runs/lora_seed1_abc/final"),
                                             "ia3-seed0": str(tmp_path / "runs/ia3_seed0_abc/final")}  # fmt: skip
    with pytest.raises(FtcoreError, match="plan.json: not found"):
        comparison_adapters(tmp_path / "runs")


def test_openai_client_variants_mean_the_same_request(server):
    """A tiny temperature is greedy (no overflow); `developer` is the system role; text parts are one string."""
    greedy = chat(server, "lora", QUESTIONS[5], 6).json()["choices"][0]["token_ids"]
    tiny = chat(server, "lora", QUESTIONS[5], 6, temperature=1e-39)
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["token_ids"] == greedy
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTIONS[5]}]
    variant = [{"role": "developer", "content": "Be brief."},
               {"role": "user", "content": [{"type": "text", "text": QUESTIONS[5][:4]},
                                            {"type": "text", "text": QUESTIONS[5][4:]}]}]  # fmt: skip
    answers = [server.post("/v1/chat/completions", {"model": "lora", "messages": m, "max_tokens": 6, "temperature": 0,
                                                    "return_token_ids": True, "n": None}).json()  # fmt: skip
               for m in (system, variant)]
    assert answers[0]["choices"][0]["token_ids"] == answers[1]["choices"][0]["token_ids"]


def test_stream_usage_and_a_client_that_leaves_stops_its_row(tiny_served):
    base, _ = tiny_served
    s = Server(base, {}, "--max-tokens-limit", "2000", "--max-batch", "1")
    try:
        body = {"model": "base", "prompt": "Once", "max_tokens": 5, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        with s.client.stream("POST", "/v1/completions", json=body) as r:
            events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client gives up after 0.3 s
            s.post("/v1/completions", {"model": "base", "prompt": "Once", "max_tokens": 2000, "temperature": 0},
                   timeout=0.3)  # fmt: skip
        time.sleep(1.5)
        families = {f.name: f for f in text_string_to_metric_families(s.client.get("/metrics").text)}
        t0 = time.perf_counter()
        assert s.post("/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": 2}).status_code == 200
        waited = time.perf_counter() - t0
    finally:
        s.stop()
    codes = {x.labels["code"]: x.value for x in families["ftcore_requests"].samples
             if x.name == "ftcore_requests_total"}  # fmt: skip
    assert codes.get("499") == 1
    generated = [x.value for x in families["ftcore_generated_tokens"].samples if x.name.endswith("_total")]
    assert sum(generated) < 5 + 2000  # the row stopped before its 2000 tokens
    assert waited < 5


def test_adapters_that_change_base_weights_get_a_private_base_and_lily_decodes_alone(tiny_served, tmp_path):
    """HF PEFT saves a targeted embed_tokens' base weight in the adapter file and loading copies it in: the shared
    base must not change. Lily mixes a batch's rows, so it gets its own engine, one row per batch."""
    from safetensors.torch import load_file, save_file

    from ftcore.serve.models import load_served

    base, adapters = tiny_served
    m, _ = load_pretrained(base)
    original = m.embed_tokens.weight.detach().clone()
    apply(m, PeftConfig(method="lora", r=2, alpha=4, target_modules=["embed_tokens", "q_proj"]))
    save_adapter(m, tmp_path / "emb")
    tensors = load_file(tmp_path / "emb" / "adapter_model.safetensors")
    tensors["base_model.model.model.embed_tokens.base_layer.weight"] = original + 0.5
    save_file(tensors, tmp_path / "emb" / "adapter_model.safetensors")
    m, _ = load_pretrained(base)
    apply(m, PeftConfig(method="lily", r=2, target_modules=["q_proj", "v_proj"]))
    save_adapter(m, tmp_path / "lily")

    served = load_served(base, {"emb": tmp_path / "emb", "lily": tmp_path / "lily", "lora": adapters["lora"]})
    shared = served.base.engine
    assert torch.equal(shared.model.embed_tokens.module_for(0).weight, original)  # the base is untouched
    assert torch.equal(shared.model.embed_tokens.module_for(served.by_name["emb"].adapter).weight, original + 0.5)
    assert served.by_name["emb"].engine is shared and served.by_name["lora"].engine is shared
    lily = served.by_name["lily"].engine
    assert lily is not shared and lily.max_batch == 1


def test_rows_join_and_leave_a_running_batch_and_each_equals_its_offline_answer(tiny_served, offline):
    """Continuous batching, step by step: a row with a short prompt starts; a longer prompt joins (the batch
    widens), the first row leaves, a short prompt joins a wide batch (and the all-padding columns are trimmed);
    every row's tokens equal generate() on its prompt alone."""
    from ftcore.serve.batch import Job
    from ftcore.serve.decode import RunningBatch
    from ftcore.serve.models import load_served

    base, adapters = tiny_served
    served = load_served(base, {k: adapters[k] for k in ("lora", "ia3")}, dtype=torch.float64, base_name="base")
    tok = served.base.engine.tokenizer

    def job(name, text, n, **kw):
        return Job(tok.encode(text), n, served.by_name[name], **kw)

    first = job("base", "Hi", 6)
    wide = job("lora", "A much longer prompt that is wider than the running batch is now", 12)
    late = job("ia3", "Short one", 8)
    sampled = job("lora", "Pick a word", 10, temperature=0.8, top_p=0.9, seed=7)
    batch = RunningBatch(served.base.engine, [first])
    batch.step()
    batch.admit([wide])  # longer than the batch's width: every row gets more left padding
    assert batch.mask.shape[1] == len(wide.prompt)
    while first.finish_reason is None:
        batch.step()
    assert first not in batch.rows and batch.mask.any(0).all()  # the first row left, its padding went with it
    batch.admit([late, sampled])
    while batch.rows:
        batch.step()
    for j in (first, wide, late, sampled):
        model, _ = offline[j.served.name]
        want = generate(model, [j.prompt], j.max_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id,
                        temperature=j.temperature, top_p=j.top_p, seed=j.seed)[0]  # fmt: skip
        assert j.ids == want, j.served.name
