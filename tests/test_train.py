"""train.py end to end on a tiny BERT and a tiny GPT-2: it learns, it resumes exactly, its batched
two-view step equals two passes, and two data-parallel ranks stay identical."""
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, ROOT

import adamix
import data
import formats
import model
import train

WORDS = "the a film movie story plot actor scene music ending it was is this one".split()


def tiny_checkpoint(folder, source="tiny-bert-legacy", dropout=None, vocab=None):
    """A copy of a tiny fixture checkpoint with a vocabulary of our words (and dropout changed).

    The fixture holds Hugging Face's initialisation (std 0.02): attention is then uniform and a token
    barely changes another's state, so a frozen copy cannot be adapted to anything. The copy re-draws
    every matrix at the scale of a trained network, N(0, 1/fan_in), seeded."""
    shutil.copytree(FIXTURES / source, folder)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    g = torch.Generator().manual_seed(0)
    for name, w in state.items():
        if name.endswith("weight") and w.dim() == 2:
            state[name] = torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5
    torch.save(state, folder / "pytorch_model.bin")
    config = json.loads((folder / "config.json").read_text())
    if dropout is not None:
        config.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    (folder / "config.json").write_text(json.dumps(config))
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (folder / "vocab.txt").write_text("\n".join(special + (vocab or WORDS + ["good", "great", "bad", "awful"])))
    return folder


def synthetic_sst2(folder, n_train=320, n_test=96, seed=0):
    """SST-2 layout: three random words and three cues, "good"/"great" (label 1) or "bad"/"awful" (0)."""
    g = torch.Generator().manual_seed(seed)
    (folder / "SST-2").mkdir(parents=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_test)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            label = i % 2
            cues = [["bad", "awful"], ["good", "great"]][label]
            words = [WORDS[j] for j in torch.randint(len(WORDS), (3,), generator=g)]
            words += [cues[j] for j in torch.randint(2, (3,), generator=g)]  # half the words carry the label
            words = [words[j] for j in torch.randperm(len(words), generator=g)]
            rows.append(f"{' '.join(words)}\t{label}")
        (folder / "SST-2" / name).write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture
def sst2(tmp_path):
    return tiny_checkpoint(tmp_path / "ckpt"), synthetic_sst2(tmp_path / "glue")


def config(ckpt, glue, out_dir, **kw):
    base = dict(model=str(ckpt), task="sst2", data_dir=str(glue), experts=2, bottleneck=8, epochs=4, batch_size=16,
                lr=1e-2, warmup=0.1, max_len=16, eval_batch_size=64, log_interval=10_000, out_dir=str(out_dir))
    return train.TrainConfig(**{**base, **kw})


def test_adamix_learns_a_synthetic_task(sst2, tmp_path):
    ckpt, glue = sst2
    results = train.main(config(ckpt, glue, tmp_path / "out"))
    history = results["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] < 0.75  # falls from about ln 2
    assert results["test"]["merged"]["accuracy"] > 0.85                 # chance is 0.5
    assert set(results["test"]) == {"merged", "greedy", "best-expert", "random", "expert:0", "ensemble"}
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["test"] == results["test"] and saved["config"]["method"] == "adamix-adapter"
    assert saved["parameters"]["trainable"] > saved["parameters"]["inference"] > 0


@pytest.mark.parametrize("method", ["adamix-lora", "head-only", "full"])
def test_other_methods_run(sst2, tmp_path, method):
    ckpt, glue = sst2
    results = train.main(config(ckpt, glue, tmp_path / "out", method=method, epochs=1))
    assert 0.0 <= results["test"]["merged"]["accuracy"] <= 1.0


def test_resume_gives_the_same_weights_as_no_interruption(sst2, tmp_path):
    ckpt, glue = sst2
    straight = train.main(config(ckpt, glue, tmp_path / "a", epochs=2))
    assert train.main(config(ckpt, glue, tmp_path / "b", epochs=2, stop_after=7)) is None  # mid epoch 1 of 2
    first_s = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["trained_s"]  # training time to step 7
    resumed = train.main(config(ckpt, glue, tmp_path / "b", epochs=2, resume=True))
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] and a["weights"].keys() == b["weights"].keys()
    for name in a["weights"]:
        assert torch.equal(a["weights"][name], b["weights"][name]), name
    assert resumed["test"] == straight["test"]
    assert [h["dev"] for h in resumed["history"]] == [h["dev"] for h in straight["history"]]
    second_s = (resumed["history"][-1]["step"] - 7) / resumed["steps_per_s"]   # the resumed process's own
    assert first_s > 0 and resumed["wall_time_s"] == pytest.approx(first_s + second_s)  # both processes count


