"""
train.py: fine-tune a frozen pretrained Transformer with AdaMix (or a baseline) and report test
metrics.

    python train.py                       # AdaMix adapters, all-MiniLM-L6-v2, movie reviews
    python train.py --method lora --seed 1                                   # a baseline
    python train.py --preset roberta-large-glue --task rte --data_dir glue   # the paper's setup
    torchrun --nproc_per_node 2 train.py  # data parallel (every rank draws the same routes)

The loop follows nanoGPT's order: learning rate, forward (two views for the consistency loss),
backward with the loss divided by the accumulation count, clip, step, zero_grad (set_to_none unless
--unrouted zero), log; evaluate on dev after every epoch with merged experts, keep the best epoch by
dev, and test it at the end with every inference mode (merged, the greedy soup and the best expert
chosen on dev, a random expert, expert 0, ensemble).
Flags, files and the data's fit to the model are all checked before the first step; a bad one is
one line, `error: ...`.
"""
import argparse
import ctypes
import dataclasses
import fcntl
import inspect
import json
import math
import os
import re
import shlex
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import adamix
import data
import formats
from formats import load_tokenizer, torch_load
from model import from_pretrained, generate


TEST_MODES = ("empty, or comma-separated merged, greedy, best-expert, random, ensemble, "
              "expert:<k>")  # the inference modes --test_modes takes (adamix.set_inference)


def flag(default, **rules):
    """A TrainConfig field with what the checks need to know about it. check: the rule its value
    follows, in the words of the error message (RULES, at the bottom, tests it); choices: the values
    allowed; on_resume="may change": --resume accepts another value (every other flag must be the
    run's own); adamix_only: left out of the single-module command printed after an AdaMix run."""
    return dataclasses.field(default=default, metadata=rules)


@dataclass
class TrainConfig:
    """The defaults, grouped as `python train.py --help` shows them. A comment line after a blank
    line is the title of a group; the comment after a field, continued on the lines indented under
    it, is the field's help."""

    # what to train
    model: str = flag("minilm", check="a non-empty string")
        # a local checkpoint folder or .gguf file, "minilm" or "smollm2" (built in), or a hub id
    task: str = flag("mr", check="a non-empty string")
        # "mr" (built in), a GLUE task (sst2, mnli, ...) or "e2e"
    data_dir: str | None = None  # folder with the GLUE task folders or the e2e files
    method: str = flag("adamix-adapter", adamix_only=True, choices=[
        "adamix-adapter", "adamix-lora", "adapter", "lora", "head-only", "full"])
        # baselines: one adapter, one LoRA, the head alone, everything (full)

    # adaptation modules
    # (defaults: the official BERT/RoBERTa GLUE scripts)
    experts: int = flag(4, check=">= 1", adamix_only=True)
        # M; ignored by the single-module baselines
    bottleneck: int = flag(16, check=">= 1")
        # adapter bottleneck r (RoBERTa-large GLUE: 16, BERT-base: 48)
    lora_rank: int = flag(8, check=">= 1")  # LoRA rank r (GPT-2 E2E: 4)
    lora_alpha: float = flag(16.0, check="> 0")  # LoRA scale alpha (GPT-2 E2E: 32)
    lora_dropout: float = flag(0.1, check="in [0, 1)")  # dropout on the LoRA input (GPT-2 E2E: 0.1)
    share: str = flag("up", choices=["up", "down", "none"], adamix_only=True)
        # which side is shared by all experts: up | down | none
    expert_init: str = flag("independent", choices=["independent", "identical"], adamix_only=True)
        # independent draws per expert (paper) | identical copies of one draw
    consistency: float = flag(-1.0, check=">= 0, or -1 for the method's default", adamix_only=True)
        # lambda of the consistency loss; -1: 1 for AdaMix, 0 for baselines (GPT-2: 100)
    consistency_kind: str = flag("kl_sg", choices=["kl_sg", "kl", "mse"], adamix_only=True)
        # kl_sg (official, stop-gradient) | kl | mse (regression)
    batched_views: bool = flag(False, adamix_only=True)
        # run the two views as one forward of 2B examples
    differ_routes: bool = flag(False, adamix_only=True)
        # the two views never take the same route in a mixture (paper: independent draws)
    consistency_every: int = flag(1, check=">= 1")
        # the second pass and the consistency loss on every k-th optimiser step only (1: every
        # step); the other steps take one pass and the task loss

    # optimisation (out of memory? lower batch_size and raise grad_accum)
    # (AdamW, warm-up then linear decay; paper: lr 3e-4/4e-4, wd 0.1, warm-up 6 %)
    lr: float = flag(3e-3, check="> 0")
        # AdaMix's best on dev in the 2-epoch default run (the adapter's: 1e-2; results/README.md)
    weight_decay: float = flag(0.1, check=">= 0")  # not applied to biases and LayerNorm weights
    warmup: float = flag(0.06, check=">= 0")
        # a fraction of all steps, or a number of steps if >= 1
    epochs: int = flag(2, check=">= 0")
        # the paper trains 20-40 epochs; the default run is a CPU demo
    max_steps: int = flag(0, check=">= 0")
        # train this many optimiser steps instead of --epochs (it replaces the epoch budget, more
        # or fewer steps; 0: --epochs decides)
    batch_size: int = flag(32, check=">= 1")
        # per rank and micro-step; out of memory? halve it, double grad_accum
    grad_accum: int = flag(1, check=">= 1")  # micro-steps per optimiser step
    max_len: int = flag(64, check=">= 1")
        # tokens per example (GLUE 128, E2E 512); MR sentences are short
    grad_clip: float = flag(1.0, check=">= 0")  # 0 turns clipping off
    label_smoothing: float = flag(0.0, check="in [0, 1)")  # E2E / WebNLG: 0.1
    seed: int = flag(0, check="in [0, 2^63)")
        # data order, dropout, new heads and the routing generator
    precision: str = flag("auto", choices=["auto", "fp32", "bf16"])
        # auto: bf16 autocast on CUDA with bf16 and on a CPU that reports AVX512-BF16, AMX-BF16
        # or ARM BF16, else fp32; --resume: the run's own
    unrouted: str = flag("skip", choices=["skip", "zero"], adamix_only=True)
        # an expert not routed in a step: skip (grad None, AdamW leaves it) | zero (the authors'
        # trainer: grad 0, AdamW moves it by its momentum and decays it)
    kshot: int = flag(0, check=">= 0")
        # few-shot: train on this many examples per class, drawn by seed (0: all); dev and test
        # unchanged

    # evaluation and output
    eval_batch_size: int = flag(128, check=">= 1", on_resume="may change")
    beam: int = flag(10, check=">= 1", on_resume="may change")
        # E2E decoding (paper: beam 10, length penalty 0.8, no repeated 4-grams)
    length_penalty: float = flag(0.8, on_resume="may change")
    no_repeat_ngram: int = flag(4, check=">= 0", on_resume="may change")
    max_new_tokens: int = flag(64, check=">= 1", on_resume="may change")
    eval_limit: int = flag(0, check=">= 0")
        # evaluate on at most this many examples per split (0: all), for quick looks; --resume:
        # the run's own (the best epoch is chosen by dev scores on the same examples)
    track_experts: bool = flag(False, on_resume="may change", adamix_only=True)
        # AdaMix: after every epoch also evaluate dev with a random expert and with each expert
        # alone
    test_modes: str = flag("", on_resume="may change", adamix_only=True, check=TEST_MODES)
        # comma-separated inference modes to test (default: all that apply); E2E on a CPU: merged
    log_interval: int = flag(20, check=">= 1", on_resume="may change", adamix_only=True)
    out_dir: str = flag("out", check="a non-empty string", on_resume="may change", adamix_only=True)
    resume: bool = flag(False, on_resume="may change", adamix_only=True)
        # continue from out_dir/ckpt.pt
    stop_after: int = flag(0, check=">= 0", on_resume="may change", adamix_only=True)
        # stop (as if killed) after this many steps; tests use it for --resume
    device: str = flag("auto", choices=["auto", "cpu", "cuda"], on_resume="may change")
        # auto | cpu | cuda


