#!/usr/bin/env bash
# The reference comparison: SmolLM2-135M on the arithmetic demo, 10 arms at a 2.5M-parameter
# budget (LoRA r=8, DoRA r=7, PiSSA r=8, LoHa r=4, HRA r=16, prefix and prompt at their 100-token cap, IA3 and LN
# tuning at their fixed sizes, full fine-tuning) plus the base model zero- and 4-shot; 3 seeds; 3 learning rates
# per method tried for 40 steps; 200-step runs. Resumable: rerun the same command (finished runs are skipped).
# Usage: bash docs/reference/run.sh hydra.run.dir=comparisons/reference_arithmetic
cd "$(dirname "$0")/../.."
exec python scripts/compare.py compare.name=reference \
  'compare.methods=[lora,dora,loha,hra,ia3,prefix,prompt,ln_tuning,full]' \
  '+compare.variants.pissa={method: lora, init: pissa}' \
  'compare.seeds=[0,1,2]' compare.budget=2500000 compare.lr_steps=40 \
  'compare.method_lrs.lora=[3e-4,1e-3,3e-3]' 'compare.method_lrs.dora=[3e-4,1e-3,3e-3]' \
  'compare.method_lrs.loha=[1e-3,3e-3,1e-2]' 'compare.method_lrs.hra=[1e-3,3e-3,1e-2]' \
  'compare.method_lrs.ia3=[3e-3,1e-2,3e-2]' 'compare.method_lrs.prefix=[1e-3,3e-3,1e-2]' \
  'compare.method_lrs.prompt=[3e-3,1e-2,3e-2]' 'compare.method_lrs.ln_tuning=[1e-3,3e-3,1e-2]' \
  'compare.method_lrs.full=[1e-5,3e-5,1e-4]' \
  train.max_steps=200 train.eval_every=50 eval.few_shot=4 \
  logger.wandb.mode=disabled logger.progress=false "$@"