def test_batched_two_views_equal_two_passes(tmp_path):
    """With dropout off, one forward of 2B examples with routes (p, q) equals two forwards with p and q."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt", dropout=0.0)
    net = model.from_pretrained(ckpt, num_labels=2)
    router = adamix.add_adamix(net, ["*.mlp.fc_out"], "adapter", adamix.AdaMixConfig(num_experts=3, r=4, share="none"))
    for p in adamix.mixtures(net)[0].parameters():  # move off the exact init so the experts differ clearly
        p.data.add_(0.05 * torch.randn_like(p))
    net.train()
    batch = {"input_ids": torch.randint(5, 20, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long),
             "labels": torch.tensor([0, 1, 1, 0])}
    batch["attention_mask"][1, 5:] = 0
    plan = router.sample(views=2)
    plan[0, :, 0] = torch.tensor([0, 2])  # make sure the two views really take different experts
    cfg = train.TrainConfig(consistency=1.0, batched_views=True)
    with router.use(plan):  # training_loss samples a plan itself; pin ours instead
        doubled = {k: torch.cat([v, v]) for k, v in batch.items()}
        logits_a, logits_b = train.predict(net, doubled).chunk(2)
    with router.use(plan[:, :1]):
        first = train.predict(net, batch)
    with router.use(plan[:, 1:]):
        second = train.predict(net, batch)
    torch.testing.assert_close(logits_a, first, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits_b, second, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(first, second)
    # and the loss train.py computes for the batched step uses them as the two views
    router.sample = lambda views=1: plan  # training_loss draws with router.sample(views=2)
    loss = train.training_loss(net, router, batch, cfg, "classification")
    expected = torch.nn.functional.cross_entropy(first, batch["labels"]) + adamix.consistency_loss(first, second)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(sst2, tmp_path, monkeypatch):
    ckpt, glue = sst2
    cfg = config(ckpt, glue, tmp_path / "out", epochs=2)
    train.main(config(ckpt, glue, tmp_path / "out", epochs=2, stop_after=3))
    before = (tmp_path / "out" / "ckpt.pt").read_bytes()
    real = train.training_loss
    calls = []

    def poisoned(*args):
        calls.append(1)
        return real(*args) * (float("nan") if len(calls) == 2 else 1.0)
    monkeypatch.setattr(train, "training_loss", poisoned)
    with pytest.raises(SystemExit, match="step 4: the loss is nan"):
        train.main(train.TrainConfig(**{**cfg.__dict__, "resume": True}))
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == before


def test_e2e_language_modelling_with_adamix_lora(tmp_path):
    """GPT-2 path: LM loss on the reference only, masked consistency term, beam search, BLEU."""
    vocab = ["<|endoftext|>"] + "name food area price the serves is in a and".split() + [
        "[", "]", ",", ".", "Alimentum", "Aromi", "Italian", "Chinese", "riverside", "centre", "cheap", "high"]
    folder = tmp_path / "gpt2"
    shutil.copytree(FIXTURES / "tiny-gpt2", folder)
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(folder / "tokenizer.json"))
    lines = []
    for n in ("Alimentum", "Aromi"):
        for f in ("Italian", "Chinese"):
            for a in ("riverside", "centre"):
                mr = f"name [ {n} ] , food [ {f} ] , area [ {a} ]"
                lines += [f"{mr}||{n} serves {f} food in the {a} .", f"{mr}||{n} is a {f} in the {a} ."]
    e2e = tmp_path / "e2e"
    e2e.mkdir()
    (e2e / "valid.txt").write_text("\n".join(lines * 3) + "\n")
    (e2e / "test.txt").write_text("\n".join(lines[:8]) + "\n")
    cfg = train.TrainConfig(model=str(folder), task="e2e", data_dir=str(e2e), method="adamix-lora", experts=2,
                            lora_rank=4, consistency=100.0, epochs=2, batch_size=8, lr=1e-2, max_len=64, beam=2,
                            max_new_tokens=12, eval_batch_size=8, log_interval=10_000, out_dir=str(tmp_path / "out"))
    results = train.main(cfg)
    assert results["history"][-1]["train_loss"] < results["history"][0]["train_loss"]
    for mode in ("merged", "random", "expert:0"):
        assert 0.0 <= results["test"][mode]["bleu"] <= 1.0


def test_two_process_torchrun_keeps_ranks_identical(sst2, tmp_path):
    """torchrun on CPU (gloo): both ranks draw the same routes and end with bit-identical weights."""
    ckpt, glue = sst2
    script = tmp_path / "run_rank.py"
    script.write_text(f"""
