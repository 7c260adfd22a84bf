"""Ablations over the comparison machinery: `python scripts/ablate.py NAME [hydra overrides]`.

NAME is a config of conf/compare/ (lora_rank, lora_targets, prefix_length, or your own), so this is
`python scripts/compare.py compare=NAME [overrides]`: the same runs, resumption, tables and plots.

    python scripts/ablate.py lora_rank compare.vary.values=[2,8,32] train.max_steps=100
    python scripts/ablate.py lora_targets compare.budget=300000   # rank solved per target set
    python scripts/ablate.py prefix_length compare.seeds=[0,1,2]
"""

import runpy
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "conf" / "compare"

if __name__ == "__main__":
    names = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        got = f" (got {sys.argv[1]!r})" if len(sys.argv) > 1 else ""
        print(
            f"error: usage: scripts/ablate.py NAME [overrides]; NAME is one of {', '.join(names)}{got}", file=sys.stderr
        )
        sys.exit(2)
    sys.argv = [str(Path(__file__).with_name("compare.py")), f"compare={sys.argv[1]}", *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