# the paper's configurations (the authors' scripts); pass --task and --data_dir with them
PRESETS = {
    "roberta-large-glue": dict(model="roberta-large", method="adamix-adapter", experts=4,
                               bottleneck=16, share="up", lr=3e-4, epochs=20, batch_size=64,
                               max_len=128, consistency=1.0),
    "bert-base-glue": dict(model="bert-base-uncased", method="adamix-adapter", experts=4,
                           bottleneck=48, share="up", lr=4e-4, epochs=40, batch_size=64,
                           max_len=128, consistency=1.0),
    "gpt2-medium-e2e": dict(model="gpt2-medium", task="e2e", method="adamix-lora", experts=8,
                            lora_rank=4, lora_alpha=32.0, lora_dropout=0.1, share="up", lr=2e-4,
                            epochs=20, batch_size=8, max_len=512, warmup=2000, label_smoothing=0.1,
                            consistency=100.0),
}


# -----------------------------------------------------------------------------
# the run: set up, build, resume, the loop, test the best epoch, report

def main(cfg):
    check_config(cfg)
    if cfg.consistency < 0:  # the method's default
        cfg = dataclasses.replace(cfg, consistency=1.0 if cfg.method.startswith("adamix") else 0.0)
    ddp, rank, world, device = init_distributed(cfg)  # every rank draws the same routes
    master = rank == 0
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    # --resume: the flags are checked against the run's own before anything else loads
    ckpt = load_checkpoint(ckpt_path, device, RESUME_KEYS, cfg, world) if cfg.resume else None
    if ckpt is not None and (done := finished_results(out_dir, ckpt["run_id"])) is not None:
        if master:  # not tested again: nothing to resume
            print(f"{ckpt_path}: run {ckpt['run_id']} finished at step {ckpt['step']}; its test "
                  f"results are in {out_dir / 'metrics.json'}: nothing to resume")
        end_run(out_dir, ddp)
        return done
    cfg = dataclasses.replace(cfg, precision=run_precision(cfg, ckpt, device))
    ctx = autocast(cfg.precision, device)
    if master:  # out_dir is this run's alone until it ends, and every file it writes can be written
        lock_out_dir(out_dir)
        check_writable(out_dir, cfg.resume)

    # --- data and model (the same seed on every rank, so new heads start identical), all checked
    torch.manual_seed(cfg.seed)
    tokenizer, task, net, router = load_task_and_model(cfg)
    read = data.fingerprint(task.texts)  # kept in ckpt.pt: --resume refuses data that changed
    if ckpt is not None:
        check_same_data(ckpt, read, ckpt_path, cfg)
    kind = task_kind(task)
    train, dev, test = select_splits(task, kind, cfg)
    check_fits(net, task, cfg)
    check_test_modes(cfg, kind, router)
    net.to(device)
    if cfg.precision == "bf16":  # the same numbers, cast once instead of at every forward
        keep_frozen_weights_in_bf16(net)
    if device == "cpu":
        keep_freed_memory()
    optimizer = make_optimizer(net, cfg)
    trainable = [p for p in net.parameters() if p.requires_grad]
    counts = adamix.count_parameters(net, head=head_of(net))
    shuffled = partial(data.make_batches, train, cfg.batch_size, shuffle=True, pad_id=task.pad_id,
                       rank=rank, world_size=world)
    # an epoch's last step takes the batches left over when grad_accum does not divide them
    steps_per_epoch = math.ceil(len(shuffled(seed=cfg.seed)) / cfg.grad_accum)  # not collated
    check_batches(steps_per_epoch, len(train), world, cfg)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    if master:
        print(describe(cfg, counts, (train, dev, test), total_steps, world, device))

    # --- the run's state, new or as ckpt.pt left it
    torch.manual_seed(cfg.seed + rank)  # dropout differs between ranks, routes do not
    run = resume(ckpt, ckpt_path, net, optimizer, router, cfg, rank) if cfg.resume else RunState()
    run.data = read
    if ddp:  # every rank checks model.pt against the same id
        dist.broadcast_object_list(ids := [run.run_id])
        run.run_id = ids[0]

    # --- the loop: an optimiser step, then the log, dev after every epoch, and the checkpoint
    start_step = run.step
    run.started = time.time()
    batches = []
    net.train()
    while run.step < total_steps:
        epoch, k = divmod(run.step, steps_per_epoch)
        if k == 0 or not batches:  # collated once per epoch; indexed to resume mid-epoch
            batches = list(shuffled(seed=cfg.seed + epoch))  # the order: only (seed, epoch)

        # --- one optimiser step: learning rate, micro-steps, clip, step, zero_grad
        lr = get_lr(run.step, total_steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = batches[k * cfg.grad_accum:(k + 1) * cfg.grad_accum]  # fewer at epoch end
        for micro_batch in micro_batches:
            batch = {name: t.to(device) for name, t in micro_batch.items()}
            with ctx:
                loss = training_loss(net, router, batch, cfg, kind, run.step)
            check_finite(loss, run, ckpt_path)
            (loss / len(micro_batches)).backward()
            run.losses.append(loss.item())
        if ddp:
            average_gradients(trainable)
        optimizer_step(optimizer, trainable, cfg)
        run.step += 1

        # --- log, evaluate at the end of every epoch (and after the last step), checkpoint
        if master and (run.step % cfg.log_interval == 0 or run.step == total_steps):
            rate = (run.step - start_step) / (time.time() - run.started)
            left = (total_steps - run.step) / rate / 60
            print(f"step {run.step}/{total_steps} | epoch {epoch + 1} | loss {loss.item():.4f} | "
                  f"lr {lr:.2e} | {rate:.2f} steps/s | {left:.1f} min left", flush=True)
        if run.step % steps_per_epoch == 0 or run.step == total_steps:
            dev_metrics = evaluate(net, router, dev, task, cfg, "merged", ctx, device)
            score = dev_metrics["loss" if kind == "lm" else task.main_metric]  # LM: by dev loss
            improved = run.best is None or (score < run.best if kind == "lm" else score > run.best)
            train_loss = sum(run.losses) / len(run.losses)
            run.history.append(dict(step=run.step, epoch=run.step / steps_per_epoch,
                                    train_loss=train_loss, dev=dev_metrics, best=improved))
            if router is not None:
                run.history[-1].update(expert_stats(net, router, dev, task, cfg, ctx, device))
            run.losses = []
            if improved:
                run.best = score
                save_best(out_dir / "model.pt", run, dev_metrics, net, cfg)
            if master:
                scores = ", ".join(f"{k} {v:.4f}" for k, v in dev_metrics.items())
                note = " (best so far, saved model.pt)" if improved else ""
                print(f"step {run.step}: dev {scores}{note}", flush=True)
            save_checkpoint(ckpt_path, run, net, optimizer, router, cfg)
        if run.step == cfg.stop_after:
            save_checkpoint(ckpt_path, run, net, optimizer, router, cfg)
            if master:
                print(f"stopping after step {run.step} as asked (--stop_after); "
                      "continue with --resume")
            end_run(out_dir, ddp)
            return None
    wall = max(time.time() - run.started, 1e-9)

    # --- test the best epoch (chosen on dev) with every way of combining the experts
    if ddp:
        dist.barrier()
    load_best(out_dir / "model.pt", net, cfg, device, run.run_id)
    test_metrics, chosen = score_modes(net, router, tokenizer, task, dev, cfg, ctx, device)
    trained_s = None if run.trained_s is None else run.trained_s + wall
    results = dict(config=dataclasses.asdict(cfg), run_id=run.run_id, parameters=counts,
                   history=run.history, test=test_metrics,
                   steps_per_s=(run.step - start_step) / wall, world_size=world,
                   wall_time_s=trained_s, device=device, precision=cfg.precision,
                   train_examples=len(train), soups=chosen)
    if master:
        report(results, cfg, len(test), out_dir)
    end_run(out_dir, ddp)
    return results


def init_distributed(cfg):
    """torchrun sets RANK: one process per rank. -> (ddp, rank, world size, device)"""
    ddp = "RANK" in os.environ
    if ddp:
        gpus = torch.cuda.is_available() and cfg.device != "cpu"
        dist.init_process_group("nccl" if gpus else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and ddp:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return ddp, rank, world, device


def load_task_and_model(cfg):
    """The tokenizer, the task's encoded splits, and the model with cfg.method's modules."""
    with user_errors():
        tokenizer = load_tokenizer(cfg.model)
        task = data.load_task(cfg.task, tokenizer, data_dir=cfg.data_dir, max_len=cfg.max_len)
        net, router = build(cfg, task.num_labels or None)
    return tokenizer, task, net, router


def task_kind(task):
    """"classification", "regression" (one output: STS-B) or "lm" (no labels: E2E)."""
    return {0: "lm", 1: "regression"}.get(task.num_labels, "classification")


def select_splits(task, kind, cfg):
    """train (with --kshot, k examples of every class), dev and test; each needs an example."""
    train, dev, test = task.splits["train"], task.splits["dev"], task.splits["test"]
    if cfg.kshot:  # few-shot: k training examples of every class
        if kind != "classification":
            raise UserError(f"--kshot {cfg.kshot}: needs a task with classes; {cfg.task} is {kind}")
        with user_errors(f"--kshot {cfg.kshot}"):
            train = data.k_per_class(train, cfg.kshot, seed=cfg.seed)
    if not (train and dev and test):
        sizes = f"{len(train)} train / {len(dev)} dev / {len(test)} test"
        raise UserError(f"--task {cfg.task}: {sizes} examples after splitting; "
                        "every split needs at least one")
    return train, dev, test


def describe(cfg, counts, splits, total_steps, world, device):
    """The run's first line: the method and model, its parameters, examples and steps, and where."""
    train, dev, test = (f"{len(split):,}" for split in splits)
    return (f"{cfg.method} on {cfg.model} / {cfg.task}: {counts['trainable']:,} trainable "
            f"parameters, {counts['inference']:,} added at inference; {train} train / {dev} dev / "
            f"{test} test examples; {total_steps} steps on {world} x {device} in {cfg.precision}")


def inference_modes(cfg, kind, router):
    """The ways of combining the experts to test: all that apply, or those of --test_modes."""
    modes = ["merged"]
    if cfg.method.startswith("adamix"):
        modes = ["merged", "greedy", "best-expert", "random", "expert:0", "ensemble"]
    if kind == "lm":  # an ensemble would average logits inside beam search: not done here;
        modes = ["merged", "random", "expert:0"]  # soups: on request (each costs a dev decode)
    if cfg.test_modes:
        named = ("greedy", "best-expert", "expert:")
        modes = [m for m in cfg.test_modes.split(",")
                 if m in modes or m.startswith(named) and router]
    return modes


def choose_soups(net, router, dev, task, cfg, ctx, device):
    """The experts to average, chosen on dev (the same expert index in every mixture): best-expert
    is the expert with the best dev score alone; greedy (a greedy soup, Wortsman et al., ICML
    2022) takes the experts in that order and adds each to the average when dev does not get
    worse. -> ({"best-expert": "expert:k", "greedy": "soup:i,j,..."}, what dev said)."""
    lm = task_kind(task) == "lm"
    metric = "loss" if lm else task.main_metric
    better = (lambda a, b: a <= b) if lm else (lambda a, b: a >= b)  # a at least as good as b
    dev_score = lambda mode: evaluate(net, router, dev, task, cfg, mode, ctx, device)[metric]
    M = max(max(m.sizes()) for m in router.mixtures)
    alone = {k: dev_score(f"expert:{k}") for k in range(M)}
    order = sorted(alone, key=alone.get, reverse=not lm)  # the best first
    soup, best = [order[0]], alone[order[0]]
    for k in order[1:]:
        score = dev_score("soup:" + ",".join(map(str, soup + [k])))
        if better(score, best):
            soup, best = soup + [k], score
    modes = {"best-expert": f"expert:{order[0]}", "greedy": "soup:" + ",".join(map(str, soup))}
    return modes, dict(dev_alone=alone, dev_greedy=best, **modes)


def score_modes(net, router, tokenizer, task, dev, cfg, ctx, device):
    """The test split's metrics in every inference mode of the run (inference_modes); greedy and
    best-expert test the experts that dev chose first. -> (metrics by mode, the soups or None)"""
    modes = inference_modes(cfg, task_kind(task), router)
    soups, chosen = {}, None
    if {"greedy", "best-expert"} & set(modes):
        soups, chosen = choose_soups(net, router, dev, task, cfg, ctx, device)
    metrics = {m: score_test(net, router, tokenizer, task, cfg, soups.get(m, m), ctx, device)
               for m in modes}
    return metrics, chosen


def score_test(net, router, tokenizer, task, cfg, mode, ctx, device):
    """The test split's metrics in one inference mode (a language model: of beam search's texts)."""
    if task_kind(task) == "lm":
        return decode_and_score(net, router, tokenizer, task, cfg, mode, ctx, device)
    return evaluate(net, router, task.splits["test"], task, cfg, mode, ctx, device)


def report(results, cfg, n_test, out_dir):
    """The test lines, metrics.json, and after AdaMix the command that trains its single module."""
    limit = f", at most {cfg.eval_limit} of them evaluated" if cfg.eval_limit else ""
    print(f"\ntest ({cfg.task}, best dev epoch, {n_test:,} examples{limit}):")
    for mode, metrics in results["test"].items():
        chosen = (results.get("soups") or {}).get(mode, "")  # the experts dev chose
        print(f"  {mode:<12}" + "  ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items())
              + (f"  ({chosen})" if chosen else ""))
    save_atomic_json(results, out_dir / "metrics.json")
    print(f"wrote {out_dir / 'metrics.json'}")
    if cfg.method.startswith("adamix"):  # the question AdaMix must answer: does it beat its module?
        single = cfg.method.removeprefix("adamix-")
        print(f"compare with one {single} of the same inference size, same data, budget and "
              f"seed:\n  {single_module_command(cfg)}")
        print(f"and with that {single} trained with the same consistency loss (the regulariser "
              f"without the mixture):\n  {single_module_command(cfg, consistency=True)}")


def single_module_command(cfg, consistency=False):
    """The command that trains AdaMix's single module (adapter or LoRA) with every other flag of cfg
    kept; consistency=True keeps AdaMix's consistency loss too (two passes that differ by their
    dropout alone: the regulariser without the mixture)."""
    single = cfg.method.removeprefix("adamix-")
    default = TrainConfig()
    flags = [f"--method {single}", f"--task {cfg.task}", f"--epochs {cfg.epochs}",
             f"--seed {cfg.seed}"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("adamix_only") or f.name in ("task", "epochs", "seed"):
            continue
        if value == getattr(default, f.name):
            continue
        flags.append(f"--{f.name}" if value is True else f"--no-{f.name}" if value is False
                     else f"--{f.name} {shlex.quote(str(value))}")
    suffix = single
    if consistency:
        flags.append(f"--consistency {cfg.consistency:g}")
        if cfg.consistency_kind != default.consistency_kind:
            flags.append(f"--consistency_kind {cfg.consistency_kind}")
        suffix += "-consistency"
    flags.append(f"--out_dir {shlex.quote(cfg.out_dir + '-' + suffix)}")
    return "python train.py " + " ".join(flags)


# -----------------------------------------------------------------------------
# the model with its adaptation modules

def build(cfg, num_labels):
    """The pretrained model, AdaMix (or a baseline) added, and only the trainable part unfrozen."""
    return adapt(from_pretrained(cfg.model, num_labels=num_labels), cfg)


def adapt(net, cfg):
    """Add cfg.method's modules to `net` and freeze all but them and the head.
    -> (net, Router or None)"""
    router = None
    if cfg.method in ("adamix-adapter", "adapter", "adamix-lora", "lora"):
        single = not cfg.method.startswith("adamix")  # a baseline is AdaMix with one expert
        experts = 1 if single else cfg.experts
        if cfg.method.endswith("adapter"):  # after each layer's FFN output projection (Sec. 3)
            kind, targets, r = "adapter", ["*.mlp.fc_out"], cfg.bottleneck
        else:  # LoRA on the query and value projections
            kind, targets, r = "lora", ["*.attn.query", "*.attn.value"], cfg.lora_rank
        mix = adamix.AdaMixConfig(num_experts=experts, r=r, share=cfg.share,
                                  lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                  init=cfg.expert_init)
        router = adamix.add_adamix(net, targets, kind, mix, seed=cfg.seed)
        router.differ = cfg.differ_routes
    if cfg.method == "full":
        net.requires_grad_(True)
    else:
        adamix.mark_only_adamix_trainable(net, head=head_of(net))
    return net, router


def head_of(net):
    """The task head's module name; None for a language model (its LM head, wte or lm_head, stays
    frozen)."""
    return "head" if net.head is not None else None


def make_optimizer(net, cfg):
    """AdamW; no weight decay on biases and LayerNorm weights (every 1-d tensor)."""
    params = [p for p in net.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=cfg.weight_decay),
              dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg.lr)


# -----------------------------------------------------------------------------
# mixed precision and memory, the learning rate, one optimiser step

def cpu_has_native_bf16(capabilities=None):
    """Does this processor report bf16 arithmetic in hardware? x86: AVX512-BF16 or AMX-BF16; ARM:
    the BF16 extension (NEON or SVE). Decided from what the processor reports, never from a timing,
    so every process of a run (a forked child, a resumed run) decides the same. Without it torch
    emulates bf16: 3-17x slower than fp32 per step, 50x per matmul
    (results/bench-precision-2026-12-02.json). In doubt (an older torch without the detection, an
    unknown architecture): False, so fp32."""
    try:
        caps = capabilities if capabilities is not None else torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # a torch older than the detection: ask two older ones
        try:
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        except (AttributeError, RuntimeError):
            return False
    return any(caps.get(name) is True for name in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))


def resolve_precision(choice, device):
    """--precision auto -> "bf16" where the device computes bf16 natively, else "fp32"; other
    choices as given."""
    if choice != "auto":
        return choice
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def run_precision(cfg, ckpt, device):
    """The run's precision: --precision auto resolved for this device; with --resume, auto is the
    precision the run was trained in."""
    if ckpt is not None and cfg.precision == "auto":
        return resolve_precision(ckpt["config"].get("precision", "auto"), device)
    return resolve_precision(cfg.precision, device)


def autocast(precision, device):
    """The one switch for mixed precision: matmuls in bf16 under autocast, weights and optimiser in
    fp32. Losses, the consistency KL and softmax are computed in fp32 explicitly (task_loss,
    consistency_loss)."""
    if precision == "bf16":
        return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
    return nullcontext()


def keep_frozen_weights_in_bf16(net):
    """bf16 runs: the frozen Linear weights converted to bf16 once, for the whole run. Autocast
    caches the bf16 copy of a trainable weight, but casts a frozen one afresh at every forward, and
    keeps that copy for the backward: AdaMix's two passes hold two copies of the network. The same
    bf16 values reach the same kernels, so training and evaluation are bit for bit the same
    (tested); embeddings (and an LM head tied to one) and LayerNorms stay fp32, as autocast runs
    them."""
    embedded = {id(m.weight) for m in net.modules() if isinstance(m, torch.nn.Embedding)}
    for m in net.modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in embedded:
            for p in (m.weight, m.bias):
                if p is not None and not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)