import os, sys, torch
sys.path.insert(0, {str(ROOT)!r})
import adamix, train
nets = []
build = train.build
train.build = lambda *a: nets.append(build(*a)) or nets[-1]  # keep the model to save it below
cfg = train.parse_args(sys.argv[1:])
train.main(cfg)  # stop_after the last step: returns before reloading the best weights from disk
torch.save(adamix.adamix_state_dict(nets[0][0]), os.path.join({str(tmp_path)!r}, f"rank{{os.environ['RANK']}}.pt"))
""")
    steps = 6
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), "--model", str(ckpt), "--task", "sst2", "--data_dir", str(glue), "--experts", "2",
           "--bottleneck", "8", "--batch_size", "8", "--max_steps", str(steps), "--stop_after", str(steps),
           "--max_len", "16", "--out_dir", str(tmp_path / "out"), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert a.keys() == b.keys()
    torch.manual_seed(0)  # as train.main does before building, so the new head starts the same
    start = adamix.adamix_state_dict(train.build(train.TrainConfig(model=str(ckpt), experts=2, bottleneck=8), 2)[0])
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it trained
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_regression_task_uses_squared_error_consistency(tmp_path, monkeypatch):
    """STS-B: one output, MSE loss, and the consistency term is the squared difference (a softmax KL of one logit is always zero)."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    (tmp_path / "glue" / "STS-B").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for name, n in (("train.tsv", 96), ("dev.tsv", 32)):
        rows = ["index\tsentence1\tsentence2\tscore"]
        for i in range(n):
            a, b = (" ".join(WORDS[j] for j in torch.randint(len(WORDS), (4,), generator=g)) for _ in range(2))
            rows.append(f"{i}\t{a}\t{b}\t{float(torch.rand(1, generator=g)) * 5:.2f}")
        (tmp_path / "glue" / "STS-B" / name).write_text("\n".join(rows) + "\n")
    kinds = []
    real = train.adamix.consistency_loss
    monkeypatch.setattr(train.adamix, "consistency_loss", lambda a, b, mask=None, kind="kl_sg":
                        kinds.append(kind) or real(a, b, mask, kind))
    results = train.main(config(ckpt, tmp_path / "glue", tmp_path / "out", task="stsb", epochs=1))
    assert set(kinds) == {"mse"}
    assert -1.0 <= results["test"]["merged"]["pearson"] <= 1.0


# -----------------------------------------------------------------------------
# the study's options: --unrouted, --precision, --kshot, --expert_init, expert tracking

@pytest.mark.parametrize("unrouted", ["skip", "zero"])
def test_unrouted_expert_update(unrouted):
    """Two experts; step 1 routes both, step 2 only expert a. Expert b in step 2, by AdamW's equations:
    skip: unchanged. zero: g = 0, so m2 = b1 m1, v2 = b2 v1, and p2 = p1 (1 - lr wd) - lr m2_hat / (sqrt(v2_hat) + eps)."""
    lr, wd, (b1, b2), eps = 0.1, 0.1, (0.9, 0.999), 1e-8
    a, b = torch.nn.Parameter(torch.tensor([1.0, -2.0])), torch.nn.Parameter(torch.tensor([0.5, 3.0]))
    opt = torch.optim.AdamW([a, b], lr=lr, weight_decay=wd, betas=(b1, b2), eps=eps)
    cfg = train.TrainConfig(unrouted=unrouted, grad_clip=0.0)
    g1 = torch.tensor([0.3, -0.7])
    ((a + b) * g1).sum().backward()                  # step 1: both routed, both get g1
    train.optimizer_step(opt, [a, b], cfg)
    b1_value = b.detach().clone()
    (a * g1).sum().backward()                        # step 2: only a is routed
    train.optimizer_step(opt, [a, b], cfg)
    if unrouted == "skip":
        assert torch.equal(b.detach(), b1_value)
    else:
        m2, v2 = b1 * (1 - b1) * g1, b2 * (1 - b2) * g1 ** 2
        m_hat, v_hat = m2 / (1 - b1 ** 2), v2 / (1 - b2 ** 2)
        expected = b1_value * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
        torch.testing.assert_close(b.detach(), expected)
        assert not torch.equal(b.detach(), b1_value)


