"""
results/report.py: every table and figure of the study "when does AdaMix beat a single adapter?",
rebuilt from the run summaries in results/runs/*.json (train.py's metrics.json, one per run).

    python results/report.py   # writes results/summary.md and, with matplotlib, results/*.svg

A run's name is <experiment>-<method>[-<variant>]-s<seed> (see results/study.sh); runs that differ
only in the seed form a group. An AdaMix group is compared with the single module of its experiment
(budget-adamix-adapter-lambda0 with budget-adapter), paired by seed: the paired difference is the
mean and spread over seeds of (AdaMix - baseline) for the same seed. Accuracies are in %, mean ±
sample standard deviation over seeds; "test" is at the epoch chosen on dev. matplotlib is needed for
the figures only (`pip install matplotlib`); without it the tables are still written.
"""
import json
import os
import re
import statistics
import subprocess
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ["merged", "random", "expert:0", "ensemble"]


def load(folder=HERE / "runs"):
    """{group: {seed: run}} from every results/runs/<group>-s<seed>.json."""
    groups = defaultdict(dict)
    by_number = lambda path: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.stem)]
    # digits as numbers: k16, k64, k256 in that order
    for path in sorted(folder.glob("*.json"), key=by_number):
        group, seed = re.fullmatch(r"(.+)-s(\d+)", path.stem).groups()
        groups[group][int(seed)] = json.loads(path.read_text())
    return dict(groups)


# a learning rate in a run's name: short-adamix-adapter-lr3e-3-m2 -> "3e-3"
LR = r"-lr([^-]+(?:-\d+)?)"


def baseline_of(group, groups=()):
    """The single module an AdaMix group is compared with: the one trained the same way where
    `groups` has it (short-adamix-adapter-lr3e-3 -> short-adapter-lr3e-3: each method at the same
    learning rate; for short-adamix-adapter-lr3e-3-unrouted-zero too, as the single module has no
    unrouted experts), else the experiment's default one (budget-adamix-adapter-lambda0 ->
    budget-adapter); None for a single module."""
    m = re.fullmatch(rf"(.+)-adamix-(adapter|lora)((?:{LR})?)(-.*)?", group)
    if not m:
        return None
    for same in (f"{m[1]}-{m[2]}{m[3]}{m[5] or ''}", f"{m[1]}-{m[2]}{m[3]}"):
        if same in groups:
            return same
    return f"{m[1]}-{m[2]}"


def variant_of(group):
    """The AdaMix run a variant changes one thing of (budget-adamix-adapter-lambda0 ->
    budget-adamix-adapter, short-adamix-adapter-lr3e-3-unrouted-zero ->
    short-adamix-adapter-lr3e-3); None for a run that is no variant."""
    m = re.fullmatch(rf"(.+-adamix-(?:adapter|lora))((?:{LR})?)(-.+)?", group)
    if not m or not (m[2] or m[4]):
        return None
    if not m[4]:  # a learning rate alone: paired with AdaMix at the default rate
        return m[1]
    return m[1] + m[2]


def paired(runs, other, value):
    """mean ± std over the seeds both groups have of value(run) - value(other run), and those
    seeds."""
    common = [s for s in sorted(runs) if s in other]
    if not common:
        return "—", []
    return pct([value(runs[s]) - value(other[s]) for s in common]), common


VARIANTS = {
    "lambda0": "λ = 0 (no consistency loss)",
    "lambda10": "λ = 10",
    "unrouted-zero": "the authors' update of unrouted experts",
    "identical": "identical expert init",
    "m2": "M = 2",
    "m8": "M = 8",
    "sharedown": "down shared",
    "sharenone": "nothing shared",
    "bf16": "bf16 autocast",
    "bf16-consistency": "bf16 autocast, with the consistency loss (λ = 1, two dropout passes)",
    "bf16-steps2x": "bf16 autocast, twice the steps (AdaMix's passes)",
}


def label(group):
    """budget-adamix-adapter-lambda0 -> 'AdaMix adapter, λ = 0 (no consistency loss)', for
    legends."""
    m = re.fullmatch(rf"\w+?-(adamix-)?(adapter|lora)(?:{LR})?(?:-(.+))?", group)
    if not m:
        return group
    name = ("AdaMix " if m[1] else "") + ("LoRA" if m[2] == "lora" else m[2])
    if m[4]:
        name += ", " + VARIANTS.get(m[4], m[4])
    elif m[1]:
        name += ", λ = 1"
    return name + (f", lr {m[3]}" if m[3] else "")


