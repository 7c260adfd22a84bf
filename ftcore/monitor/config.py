"""The drift thresholds: the one place their defaults live (scripts/monitor.py and the HTTP server read them).

    DriftThresholds().over({"length_psi": 0.4, "token_js": 0.02})         # ["length_psi"]
    DriftThresholds.parse("length_psi=0.3,embedding_shift=0.5")          # the others keep their defaults

Each score of drift.py is 0 for the same distribution; above its threshold it counts as a shift. The defaults:
- length_psi 0.25: the common reading of the population stability index (> 0.25: a real shift). Its noise for n
  prompts of the same distribution is about 9 / n, so windows under about 100 prompts are noisy against it.
- token_js 0.1: Jensen-Shannon divergence (bits) of token frequencies; prompts of one template and task share most
  of their tokens, another task's prompts score several times higher.
- embedding_shift 0.3: the mean embedding's move in units of the reference's per-prompt spread; n prompts' noise
  alone is about 1 / sqrt(n) (0.1 for 100 prompts), so 0.3 is three times that noise at 100 prompts.
"""

import math
from dataclasses import asdict, dataclass, fields

from ftcore.monitor.drift import SCORES
from ftcore.schema import invalid


@dataclass(frozen=True)
class DriftThresholds:
    length_psi: float = 0.25
    token_js: float = 0.1
    embedding_shift: float = 0.3

    def __post_init__(self):
        for name in SCORES:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                raise invalid(f"drift threshold {name}", value, "a number >= 0")

    def over(self, scores: dict[str, float]) -> list[str]:
        """The scores (of those given) above their thresholds, in SCORES order."""
        return [name for name in SCORES if name in scores and scores[name] > getattr(self, name)]

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def parse(cls, text: str) -> "DriftThresholds":
        """`name=value[,name=value...]` (names: length_psi, token_js, embedding_shift); others keep their defaults."""
        allowed = [f.name for f in fields(cls)]
        values = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, value = item.partition("=")
            name = name.strip()
            if not sep or name not in allowed:
                raise invalid("--drift-thresholds", item, f"name=value with a name in {', '.join(allowed)}")
            try:
                values[name] = float(value)
            except ValueError:
                raise invalid(f"--drift-thresholds {name}", value.strip(), "a number >= 0") from None
        return cls(**values)