def test_unrouted_zero_resumes_exactly(sst2, tmp_path):
    """With --unrouted zero the zero gradients are part of the state: a resumed run ends bit-identical."""
    ckpt, glue = sst2
    straight = train.main(config(ckpt, glue, tmp_path / "a", epochs=2, unrouted="zero", experts=4))
    train.main(config(ckpt, glue, tmp_path / "b", epochs=2, unrouted="zero", experts=4, stop_after=7))
    resumed = train.main(config(ckpt, glue, tmp_path / "b", epochs=2, unrouted="zero", experts=4, resume=True))
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["weights"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["weights"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test"] == straight["test"]


def test_precision_choices(monkeypatch):
    assert train.resolve_precision("fp32", "cpu") == "fp32" and train.resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: True)
    assert train.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: False)
    assert train.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert train.resolve_precision("auto", "cuda:0") == "bf16"
    assert isinstance(train.autocast("bf16", "cpu"), torch.autocast)
    assert isinstance(train.autocast("fp32", "cpu"), train.nullcontext)


@pytest.mark.parametrize("reported, native", [
    (dict(architecture="x86_64", avx2=True, avx512_bf16=True, amx_bf16=False), True),
    (dict(architecture="x86_64", avx2=True, avx512_bf16=False, amx_bf16=True, amx_tile=True), True),
    (dict(architecture="x86_64", avx2=True, avx512_f=True, avx512_bf16=False, amx_bf16=False), False),
    (dict(architecture="x86_64", avx512_bf16=False, amx_tile=True), False),  # tiles without bf16
    (dict(architecture="aarch64", neon=True, bf16=True), True),
    (dict(architecture="aarch64", neon=True, bf16=False, sve=True, sve_bf16=True), True),
    (dict(architecture="aarch64", neon=True, bf16=False), False),
    (dict(architecture="riscv64"), False),  # nothing known: fp32
])
def test_auto_precision_follows_what_the_processor_reports(monkeypatch, reported, native):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: reported)
    assert train.cpu_has_native_bf16() is native
    assert train.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")


def test_auto_precision_falls_back_to_fp32_when_torch_cannot_tell(monkeypatch):
    def missing():
        raise AttributeError("no detection in this torch")
    monkeypatch.setattr(torch.cpu, "get_capabilities", missing)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", missing)
    assert train.cpu_has_native_bf16() is False
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert train.cpu_has_native_bf16() is True


def test_auto_precision_is_the_same_in_a_forked_child():
    """The decision reads the processor, not a clock: a forked child (as in the kill-and-resume test, or
    a data loader) decides exactly as its parent, whatever the load on the machine."""
    parent = [train.resolve_precision("auto", "cpu") for _ in range(3)]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        answer = ",".join(train.resolve_precision("auto", "cpu") for _ in range(3))
        os.write(write, answer.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        child = f.read().split(",")
    os.waitpid(pid, 0)
    assert child == parent and len(set(parent)) == 1


@pytest.mark.parametrize("stored, native", [("bf16", False), ("fp32", True)])
def test_resume_with_auto_continues_in_the_runs_own_precision(sst2, tmp_path, monkeypatch, stored, native):
    """A run stopped in one precision and resumed with --precision auto on a processor that would choose
    the other (another machine, say) continues in its own; an explicit other precision is refused."""
    ckpt, glue = sst2
    kw = dict(epochs=1, stop_after=1, eval_limit=20)
    assert train.main(config(ckpt, glue, tmp_path, precision=stored, **kw)) is None
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: native)
    resumed = train.main(config(ckpt, glue, tmp_path, precision="auto", resume=True, epochs=1, eval_limit=20))
    assert resumed["precision"] == stored and resumed["config"]["precision"] == stored
    train.main(config(ckpt, glue, tmp_path / "other", precision=stored, **kw))
    other = {"bf16": "fp32", "fp32": "bf16"}[stored]
    with pytest.raises(train.UserError, match=f"--precision '{stored}' \\(now '{other}'\\)"):
        train.main(config(ckpt, glue, tmp_path / "other", precision=other, resume=True, epochs=1))


def test_bf16_training_on_the_cpu_is_close_to_fp32(sst2, tmp_path):
    """A few steps in bf16 autocast: finite losses within bf16's rounding of fp32's, and every inference
    mode (merged, random, expert, ensemble) runs in bf16; the chosen precision is stored."""
    ckpt, glue = sst2
    runs = {p: train.main(config(ckpt, glue, tmp_path / p, epochs=1, precision=p, method="adamix-lora"))
            for p in ("fp32", "bf16")}
    losses = {p: r["history"][0]["train_loss"] for p, r in runs.items()}
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert abs(losses["bf16"] - losses["fp32"]) < 0.02 * abs(losses["fp32"]) + 0.01
    assert runs["bf16"]["precision"] == "bf16" and runs["bf16"]["config"]["precision"] == "bf16"
    assert set(runs["bf16"]["test"]) == {"merged", "greedy", "best-expert", "random", "expert:0", "ensemble"}