def pct(xs):
    xs = [100 * x for x in xs]
    if len(xs) > 1:
        return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"
    return f"{xs[0]:.2f}"


def acc(metrics):
    return metrics.get("accuracy", next(iter(metrics.values())))


def test_merged(run):
    return acc(run["test"]["merged"])


def dev_curve(run, mode="merged"):
    """Dev accuracy after every epoch: merged from the history, other modes from --track_experts."""
    if mode == "merged":
        return [acc(h["dev"]) for h in run["history"]]
    if "dev_modes" not in run["history"][0]:
        return None
    return [acc(h["dev_modes"][mode]) for h in run["history"]]


def mean_distance(h):  # mean over layers of the down experts' pairwise cosine distance
    d = h.get("expert_distance", {}).get("down")
    return statistics.mean(d) if d else None


def summary_table(groups, every=None):
    """One row per group: seeds, chosen epochs, dev there, test per mode, and the paired differences
    from its single module and its AdaMix default, looked up in `every` (default: groups)."""
    every = groups if every is None else every
    rows = ["| runs | seeds | epochs | best dev epoch | dev there | test: merged | random expert "
            "| expert 0 | ensemble | AdaMix − single module (paired) "
            "| − AdaMix default (paired) | min/run |",
            "|---" * 12 + "|"]
    for group, runs in groups.items():
        seeds = sorted(runs)
        test = lambda mode: (pct([acc(runs[s]["test"][mode]) for s in seeds])
                             if mode in runs[seeds[0]]["test"] else "—")
        best = [next(i + 1 for i, h in enumerate(runs[s]["history"])
                     if acc(h["dev"]) == max(dev_curve(runs[s])))
                for s in seeds]
        cells = []
        for other in (baseline_of(group, every), variant_of(group)):
            diff, common = paired(runs, every.get(other, {}), test_merged)
            cells.append(f"{diff} (seeds {', '.join(map(str, common))})" if common else "—")
        # None: resumed from an older checkpoint
        known = [runs[s]["wall_time_s"] for s in seeds if runs[s]["wall_time_s"] is not None]
        minutes = f"{statistics.mean(known) / 60:.0f}" if known else "—"
        rows.append(f"| {group} | {', '.join(map(str, seeds))} | "
                    f"{runs[seeds[0]]['config']['epochs']} | {', '.join(map(str, best))} | "
                    f"{pct([max(dev_curve(runs[s])) for s in seeds])} | {test('merged')} | "
                    f"{test('random')} | {test('expert:0')} | {test('ensemble')} | "
                    f"{cells[0]} | {cells[1]} | {minutes} |")
    return "\n".join(rows)


