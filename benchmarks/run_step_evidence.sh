#!/bin/bash
# The evidence runs behind docs/results/text/EVIDENCE.md, in priority order (raw lines in results/evidence/).
# One experiment process at a time, one thread each: the machine is shared. Every step resumes.
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
E=".venv/bin/python benchmarks/step_evidence.py run --out results/evidence --log results/evidence/progress.log --resume"
mkdir -p results/evidence
# 3a: ||g||^2 spread for all and last:2 (the gradient only, no refined forward)
$E --corpus wiki --split dev --selectors all,last:2 --lrs "" --taus "" --max-uncertain 100 --tag sq
$E --corpus kjv --split dev --selectors all,last:2 --lrs "" --taus "" --max-uncertain 100 --tag sq
# 3b: last:2, fixed lr grid vs tau grid, 3 corpora, dev and test
$E --corpus wiki,kjv,shakespeare --split dev,test --selectors last:2 --lrs 1e-4,1e-3,1e-2 --taus 0.3,1,3,10 \
   --max-uncertain 250 --check 3 --tag grid
# transfer to Qwen2.5 (cached last:2)
$E --model qwen2.5-coder-0.5b --corpus wiki --split dev,test --selectors last:2 --lrs 1e-3 --taus 0.3,1,3,10 \
   --max-uncertain 150 --check 2 --tag grid
# 3c: which parameters carry the gain (tau grid; full-path selectors cost a full forward per point)
$E --corpus wiki --split dev,test --selectors "all,last:8,*norm*,model.embed_tokens,model.layers.0|model.layers.1|model.layers.2|model.layers.3" \
   --lrs "" --taus 1,3 --max-uncertain 80 --check 1 --tag params
# transfer to Gemma-3 (uncached: a full forward per point)
$E --model gemma3-270m --corpus wiki --split dev,test --selectors last:2 --lrs "" --taus 0.3,1,3 --max-uncertain 80 \
   --check 1 --tag grid
# all parameters: the fixed lr the issue measured (1e-4) against two taus, on the same positions
$E --corpus wiki --split dev,test --selectors all --lrs 1e-4 --taus 1,3 --max-uncertain 220 --check 1 --tag all