def keep_freed_memory():
    """Linux (glibc) CPUs: keep the memory a step frees for the next step. By default glibc gives
    the top of its heap back to the system as soon as a few MB there are free, and the next step
    takes it back page by page: tens of thousands of page faults per step, most for steps that free
    the most (two passes, LoRA's dropout on x): AdaMix-LoRA cost 2.1-2.2 LoRA steps, not 2.
    Blocks up to 32 MiB (glibc's maximum) then come from the heap, which is never trimmed; the
    process keeps its peak memory, which every step reaches again. Elsewhere: nothing.
    -> True if set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl): its own allocator
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def get_lr(step, total, cfg):
    """Linear warm-up to cfg.lr, then linear decay to zero at the last step; never above cfg.lr
    (a warm-up shorter than one step, --warmup 0.01 of 3 steps, would otherwise start at 33 lr)."""
    warmup = cfg.warmup if cfg.warmup >= 1 else cfg.warmup * total
    if step < warmup:
        return cfg.lr * min(1.0, (step + 1) / warmup)
    return cfg.lr * max(0.0, (total - step) / max(1.0, total - warmup))


def average_gradients(params):
    """Data parallel by hand: the trainable set is small, and unrouted experts have no gradient."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)


def optimizer_step(optimizer, params, cfg):
    """Clip, step, zero the gradients. What happens to an expert that the next step does not route:
    --unrouted skip: its grad stays None, and AdamW leaves it exactly as it is.
    --unrouted zero (the authors' Trainer: model.zero_grad() of torch 1.9 wrote zeros): once routed,
    its grad is a tensor of zeros from then on, so AdamW keeps moving it along its momentum and
    decays its weights."""
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=cfg.unrouted == "skip")