def epoch_table(groups, prefix="budget-"):
    """Dev accuracy (merged) after every epoch, mean ± std over seeds, for the groups of one
    experiment, and every AdaMix group's paired difference from its single module at that epoch."""
    chosen = {g: runs for g, runs in groups.items() if g.startswith(prefix)}
    if not chosen:
        return ""
    base = {g: baseline_of(g, chosen) for g in chosen}
    pairs = [g for g in chosen if base[g] in chosen]
    n = max(len(r["history"]) for runs in chosen.values() for r in runs.values())
    names = list(chosen) + [f"{g} − {base[g]} (paired)" for g in pairs]
    rows = ["| epoch | " + " | ".join(names) + " |",
            "|---" * (len(chosen) + len(pairs) + 1) + "|"]
    for e in range(n):
        dev = lambda run: acc(run["history"][e]["dev"]) if len(run["history"]) > e else None
        cells = [pct(xs) if (xs := [d for r in runs.values() if (d := dev(r)) is not None]) else ""
                 for runs in chosen.values()]
        for g in pairs:
            done = lambda runs: {s: r for s, r in runs.items() if dev(r) is not None}
            cells.append(paired(done(chosen[g]), done(chosen[base[g]]), dev)[0])
        rows.append(f"| {e + 1} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def lr_table(groups, prefix="short-", default_lr="1e-3"):
    """Each method at every learning rate run (dev at the chosen epoch, test), and at the one that
    is best on dev (mean over seeds): the comparison of two methods each tuned on dev, never on
    test."""
    rows = ["| method | lr | seeds | dev there | test: merged |", "|---|---|---|---|---|"]
    tuned = {}
    for method in ("adapter", "adamix-adapter", "lora", "adamix-lora"):
        name = f"{prefix}{method}"
        by_lr = {default_lr if g == name else g.removeprefix(f"{name}-lr"): runs
                 for g, runs in groups.items()
                 if g == name or re.fullmatch(rf"{name}-lr[\d.e-]+", g)}
        if not by_lr:
            continue
        for lr, runs in sorted(by_lr.items(), key=lambda kv: float(kv[0])):
            rows.append(f"| {label('x-' + method)} | {lr} | {', '.join(map(str, sorted(runs)))} | "
                        f"{pct([best_dev(r) for r in runs.values()])} | "
                        f"{pct([test_merged(r) for r in runs.values()])} |")
        # choose on the same seeds
        common = set.intersection(*(set(runs) for runs in by_lr.values()))
        if not common:
            continue
        lr = max(by_lr, key=lambda lr: statistics.mean(best_dev(by_lr[lr][s]) for s in common))
        tuned[method] = (lr, by_lr[lr])
    lines = ["\n".join(rows)] if len(rows) > 2 else []
    for mix, single in (("adamix-adapter", "adapter"), ("adamix-lora", "lora")):
        if mix in tuned and single in tuned:
            diff, seeds = paired(tuned[mix][1], tuned[single][1], test_merged)
            lines.append(f"Tuned on dev: {label('x-' + mix)} at lr {tuned[mix][0]}, "
                         f"{label('x-' + single)} at lr {tuned[single][0]}; test, "
                         f"AdaMix − single (paired, seeds {', '.join(map(str, seeds))}): "
                         f"{diff} points.")
    return "\n\n".join(lines)


def changes(groups):
    """(group, the AdaMix run it changes one thing of, the change's name, the seeds both have) for
    every variant."""
    for group, runs in sorted(groups.items()):
        reference = variant_of(group)
        # none, or a learning rate alone
        if reference not in groups or not group.startswith(reference + "-"):
            continue
        common = [s for s in sorted(runs) if s in groups[reference]]
        change = group.removeprefix(reference + "-")  # short-adamix-adapter-lr3e-3-m2 -> m2
        if common:
            yield group, reference, VARIANTS.get(change) or re.sub(r"^lr", "lr ", change), common


def best_dev(run):
    return max(dev_curve(run))


def change_table(groups):
    """Every variant against the AdaMix run it changes one thing of, paired by seed: on dev (the
    best epoch, the split that decides) and on test, with how many seeds the change helped on test,
    and against the single module."""
    rows = ["| AdaMix run | change | seeds | dev: change − AdaMix (paired) "
            "| test: change − AdaMix (paired) | seeds better on test "
            "| test: change − single module (paired) |",
            "|---|---|---|---|---|---|---|"]
    for group, reference, change, common in changes(groups):
        runs, other = groups[group], groups[reference]
        better = sum(test_merged(runs[s]) > test_merged(other[s]) for s in common)
        single, _ = paired(runs, groups.get(baseline_of(group, groups), {}), test_merged)
        rows.append(f"| {reference} | {change} | {', '.join(map(str, common))} | "
                    f"{paired(runs, other, best_dev)[0]} | {paired(runs, other, test_merged)[0]} | "
                    f"{better} of {len(common)} | {single} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def expert_table(groups):
    """Per epoch, for AdaMix runs with --track_experts: the experts' distance and merged - best
    single expert."""
    rows = ["| runs (seed) | epoch | down experts' distance | dev: merged | best single expert "
            "| merged − best single |",
            "|---|---|---|---|---|---|"]
    for group, runs in groups.items():
        for seed, run in sorted(runs.items()):
            for e, h in enumerate(run["history"]):
                if "dev_modes" not in h:
                    continue
                single = max(acc(v) for k, v in h["dev_modes"].items() if k.startswith("expert:"))
                rows.append(f"| {group} ({seed}) | {e + 1} | {mean_distance(h):.3f} | "
                            f"{100 * acc(h['dev']):.2f} | {100 * single:.2f} | "
                            f"{100 * (acc(h['dev']) - single):+.2f} |")
    return "\n".join(rows) if len(rows) > 2 else ""


PARTS = {
    "budget": "1. adapter against AdaMix adapter, 10 epochs, seeds 0-2",
    "noconsistency": "5. the experts without the consistency loss (λ = 0), 10 epochs, seeds 0-2",
    "ablate": "2. the authors' update of unrouted experts over 10 epochs, seed 0",
    "lora": "1. LoRA against AdaMix LoRA, 10 epochs, seeds 0-2, both in bf16 autocast",
    "bf16": "the default run (2 epochs, lr 3e-3) and the adapter in bf16 autocast against fp32, "
            "seeds 0-2",
    "short": "3. the learning rate at the default's 2 epochs, both methods, seeds 0-2",
    "unrouted": "2. the authors' update of unrouted experts at 2 epochs, seeds 0-2",
    "shortmore": "3. lr 1e-2 for both, 3e-2 for the adapter; the other ablations at 2 epochs and "
                 "lr 3e-3, one change each; seeds 0-2",
    "fewshot": "4. K = 16, 64, 256 examples per class, seeds 0-4",
    "mixreg": "6. mixture or regulariser at the default budget (bf16): the adapter, the adapter "
              "with the consistency loss, AdaMix, seeds 0-4; the adapter with twice the steps",
    "mixreglora": "6. LoRA with the consistency loss, 10 epochs (bf16), seeds 0-2",
    "every": "7. the consistency step on every k-th step (k = 1, 2, 4), default budget, seeds 0-2",
}


def plan_table(study=HERE / "study.sh"):
    """How many of each part's runs in study.sh are done (their summary is in results/runs), and
    which are not."""
    rows = ["| part of results/study.sh | what it asks | runs done | runs to do |",
            "|---|---|---|---|"]
    for part, what in PARTS.items():
        out = subprocess.run(["bash", str(study), part], env={**os.environ, "PLAN": "1"},
                             capture_output=True, text=True, check=True).stdout.split()
        status = dict(zip(out[1::2], out[0::2]))  # name -> done | todo
        todo = [n for n, s in status.items() if s == "todo"]
        more = f" and {len(todo) - 3} more" if len(todo) > 3 else ""
        rows.append(f"| {part} | {what} | {len(status) - len(todo)} of {len(status)} | "
                    f"{', '.join(todo[:3]) + more or '—'} |")
    return "\n".join(rows)


# -----------------------------------------------------------------------------
# 6. mixture or regulariser; 7. every k-th step; soups

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447}  # Student's t, 97.5 %, by df


def paired_interval(runs, other, value=test_merged):
    """mean and 95 % interval (t over the seeds both have) of value(run) - value(other), in %."""
    common = [s for s in sorted(runs) if s in other]
    d = [100 * (value(runs[s]) - value(other[s])) for s in common]
    if len(d) < 2:
        return (f"{d[0]:+.2f} (one seed)" if d else "—"), common
    half = T_975[len(d) - 1] * statistics.stdev(d) / len(d) ** 0.5
    mean = statistics.mean(d)
    return f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]", common