def test_folded_and_collapsed_inference_in_bf16(tmp_path):
    """Under bf16 autocast, folded LoRA and collapsed adapters give the merged model's logits up to bf16 rounding."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt", dropout=0.0)
    ids = torch.randint(5, 20, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    for kind, targets, finish in [("lora", ["*.attn.query", "*.attn.value"], adamix.fold_lora),
                                  ("adapter", ["*.mlp.fc_out"], adamix.collapse_experts)]:
        net = model.from_pretrained(ckpt, num_labels=2)
        adamix.add_adamix(net, targets, kind, adamix.AdaMixConfig(num_experts=3, r=4))
        for p in net.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
        net.eval()
        with torch.no_grad(), train.autocast("bf16", "cpu"):
            merged = train.predict(net, dict(input_ids=ids, attention_mask=mask)).float()
            finish(net)
            final = train.predict(net, dict(input_ids=ids, attention_mask=mask)).float()
        assert torch.isfinite(final).all()
        torch.testing.assert_close(final, merged, atol=0.05 + 0.02 * merged.abs().max().item(), rtol=0.0)


def test_kshot_track_experts_and_identical_init(sst2, tmp_path):
    ckpt, glue = sst2
    r = train.main(config(ckpt, glue, tmp_path / "k", epochs=2, kshot=8, experts=3, track_experts=True,
                          expert_init="identical"))
    assert r["train_examples"] == 16  # 8 of each of the two labels
    for h in r["history"]:
        assert set(h["dev_modes"]) == {"random", "expert:0", "expert:1", "expert:2"}
        assert set(h["expert_distance"]) == {"down"} and len(h["expert_distance"]["down"]) == 2  # 2 layers, up shared
        assert all(0.0 < d < 1.0 for d in h["expert_distance"]["down"])  # identical at start, apart after routing


def test_evaluate_by_length_scores_every_example_against_its_own_label(tmp_path):
    """evaluate() batches by length; its accuracy must equal one example at a time, in the file's order."""
    net = model.from_pretrained(tiny_checkpoint(tmp_path / "ckpt", dropout=0.0), num_labels=2).eval()
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(5, 20, (int(n),), generator=g).numpy(),
                 "token_type_ids": torch.zeros(int(n), dtype=torch.long).numpy(), "label": i % 2}
                for i, n in enumerate(torch.randint(2, 12, (40,), generator=g))]
    with torch.no_grad():
        alone = [int(train.predict(net, {"input_ids": torch.as_tensor(e["input_ids"])[None].long(),
                                         "attention_mask": torch.ones(1, len(e["input_ids"]), dtype=torch.long)})
                     .argmax(-1)) for e in examples]
    plain = sum(p == e["label"] for p, e in zip(alone, examples)) / len(examples)
    task = types.SimpleNamespace(num_labels=2, pad_id=0, metric=data.accuracy)
    cfg = types.SimpleNamespace(eval_limit=0, eval_batch_size=16)
    got = train.evaluate(net, None, examples, task, cfg, "merged", contextlib.nullcontext(), "cpu")
    assert 0.2 < plain < 0.8                       # the labels are not all predicted alike: a mix-up would show
    assert got["accuracy"] == pytest.approx(plain)


def test_the_printed_comparison_keeps_every_flag_but_the_mixture():
    """The command printed after an AdaMix run trains its single module on the same data, budget and seed."""
    cfg = train.TrainConfig(kshot=64, batch_size=8, epochs=20, lr=3e-3, bottleneck=32, max_len=48, experts=8,
                            unrouted="zero", consistency=10.0, track_experts=True, out_dir="runs/a b")
    command = train.single_module_command(cfg)
    args = shlex.split(command)
    assert args[:2] == ["python", "train.py"]
    single = train.parse_args(args[2:])
    mixture = {f.name for f in dataclasses.fields(cfg) if f.metadata.get("adamix_only")}
    for f in dataclasses.fields(cfg):
        if f.name not in mixture:
            assert getattr(single, f.name) == getattr(cfg, f.name), f.name
    assert single.method == "adapter" and single.out_dir == "runs/a b-adapter"
    assert single.experts == 4 and single.unrouted == "skip" and not single.track_experts  # defaults again
    regularised = train.parse_args(shlex.split(train.single_module_command(cfg, True))[2:])
    assert regularised.consistency == 10.0 and regularised.method == "adapter"
    assert regularised.out_dir == "runs/a b-adapter-consistency"
    assert {k: v for k, v in vars(regularised).items() if k not in ("consistency", "out_dir")} == \
        {k: v for k, v in vars(single).items() if k not in ("consistency", "out_dir")}


