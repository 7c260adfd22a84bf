"""The committed demo datasets are what scripts/make_demo_data.py makes, small, and well-formed."""

import json
import subprocess
import sys
from pathlib import Path

from ftcore.data.config import DEMO_DIR, DEMOS
from ftcore.data.tasks import TICKET_LABELS

ROOT = Path(__file__).parents[1]


def records(name):
    return [json.loads(line) for line in (DEMO_DIR / DEMOS[name].file).read_text().splitlines()]


def test_script_reproduces_the_committed_files(tmp_path):
    subprocess.run([sys.executable, ROOT / "scripts" / "make_demo_data.py", "--out", tmp_path], check=True,
                   capture_output=True)  # fmt: skip
    for name in (d.file for d in DEMOS.values()):
        assert (tmp_path / name).read_bytes() == (DEMO_DIR / name).read_bytes(), name
    assert sum((DEMO_DIR / n).stat().st_size for n in (d.file for d in DEMOS.values())) < 3 * 2**20


def test_demo_contents():
    arithmetic = records("arithmetic")
    assert len(arithmetic) == 2500 and all(r["completion"].isdigit() for r in arithmetic)
    assert max(len(r["prompt"]) for r in arithmetic) < 160
    tickets = records("tickets")
    assert len(tickets) == 1500 and {r["output"] for r in tickets} == set(TICKET_LABELS)
    rewrite = records("rewrite")
    assert len(rewrite) == 1200 and all(r["messages"][-1]["role"] == "assistant" for r in rewrite)
    assert any(len(r["messages"]) == 4 for r in rewrite)  # some two-turn chats