MIXREG = {  # setting: (single, single + consistency, single with twice the steps, AdaMix)
    "adapter, 2 epochs, lr 3e-3": ("short-adapter-lr3e-3-bf16",
                                   "short-adapter-lr3e-3-bf16-consistency",
                                   "short-adapter-lr3e-3-bf16-steps2x",
                                   "short-adamix-adapter-lr3e-3-bf16"),
    "LoRA, 10 epochs, lr 1e-3": ("budget-lora-bf16", "budget-lora-bf16-consistency", None,
                                 "budget-adamix-lora-bf16"),
}


def mixreg_table(groups):
    """Question 6: each arm's test accuracy, and the paired differences with 95 % intervals from the
    single module and from the single module with the consistency loss."""
    rows = ["| setting | arm | seeds | test (merged) | − single module (paired, 95 % interval) | "
            "− single + consistency (paired, 95 % interval) | min/run |",
            "|---" * 7 + "|"]
    for setting, arms in MIXREG.items():
        single, regular = groups.get(arms[0], {}), groups.get(arms[1], {})
        names = ("single module", "single + consistency loss", "single, twice the steps", "AdaMix")
        for name, group in zip(names, arms):
            runs = groups.get(group or "", {})
            if not runs:
                continue
            seeds = sorted(runs)
            cells = []
            for other in (single, regular):
                diff, common = paired_interval(runs, other) if runs is not other else ("—", [])
                cells.append(f"{diff} (seeds {', '.join(map(str, common))})" if common else "—")
            known = [runs[s]["wall_time_s"] for s in seeds if runs[s]["wall_time_s"] is not None]
            minutes = f"{statistics.mean(known) / 60:.0f}" if known else "—"
            rows.append(f"| {setting} | {name} (`{group}`) | {', '.join(map(str, seeds))} | "
                        f"{pct([test_merged(runs[s]) for s in seeds])} | {cells[0]} | {cells[1]} | "
                        f"{minutes} |")
    return "\n".join(rows)


