"""The one map from config strings to torch dtypes: model.dtype names and train.precision's autocast."""

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # model.dtype
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision; fp32 = no autocast