# -----------------------------------------------------------------------------
# the loop's arithmetic: the schedule, gradient accumulation, the best epoch, the data order

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny BERT without dropout and a small synthetic SST-2 (6 steps an epoch at batch 16)."""
    root = tmp_path_factory.mktemp("small")
    ckpt = tiny_checkpoint(root / "ckpt", dropout=0.0)
    return ckpt, synthetic_sst2(root / "glue", n_train=96, n_test=32)


def schedule(step, total, lr, warmup_steps):
    """The schedule as the README states it: linear warm-up to lr, then linear decay to 0."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * (total - step) / (total - warmup_steps)


@pytest.mark.parametrize("warmup, warmup_steps", [(0.1, 10), (0.25, 25), (7, 7), (0, 0)])
def test_the_learning_rate_warms_up_linearly_then_decays_linearly_to_zero(warmup, warmup_steps):
    """--warmup is a fraction of all steps (< 1) or a number of steps (>= 1). The rate reaches lr at
    the end of the warm-up and 0 after the last step."""
    total, cfg = 100, train.TrainConfig(lr=2e-3, warmup=warmup)
    for s in range(total + 1):
        expected = schedule(s, total, 2e-3, warmup_steps)
        assert train.get_lr(s, total, cfg) == pytest.approx(expected, rel=1e-12, abs=1e-15), s
    if warmup_steps:
        assert train.get_lr(warmup_steps - 1, total, cfg) == pytest.approx(2e-3)  # the peak
    assert train.get_lr(total - 1, total, cfg) == pytest.approx(2e-3 / (total - warmup_steps))
    assert train.get_lr(total, total, cfg) == 0.0


def test_every_step_trains_with_the_scheduled_learning_rate(small, tmp_path, monkeypatch):
    """The loop gives get_lr's value to every parameter group before the step."""
    seen, real = [], train.optimizer_step

    def record(opt, params, cfg):
        seen.append([group["lr"] for group in opt.param_groups])
        real(opt, params, cfg)
    monkeypatch.setattr(train, "optimizer_step", record)
    train.main(config(*small, tmp_path / "out", epochs=2, warmup=4, lr=1e-2))
    total = 12  # 2 epochs of 6 steps
    assert len(seen) == total
    for s, lrs in enumerate(seen):
        assert lrs == pytest.approx([schedule(s, total, 1e-2, 4)] * len(lrs)), s


def test_accumulated_gradients_are_the_mean_over_micro_batches(small, tmp_path, monkeypatch):
    """A loss with a known gradient: n * sum(trainable weights), n the micro-batch's examples, has
    gradient n for every weight. Accumulated over a step's micro-batches, each loss divided by their
    number, the gradient is their mean n, also at an epoch's end where fewer are left."""
    sizes, grads = [], []

    def known_loss(net, router, batch, cfg, kind, step=0):
        sizes.append(len(batch["labels"]))
        return len(batch["labels"]) * sum(p.sum() for p in net.parameters() if p.requires_grad)

    def record(opt, params, cfg):
        grads.append({g.item() for p in params for g in p.grad.flatten().unique()})
        opt.zero_grad()
    monkeypatch.setattr(train, "training_loss", known_loss)
    monkeypatch.setattr(train, "optimizer_step", record)
    cfg = config(*small, tmp_path / "out", epochs=1, batch_size=5, grad_accum=4, eval_limit=4,
                 precision="fp32")
    train.main(cfg)
    steps = [sizes[i:i + 4] for i in range(0, len(sizes), 4)]
    assert len(steps[-1]) < 4  # a leftover step
    assert len(set(sizes)) > 1  # micro-batches of two sizes
    assert len(grads) == len(steps)
    for got, micro in zip(grads, steps):
        assert len(got) == 1 and got.pop() == pytest.approx(sum(micro) / len(micro)), micro