def every_table(groups):
    """Question 7: the consistency step on every k-th step: test and dev, paired against k = 1,
    and the forward passes a step takes on average (1 + 1/k). The runs' own steps/s are left out:
    they shared the CPU with a varying number of other runs; docs/costs.md has a pass's cost."""
    rows = ["| k | forward passes per step | seeds | test (merged) | − k = 1 (paired, 95 % interval) "
            "| best dev | − k = 1 on dev (paired) |", "|---" * 7 + "|"]
    base = groups.get("every-adamix-adapter-k1", {})
    for group in sorted(g for g in groups if g.startswith("every-adamix-adapter-k")):
        runs, seeds = groups[group], sorted(groups[group])
        k = runs[seeds[0]]["config"]["consistency_every"]
        diff, common = paired_interval(runs, base) if runs is not base else ("—", [])
        dev_diff, _ = paired_interval(runs, base, best_dev) if runs is not base else ("—", [])
        note = f" (seeds {', '.join(map(str, common))})" if common else ""
        rows.append(f"| {k} | {1 + 1 / k:.2f} | {', '.join(map(str, seeds))} | "
                    f"{pct([test_merged(runs[s]) for s in seeds])} | {diff}{note} | "
                    f"{pct([best_dev(runs[s]) for s in seeds])} | {dev_diff} |")
    return "\n".join(rows)


SOUP_MODES = ["merged", "greedy", "best-expert", "random", "expert:0", "ensemble"]


def soup_table(groups):
    """Inference modes of the runs that tested the dev-chosen soups: test per mode, and the experts
    that dev chose."""
    modes = " | ".join(SOUP_MODES)
    rows = [f"| runs | seeds | {modes} | greedy − merged (paired) | soups chosen |",
            "|---" * (len(SOUP_MODES) + 4) + "|"]
    for group, runs in groups.items():
        seeds = [s for s in sorted(runs) if runs[s].get("soups")]
        if not seeds:
            continue
        cell = lambda mode: pct([acc(runs[s]["test"][mode]) for s in seeds])
        diff = pct([acc(runs[s]["test"]["greedy"]) - acc(runs[s]["test"]["merged"]) for s in seeds])
        chosen = "; ".join(f"s{s}: {runs[s]['soups']['greedy']}" for s in seeds)
        rows.append(f"| {group} | {', '.join(map(str, seeds))} | "
                    + " | ".join(cell(m) for m in SOUP_MODES) + f" | {diff} | {chosen} |")
    return "\n".join(rows)


# -----------------------------------------------------------------------------
# figures

def band(ax, curves, label, **style):
    """Mean over seeds as a line, min to max over seeds as a band."""
    n = min(len(c) for c in curves)
    cols = [[100 * c[e] for c in curves] for e in range(n)]
    x = range(1, n + 1)
    seeds = f"{len(curves)} seed{'s' * (len(curves) > 1)}"
    ax.plot(x, [statistics.mean(c) for c in cols], label=f"{label} ({seeds})", **style)
    if len(curves) > 1:
        ax.fill_between(x, [min(c) for c in cols], [max(c) for c in cols], alpha=0.2,
                        color=style.get("color"))


