"""
bench.py: what AdaMix costs, measured in one run on this machine and reported as ratios.

    python bench.py                          # all-MiniLM-L6-v2, batch 32 x 64 tokens, CUDA if present
    python bench.py --batch_size 16 --seq_len 128 --precisions fp32   # writes out/bench.json
    python bench.py --results runs/mr        # the results table of the README, from train.py's metrics.json
    python bench.py --model smollm2 --batch_size 4 --seq_len 64 --rounds 2 --repeats 1 --precisions fp32  # a decoder

Training: one optimiser step (forward passes, loss, backward, AdamW, zero_grad) of AdaMix against a
single adapter, LoRA and the head alone. The paper's claim: a step costs what its two forward passes
cost (two views for the consistency loss), not M times more, because each pass routes through one
expert. Inference: the merged model against a single adapter (AdaMix-adapter) and against the plain
pretrained model (AdaMix-LoRA folded into the frozen weights): the claim is equal cost.
A decoder (GPT-2, Llama) is timed as a language model (the loss on every next token; no task head, so
no "head only" row) and, in a third table, decoding: greedy new tokens per second with and without the
key/value cache, for the pretrained model, LoRA, merged AdaMix-LoRA and AdaMix-LoRA folded into the weights.
Every configuration is timed in interleaved rounds and the median is kept, so that a slow moment of
the machine hits all of them alike; absolute times vary between machines, the ratios much less.
"""
import argparse
import copy
import itertools
import json
import math
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import adamix
import model
from model import from_pretrained, generate
import train

TRAINING = {  # name: train.py flags; the two views of AdaMix are the consistency loss's two passes
    "head only": dict(method="head-only"),
    "adapter": dict(method="adapter"),
    "LoRA": dict(method="lora"),
    "AdaMix adapter, 2 passes": dict(method="adamix-adapter"),
    "AdaMix adapter, batched 2B": dict(method="adamix-adapter", batched_views=True),
    "AdaMix LoRA, 2 passes": dict(method="adamix-lora"),
}
# decoders: INFERENCE rows
DECODING = ["pretrained model", "LoRA", "AdaMix LoRA, merged", "AdaMix LoRA, folded"]
INFERENCE = {  # name: (train.py flags, what to do to the trained modules before serving)
    "pretrained model": (dict(method="head-only"), None),
    "adapter": (dict(method="adapter"), None),
    "AdaMix adapter, merged": (dict(method="adamix-adapter"), None),
    "AdaMix adapter, collapsed": (dict(method="adamix-adapter"), adamix.collapse_experts),
    "LoRA": (dict(method="lora"), None),
    "AdaMix LoRA, merged": (dict(method="adamix-lora"), None),
    "AdaMix LoRA, folded": (dict(method="adamix-lora"), adamix.fold_lora),
}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved(jobs, rounds, repeats, device):
    """Median seconds per call of every job, timing them in turns: round 1 of each, round 2 of
    each..."""
    times = defaultdict(list)
    for fn in jobs.values():  # warm-up (allocator, kernels, caches)
        fn(), fn()
    for _ in range(rounds):
        for name, fn in jobs.items():
            times[name].append(timed(lambda: [fn() for _ in range(repeats)], device) / repeats)
    return {name: statistics.median(t) for name, t in times.items()}