# -----------------------------------------------------------------------------
# one forward pass, the loss, and evaluation

def predict(net, batch):
    """Logits for one batch: (B, num_labels) for classification, (B, T, V) for language models."""
    ids, mask = batch["input_ids"], batch["attention_mask"]  # (B, T)
    hidden = net(ids, mask, batch.get("token_type_ids"))  # (B, T, C)
    if net.head is not None:
        return net.classify(hidden, mask)  # (B, num_labels)
    return net.lm_logits(hidden)  # (B, T, V)


def task_loss(logits, labels, kind, label_smoothing=0.0):
    if kind == "regression":  # STS-B: one output, squared error
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    # a language model: token t predicts token t + 1; only the reference is a target (IGNORE_INDEX
    # elsewhere)
    if kind == "lm":
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),  # (B*(T-1), V)
                               labels[:, 1:].flatten(), ignore_index=data.IGNORE_INDEX,
                               label_smoothing=label_smoothing)
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def training_loss(net, router, batch, cfg, kind, step=0):
    """CE on the first view plus lambda times the consistency loss between two routed views (Eq. 3
    in adamix.py); with --consistency_every k, only on every k-th step, the task loss elsewhere."""
    if cfg.consistency == 0 or step % cfg.consistency_every:  # one pass, the task loss alone
        return task_loss(predict(net, batch), batch["labels"], kind, cfg.label_smoothing)
    if cfg.batched_views:  # one forward of 2B examples: the first half takes route 1, the rest 2
        doubled = {k: torch.cat([v, v]) for k, v in batch.items()}
        plan = router.sample(views=2) if router is not None else None
        with router.use(plan) if router is not None else nullcontext():
            logits_a, logits_b = predict(net, doubled).chunk(2)
    else:  # two forwards; the router draws a fresh route for each
        logits_a = predict(net, batch)
        logits_b = predict(net, batch)
    if kind == "lm":  # the consistency term is averaged over target tokens (official GPT-2 code)
        targets = batch["labels"][:, 1:] != data.IGNORE_INDEX
        reg = adamix.consistency_loss(logits_a[:, :-1].float(), logits_b[:, :-1].float(),
                                      mask=targets, kind=cfg.consistency_kind)
    else:
        reg = adamix.consistency_loss(logits_a.float(), logits_b.float(),
                                      kind="mse" if kind == "regression" else cfg.consistency_kind)
    return task_loss(logits_a, batch["labels"], kind, cfg.label_smoothing) + cfg.consistency * reg


