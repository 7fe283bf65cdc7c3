#!/usr/bin/env bash
# The study "when does AdaMix beat a single adapter?": every run behind results/, one line each, in the
# order they run. A run whose summary results/runs/NAME.json exists is skipped, so the script picks up
# where it stopped; each finished run's summary is committed at once. One training process at a time.
#   cp results/study.sh runs/ && nohup bash runs/study.sh > runs/study.log 2>&1 &   (a copy: bash reads
#   a script while it runs it, so the original can then be edited safely); then python results/report.py
# Common to all: all-MiniLM-L6-v2, movie reviews (mr), batch 32, lr 1e-3, adapter r 16, M 4, up shared.
set -u
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one core per run: torch's threads stall when another process
                                              # shares the cores; a second run or other work can use the other
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"

run() {  # run NAME FLAGS...: train into runs/study/NAME, keep its metrics.json as results/runs/NAME.json
  local name=$1; shift
  [ -e "results/runs/$name.json" ] && return 0
  local resume=""
  [ -e "runs/study/$name/ckpt.pt" ] && resume="--resume"  # a run that was stopped continues
  echo "=== $(date -u +%FT%TZ) $name: $* $resume"
  if python train.py --out_dir "runs/study/$name" "$@" $resume; then
    cp "runs/study/$name/metrics.json" "results/runs/$name.json"
    git add "results/runs/$name.json" && git commit -q -m "results: $name" -- "results/runs/$name.json" || true
  fi
}

# 1. budget: 10 epochs, dev after each; adapter against AdaMix (with every expert tracked on dev)
# 5. and the experts' distance with and without the consistency loss (the λ = 0 run)
run budget-adapter-s0          --method adapter        --epochs 10 --seed 0
run budget-adamix-adapter-s0   --method adamix-adapter --epochs 10 --seed 0 --track_experts
run budget-adamix-adapter-unrouted-zero-s0 --method adamix-adapter --epochs 10 --seed 0 --track_experts --unrouted zero
run budget-adamix-adapter-lambda0-s0 --method adamix-adapter --epochs 10 --seed 0 --track_experts --consistency 0
for seed in 1 2; do
  run budget-adapter-s$seed        --method adapter        --epochs 10 --seed $seed
  run budget-adamix-adapter-s$seed --method adamix-adapter --epochs 10 --seed $seed --track_experts
done
