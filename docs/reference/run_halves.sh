#!/usr/bin/env bash
# How the reference comparison was run on the 2-core machine: run.sh's arms in two halves at once, one thread
# each (`bash docs/reference/run_halves.sh A DIR & bash docs/reference/run_halves.sh B DIR`), then run.sh with
# hydra.run.dir=DIR, which finds every run finished and writes the baseline and the results. Same runs, same
# config hashes as run.sh (each run's config does not depend on the other arms).
set -euo pipefail
half=$1 dir=$2
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
common=(compare.name=reference 'compare.seeds=[0,1,2]' compare.budget=2500000 compare.lr_steps=40
  train.max_steps=200 train.eval_every=50 eval.few_shot=4 logger.wandb.mode=disabled logger.progress=false
  "hydra.run.dir=$dir")
case "$half" in
  A) exec python scripts/compare.py "${common[@]}" 'compare.methods=[lora,dora,loha,hra]' \
       '+compare.variants.pissa={method: lora, init: pissa}' \
       'compare.method_lrs.lora=[3e-4,1e-3,3e-3]' 'compare.method_lrs.dora=[3e-4,1e-3,3e-3]' \
       'compare.method_lrs.loha=[1e-3,3e-3,1e-2]' 'compare.method_lrs.hra=[1e-3,3e-3,1e-2]' ;;
  B) exec python scripts/compare.py "${common[@]}" 'compare.methods=[ia3,prefix,prompt,ln_tuning,full]' \
       'compare.method_lrs.ia3=[3e-3,1e-2,3e-2]' 'compare.method_lrs.prefix=[1e-3,3e-3,1e-2]' \
       'compare.method_lrs.prompt=[3e-3,1e-2,3e-2]' 'compare.method_lrs.ln_tuning=[1e-3,3e-3,1e-2]' \
       'compare.method_lrs.full=[1e-5,3e-5,1e-4]' ;;
  *) echo "usage: bash docs/reference/run_halves.sh A|B DIR" >&2; exit 2 ;;
esac
