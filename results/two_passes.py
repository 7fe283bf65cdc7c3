"""
results/two_passes.py: does a two-pass AdaMix step cost two passes? One configuration per process
(the allocator's state is the process's), LoRA, AdaMix-LoRA, adapter and AdaMix-adapter training
steps interleaved as bench.py times them; all-MiniLM-L6-v2, batch 32 x 64 tokens.

    OMP_NUM_THREADS=1 python results/two_passes.py fp32 keep once
    for m in give_back keep; do for c in every once; do
        python results/two_passes.py bf16 $m $c; done; done

precision: fp32 | bf16. memory: keep (train.keep_freed_memory, what train.py does on a CPU) or
give_back (glibc's default). cast: once (train.keep_frozen_weights_in_bf16, what train.py does in
bf16) or every (autocast casts the frozen weights at every forward). Prints one line: each step's
median ms, the two ratios, and the page faults per step of each row (Linux).
"""
import copy
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench  # noqa: E402
import train  # noqa: E402
from model import from_pretrained  # noqa: E402

precision, memory, cast = sys.argv[1:4]
if memory == "keep" and not train.keep_freed_memory():
    sys.exit("keep: not a Linux with glibc")
base = from_pretrained("minilm", num_labels=2)
B, T, V = 32, 64, base.config.vocab_size
g = torch.Generator().manual_seed(0)
batch = {"input_ids": torch.randint(V // 2, V, (B, T), generator=g),
         "attention_mask": torch.ones(B, T, dtype=torch.long),
         "token_type_ids": torch.zeros(B, T, dtype=torch.long),
         "labels": torch.randint(2, (B,), generator=g)}
jobs = {}
for method in ("lora", "adamix-lora", "adapter", "adamix-adapter"):
    cfg = train.TrainConfig(method=method, consistency=1.0 if method.startswith("adamix") else 0.0)
    net, router = train.adapt(copy.deepcopy(base), cfg)
    net.train()
    if precision == "bf16" and cast == "once":
        train.keep_frozen_weights_in_bf16(net)
    opt = train.make_optimizer(net, cfg)

    def step(net=net, router=router, cfg=cfg, opt=opt):
        with train.autocast(precision, "cpu"):
            loss = train.training_loss(net, router, batch, cfg, "classification")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    jobs[method] = step
t = bench.interleaved(jobs, rounds=3, repeats=2, device="cpu")
faults = {}
for method, step in jobs.items():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(), step()
    faults[method] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 2
ms = " ".join(f"{m} {1e3 * s:.0f}" for m, s in t.items())
print(f"{precision} memory {memory} cast {cast}: ms {ms}; adamix-lora/lora "
      f"{t['adamix-lora'] / t['lora']:.3f} adamix-adapter/adapter "
      f"{t['adamix-adapter'] / t['adapter']:.3f}; page faults/step "
      + " ".join(f"{m} {f}" for m, f in faults.items()))