@torch.no_grad()
def evaluate(net, router, examples, task, cfg, mode, ctx, device):
    """The task's metrics on `examples`, the experts combined as `mode` (adamix.set_inference)."""
    kind = task_kind(task)
    net.eval()
    if router is not None:
        adamix.set_inference(net, mode)
    if cfg.eval_limit:  # a quick look: evenly spaced examples (the splits are not shuffled)
        examples = examples[::math.ceil(len(examples) / cfg.eval_limit)]
    outputs, labels = [], []  # classification and regression
    loss_sum, tokens = 0.0, 0  # language modelling
    # sorted by length (half the padding): each prediction is scored against its own batch's labels
    batches = data.make_batches(examples, cfg.eval_batch_size, pad_id=task.pad_id, by_length=True)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with ctx:
            forward = lambda: predict(net, batch).float()
            logits = adamix.ensemble(router, forward) if mode == "ensemble" else forward()
        if kind == "lm":  # dev metric of a language model: loss per target token
            n = int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())
            loss_sum += task_loss(logits, batch["labels"], "lm").item() * n
            tokens += n
        else:
            outputs.append(logits.squeeze(-1) if kind == "regression" else logits.argmax(-1))
            labels.append(batch["labels"])
    net.train()
    if kind == "lm":
        return {"loss": loss_sum / tokens, "ppl": math.exp(loss_sum / tokens)}
    return task.metric(torch.cat(outputs).cpu().numpy(), torch.cat(labels).cpu().numpy())


@torch.no_grad()
def decode_and_score(net, router, tokenizer, task, cfg, mode, ctx, device, split="test"):
    """E2E: beam-search a text for every meaning representation and score it against all its
    references."""
    net.eval()
    if router is not None:
        adamix.set_inference(net, mode)
    every = math.ceil(len(task.prompts[split]) / cfg.eval_limit) if cfg.eval_limit else 1
    prompts = task.prompts[split][::every]
    references = [refs for _, refs in task.texts[split]][::every]
    eos = data.special_id(tokenizer, data.EOS_TOKENS)
    hypotheses = []
    size = max(1, cfg.eval_batch_size // cfg.beam)  # prompts per batch: each takes `beam` rows
    for i in range(0, len(prompts), size):
        padded = data.pad_prompts(prompts[i:i + size], task.pad_id)
        batch = {k: v.to(device) for k, v in padded.items()}
        with ctx:
            out = generate(net, batch["input_ids"], cfg.max_new_tokens, num_beams=cfg.beam,
                                    length_penalty=cfg.length_penalty,
                                    no_repeat_ngram_size=cfg.no_repeat_ngram, eos_token_id=eos,
                                    attention_mask=batch["attention_mask"])
        for row in out[:, batch["input_ids"].shape[1]:].tolist():  # new tokens, up to the first EOS
            hypotheses.append(tokenizer.decode(row[:row.index(eos)] if eos in row else row).strip())
    net.train()
    return task.metric(hypotheses, references)


def expert_stats(net, router, dev, task, cfg, ctx, device):
    """How far apart the experts are after an epoch, and (--track_experts) how each does alone."""
    stats = dict(expert_distance=adamix.expert_distance(net))
    if cfg.track_experts:
        stats["dev_modes"] = track_experts(net, router, dev, task, cfg, ctx, device)
    return stats


def track_experts(net, router, dev, task, cfg, ctx, device):
    """Dev metrics with a random expert and with each expert alone, after an epoch. The router's
    generator is put back afterwards, so tracking does not change the routes that training draws."""
    state = router.generator.get_state()
    experts = max(max(m.sizes()) for m in router.mixtures)
    modes = ["random"] + [f"expert:{k}" for k in range(experts)]
    out = {mode: evaluate(net, router, dev, task, cfg, mode, ctx, device) for mode in modes}
    router.generator.set_state(state)
    adamix.set_inference(net, "merged")
    return out


# -----------------------------------------------------------------------------
# the run's state: ckpt.pt to continue it (--resume), model.pt for its best epoch on dev

def new_run_id():
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(4).hex()}"


