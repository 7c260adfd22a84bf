"""Fair comparisons of PEFT methods: matched trainable-parameter budgets, several seeds, an optional
learning-rate sweep per method, resumable; and ablations over the same machinery.

    cc = compare_config({"methods": ["lora", "ia3"], "seeds": [0, 1], "budget": 200_000, "peft": {...}})
    run_comparison(cc, base_run_config_dict, "comparisons/demo")   # results.csv, results.md, *.png

config.py (CompareConfig), budget.py (exact counts on the meta device, knob solving), plan.py
(arms, runs, config hashes, run states), runner.py (trials, runs, baseline), results.py, plots.py.
The command line is scripts/compare.py (Hydra, conf/compare.yaml) and scripts/ablate.py.
"""

from ftcore.compare.budget import KNOBS, count_trainable, solve_budget
from ftcore.compare.config import CompareConfig, VaryConfig, compare_config
from ftcore.compare.plan import config_hash, make_run, plan_arms, run_state
from ftcore.compare.runner import run_comparison, train_command

__all__ = [
    "KNOBS",
    "CompareConfig",
    "VaryConfig",
    "compare_config",
    "config_hash",
    "count_trainable",
    "make_run",
    "plan_arms",
    "run_comparison",
    "run_state",
    "solve_budget",
    "train_command",
]
