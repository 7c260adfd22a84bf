"""Full fine-tuning: every parameter trains, except those whose names match a freeze glob.

Globs use fnmatch on our parameter names (`embed_tokens.weight`, `layers.0.self_attn.q_proj.weight`):
`freeze: ["embed_tokens.*", "layers.0.*"]` keeps the embeddings and the first block fixed. A glob
that matches nothing is a typo and fails with the model's top-level module names.
"""

from fnmatch import fnmatchcase

from torch import nn

from ftcore.errors import FtcoreError


def apply_full(model: nn.Module, freeze: list[str]) -> nn.Module:
    names = [n for n, _ in model.named_parameters()]
    for pattern in freeze:
        if not any(fnmatchcase(n, pattern) for n in names):
            top = sorted({n.split(".")[0] for n in names})
            raise FtcoreError(
                f"peft.freeze: {pattern!r} matches no parameter; names look like 'layers.0.mlp.up_proj.weight' "
                f"under {', '.join(top)}"
            )
    for name, p in model.named_parameters():
        p.requires_grad_(not any(fnmatchcase(name, pattern) for pattern in freeze))
    return model