@dataclass
class RunState:
    """The loop's own state, saved in ckpt.pt beside the weights, the optimiser and the generators.
    run_id ties model.pt to this run: the final test never reads another run's. The run's training
    time (metrics.json's wall_time_s) is trained_s, that of its earlier processes up to each one's
    last checkpoint, plus this process's since `started`."""
    step: int = 0
    best: float | None = None  # the best dev score so far
    history: list = field(default_factory=list)  # one entry per evaluation on dev
    losses: list = field(default_factory=list)  # this epoch's training losses, for the log
    run_id: str = field(default_factory=new_run_id)
    saved: int | None = None  # the step of the last checkpoint
    trained_s: float | None = 0.0  # None: unknown (a checkpoint written before it was recorded)
    data: dict = field(default_factory=dict)  # split -> sha256 of its examples (data.fingerprint)
    started: float = 0.0  # time.time() when this process began training; not saved


def save_checkpoint(path, run, net, optimizer, router, cfg):
    """ckpt.pt: what --resume needs to continue exactly. Every rank calls it (the dropout generators
    of all ranks are gathered); rank 0 writes."""
    rngs = [torch.get_rng_state()]  # dropout's generator, one state per rank
    if dist.is_initialized():
        rngs = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, torch.get_rng_state())
    if not dist.is_initialized() or dist.get_rank() == 0:
        trained_s = None if run.trained_s is None else run.trained_s + time.time() - run.started
        save_atomic(dict(config=dataclasses.asdict(cfg), run_id=run.run_id, step=run.step,
                         best=run.best, history=run.history, losses=run.losses,
                         weights=small_state(net, cfg), optimizer=optimizer.state_dict(), rng=rngs,
                         router=router.state_dict() if router is not None else None,
                         trained_s=trained_s, data=run.data), path)
    run.saved = run.step


RESUME_KEYS = "run_id config step best history losses weights optimizer rng router"  # of ckpt.pt


def resume(ckpt, path, net, optimizer, router, cfg, rank):
    """The run as ckpt.pt left it: the weights, the optimiser, the router, this rank's dropout
    generator, and the loop's state."""
    with user_errors(path, (ValueError, RuntimeError, KeyError)):  # weights that do not fit
        load_small_state(net, ckpt["weights"], cfg)
        optimizer.load_state_dict(ckpt["optimizer"])
        if router is not None:
            router.load_state_dict(ckpt["router"])
        torch.set_rng_state(ckpt["rng"][rank].cpu())
    if cfg.unrouted == "zero":  # grads are not saved: the experts that had one get their zeros back
        for p in optimizer.state:
            p.grad = torch.zeros_like(p)
    if rank == 0:
        print(f"resumed from {path} at step {ckpt['step']}")
    return RunState(step=ckpt["step"], best=ckpt["best"], history=ckpt["history"],
                    losses=ckpt["losses"], run_id=ckpt["run_id"], saved=ckpt["step"],
                    trained_s=ckpt.get("trained_s"))  # absent from older checkpoints


def check_same_data(ckpt, read, path, cfg):
    """--resume continues on the examples the run was trained on: refused when a split's differ
    from those ckpt.pt recorded (a data file edited or replaced since the run stopped). A
    checkpoint of an older train.py recorded none: it resumes unchecked, as it did."""
    if (stored := ckpt.get("data")) is None:
        return
    if changed := [split for split in {**stored, **read} if stored.get(split) != read.get(split)]:
        source = f"--data_dir {cfg.data_dir}" if cfg.data_dir else "the downloaded files"
        raise UserError(f"{path}: the {', '.join(changed)} examples of --task {cfg.task} read "
                        f"from {source} differ from those the run was trained on: the data "
                        "changed since it stopped; put back the files it used, or start a new run "
                        "in another --out_dir")


def finished_results(out_dir, run_id):
    """out_dir/metrics.json if the run `run_id` wrote it (the run has finished), else None."""
    try:
        results = json.loads((out_dir / "metrics.json").read_text())
    except (OSError, ValueError):  # none, or not ours
        return None
    finished = isinstance(results, dict) and results.get("run_id", "before run ids") == run_id
    return results if finished else None


def stopped_run(out_dir):
    """(run id, step) of the run in out_dir/ckpt.pt if it has not finished, else None (also when
    there is no ckpt.pt, or one that could not be resumed anyway)."""
    try:  # mmap: the weights stay on disk
        ckpt = torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=True, mmap=True)
        run_id, step = ckpt.get("run_id", "before run ids"), ckpt["step"]
    except Exception:  # missing, damaged or foreign: nothing to resume
        return None
    return None if finished_results(out_dir, run_id) is not None else (run_id, step)


def end_run(out_dir, ddp):
    """The lock on out_dir released, and the ranks' process group closed."""
    unlock_out_dir(out_dir)
    if ddp:
        dist.destroy_process_group()


def interrupted(cfg, started):
    """What Ctrl-C leaves: the checkpoint to continue from (this run's, written since `started`,
    or the one it resumed from), or nothing."""
    path = Path(cfg.out_dir) / "ckpt.pt"
    if path.exists() and (cfg.resume or path.stat().st_mtime >= started):
        return f"stopped (Ctrl-C); the last checkpoint is {path}: continue with --resume"
    return "stopped (Ctrl-C) before the first checkpoint: nothing to resume"


def check_finite(loss, run, ckpt_path):
    """A loss of nan or inf stops the run at once, naming the checkpoint that is left."""
    if not torch.isfinite(loss):
        kept = "no checkpoint yet" if run.saved is None else f"{ckpt_path} holds step {run.saved}"
        raise SystemExit(f"step {run.step}: the loss is {loss.item()}; stopping ({kept}). "
                         "Start again with a lower --lr, or check the data")