def test_the_epoch_best_on_dev_is_saved_and_tested_not_the_last(small, tmp_path, monkeypatch):
    """Dev accuracy peaks after epoch 1 of 3 (a stub evaluate): model.pt holds epoch 1's weights,
    and the test split is evaluated with them, in every mode."""
    dev_scores, at_dev, at_test = iter([0.9, 0.5, 0.7]), [], []

    def stub(net, router, examples, task, cfg, mode, ctx, device):
        state = adamix.adamix_state_dict(net, head="head", router=False)
        weights = {k: v.clone() for k, v in state.items()}
        if examples is task.splits["test"]:
            at_test.append(weights)
            return {"accuracy": 0.0}
        at_dev.append(weights)
        return {"accuracy": next(dev_scores)}
    monkeypatch.setattr(train, "evaluate", stub)
    results = train.main(config(*small, tmp_path / "out", epochs=3,
                                test_modes="merged,random,expert:0,ensemble"))  # no dev soups
    assert [h["best"] for h in results["history"]] == [True, False, False]
    assert len(at_dev) == 3
    assert len(at_test) == 4  # merged, random, expert:0, ensemble
    first, last = at_dev[0], at_dev[2]
    assert any(not torch.equal(first[k], last[k]) for k in first)  # it trained on after epoch 1
    best = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert best["step"] == 6 and best["weights"].keys() == first.keys()
    for weights in [best["weights"]] + at_test:
        assert all(torch.equal(weights[k], first[k]) for k in first)


def test_every_epoch_has_its_own_shuffle_drawn_from_seed_plus_epoch(small, tmp_path, monkeypatch):
    """The batches of epoch e are make_batches(shuffle, seed + e): different in each epoch, and the
    same after a restart (the order depends only on the seed and the epoch)."""
    seen, real = [], train.training_loss

    def record(net, router, batch, *args):
        seen.append(batch["input_ids"].clone())
        return real(net, router, batch, *args)
    monkeypatch.setattr(train, "training_loss", record)
    seed = 3
    train.main(config(*small, tmp_path / "out", epochs=2, seed=seed, consistency=0.0))
    ckpt, glue = small
    task = data.load_task("sst2", formats.load_tokenizer(ckpt), glue, max_len=16)
    for epoch in (0, 1):
        batches = data.make_batches(task.splits["train"], 16, shuffle=True, seed=seed + epoch,
                                    pad_id=task.pad_id)
        expected = [b["input_ids"] for b in batches]
        got = seen[epoch * len(expected):(epoch + 1) * len(expected)]
        assert len(got) == len(expected), epoch
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), epoch
    half = len(seen) // 2
    assert len(seen) == 2 * half
    assert any(not torch.equal(a, b) for a, b in zip(seen[:half], seen[half:]))


# ----------------------------------------------------------------------------- the study's flags

def test_consistency_every_k_takes_the_second_pass_on_every_kth_step_only(monkeypatch):
    """--consistency_every 2: two passes and CE + lambda * KL on steps 0, 2, ...; one pass and the
    task loss alone on steps 1, 3, ..."""
    returned = []
    logits = iter(torch.randn(8, 3, 2, generator=torch.Generator().manual_seed(0)))
    monkeypatch.setattr(train, "predict", lambda net, batch: returned.append(next(logits)) or
                        returned[-1])
    cfg = train.TrainConfig(consistency=1.0, consistency_every=2)
    labels = torch.tensor([0, 1, 1])
    per_step = []
    for step in range(4):
        returned.clear()
        loss = train.training_loss(None, None, {"labels": labels}, cfg, "classification", step)
        per_step.append(len(returned))
        if step % 2:  # the task loss of the one pass
            expected = torch.nn.functional.cross_entropy(returned[0], labels)
            torch.testing.assert_close(loss, expected)
    assert per_step == [2, 1, 2, 1]


def test_consistency_every_1_is_every_step(monkeypatch):
    monkeypatch.setattr(train, "predict", lambda net, batch: torch.zeros(2, 2))
    cfg = train.TrainConfig(consistency=1.0)
    seen = []
    monkeypatch.setattr(train.adamix, "consistency_loss", lambda *a, **k: seen.append(1) or 0.0)
    for step in range(3):
        train.training_loss(None, None, {"labels": torch.tensor([0, 1])}, cfg, "classification", step)
    assert seen == [1, 1, 1]


