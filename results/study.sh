#!/usr/bin/env bash
# The study "when does AdaMix beat a single adapter?": every run behind results/, one line each, in the
# order they run. A run whose summary results/runs/NAME.json exists is skipped, so the script picks up
# where it stopped; each finished run's summary is committed at once. One training process per part.
#   cp results/study.sh runs/ && nohup bash runs/study.sh budget > runs/study.log 2>&1 &   (a copy: bash reads
#   a script while it runs it, so the original can then be edited safely); then python results/report.py
#   PLAN=1 bash results/study.sh budget short ...   lists the parts' runs, each "done" or "todo", and runs nothing.
# Common to all: all-MiniLM-L6-v2, movie reviews (mr), batch 32, lr 1e-3, adapter r 16, M 4, up shared, fp32.
set -u
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one core per run: torch's threads stall when another process
                                              # shares the cores; a second run or other work can use the other
cd "$(dirname "$0")/.."  # the repository's root (the script sits in results/, its running copy in runs/)

run() {  # run NAME FLAGS...: train into runs/study/NAME, keep its metrics.json as results/runs/NAME.json
  local name=$1; shift
  if [ -n "${PLAN:-}" ]; then
    if [ -e "results/runs/$name.json" ]; then echo "done $name"; else echo "todo $name"; fi
    return 0
  fi
  [ -e "results/runs/$name.json" ] && return 0
  mkdir -p runs/study
  local lock
  exec {lock}>"runs/study/$name.lock"  # two processes running parts side by side never train the same run:
  if ! flock -n $lock; then            # the lock goes with the process that holds it, even when it is killed
    exec {lock}>&-; return 0
  fi
  local resume=""
  [ -e "runs/study/$name/ckpt.pt" ] && resume="--resume"  # a run that was stopped continues
  echo "=== $(date -u +%FT%TZ) $name: $* $resume"
  # lr 1e-3 unless the run says otherwise (a later flag wins): the study began before the default became 3e-3;
  # fp32 always: its first runs were in fp32, and --precision auto picks bf16 on a CPU where bf16 is faster
  if python train.py --out_dir "runs/study/$name" --lr 1e-3 --precision fp32 "$@" $resume; then
    cp "runs/study/$name/metrics.json" "results/runs/$name.json"
    python results/report.py > /dev/null  # the tables and figures always match the summaries beside them
    git add results/runs/"$name".json results/summary.md results/*.svg &&
      git commit -q -m "results: $name" -- results/runs/"$name".json results/summary.md results/*.svg || true
  fi
  exec {lock}>&-
}

budget() {  # 1. 10 epochs, dev after each: adapter against AdaMix (every expert tracked on dev), paired by seed
  for seed in 0 1 2; do
    run budget-adapter-s$seed        --method adapter        --epochs 10 --seed $seed
    run budget-adamix-adapter-s$seed --method adamix-adapter --epochs 10 --seed $seed --track_experts
  done
}

noconsistency() {  # 5. the experts without the consistency loss (lambda = 0), 10 epochs as in budget, paired by seed
  for seed in ${SEEDS:-0 1 2}; do
    run budget-adamix-adapter-lambda0-s$seed --method adamix-adapter --epochs 10 --seed $seed --track_experts \
      --consistency 0
  done
}

ablate() {  # 2. the authors' update of unrouted experts over 10 epochs, seed 0 (the 2-epoch runs in shortmore first)
  run budget-adamix-adapter-unrouted-zero-s0 --method adamix-adapter --epochs 10 --seed 0 --track_experts --unrouted zero
}

short() {  # 3. the learning rate at the default run's budget (2 epochs), where AdaMix trails most and which decides
           # the default configuration, tuned on dev for each method (seed 0 showed AdaMix far better at 3e-3:
           # its experts get fewer updates); the other ablations are in shortmore
  for seed in ${SEEDS:-0 1 2}; do
    for lr in 1e-3 3e-3; do
      name=$([ $lr = 1e-3 ] || echo "-lr$lr")  # lr 1e-3 is the default: no suffix
      run short-adapter$name-s$seed        --method adapter        --epochs 2 --seed $seed --lr $lr
      run short-adamix-adapter$name-s$seed --method adamix-adapter --epochs 2 --seed $seed --lr $lr
    done
  done
}

unrouted() {  # 2. the authors' update of unrouted experts at the default's budget, against short-adamix-adapter;
              # then at lr 3e-3, the rate dev chose (does it add anything once the experts' step is large enough?)
  for seed in ${SEEDS:-0 1 2}; do
    run short-adamix-adapter-unrouted-zero-s$seed --method adamix-adapter --epochs 2 --seed $seed --unrouted zero
  done
  for seed in ${SEEDS:-0 1 2}; do
    run short-adamix-adapter-lr3e-3-unrouted-zero-s$seed --method adamix-adapter --epochs 2 --seed $seed --lr 3e-3 \
      --unrouted zero
  done
}

shortmore() {  # the rest of 3, one change at a time against AdaMix at lr 3e-3, the rate dev chose for it (at 1e-3
               # its experts are held back by their small share of the updates, which any change that adds
               # updates, such as fewer experts, would seem to cure)
  local seeds=${SEEDS:-0 1 2}
  lr1e2 ${seeds%% *}  # first, on one seed: is 3e-3 the top of the range for both methods? It was for AdaMix,
  for seed in ${seeds#* }; do  # not for the adapter (dev 80.04 against 78.69), so its other seeds at once (cheap)
    [ "$seed" = "${seeds%% *}" ] ||
      run short-adapter-lr1e-2-s$seed --method adapter --epochs 2 --seed $seed --lr 1e-2
  done
  for seed in $seeds; do  # the adapter's dev still rose from 3e-3 to 1e-2 (mean of 3 seeds): one step further
    run short-adapter-lr3e-2-s$seed --method adapter --epochs 2 --seed $seed --lr 3e-2
  done
  for seed in $seeds; do
    for change in "lambda0 --consistency 0" "m2 --experts 2" "identical --expert_init identical" \
                  "lambda10 --consistency 10" "m8 --experts 8" "sharedown --share down" "sharenone --share none"; do
      set -- $change  # the name's suffix, then the flags
      local suffix=$1; shift
      run short-adamix-adapter-lr3e-3-$suffix-s$seed --method adamix-adapter --epochs 2 --seed $seed --lr 3e-3 "$@"
    done
  done
  for seed in ${seeds#* }; do  # AdaMix's other seeds at lr 1e-2, last
    [ "$seed" = "${seeds%% *}" ] ||
      run short-adamix-adapter-lr1e-2-s$seed --method adamix-adapter --epochs 2 --seed $seed --lr 1e-2
  done
  for seed in $seeds; do  # last: lr 3e-4, which 1e-3 < 3e-3 on every seed of both methods predicts is worse
    run short-adamix-adapter-lr3e-4-s$seed --method adamix-adapter --epochs 2 --seed $seed --lr 3e-4
    run short-adapter-lr3e-4-s$seed        --method adapter        --epochs 2 --seed $seed --lr 3e-4
  done
}

lr1e2() {  # lr1e2 SEED...: both methods at lr 1e-2, paired by seed
  for seed in "$@"; do
    run short-adamix-adapter-lr1e-2-s$seed --method adamix-adapter --epochs 2 --seed $seed --lr 1e-2
    run short-adapter-lr1e-2-s$seed        --method adapter        --epochs 2 --seed $seed --lr 1e-2
  done
}

lora() {  # 1. for LoRA: LoRA against AdaMix-LoRA over 10 epochs, paired by seed, both in bf16 autocast (on a
          # CPU with AVX512-BF16 a one-thread step is 1.4x (LoRA) and 1.5x (AdaMix LoRA) faster than in fp32,
          # which makes the 6 runs fit one session; part bf16 measures what bf16 does to accuracy)
  for seed in 0 1 2; do
    run budget-lora-bf16-s$seed        --method lora        --epochs 10 --seed $seed --precision bf16
    run budget-adamix-lora-bf16-s$seed --method adamix-lora --epochs 10 --seed $seed --precision bf16 --track_experts
  done
}

bf16() {  # the default run (2 epochs, lr 3e-3) in bf16 autocast, against the same runs in fp32 (part short), and
          # the adapter likewise: does bf16 change accuracy? (--precision auto takes bf16 where the CPU is faster in it)
  for seed in ${SEEDS:-0 1 2}; do
    run short-adamix-adapter-lr3e-3-bf16-s$seed --method adamix-adapter --epochs 2 --seed $seed --lr 3e-3 --precision bf16
    run short-adapter-lr3e-3-bf16-s$seed        --method adapter        --epochs 2 --seed $seed --lr 3e-3 --precision bf16
  done
}

fewshot() {  # 4. K examples per class drawn by seed from train; dev and test unchanged; batch 8, 20 epochs;
             # the small K first (cheap), each seed's pair together
  for k in ${KS:-16 64 256}; do for seed in 0 1 2 3 4; do for method in adapter adamix-adapter; do
    run fewshot-k$k-$method-s$seed --method $method --kshot $k --batch_size 8 --epochs 20 --seed $seed
  done; done; done
}

mixreg() {  # 6. mixture or regulariser, at the default run's budget (2 epochs, lr 3e-3, bf16), 5 seeds, paired:
            # the single adapter with the consistency loss alone (two dropout passes, lambda 1, no experts), the
            # adapter and AdaMix (seeds 3 and 4 added to part bf16's 0-2), then the adapter with as many
            # forward/backward passes as AdaMix (twice the steps: 4 epochs; matched compute)
  for seed in ${SEEDS:-0 1 2 3 4}; do
    run short-adapter-lr3e-3-bf16-consistency-s$seed --method adapter --epochs 2 --seed $seed --lr 3e-3 \
      --precision bf16 --consistency 1
    run short-adapter-lr3e-3-bf16-s$seed        --method adapter        --epochs 2 --seed $seed --lr 3e-3 --precision bf16
    run short-adamix-adapter-lr3e-3-bf16-s$seed --method adamix-adapter --epochs 2 --seed $seed --lr 3e-3 --precision bf16
  done
  for seed in ${SEEDS:-0 1 2 3 4}; do
    run short-adapter-lr3e-3-bf16-steps2x-s$seed --method adapter --epochs 4 --seed $seed --lr 3e-3 --precision bf16
  done
}

mixreglora() {  # 6. the same question where AdaMix won (part lora: 10 epochs, lr 1e-3, bf16): LoRA with the
                # consistency loss alone, against budget-lora-bf16 and budget-adamix-lora-bf16
  for seed in ${SEEDS:-0 1 2}; do
    run budget-lora-bf16-consistency-s$seed --method lora --epochs 10 --seed $seed --precision bf16 --consistency 1
  done
}

every() {  # 7. a cheaper consistency step: the second pass and the KL on every k-th step only, at the
           # default run's budget (2 epochs, lr 3e-3, bf16); k = 1 is the default run itself, rerun with
           # this code (its attention path changed in bf16), whose test also has the dev-chosen soups
  for seed in ${SEEDS:-0 1 2}; do
    for k in 1 2 4; do
      run every-adamix-adapter-k$k-s$seed --method adamix-adapter --epochs 2 --seed $seed --lr 3e-3 \
        --precision bf16 --consistency_every $k
    done
  done
}

for part in "${@:-budget}"; do "$part"; done  # bash results/study.sh [PART...]: parts in order; two processes
                                              # (each with its own parts) can run side by side