def saved_activation_bytes(fn):
    """Bytes of the tensors autograd keeps for backward during fn(): the training memory that grows
    with the batch (weights and optimiser state aside). Works on every device; shared storage
    counted once."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def matmul_flops_per_s(n, c, device, dtype):
    """FLOP/s of a plain (n, c) @ (c, 4c) matmul, the shape of the FFN's first layer: the device's
    practical peak."""
    a = torch.randn(n, c, device=device, dtype=dtype)
    b = torch.randn(c, 4 * c, device=device, dtype=dtype)
    seconds = interleaved({"mm": lambda: a @ b}, rounds=5, repeats=10, device=device)["mm"]
    return 2 * n * c * 4 * c / seconds


def attention_path_of(T, precision, device):
    """The attention path (model.attention_path) that training at T tokens takes in `precision`."""
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16)[precision]
    q = torch.zeros(1, 1, T, 8, dtype=dtype, device=device, requires_grad=True)
    return model.attention_path(q, q)


def profile_top(fn, device, k=3):
    """The k ops with the most self time in one call of fn: [(op, share of all ops' self time)]."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        sync(device)
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in events)
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return [(e.key, getattr(e, key) / total) for e in events[:k]]


def bench(args):
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    # each row is timed in every precision, in the same rounds
    precisions = args.precisions.split(",")
    # what train.py does on a CPU, unless told to measure without it
    give_back = getattr(args, "give_back_memory", False)
    kept = device == "cpu" and not give_back and train.keep_freed_memory()
    cast_once = not getattr(args, "cast_every_forward", False)
    base = from_pretrained(args.model)
    decoder = base.config.decoder  # a language model: next-token loss, and decoding speed
    if not decoder:
        base = from_pretrained(args.model, num_labels=2)
    kind = "lm" if decoder else "classification"
    B, T, V = args.batch_size, args.seq_len, base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    # ordinary tokens, no special ones
    batch = {"input_ids": torch.randint(V // 2, V, (B, T), generator=g),
             "attention_mask": torch.ones(B, T, dtype=torch.long)}
    if decoder:
        batch["labels"] = batch["input_ids"].clone()  # every next token is a target
    else:
        batch.update(token_type_ids=torch.zeros(B, T, dtype=torch.long),
                     labels=torch.randint(2, (B,), generator=g))
    batch = {k: v.to(device) for k, v in batch.items()}
    common = dict(experts=args.experts, bottleneck=args.bottleneck, lora_rank=args.lora_rank)

    # --- training steps, keyed (name, precision)
    jobs, flops, memory, trainable = {}, {}, {}, {}
    also_compiled = getattr(args, "compile", False)
    if also_compiled:  # one compiled graph per row and precision, not eight in all
        torch._dynamo.config.recompile_limit = 64
    for (eager, flags), precision, compiled in itertools.product(
            TRAINING.items(), precisions, (False, True) if also_compiled else (False,)):
        # a language model has no task head to train alone
        if decoder and flags["method"] == "head-only":
            continue
        name = f"{eager}, compiled" if compiled else eager  # the row's name
        cfg = train.TrainConfig(**common, **flags)
        cfg.consistency = 1.0 if cfg.method.startswith("adamix") else 0.0
        net, router = train.adapt(copy.deepcopy(base), cfg)
        net.to(device).train()
        if precision == "bf16" and cast_once:  # as train.py: frozen weights in bf16 for the run
            train.keep_frozen_weights_in_bf16(net)
        opt = train.make_optimizer(net, cfg)
        if compiled:  # torch.compile of the network; each mixture's choice of experts stays eager
            net.compile()

        def step(net=net, router=router, cfg=cfg, opt=opt, precision=precision):
            with train.autocast(precision, device):
                loss = train.training_loss(net, router, batch, cfg, kind)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        jobs[name, precision] = step
        if compiled:  # compile now; under FlopCounterMode torch.compile would skip it for good
            step()
            flops[name, precision] = flops[eager, precision]  # the same work
        else:
            with FlopCounterMode(display=False) as counter:
                step()
            flops[name, precision] = counter.get_total_flops()
        with train.autocast(precision, device):  # not measured compiled: the hook would be traced
            memory[name, precision] = None if compiled else saved_activation_bytes(
                lambda: train.training_loss(net, router, batch, cfg, kind))
        trainable[name] = adamix.count_parameters(net, head=train.head_of(net))["trainable"]
        opt.zero_grad(set_to_none=True)
    step_s = interleaved(jobs, args.rounds, args.repeats, device)
    profile = getattr(args, "profile", False)
    top_ops = {key: profile_top(fn, device) for key, fn in jobs.items()} if profile else {}
    dtypes = dict(fp32=torch.float32, bf16=torch.bfloat16)
    peak = {p: matmul_flops_per_s(B * T, base.config.n_embd, device, dtypes[p]) for p in precisions}

    # --- inference (eval mode: merged experts unless folded or collapsed)
    jobs, added, nets = {}, {}, {}
    for (name, (flags, prepare)), precision in itertools.product(INFERENCE.items(), precisions):
        net, _ = train.adapt(copy.deepcopy(base), train.TrainConfig(**common, **flags))
        # trained-looking experts: the zero-initialised sides would make folding trivial
        for p in net.parameters():
            if p.requires_grad:
                p.data.add_(0.01 * torch.randn_like(p))
        net.to(device).eval()
        if prepare is not None:
            prepare(net)
        added[name] = adamix.count_parameters(net, head=None)["inference"]

        def infer(net=net, precision=precision):
            with torch.no_grad(), train.autocast(precision, device):
                return train.predict(net, batch)
        jobs[name, precision], nets[name, precision] = infer, net
    infer_s = interleaved(jobs, args.rounds, args.repeats, device)

    # --- decoding (decoders): greedy new tokens per second for B prompts of T/2 tokens, with and
    # without the cache
    decode_s, prompt = {}, batch["input_ids"][:, :max(1, T // 2)]
    if decoder:
        def decode(net, precision, cache):
            with train.autocast(precision, device):
                generate(net, prompt, args.new_tokens, use_cache=cache)
        jobs = {(n, p, c): lambda n=n, p=p, c=c: decode(nets[n, p], p, c)
                for n in DECODING for p in precisions for c in (True, False)}
        decode_s = interleaved(jobs, args.rounds, 1, device)

    gpu = f", {torch.cuda.get_device_name()}" if device == "cuda" else ""
    machine = (f"{platform.node()} ({platform.processor() or platform.machine()}, "
               f"{torch.get_num_threads()} threads{gpu})")
    report = dict(
        machine=machine, date=time.strftime("%Y-%m-%d"), torch=torch.__version__, device=device,
        model=args.model, batch_size=B, seq_len=T, experts=args.experts, bottleneck=args.bottleneck,
        lora_rank=args.lora_rank, matmul_flops_per_s=peak, precisions=precisions, training={},
        inference={}, freed_memory_kept=bool(kept), frozen_weights_cast_once=cast_once)
    # ratios within one precision; bf16 against fp32 in print_report
    for (n, p), s in step_s.items():
        report["training"].setdefault(n, {})[p] = dict(
            step_ms=1e3 * s, vs_adapter=s / step_s["adapter", p], tokens_per_s=B * T / s,
            flops_per_step=flops[n, p], achieved_flops_per_s=flops[n, p] / s,
            of_matmul_peak=flops[n, p] / s / peak[p],
            saved_activations_mb=None if memory[n, p] is None else memory[n, p] / 2**20,
            trainable_params=trainable[n],
            attention=attention_path_of(T, p, device), top_ops=top_ops.get((n, p)))
    for (n, p), s in infer_s.items():
        report["inference"].setdefault(n, {})[p] = dict(
            latency_ms=1e3 * s, vs_adapter=s / infer_s["adapter", p],
            vs_pretrained=s / infer_s["pretrained model", p],
            tokens_per_s=B * T / s, added_params=added[n])
    report["decoding"] = [dict(model=n, precision=p, cache=c, prompt_tokens=prompt.shape[1],
                               new_tokens=args.new_tokens, tokens_per_s=B * args.new_tokens / s,
                               vs_pretrained=s / decode_s["pretrained model", p, c])
                          for (n, p, c), s in decode_s.items()]
    if device == "cuda":
        report["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return report


def print_report(r):
    print(f"{r['model']}, batch {r['batch_size']} x {r['seq_len']} tokens, M={r['experts']}, "
          f"adapter r={r['bottleneck']}, LoRA r={r['lora_rank']}; {r['device']}: {r['machine']}, "
          f"{r['date']}")
    ps = r["precisions"]
    cast = "bf16 for the run" if r["frozen_weights_cast_once"] else "cast at every forward"
    print(f"freed memory kept for the next step: {'yes' if r['freed_memory_kept'] else 'no'}; "
          f"frozen weights in bf16 rows: {cast}")

    def vs(by, key):  # bf16/fp32
        return f"{by['bf16'][key] / by['fp32'][key]:>10.2f}" if ps == ["fp32", "bf16"] else ""
    w = max(28, 2 + max(map(len, r["training"])))  # the names' column
    print(f"\n{'training step':<{w}}{'precision':>10}{'ms':>9}{'x adapter':>11}{'tokens/s':>10}"
          f"{'GFLOP':>8}{'of matmul':>11}{'act. MB':>9}{'trained':>10}{'attention':>13}"
          + ("  bf16/fp32" if len(ps) == 2 else ""))
    for n, by in r["training"].items():
        for p, t in by.items():
            mb = t["saved_activations_mb"]
            print(f"{n if p == ps[0] else '':<{w}}{p:>10}{t['step_ms']:>9.1f}"
                  f"{t['vs_adapter']:>11.2f}{t['tokens_per_s']:>10.0f}"
                  f"{t['flops_per_step'] / 1e9:>8.1f}{100 * t['of_matmul_peak']:>10.0f}%"
                  f"{'-' if mb is None else f'{mb:.0f}':>9}{t['trainable_params']:>10,}"
                  f"{t.get('attention', ''):>13}" + (vs(by, "step_ms") if p == ps[-1] else ""))
    for n, by in r["training"].items():
        for p, t in by.items():
            if t.get("top_ops"):
                ops = ", ".join(f"{op} {100 * share:.0f}%" for op, share in t["top_ops"])
                print(f"  profile of {n}, {p}: {ops}")
    peaks = ", ".join(f"{p} {f / 1e9:.0f} GFLOP/s" for p, f in r["matmul_flops_per_s"].items())
    print(f"(plain matmul: {peaks})")
    print(f"\n{'inference forward':<28}{'precision':>10}{'ms':>9}{'x adapter':>11}"
          f"{'x pretrained':>14}{'tokens/s':>10}{'added params':>14}"
          + ("  bf16/fp32" if len(ps) == 2 else ""))
    for n, by in r["inference"].items():
        for p, t in by.items():
            print(f"{n if p == ps[0] else '':<28}{p:>10}{t['latency_ms']:>9.1f}"
                  f"{t['vs_adapter']:>11.2f}{t['vs_pretrained']:>14.2f}{t['tokens_per_s']:>10.0f}"
                  f"{t['added_params']:>14,}" + (vs(by, "latency_ms") if p == ps[-1] else ""))
    if r.get("decoding"):
        d = r["decoding"][0]
        print(f"\n{'greedy decoding':<28}{'precision':>10}{'cache':>7}{'new tokens/s':>14}"
              f"{'x pretrained':>14}   ({r['batch_size']} prompts of {d['prompt_tokens']} tokens, "
              f"{d['new_tokens']} new tokens each)")
        for d in r["decoding"]:
            print(f"{d['model']:<28}{d['precision']:>10}{'yes' if d['cache'] else 'no':>7}"
                  f"{d['tokens_per_s']:>14.1f}{d['vs_pretrained']:>14.2f}")


# -----------------------------------------------------------------------------
# the attention rule: model.attention writes attention out where that trains faster than the
# fused kernel

def attention_table(args, lengths=(32, 64, 128, 256, 512), tokens=2048):
    """For each number of tokens T (batches of about `tokens` tokens) and precision: attention alone
    (forward and backward, each path forced) and a whole AdaMix-adapter training step (two passes)
    with the rule of model.attention_path against the fused kernel everywhere. -> list of rows."""
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    base = from_pretrained(args.model, num_labels=2)
    nh, C = base.config.n_head, base.config.n_embd
    dtypes = dict(fp32=torch.float32, bf16=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    cfg = train.TrainConfig(method="adamix-adapter", experts=args.experts,
                            bottleneck=args.bottleneck, consistency=1.0)
    net, router = train.adapt(copy.deepcopy(base), cfg)
    net.to(device).train()
    rows = []
    for T in lengths:
        B = max(1, tokens // T)
        q, k, v = (torch.randn(B, nh, T, C // nh, generator=g).to(device) for _ in range(3))
        V = base.config.vocab_size
        ids = torch.randint(V // 2, V, (B, T), generator=g)  # ordinary tokens, no special ones
        batch = {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long),
                 "token_type_ids": torch.zeros(B, T, dtype=torch.long),
                 "labels": torch.randint(2, (B,), generator=g)}
        batch = {name: t.to(device) for name, t in batch.items()}
        for precision in args.precisions.split(","):
            qs = [t.to(dtypes[precision]).requires_grad_() for t in (q, k, v)]

            def alone(path, qs=qs):
                real = model.attention_path
                model.attention_path = lambda q, k: path
                try:
                    model.attention(*qs, None, False, 0.0).float().sum().backward()
                finally:
                    model.attention_path = real

            def step(limit, precision=precision, batch=batch):
                real = model.WRITTEN_OUT_MAX_KEYS
                model.WRITTEN_OUT_MAX_KEYS = limit
                try:
                    with train.autocast(precision, device):
                        loss = train.training_loss(net, router, batch, cfg, "classification")
                    loss.backward()
                    net.zero_grad(set_to_none=True)
                finally:
                    model.WRITTEN_OUT_MAX_KEYS = real
            jobs = {"written out": lambda: alone("written out"), "fused": lambda: alone("fused"),
                    "step, rule": lambda: step(model.WRITTEN_OUT_MAX_KEYS),
                    "step, fused": lambda: step(0)}
            ms = {name: 1e3 * s for name, s in
                  interleaved(jobs, args.rounds, args.repeats, device).items()}
            path = model.attention_path(qs[0], qs[1])
            rows.append(dict(tokens=T, batch=B, precision=precision, path=path, **ms))
            print(f"T {T:>4} x B {B:>3} {precision:>5}: attention written out"
                  f" {ms['written out']:7.1f} ms, fused {ms['fused']:7.1f} ms"
                  f" ({ms['written out'] / ms['fused']:.2f}); AdaMix step with the rule ({path})"
                  f" {ms['step, rule']:7.1f} ms, fused {ms['step, fused']:7.1f} ms"
                  f" ({ms['step, rule'] / ms['step, fused']:.2f})",
                  flush=True)
    return rows


# -----------------------------------------------------------------------------
# the results table: every runs/<task>/<method>-seed<k>/metrics.json written by train.py

METHODS = ["head-only", "adapter", "lora", "adamix-adapter", "adamix-lora"]


def results_table(folder):
    runs = defaultdict(list)
    for path in sorted(Path(folder).glob("*/metrics.json")):
        m = json.loads(path.read_text())
        runs[m["config"]["method"]].append(m)
    if not runs:
        raise FileNotFoundError(f"no */metrics.json under {folder}: run train.py with "
                                f"--out_dir {folder}/<name>")
    mean_std = lambda xs: (f"{100 * statistics.mean(xs):.2f} ± {100 * statistics.stdev(xs):.2f}"
                           if len(xs) > 1 else f"{100 * xs[0]:.2f}")
    rows = ["| method | seeds | trained params | test acc. (merged) | random expert | expert 0 | "
            "ensemble | min/run |",
            "|---|---|---|---|---|---|---|---|"]
    for method in sorted(runs, key=lambda m: METHODS.index(m) if m in METHODS else len(METHODS)):
        ms = runs[method]
        merged = ms[0]["test"]["merged"]
        main = "accuracy" if "accuracy" in merged else next(iter(merged))
        cell = lambda mode: (mean_std([m["test"][mode][main] for m in ms]) if mode in ms[0]["test"]
                             else "—")
        # None: a run resumed from an old checkpoint
        known = [m["wall_time_s"] for m in ms if m["wall_time_s"] is not None]
        minutes = f"{statistics.mean(known) / 60:.1f}" if known else "—"
        rows.append(f"| {method} | {', '.join(str(m['config']['seed']) for m in ms)} | "
                    f"{ms[0]['parameters']['trainable']:,} | {cell('merged')} | {cell('random')} | "
                    f"{cell('expert:0')} | {cell('ensemble')} | {minutes} |")
    return "\n".join(rows)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--bottleneck", type=int, default=16)
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=32,
                   help="greedy tokens generated per prompt (decoders)")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds; the median is kept")
    p.add_argument("--repeats", type=int, default=3, help="calls per round")
    p.add_argument("--device", default="auto", help="auto | cpu")
    p.add_argument("--precisions", default="fp32,bf16",
                   help="fp32, bf16 or both, comma-separated: each row in each")
    p.add_argument("--out_dir", default="out", help="the JSON report goes to OUT_DIR/bench.json")
    p.add_argument("--results", metavar="FOLDER",
                   help="print the results table of the runs in FOLDER instead")
    p.add_argument("--profile", action="store_true",
                   help="also profile one step of every training row: its three costliest ops")
    p.add_argument("--give_back_memory", action="store_true",
                   help="measure with glibc's default: memory freed by a step goes back to the "
                        "system (train.py keeps it: train.keep_freed_memory)")
    p.add_argument("--cast_every_forward", action="store_true",
                   help="bf16 rows: autocast casts the frozen weights at every forward (train.py "
                        "keeps them in bf16: train.keep_frozen_weights_in_bf16)")
    p.add_argument("--compile", action="store_true",
                   help="also time every training row with the network under torch.compile")
    p.add_argument("--attention", action="store_true",
                   help="measure the attention rule instead (out/bench-attention.json)")
    args = p.parse_args()
    if args.results:
        print(results_table(args.results))
    elif args.attention:
        rows = attention_table(args)
        out = Path(args.out_dir) / "bench-attention.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                                       machine=platform.processor() or platform.machine(),
                                       threads=torch.get_num_threads(), rows=rows), indent=2))
        print(f"wrote {out}")
    else:
        report = bench(args)
        print_report(report)
        out = Path(args.out_dir) / "bench.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {out}")
