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
                           rounds=1, repeats=1, device="cpu", precisions="fp32,bf16", new_tokens=2,
                           profile=True)
    r = bench.bench(args)
    assert set(r["training"]) == set(bench.TRAINING) and set(r["inference"]) == set(bench.INFERENCE)
    assert all(set(by) == {"fp32", "bf16"} for part in ("training", "inference") for by in r[part].values())
    assert set(r["matmul_flops_per_s"]) == {"fp32", "bf16"}
    for p in ("fp32", "bf16"):
        t, i = {n: by[p] for n, by in r["training"].items()}, {n: by[p] for n, by in r["inference"].items()}
        assert t["adapter"]["vs_adapter"] == 1.0
        # added at inference: a merged adapter is one adapter; folded LoRA adds nothing
        assert i["AdaMix adapter, merged"]["added_params"] == i["adapter"]["added_params"] > 0
        assert i["AdaMix LoRA, folded"]["added_params"] == 0
        # two passes compute twice the adapter's forward work: more FLOPs than one pass, and the batched
        # step the same FLOPs as two passes
        assert t["AdaMix adapter, 2 passes"]["flops_per_step"] > t["adapter"]["flops_per_step"]
        assert t["AdaMix adapter, batched 2B"]["flops_per_step"] == pytest.approx(
            t["AdaMix adapter, 2 passes"]["flops_per_step"], rel=0.01)
        # training at 8 tokens: written-out attention in bf16 on a CPU, the fused kernel in fp32
        assert {row["attention"] for row in t.values()} == {"fp32": {"fused"},
                                                            "bf16": {"written out"}}[p]
        for row in t.values():  # three ops, their shares of the step's op time, the costliest first
            shares = [share for _, share in row["top_ops"]]
            assert len(shares) == 3 and 1 >= shares[0] >= shares[1] >= shares[2] > 0
    bench.print_report(r)  # the side-by-side table prints without error


def test_attention_table_times_both_paths_and_the_rule(tmp_path):
    shutil.copytree(FIXTURES / "tiny-bert-legacy", tmp_path / "ckpt")  # no classifier: a new head
    args = SimpleNamespace(model=str(tmp_path / "ckpt"), experts=2, bottleneck=4, rounds=1,
                           repeats=1, device="cpu", precisions="fp32,bf16")
    rows = bench.attention_table(args, lengths=(4, 8), tokens=16)
    assert [(r["tokens"], r["batch"], r["precision"]) for r in rows] == [
        (4, 4, "fp32"), (4, 4, "bf16"), (8, 2, "fp32"), (8, 2, "bf16")]
    assert [r["path"] for r in rows] == ["fused", "written out"] * 2
    assert all(r[k] > 0 for r in rows for k in ("written out", "fused", "step, rule", "step, fused"))


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


def test_bench_of_a_decoder_times_decoding(tmp_path):
    args = SimpleNamespace(model=str(FIXTURES / "tiny-llama"), batch_size=2, seq_len=8, experts=2, bottleneck=4,
                           lora_rank=2, rounds=1, repeats=1, device="cpu", new_tokens=3, precisions="fp32")
    r = bench.bench(args)
    assert "head only" not in r["training"] and set(r["training"]) == set(bench.TRAINING) - {"head only"}
    t = {n: by["fp32"] for n, by in r["training"].items()}
    assert t["AdaMix LoRA, 2 passes"]["flops_per_step"] > t["LoRA"]["flops_per_step"]
    rows = {(d["model"], d["cache"]) for d in r["decoding"]}
    assert rows == {(n, c) for n in bench.DECODING for c in (True, False)}
    assert r["inference"]["AdaMix LoRA, folded"]["fp32"]["added_params"] == 0
    bench.print_report(r)


@pytest.mark.slow  # compiling every row takes a minute or more on a CPU
def test_bench_compile_times_every_training_row_compiled_too(tmp_path):
    """--compile adds a compiled twin of every training row, really compiled (dynamo's frames)."""
    import torch._dynamo.utils
    shutil.copytree(FIXTURES / "tiny-bert-legacy", tmp_path / "ckpt")
    args = SimpleNamespace(model=str(tmp_path / "ckpt"), batch_size=2, seq_len=8, experts=2, bottleneck=4, lora_rank=2,
                           rounds=1, repeats=1, device="cpu", precisions="fp32", new_tokens=2, compile=True)
    torch._dynamo.utils.counters.clear()
    r = bench.bench(args)
    assert set(r["training"]) == set(bench.TRAINING) | {f"{n}, compiled" for n in bench.TRAINING}
    assert torch._dynamo.utils.counters["frames"]["ok"] > 0
    compiled = r["training"]["adapter, compiled"]["fp32"]
    assert compiled["saved_activations_mb"] is None  # not measured: the hook would be traced
    assert compiled["flops_per_step"] == r["training"]["adapter"]["fp32"]["flops_per_step"]
