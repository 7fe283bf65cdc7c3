"""results/report.py: groups runs by name, pairs AdaMix with its single module by seed, computes the spread."""
import importlib.util
import json
import os
import subprocess

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("report", ROOT / "results" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def fake_run(folder, name, seed, test_acc, dev_accs, tracked=False):
    history = []
    for e, a in enumerate(dev_accs):
        h = dict(epoch=e + 1, dev={"accuracy": a}, expert_distance={"down": [0.5, 0.7]})
        if tracked:
            h["dev_modes"] = {"random": {"accuracy": a - 0.01}, "expert:0": {"accuracy": a - 0.02},
                              "expert:1": {"accuracy": a + 0.03}}
        history.append(h)
    test = {m: {"accuracy": test_acc} for m in (report.MODES if tracked else ["merged"])}
    run = dict(config=dict(epochs=len(dev_accs), seed=seed), history=history, test=test, wall_time_s=120)
    (folder / f"{name}-s{seed}.json").write_text(json.dumps(run))


def test_tables_pair_by_seed_and_use_the_sample_std(tmp_path):
    for seed, (base, mix) in enumerate([(0.70, 0.72), (0.80, 0.86), (0.90, 0.90)]):
        fake_run(tmp_path, "budget-adapter", seed, base, [0.6, 0.7, 0.65])
        fake_run(tmp_path, "budget-adamix-adapter-lambda0", seed, mix, [0.5, 0.6, 0.7], tracked=True)
    groups = report.load(tmp_path)
    assert set(groups) == {"budget-adapter", "budget-adamix-adapter-lambda0"}
    assert report.baseline_of("budget-adamix-adapter-lambda0") == "budget-adapter"
    assert report.baseline_of("fewshot-k16-adamix-lora") == "fewshot-k16-lora"
    assert report.baseline_of("short-adamix-adapter-lr3e-3", {"short-adapter-lr3e-3": {}}) == "short-adapter-lr3e-3"
    assert report.baseline_of("short-adamix-adapter-lr3e-3") == "short-adapter"  # none at that lr: the default
    table = report.summary_table(groups)
    # adapter: best dev epoch 2 (70 %) in every seed; test mean 80.00, sample std 10.00
    assert "| budget-adapter | 0, 1, 2 | 3 | 2, 2, 2 | 70.00 ± 0.00 | 80.00 ± 10.00 | — |" in table
    # paired differences +2, +6, 0 points: mean 2.67, sample std 3.06
    assert "2.67 ± 3.06 (seeds 0, 1, 2)" in table
    # dev per epoch, paired: AdaMix 0.5/0.6/0.7 against the adapter's 0.6/0.7/0.65 in every seed (std 0)
    assert "| 3 | 70.00 ± 0.00 | 65.00 ± 0.00 | 5.00 ± 0.00 |" in report.epoch_table(groups)
    # a variant is also paired with the AdaMix default of its experiment: seeds 0 and 1 only
    assert report.variant_of("budget-adamix-adapter-lambda0") == "budget-adamix-adapter"
    assert report.variant_of("budget-adamix-adapter") is None and report.variant_of("budget-adapter") is None
    # a change made at another learning rate is paired with AdaMix, and compared with the adapter, at that rate
    assert report.variant_of("short-adamix-adapter-lr3e-3-unrouted-zero") == "short-adamix-adapter-lr3e-3"
    assert report.variant_of("short-adamix-adapter-lr3e-3") == "short-adamix-adapter"
    assert report.baseline_of("short-adamix-adapter-lr3e-3-unrouted-zero",
                              {"short-adapter-lr3e-3": {}}) == "short-adapter-lr3e-3"
    for seed, mix in enumerate([0.71, 0.83]):
        fake_run(tmp_path, "budget-adamix-adapter", seed, mix, [0.5, 0.6, 0.7])
    table = report.summary_table(report.load(tmp_path))
    assert "| 2.67 ± 3.06 (seeds 0, 1, 2) | 2.00 ± 1.41 (seeds 0, 1) |" in table   # +1 and +3 points
    assert report.label("budget-adamix-adapter-lambda0") == "AdaMix adapter, λ = 0 (no consistency loss)"
    assert report.label("short-adapter-lr3e-3") == "adapter, lr 3e-3" and report.label("budget-lora") == "LoRA"
    assert report.label("short-adamix-adapter-lr3e-3-m2") == "AdaMix adapter, M = 2, lr 3e-3"
    # runs in bf16 autocast are compared with the single module in bf16 (where it exists), and a bf16 run at
    # the default's rate is a change of the fp32 run at that rate
    assert report.baseline_of("budget-adamix-lora-bf16", {"budget-lora-bf16": {}}) == "budget-lora-bf16"
    assert report.variant_of("short-adamix-adapter-lr3e-3-bf16") == "short-adamix-adapter-lr3e-3"
    assert report.label("budget-lora-bf16") == "LoRA, bf16 autocast"
    # merged minus the best single expert (expert 1, +3 points): -3.00 at every epoch
    assert "| budget-adamix-adapter-lambda0 (0) | 1 | 0.600 | 50.00 | 53.00 | -3.00 |" in report.expert_table(groups)


def test_figures_are_written(tmp_path, monkeypatch):
    plt = pytest.importorskip("matplotlib.pyplot", reason="matplotlib is optional: figures only")
    for seed in (0, 1):
        fake_run(tmp_path, "budget-adapter", seed, 0.8, [0.6, 0.7])
        fake_run(tmp_path, "budget-adamix-adapter", seed, 0.8, [0.6, 0.7], tracked=True)
        fake_run(tmp_path, "budget-lora-bf16", seed, 0.8, [0.6, 0.7])  # a second panel in fig_budget
        fake_run(tmp_path, "budget-adamix-lora-bf16", seed, 0.8, [0.6, 0.7], tracked=True)
        fake_run(tmp_path, "fewshot-k16-adapter", seed, 0.6, [0.6])
        fake_run(tmp_path, "short-adamix-adapter-lr3e-3", seed, 0.8, [0.7, 0.8])
        fake_run(tmp_path, "short-adamix-adapter-lr3e-3-m2", seed, 0.81, [0.7, 0.82])
    monkeypatch.setattr(report, "HERE", tmp_path)
    names = ["fig_budget.svg", "fig_experts.svg", "fig_fewshot.svg", "fig_changes.svg", "fig_mixreg.svg"]
    assert report.figures(report.load(tmp_path), plt) == names
    assert all((tmp_path / name).read_text().startswith("<?xml") for name in names)


def test_the_plan_counts_the_summaries_that_exist():
    """PLAN=1 lists study.sh's runs without running any; "done" means the run's summary is in results/runs."""
    table = report.plan_table()
    for part in report.PARTS:
        out = subprocess.run(["bash", str(ROOT / "results" / "study.sh"), part], env={**os.environ, "PLAN": "1"},
                             capture_output=True, text=True, check=True).stdout.split()
        names = out[1::2]
        assert names and len(set(names)) == len(names)                       # every run once
        done = [n for n in names if (ROOT / "results" / "runs" / f"{n}.json").exists()]
        assert [n for n, s in zip(names, out[0::2]) if s == "done"] == done
        assert f"| {part} | {report.PARTS[part]} | {len(done)} of {len(names)} |" in table


def test_each_method_gets_the_learning_rate_best_on_dev(tmp_path):
    for seed in (0, 1):
        fake_run(tmp_path, "short-adapter", seed, 0.78, [0.70, 0.80])            # adapter: best at 1e-3 on dev
        fake_run(tmp_path, "short-adapter-lr3e-3", seed, 0.90, [0.70, 0.79])     # (test would say otherwise)
        fake_run(tmp_path, "short-adamix-adapter", seed, 0.70, [0.70, 0.75])
        fake_run(tmp_path, "short-adamix-adapter-lr3e-3", seed, 0.80 + seed / 100, [0.70, 0.81])
    fake_run(tmp_path, "short-adapter-lr3e-3", 2, 0.99, [0.99, 0.99])           # seed 2 only here: not compared
    table = report.lr_table(report.load(tmp_path))
    assert "| adapter | 3e-3 | 0, 1, 2 | 85.67 ± 11.55 | 93.00 ± 5.20 |" in table
    assert "AdaMix adapter, λ = 1 at lr 3e-3, adapter at lr 1e-3" in table
    assert "(paired, seeds 0, 1): 2.50 ± 0.71 points" in table                   # +2 and +3 points


def test_each_change_is_paired_with_the_adamix_run_it_changes(tmp_path):
    for seed in (0, 1, 2):
        fake_run(tmp_path, "short-adamix-adapter-lr3e-3", seed, 0.80, [0.70, 0.80])
    for seed, (test, dev) in enumerate([(0.82, 0.81), (0.79, 0.83)]):  # seeds 0 and 1 only
        fake_run(tmp_path, "short-adamix-adapter-lr3e-3-m2", seed, test, [0.60, dev])
        fake_run(tmp_path, "short-adapter-lr3e-3", seed, 0.81, [0.80, 0.80])
    table = report.change_table(report.load(tmp_path))
    # dev +1 and +3 points, test +2 and -1, against the adapter at the same rate +1 and -2
    assert ("| short-adamix-adapter-lr3e-3 | M = 2 | 0, 1 | 2.00 ± 1.41 | 0.50 ± 2.12 | 1 of 2 | -0.50 ± 2.12 |"
            in table)
    assert len(table.splitlines()) == 3  # the reference and the single module are no changes


def test_paired_interval_is_the_t_interval_of_the_differences():
    """Differences of 1 and 3 points: mean 2, sd sqrt(2), half-width t(0.975, 1) * sqrt(2) / sqrt(2)."""
    run = lambda a: {"test": {"merged": {"accuracy": a}}}
    ours, other = {0: run(0.51), 1: run(0.53), 5: run(0.9)}, {0: run(0.50), 1: run(0.50)}
    text, common = report.paired_interval(ours, other)
    assert common == [0, 1] and text == "+2.00 [-10.71, +14.71]"
    assert report.paired_interval({0: run(0.6)}, {0: run(0.5)})[0] == "+10.00 (one seed)"
