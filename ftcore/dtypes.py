"""The one map from config strings to torch dtypes: model.dtype names and train.precision's autocast."""

import torch

from ftcore.schema import one_of

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision; fp32 = no autocast


def torch_dtype(name: str, key: str = "model.dtype") -> torch.dtype:
    """'bfloat16' -> torch.bfloat16; anything else fails naming `key` and the allowed names."""
    one_of(key, name, tuple(DTYPES))
    return DTYPES[name]
