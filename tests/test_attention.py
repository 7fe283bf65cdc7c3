"""model.attention: the written-out path that training in bf16 on a CPU takes, against torch's
fused kernel (outputs and gradients), and the rule that picks between them."""
import pytest
import torch
from conftest import FIXTURES

import model

BF16_ATOL, BF16_RTOL = 5e-2, 2e-2  # bf16 keeps 8 mantissa bits: ~0.4 % per rounding, over 2 layers


def test_attention_path_rule():
    """Written out only to train in bf16 on a CPU with at most WRITTEN_OUT_MAX_KEYS keys."""
    def path(dtype, keys, grad=True):
        q = torch.zeros(1, 2, 4, 8, dtype=dtype, requires_grad=grad)
        return model.attention_path(q, torch.zeros(1, 2, keys, 8, dtype=dtype))
    n = model.WRITTEN_OUT_MAX_KEYS
    assert path(torch.bfloat16, 4) == path(torch.bfloat16, n) == "written out"
    assert path(torch.bfloat16, n + 1) == "fused"
    assert path(torch.float32, 4) == "fused"
    assert path(torch.bfloat16, 4, grad=False) == "fused"  # evaluation, or nothing to train below
    with torch.no_grad():
        assert path(torch.bfloat16, 4) == "fused"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_written_out_attention_equals_the_fused_kernel(monkeypatch, causal, dtype):
    """Outputs and gradients of both paths agree: padding masked, or causal with a key/value
    prefix (S > T); exactly in fp32, to bf16's rounding in bf16."""
    g = torch.Generator().manual_seed(0)
    B, nh, T, S, hs = 3, 2, 5, (7 if causal else 5), 8
    q, k, v = (torch.randn(B, nh, n, hs, generator=g).to(dtype).requires_grad_()
               for n in (T, S, S))
    mask = None if causal else torch.ones(B, 1, 1, S, dtype=torch.bool)
    if mask is not None:
        mask[0, ..., 3:] = False  # the first example has two padding tokens
    upstream = torch.randn(B, nh, T, hs, generator=g)  # a random gradient from above
    results = {}
    for path in ("written out", "fused"):
        monkeypatch.setattr(model, "attention_path", lambda q, k: path)
        if path == "fused" and causal:  # torch's is_causal aligns top left when S > T: by hand
            mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
        y = model.attention(q, k, v, mask, causal and path == "written out", 0.0)
        grads = torch.autograd.grad((y.float() * upstream).sum(), (q, k, v))
        results[path] = [y.float()] + [gr.float() for gr in grads]
    bf16 = dtype == torch.bfloat16
    tol = dict(atol=2e-2, rtol=2e-2) if bf16 else dict(atol=1e-5, rtol=1e-5)
    for a, b in zip(results["written out"], results["fused"]):
        torch.testing.assert_close(a, b, **tol)


def test_training_in_bf16_takes_the_written_out_path_and_agrees_with_the_fused_one(monkeypatch):
    """A tiny BERT under bf16 autocast, dropout off: the loss and the gradient of every layer's
    query weight are those of the fused kernel, to bf16's rounding."""
    net = model.from_pretrained(FIXTURES / "tiny-bert")
    net.train()
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for block in net.blocks:
        block.attn.dropout = 0.0
    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    seen, results = [], {}
    real_path = model.attention_path
    monkeypatch.setattr(model, "attention_path", lambda q, k: seen.append(real_path(q, k))
                        or seen[-1])
    for limit in (model.WRITTEN_OUT_MAX_KEYS, 0):  # 0 keys: the fused kernel everywhere
        monkeypatch.setattr(model, "WRITTEN_OUT_MAX_KEYS", limit)
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = net(ids, mask).float().pow(2).mean()
        loss.backward()
        results[limit] = [loss.detach()] + [b.attn.query.weight.grad.clone() for b in net.blocks]
    assert "written out" in seen and "fused" in seen
    for a, b in zip(results[model.WRITTEN_OUT_MAX_KEYS], results[0]):
        torch.testing.assert_close(a, b, atol=BF16_ATOL, rtol=BF16_RTOL)
