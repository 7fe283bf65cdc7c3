"""bench.py: the benchmark runs on a tiny model, and the results table computes mean and spread right."""
import json
import shutil
from types import SimpleNamespace

import pytest
from conftest import FIXTURES

import bench


def test_bench_reports_every_configuration(tmp_path):
    shutil.copytree(FIXTURES / "tiny-bert-legacy", tmp_path / "ckpt")
    args = SimpleNamespace(model=str(tmp_path / "ckpt"), batch_size=2, seq_len=8, experts=2, bottleneck=4, lora_rank=2,
                           rounds=1, repeats=1, device="cpu")
    r = bench.bench(args)
    assert set(r["training"]) == set(bench.TRAINING) and set(r["inference"]) == set(bench.INFERENCE)
    assert r["training"]["adapter"]["vs_adapter"] == 1.0
    # added at inference: a merged adapter is one adapter; folded LoRA adds nothing
    assert r["inference"]["AdaMix adapter, merged"]["added_params"] == r["inference"]["adapter"]["added_params"] > 0
    assert r["inference"]["AdaMix LoRA, folded"]["added_params"] == 0
    # two passes compute twice the adapter's forward work: more FLOPs than one pass, and the batched
    # step the same FLOPs as two passes
    t = r["training"]
    assert t["AdaMix adapter, 2 passes"]["flops_per_step"] > t["adapter"]["flops_per_step"]
    assert t["AdaMix adapter, batched 2B"]["flops_per_step"] == pytest.approx(t["AdaMix adapter, 2 passes"]["flops_per_step"], rel=0.01)


def test_results_table_mean_and_sample_std(tmp_path):
    for seed, acc in enumerate([0.70, 0.80, 0.90]):  # mean 80.00, sample std 10.00
        run = tmp_path / f"adamix-adapter-seed{seed}"
        run.mkdir()
        test = {m: {"accuracy": acc} for m in ("merged", "random", "expert:0", "ensemble")}
        (run / "metrics.json").write_text(json.dumps(dict(config=dict(method="adamix-adapter", seed=seed),
                                                          parameters=dict(trainable=1234), test=test, wall_time_s=60)))
    table = bench.results_table(tmp_path)
    assert "| adamix-adapter | 0, 1, 2 | 1,234 | 80.00 ± 10.00 |" in table
    with pytest.raises(FileNotFoundError, match="no \\*/metrics.json"):
        bench.results_table(tmp_path / "empty")