def test_greedy_soup_adds_an_expert_only_when_dev_does_not_get_worse(monkeypatch):
    """Experts alone on dev: 1 (0.8) > 2 (0.7) > 0 (0.6). Soup {1, 2} scores 0.79 < 0.8: left out;
    soup {1, 0} scores 0.85: kept. -> best-expert expert:1, greedy soup:1,0."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    router = adamix.add_adamix(net, ["0"], "lora", adamix.AdaMixConfig(num_experts=3, r=2))
    dev_scores = {"expert:0": 0.6, "expert:1": 0.8, "expert:2": 0.7, "soup:1,2": 0.79,
                  "soup:1,0": 0.85}
    asked = []
    def evaluate(net, router, examples, task, cfg, mode, ctx, device):
        asked.append(mode)
        return {"accuracy": dev_scores[mode]}
    monkeypatch.setattr(train, "evaluate", evaluate)
    task = types.SimpleNamespace(num_labels=2, main_metric="accuracy")
    modes, info = train.choose_soups(net, router, [], task, train.TrainConfig(), None, "cpu")
    assert modes == {"best-expert": "expert:1", "greedy": "soup:1,0"}
    assert asked == ["expert:0", "expert:1", "expert:2", "soup:1,2", "soup:1,0"]
    assert info["dev_greedy"] == 0.85 and info["dev_alone"] == {0: 0.6, 1: 0.8, 2: 0.7}


def test_greedy_soup_for_a_language_model_lowers_the_dev_loss(monkeypatch):
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    router = adamix.add_adamix(net, ["0"], "lora", adamix.AdaMixConfig(num_experts=2, r=2))
    losses = {"expert:0": 2.0, "expert:1": 1.5, "soup:1,0": 1.6}  # the soup is worse: left out
    monkeypatch.setattr(train, "evaluate", lambda *a: {"loss": losses[a[5]], "ppl": 0.0})
    task = types.SimpleNamespace(num_labels=0, main_metric="bleu")
    modes, _ = train.choose_soups(net, router, [], task, train.TrainConfig(), None, "cpu")
    assert modes == {"best-expert": "expert:1", "greedy": "soup:1"}


def test_the_run_tests_the_soups_dev_chose(sst2, tmp_path):
    ckpt, glue = sst2
    results = train.main(config(ckpt, glue, tmp_path / "out", epochs=1, experts=3))
    soups = results["soups"]
    assert set(soups["dev_alone"]) == {0, 1, 2}
    best = max(soups["dev_alone"], key=soups["dev_alone"].get)
    assert soups["best-expert"] == f"expert:{best}" and soups["greedy"].startswith(f"soup:{best}")
    assert {"greedy", "best-expert"} <= set(results["test"])


def test_type_choice_and_range_errors_are_one_line_naming_every_bad_flag_with_status_1():
    """argparse's own type and choice errors printed its usage, exited 2 and named only the first bad
    flag; every bad flag now goes through check_config's one-line `error:` path, status 1."""
    argv = ["--experts", "0", "--method", "foo", "--lr", "fast", "--epochs", "1.5", "--seed", "-1",
            "--precision", "bf17"]
    done = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "usage" not in done.stderr
    for part in ("--experts 0: must be >= 1", "--method 'foo': choose one of adamix-adapter",
                 "--lr 'fast': expected a finite number", "--epochs '1.5': expected an integer",
                 "--seed -1: must be in [0, 2^63)", "--precision 'bf17': choose one of auto"):
        assert part in lines[0]
    with pytest.raises(train.UserError, match=r"^--lr 'inf': expected a finite number$"):
        train.parse_args(["--lr", "inf"])
    with pytest.raises(train.UserError, match="unrecognized arguments: --experts_count"):
        train.parse_args(["--experts_count", "2"])
    cfg = train.parse_args(["--preset", "bert-base-glue", "--lr", "1e-3", "--no-batched_views"])
    assert (cfg.lr, cfg.bottleneck, cfg.batched_views) == (1e-3, 48, False)  # converted, preset kept
    help = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert help.returncode == 0 and "--precision {auto,fp32,bf16}" in help.stdout  # choices shown


def test_soups_script_adds_the_dev_chosen_soups_to_an_older_runs_summary(sst2, tmp_path):
    """results/soups.py on a run that tested only merged: the summary gains greedy and best-expert
    as train.py would have tested them, and the merged number is left as it was."""
    sys.path.insert(0, str(ROOT / "results"))
    import soups
    ckpt, glue = sst2
    out = tmp_path / "run-s0"
    results = train.main(config(ckpt, glue, out, epochs=1, experts=3, test_modes="merged"))
    (tmp_path / "summaries").mkdir()
    (tmp_path / "summaries" / "run-s0.json").write_text(json.dumps(results))
    soups.add_soups(out, summaries=tmp_path / "summaries")
    added = json.loads((tmp_path / "summaries" / "run-s0.json").read_text())
    assert added["test"]["merged"] == results["test"]["merged"]
    again = train.main(config(ckpt, glue, tmp_path / "again", epochs=1, experts=3))  # the same run
    assert added["test"]["greedy"] == again["test"]["greedy"]
    assert added["test"]["best-expert"] == again["test"]["best-expert"]
    assert added["soups"]["greedy"] == again["soups"]["greedy"]