def figures(groups, plt):
    plt.rcParams["svg.hashsalt"] = "adamix"  # the same SVG for the same data: small diffs in git

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(HERE / name, metadata={"Date": None})
        plt.close(fig)
    written = []
    # (a) the budget: dev accuracy per epoch, the single module against AdaMix merged / random
    # expert / expert 0, one panel per module that has both runs (the adapter in fp32, LoRA in bf16
    # autocast)
    panels = [(single, mix) for single, mix in [("budget-adapter", "budget-adamix-adapter"),
                                                ("budget-lora-bf16", "budget-adamix-lora-bf16")]
              if single in groups and mix in groups]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4), sharey=True,
                                 squeeze=False)
        for ax, (single, mix) in zip(axes[0], panels):
            band(ax, [dev_curve(r) for r in groups[single].values()], label(single), color="black")
            modes = [("merged", "tab:blue"), ("random", "tab:orange"), ("expert:0", "tab:green")]
            for mode, color in modes:
                curves = [c for c in (dev_curve(r, mode) for r in groups[mix].values()) if c]
                if curves:
                    band(ax, curves, f"{label(mix).removesuffix(', λ = 1')}, {mode}", color=color,
                         linestyle="-" if mode == "merged" else "--")
            ax.set(xlabel="epoch", ylabel="dev accuracy (%)")
            ax.legend(fontsize=8)
        fig.suptitle("MiniLM on movie reviews, 10 epochs (bands: min to max over seeds)")
        save(fig, "fig_budget.svg")
        written.append("fig_budget.svg")
    # (b) why merging works: the experts' distance and merged minus the best single expert, per
    # epoch
    tracked = {g: runs for g, runs in groups.items()
               if any("dev_modes" in h for r in runs.values() for h in r["history"])}
    if tracked:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for (group, runs), color in zip(tracked.items(), colors):
            dist = [[mean_distance(h) for h in r["history"]] for r in runs.values()]
            # band() multiplies by 100
            band(left, [[d / 100 for d in c] for c in dist], label(group), color=color)
            gaps = [[acc(h["dev"]) - max(acc(v) for k, v in h["dev_modes"].items()
                                         if k.startswith("expert:"))
                     for h in r["history"]] for r in runs.values()]
            band(right, gaps, label(group), color=color)
        left.set(xlabel="epoch", ylabel="mean pairwise cosine distance",
                 title="how far apart the down experts are")
        right.axhline(0, color="gray", linewidth=0.8)
        right.set(xlabel="epoch", ylabel="dev accuracy: merged − best expert (points)",
                  title="does averaging the experts help?")
        left.legend(fontsize=7)
        save(fig, "fig_experts.svg")
        written.append("fig_experts.svg")
    # (c) few-shot: test accuracy against K examples per class
    fewshot = defaultdict(dict)  # method -> {k: [test accuracies]}
    for group, runs in groups.items():
        m = re.fullmatch(r"fewshot-k(\d+)-(.+)", group)
        if m:
            fewshot[m[2]][int(m[1])] = [100 * acc(r["test"]["merged"]) for r in runs.values()]
    if fewshot:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        # side by side
        for (method, by_k), shift in zip(sorted(fewshot.items()), (0.97, 1.03, 1.0, 1.0)):
            ks = sorted(by_k)
            seeds = sorted({len(by_k[k]) for k in ks})
            ax.errorbar([k * shift for k in ks], [statistics.mean(by_k[k]) for k in ks],
                        capsize=3, marker="o",
                        label=f"{label('fewshot-' + method)} ({'/'.join(map(str, seeds))} seeds)",
                        yerr=[statistics.stdev(by_k[k]) if len(by_k[k]) > 1 else 0 for k in ks])
        all_ks = sorted({k for by_k in fewshot.values() for k in by_k})
        ax.set_xscale("log")
        ax.set_xticks(all_ks, [str(k) for k in all_ks], minor=False)
        ax.set_xticks([], minor=True)
        ax.set_xlim(all_ks[0] / 1.6, all_ks[-1] * 1.6)
        ax.axhline(50, color="gray", linewidth=0.8, linestyle=":")  # chance: two balanced classes
        ax.set(xlabel="training examples per class (K)", ylabel="test accuracy (%)",
               title="few-shot movie reviews (mean ± std over seeds; dotted: chance)")
        ax.legend(fontsize=8)
        save(fig, "fig_fewshot.svg")
        written.append("fig_fewshot.svg")
    # (d) the ablations at a glance: each change minus the AdaMix run it changes, per seed, on dev
    # and on test
    short = [c for c in changes(groups) if c[0].startswith("short-")]
    if short:
        fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(short) + 1.6), sharey=True)
        names = [f"{change} ({re.search(LR, ref)[1] if re.search(LR, ref) else '1e-3'})"
                 for _, ref, change, _ in short]
        splits = [("dev (best epoch)", best_dev), ("test", test_merged)]
        for ax, (split, value) in zip(axes, splits):
            for y, (group, ref, _, common) in enumerate(short):
                d = [100 * (value(groups[group][s]) - value(groups[ref][s])) for s in common]
                ax.plot(d, [y] * len(d), "o", color="tab:blue", alpha=0.5, markersize=4)
                ax.plot([statistics.mean(d)], [y], "|", color="tab:blue", markersize=14,
                        markeredgewidth=2)
                single = groups.get(baseline_of(group, groups), {})
                # where the single module stands
                if split == "test" and all(s in single for s in common):
                    gaps = [test_merged(single[s]) - test_merged(groups[ref][s]) for s in common]
                    ax.plot([statistics.mean(100 * g for g in gaps)], [y], "x", color="black")
            ax.axvline(0, color="gray", linewidth=0.8)
            ax.set(xlabel=f"{split}: change − AdaMix (points)")
        axes[0].set_yticks(range(len(short)), names)
        axes[0].invert_yaxis()
        fig.suptitle("2 epochs: each change minus the AdaMix run (lr in brackets) it changes; "
                     "dots: seeds, bars: means, x: the single adapter at the change's lr",
                     fontsize=9)
        save(fig, "fig_changes.svg")
        written.append("fig_changes.svg")
    # (e) mixture or regulariser: each arm's test accuracy per seed (dots, lines join a seed's arms)
    arm_names = ("single", "single +\nconsistency", "single,\n2x steps", "AdaMix")
    panels = [(setting, [(n, g) for n, g in zip(arm_names, arms) if g in groups])
              for setting, arms in MIXREG.items()]
    panels = [(setting, arms) for setting, arms in panels if len(arms) >= 2]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for ax, (setting, arms) in zip(axes[0], panels):
            seeds = sorted({s for _, g in arms for s in groups[g]})
            for seed in seeds:
                xs = [i for i, (_, g) in enumerate(arms) if seed in groups[g]]
                ys = [100 * test_merged(groups[arms[i][1]][seed]) for i in xs]
                ax.plot(xs, ys, "o-", color="0.7", markersize=4, linewidth=0.8)
            means = [statistics.mean(100 * test_merged(r) for r in groups[g].values())
                     for _, g in arms]
            ax.plot(range(len(arms)), means, "D", color="tab:red", markersize=8,
                    label="mean over seeds")
            ax.set_xticks(range(len(arms)), [n for n, _ in arms])
            ax.set(title=setting, ylabel="test accuracy (%)", xlim=(-0.5, len(arms) - 0.5))
            ax.legend(fontsize=8)
        fig.suptitle("Mixture or regulariser? MiniLM on movie reviews, bf16 (grey: one seed)")
        save(fig, "fig_mixreg.svg")
        written.append("fig_mixreg.svg")
    return written