def save_best(path, run, dev_metrics, net, cfg):
    """model.pt: the small weights of the best epoch on dev so far, the run's id. Rank 0 writes."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_atomic(dict(config=dataclasses.asdict(cfg), run_id=run.run_id, step=run.step,
                         dev=dev_metrics, weights=small_state(net, cfg)), path)


def load_best(path, net, cfg, device, run_id):
    """The weights of model.pt back into net, refused unless this run wrote them."""
    chosen = load_checkpoint(path, device, "run_id config step dev weights")
    if chosen["run_id"] != run_id:
        raise UserError(f"{path} was written by run {chosen['run_id']}, not this run ({run_id}): "
                        "another run shares --out_dir? "
                        "Not reporting a model this run did not train")
    load_small_state(net, chosen["weights"], cfg)


def small_state(net, cfg):
    """What deployment needs: the AdaMix experts and the head (all the model for --method full)."""
    if cfg.method == "full":
        return {k: v.detach().clone() for k, v in net.state_dict().items()}
    return adamix.adamix_state_dict(net, head=head_of(net), router=False)  # the router: in ckpt.pt


def load_small_state(net, state, cfg):
    if cfg.method == "full":
        net.load_state_dict(state)  # strict
    else:  # strict: missing or unexpected names are an error
        adamix.load_adamix_state_dict(net, state, head=head_of(net))


def load_checkpoint(path, device, keys, cfg=None, world=1):
    """ckpt.pt or model.pt, with every key in `keys`. With cfg (--resume): refused unless the flags
    equal the stored ones, except those that may change on resume and --precision auto (the run's
    own), and the number of ranks is the same (it fixes the data order)."""
    if not path.exists():
        resuming = ": nothing to resume, start without --resume" if cfg else ""
        raise UserError(f"{path} does not exist{resuming}")
    with user_errors():
        ckpt = torch_load(path, device)
    if "weights" in ckpt:
        ckpt.setdefault("run_id", "before run ids")  # written by an older train.py: still resumable
    if missing := [k for k in keys.split() if k not in ckpt]:
        raise UserError(f"{path}: not a checkpoint of this train.py (no {', '.join(missing)})")
    if cfg is not None:
        stored = {**dataclasses.asdict(TrainConfig()), **ckpt["config"]}
        fields = dataclasses.fields(TrainConfig)
        may_change = {f.name for f in fields if f.metadata.get("on_resume") == "may change"}
        differ = [f"--{k} {stored[k]!r} (now {v!r})" for k, v in dataclasses.asdict(cfg).items()
                  if k not in may_change and stored[k] != v
                  and not (k == "precision" and v == "auto")]  # auto: the run's own
        if differ:
            raise UserError(f"{path} was made with {', '.join(differ)}: --resume continues a run "
                            "with its own flags; pass the same ones, or start a new run in another "
                            "--out_dir")
        if len(ckpt["rng"]) != world:
            raise UserError(f"{path} was made by {len(ckpt['rng'])} ranks, not {world}: "
                            "resume it with as many")
    return ckpt


def save_atomic(obj, path):
    write_atomic(path, lambda f: torch.save(obj, f))


def save_atomic_json(obj, path):
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def write_atomic(path, write):
    """Every file of a run is written by formats.write_atomic, whole or not at all (an exclusive
    temporary in the same folder, synced, renamed); a file that cannot be written (disk full, no
    permission) is a UserError naming it and the reason: one line."""
    with user_errors(kinds=(formats.WriteError,)):
        formats.write_atomic(path, write)


# -----------------------------------------------------------------------------
# flags, files and the data's fit to the model: all checked before the first step

class UserError(Exception):
    """A bad flag, file or state: `python train.py` prints the message as one line, no traceback,
    and exits 1."""


@contextmanager
def user_errors(where=None, kinds=(ValueError, OSError)):
    """While the user's files are read, these errors are the user's to fix: re-raised as UserError.
    data.py and model.py name the file and line in their messages; `where` names it for errors that
    do not."""
    try:
        yield
    except kinds as e:
        raise UserError(f"{where}: {e}" if where else str(e)) from e


LOCKS = {}  # the lock file of each out_dir that this process holds -> its file descriptor


def lock_out_dir(out_dir):
    """out_dir is this run's alone until it ends: an advisory lock (flock) on out_dir/.lock, which
    the OS releases when the process ends, however it ends (kill -9 too). Another process's run or
    --resume in it is refused, naming the pid and start time of the one running. A main() of this
    process that failed keeps its lock until the process ends or its next main() there."""
    path = out_dir / ".lock"
    key = os.path.realpath(path)
    if key not in LOCKS:
        with user_errors(f"--out_dir {out_dir}"):
            out_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # no symlink
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 100).decode(errors="replace") or "it has not said who yet"
                os.close(fd)
                raise UserError(f"--out_dir {out_dir} is in use by another run ({holder}): wait "
                                "for it to end, or use another --out_dir") from None
            except OSError as e:  # a file system without locks (Lustre without -o flock): go on
                print(f"warning: {path}: could not lock it ({e.strerror}); another run in "
                      f"--out_dir {out_dir} would not be noticed")
        LOCKS[key] = fd
    os.ftruncate(LOCKS[key], 0)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    os.pwrite(LOCKS[key], f"pid {os.getpid()}, started {started}".encode(), 0)


def unlock_out_dir(out_dir):
    if (fd := LOCKS.pop(os.path.realpath(out_dir / ".lock"), None)) is not None:
        os.close(fd)  # releases the lock


WRITES = {"ckpt.pt": "its checkpoint", "model.pt": "its best weights",
          "metrics.json": "its test results"}  # the files a run writes in out_dir


def check_writable(out_dir, resuming):
    """Before any work (and under the lock): a file can be created in out_dir; every file there
    that the run will replace can be replaced; without --resume, ckpt.pt is not a stopped run's
    (it would be lost). Temporaries left by a killed run's writes are removed."""
    with user_errors(f"--out_dir {out_dir}"):
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
        for name in [*WRITES, "write-test"]:  # left by a killed run's writes
            for leftover in out_dir.glob(f".{name}.*.tmp"):
                leftover.unlink()
    for name, what in WRITES.items():
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            raise UserError(f"{path} is a folder: the run writes {what} there; move it, or use "
                            "another --out_dir")
        if os.path.lexists(path):
            check_replaceable(path)
    if not resuming and (stopped := stopped_run(out_dir)):
        raise UserError(f"{out_dir / 'ckpt.pt'} holds run {stopped[0]}, stopped at step "
                        f"{stopped[1]}: continue it with --resume, or start this run in another "
                        "--out_dir")


def check_replaceable(path):
    """Moves `path` aside and back: replacing it needs what moving it needs (the folder's write
    permission; the file neither immutable nor, in a sticky folder such as /tmp, another user's)."""
    fd, aside = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".aside")
    os.close(fd)
    try:
        os.replace(path, aside)
    except OSError as e:
        raise UserError(f"{path}: the run could not replace it ({e.strerror}); use another "
                        "--out_dir") from e
    finally:  # back in place, also after Ctrl-C
        if os.path.lexists(path):
            os.unlink(aside)
        else:
            os.replace(aside, path)


class FlagParser(argparse.ArgumentParser):
    def error(self, message):  # an unknown flag, a missing value: one line too, not the usage
        raise UserError(message)


