"""What train.py does to make a step faster changes no number: frozen weights kept in bf16 train
bit for bit as autocast's casts do, and keeping freed memory only stops the page faults."""
import resource
import sys

import pytest
import torch
from conftest import FIXTURES
from test_train import config, sst2  # noqa: F401 (sst2: a fixture)

import model
import train


def bf16_steps(name, method, keep, steps=3):
    """Losses and trainable tensors after `steps` bf16 optimiser steps of a tiny model, dropout on,
    with the frozen weights cast once (keep) or by autocast at every forward."""
    decoder = name != "tiny-bert"
    net = model.from_pretrained(FIXTURES / name, num_labels=None if decoder else 3)
    cfg = train.TrainConfig(method=method, experts=2, bottleneck=4, lora_rank=2, consistency=1.0)
    net, router = train.adapt(net, cfg)
    if keep:
        train.keep_frozen_weights_in_bf16(net)
    optimizer = train.make_optimizer(net, cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, net.config.vocab_size, (4, 6), generator=g)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    batch["labels"] = ids.clone() if decoder else torch.tensor([0, 1, 2, 0])
    torch.manual_seed(0)  # the same dropout masks in both runs
    losses = []
    net.train()
    for step in range(steps):
        with train.autocast("bf16", "cpu"):
            kind = "lm" if decoder else "classification"
            loss = train.training_loss(net, router, batch, cfg, kind)
        loss.backward()
        train.optimizer_step(optimizer, [p for p in net.parameters() if p.requires_grad], cfg)
        losses.append(loss.item())
    net.eval()
    with torch.no_grad(), train.autocast("bf16", "cpu"):
        evaluated = train.predict(net, batch).float()
    trained = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    return net, losses, trained, evaluated


@pytest.mark.parametrize("name,method", [("tiny-bert", "adamix-lora"),
                                         ("tiny-bert", "adamix-adapter"),
                                         ("tiny-gpt2", "adamix-lora"),   # LM head tied to wte
                                         ("tiny-llama", "lora")])        # its own LM head
def test_frozen_weights_kept_in_bf16_train_bit_for_bit_as_autocast_casts(name, method):
    _, losses, trained, evaluated = bf16_steps(name, method, keep=False)
    net, kept_losses, kept_trained, kept_evaluated = bf16_steps(name, method, keep=True)
    assert losses == kept_losses
    assert trained.keys() == kept_trained.keys()
    for n in trained:
        assert torch.equal(trained[n], kept_trained[n]), n
    assert torch.equal(evaluated, kept_evaluated)
    # what was converted: the frozen Linear weights, and nothing that autocast runs in fp32
    linear = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert any(m.weight.dtype == torch.bfloat16 for m in linear)
    for n, p in net.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, n  # experts, the head: AdamW updates fp32 weights
    for m in net.modules():
        if isinstance(m, (torch.nn.Embedding, torch.nn.LayerNorm)):
            assert m.weight.dtype == torch.float32, m
        elif isinstance(m, torch.nn.Linear) and not m.weight.requires_grad:
            # bf16, unless the Linear shares the embedding's weight (a tied LM head): fp32
            assert (m.weight.dtype == torch.bfloat16) != (m.weight is net.wte.weight)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_keep_freed_memory_stops_the_page_faults_of_a_freed_block():
    """A 24 MiB block allocated and freed again and again: once memory is kept, every block after
    the first few reuses the same pages (a fault is one 4 KiB page touched for the first time; a
    block given back to the system and taken again would fault ~6,000 times)."""
    if not train.keep_freed_memory():
        pytest.skip("not glibc: mallopt is not there")
    faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):  # the first ones may grow the heap
        torch.ones(6 << 20)
    before = faults()
    for _ in range(10):
        torch.ones(6 << 20)  # 6 Mi floats = 24 MiB, every page written
    assert faults() - before < 600  # 10 blocks given back and taken again: ~60,000


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_train_main_casts_in_bf16_only_and_keeps_freed_memory_on_a_cpu(monkeypatch, sst2,
                                                                         tmp_path, precision):
    """train.main converts the frozen weights when it trains in bf16, after the model is on its
    device, and keeps freed memory on a CPU in either precision."""
    calls = []
    real = train.keep_frozen_weights_in_bf16

    def spy(net):
        calls.append(next(net.parameters()).device.type)
        real(net)
    monkeypatch.setattr(train, "keep_frozen_weights_in_bf16", spy)
    monkeypatch.setattr(train, "keep_freed_memory", lambda: calls.append("memory"))
    ckpt, glue = sst2
    results = train.main(config(ckpt, glue, tmp_path / "out", method="adamix-lora", epochs=1,
                                precision=precision))
    assert calls == (["cpu", "memory"] if precision == "bf16" else ["memory"])
    assert results["precision"] == precision