def main():
    groups = load()
    experiments = [("budget-", "10 epochs (budget), paired by seed"),
                   ("short-", "Ablations at the default's budget, 2 epochs (short)"),
                   ("fewshot-", "Few-shot: K examples per class, 20 epochs (fewshot)")]
    parts = ["# Study results (generated by results/report.py from results/runs/*.json)",
             "## What has run\n\n" + plan_table()]
    for prefix, title in experiments:
        chosen = {g: runs for g, runs in groups.items() if g.startswith(prefix)}
        parts.append(f"## {title}\n\n" + summary_table(chosen, groups) if chosen else "")
    prefixes = tuple(p for p, _ in experiments)
    others = {g: runs for g, runs in groups.items() if not g.startswith(prefixes)}
    parts += ["## Other runs\n\n" + summary_table(others, groups) if others else "",
              "## The learning rate at 2 epochs, tuned on dev for each method\n\n"
              + lr_table(groups),
              "## One change at a time, against the AdaMix run it changes (paired by seed)\n\n"
              + change_table(groups),
              "## Dev accuracy (merged) after every epoch, 10-epoch budget\n\n"
              + epoch_table(groups),
              "## The experts during training (runs with --track_experts)\n\n"
              + expert_table(groups),
              "## Mixture or regulariser (paired by seed, 95 % interval over seeds)\n\n"
              + mixreg_table(groups),
              "## The consistency step on every k-th step (default budget, bf16)\n\n"
              + every_table(groups),
              "## Soups: the experts to average, chosen on dev\n\n" + soup_table(groups)]
    text = "\n\n".join(p for p in parts if p and not p.endswith("\n\n")) + "\n"
    (HERE / "summary.md").write_text(text)
    print(f"wrote {HERE / 'summary.md'}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: tables only (pip install matplotlib for the figures)")
        return
    for name in figures(groups, plt):
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