def parse_args(argv=None):
    """Defaults from TrainConfig, then a --preset, then the flags given on the command line. The
    help of each flag is the comment next to its field in TrainConfig, so the defaults are
    documented once. Values arrive as text and are converted here, so that a wrong type, a wrong
    choice and a value out of range are all named in one UserError (check_config)."""
    p = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    braces = lambda choices: "{" + ",".join(choices) + "}"  # argparse's own metavar for choices
    p.add_argument("--preset", metavar=braces(sorted(PRESETS)),
                   help="one of the paper's configurations")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    groups, comments = flag_help()
    for title, names in groups.items():
        g = p.add_argument_group(title)
        for name in names:
            default = fields[name].default
            help = f"{comments[name]} (default: {default})"
            if isinstance(default, bool):
                g.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None,
                               help=help)
            else:
                choices = fields[name].metadata.get("choices")
                g.add_argument(f"--{name}", default=None, help=help,
                               metavar=braces(choices) if choices else None)
    args = vars(p.parse_args(argv))
    bad, preset = [], args.pop("preset")
    if preset is not None and preset not in PRESETS:
        bad.append(f"--preset {preset!r}: choose one of {', '.join(sorted(PRESETS))}")
    overrides = dict(PRESETS.get(preset, {}))
    for name, value in args.items():
        kind = type(fields[name].default)
        if value is None or kind in (bool, str, type(None)):
            overrides.update({} if value is None else {name: value})
            continue
        try:
            number = kind(value)
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            overrides[name] = number
        else:
            expected = "an integer" if kind is int else "a finite number"
            bad.append(f"--{name} {value!r}: expected {expected}")
    cfg = TrainConfig(**overrides)  # a flag of the wrong type keeps its default here
    try:
        check_config(cfg)  # choices and ranges
    except UserError as e:
        bad.append(str(e))
    if bad:
        raise UserError("; ".join(bad))
    return cfg


def flag_help():
    """--help's groups and texts, read from TrainConfig's source (its docstring says how).
    -> ({group title: [flag names]}, {flag name: help})"""
    groups, comments, after_blank = {}, {}, False
    for line in inspect.getsource(TrainConfig).splitlines():
        if declared := re.fullmatch(r"    (\w+): [^#]*(?:# ?(.*))?", line):  # a field
            name = declared[1]
            comments[name] = declared[2] or ""
            groups[title].append(name)
        elif more := re.fullmatch(r"        # ?(.*)", line):  # the field's comment, continued
            comments[name] = f"{comments[name]} {more[1]}".strip()
        elif (heading := re.fullmatch(r"    # ?(.*)", line)) and after_blank:
            title = heading[1]
            groups[title] = []
        after_blank = line.strip() == ""
    return groups, comments


RULES = {  # check= in TrainConfig: the rule in the words of the error message -> its test
    ">= 1": lambda v: v >= 1,
    ">= 0": lambda v: v >= 0,
    "> 0": lambda v: v > 0,
    "in [0, 1)": lambda v: 0 <= v < 1,
    ">= 0, or -1 for the method's default": lambda v: v >= 0 or v == -1,
    "in [0, 2^63)": lambda v: 0 <= v < 2 ** 63,  # numpy seeds must be >= 0
    "a non-empty string": lambda v: v.strip() != "",
    TEST_MODES: lambda v: v == "" or all(
        re.fullmatch(r"merged|greedy|best-expert|random|ensemble|expert:\d+", mode)
        for mode in v.split(",")),
}


def check_config(cfg):
    """Every flag's type (that of its default; floats finite), choice and range (its check in
    TrainConfig), before anything is loaded."""
    kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,),
             type(None): (str, type(None))}  # data_dir: None or a folder
    fields = dataclasses.fields(cfg)
    for f in fields:  # argparse gives the right types; a caller of main() may not
        v, ok = getattr(cfg, f.name), kinds[type(f.default)]
        if type(v) not in ok or (type(v) is float and not math.isfinite(v)):
            expected = "a finite number" if float in ok else ok[0].__name__
            raise UserError(f"--{f.name} {v!r}: expected {expected}")
    bad = []
    for rule, test in RULES.items():
        bad += [f"--{f.name} {getattr(cfg, f.name)!r}: must be {rule}" for f in fields
                if f.metadata.get("check") == rule and not test(getattr(cfg, f.name))]
    for f in fields:
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            bad.append(f"--{f.name} {getattr(cfg, f.name)!r}: choose one of {', '.join(choices)}")
    if cfg.epochs == 0 and cfg.max_steps == 0:
        bad.append("--epochs 0 and --max_steps 0: nothing to train")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        bad.append("--device cuda: torch sees no CUDA device")
    if bad:
        raise UserError("; ".join(bad))


def check_fits(net, task, cfg):
    """Every example of the splits this run reads fits the model, so that nothing fails after
    training: its length within the positions, its token types within type_vocab_size (token ids
    against vocab_size are checked when the tokenizer loads); for E2E, each test prompt plus
    --max_new_tokens within the positions."""
    n = net.max_positions
    types = net.config.type_vocab_size
    kind = task_kind(task)
    if kind == "lm" and not net.config.decoder:
        raise UserError(f"--task {cfg.task} trains a language model: --model must be a decoder "
                        f"(GPT-2, Llama), not {net.config.model_type}")
    for split in ("train", "dev", "test"):
        examples = task.splits[split]
        longest = max(len(e["input_ids"]) for e in examples)
        if longest > n:
            raise UserError(f"{split} split: an example of {longest} tokens, but {cfg.model} has "
                            f"{n} positions: use --max_len {n} or less")
        top = max((int(e["token_type_ids"].max(initial=0)) for e in examples
                   if "token_type_ids" in e), default=0)
        if net.wtt is not None and top >= types:
            raise UserError(f"{split} split: token type {top}, but {cfg.model} has type_vocab_size "
                            f"{types}: a tokenizer of another model family?")
    if kind == "lm" and (longest := max(map(len, task.prompts["test"]))) + cfg.max_new_tokens > n:
        raise UserError(f"test split: a prompt of {longest} tokens plus --max_new_tokens "
                        f"{cfg.max_new_tokens} is more than the {n} positions of {cfg.model}; "
                        "lower --max_new_tokens")


def check_batches(steps_per_epoch, n_train, world, cfg):
    """Every rank has at least one batch to train on."""
    if steps_per_epoch == 0:
        raise UserError(f"{n_train} training examples make no batch on each of {world} ranks "
                        f"with --batch_size {cfg.batch_size}; lower it")


def check_test_modes(cfg, kind, router):
    """Every mode of --test_modes applies to this run, so that none fails after the training (an
    expert beyond --experts) or is skipped without a word (an ensemble of one adapter)."""
    experts = max(max(m.sizes()) for m in router.mixtures) if router is not None else 0
    kept = inference_modes(cfg, kind, router)
    for mode in cfg.test_modes.split(",") if cfg.test_modes else []:
        if mode not in kept:
            default = ", ".join(inference_modes(dataclasses.replace(cfg, test_modes=""), kind,
                                                router))
            task = f" on --task {cfg.task}" if kind == "lm" else ""
            raise UserError(f"--test_modes {mode}: not a mode of --method {cfg.method}{task} "
                            f"(by default it tests {default})")
        if mode.startswith("expert:") and int(mode.removeprefix("expert:")) >= experts:
            which = "expert:0 only" if experts == 1 else f"expert:0 to expert:{experts - 1}"
            raise UserError(f"--test_modes {mode}: {cfg.method} here has {experts} "
                            f"expert{'s' * (experts > 1)}: {which}")


if __name__ == "__main__":
    started = time.time()
    try:
        main(parse_args())
    except UserError as e:  # a bad flag, file or state: one line; a bug shows its traceback
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: where to continue from, no traceback, status 130
        print(interrupted(parse_args(), started), file=sys.stderr)
        sys.exit(130)
