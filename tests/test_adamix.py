"""Property tests for adamix.py.

Every expected value is a plain torch computation written here (Eq. 1 to 4 of the module docstring,
by hand) or plain math; nothing is compared against numbers the code under test produced. Widths are
non-square, M runs from 1 to 8, r from 1 to 16, both sharing sides are drawn, and all expert weights
(including the zero-initialised up / B and the zero biases) are perturbed so merges are exercised.
Most checks run in float64 so that "exact up to float error" can be asserted tightly.
"""
import copy
import math
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, strategies as st

import adamix
from adamix import AdaMixConfig

TIGHT = dict(rtol=1e-9, atol=1e-9)  # float64: equal up to rounding


class Net(nn.Module):
    """Linear layers `layers.{i}` (the AdaMix targets) with tanh in between, plus an unused `head`."""

    def __init__(self, widths):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.head = nn.Linear(widths[-1], 3)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x if i == 0 else torch.tanh(x))
        return x


@dataclass
class Setup:
    kind: str
    cfg: AdaMixConfig
    widths: list
    seed: int
    shape: tuple  # input shape, (B, C_in) or (B, T, C_in)


@st.composite
def setups(draw, kinds=("adapter", "lora"), shares=("up", "down", "none"), experts=(1, 8),
           depth=1, even_batch=False):
    c_in = draw(st.integers(2, 9))
    widths = [c_in]
    for _ in range(depth):  # every layer non-square
        widths.append(widths[-1] + draw(st.integers(1, 4)) * draw(st.sampled_from([-1, 1])))
        if widths[-1] < 1 or widths[-1] == widths[-2]:
            widths[-1] = widths[-2] + 1
    cfg = AdaMixConfig(num_experts=draw(st.integers(*experts)), r=draw(st.integers(1, 16)),
                       share=draw(st.sampled_from(shares)), lora_dropout=0.0,
                       lora_alpha=draw(st.sampled_from([1.0, 8.0, 32.0])))
    batch = draw(st.integers(1, 3)) * (2 if even_batch else 1)
    tokens = draw(st.sampled_from([None, 1, 3]))
    shape = (batch, c_in) if tokens is None else (batch, tokens, c_in)
    return Setup(draw(st.sampled_from(kinds)), cfg, widths, draw(st.integers(0, 2**20)), shape)


def build(s, perturb=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(s.seed)
    model = Net(s.widths).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=dtype))
    router = adamix.add_adamix(model, ["layers.*"], s.kind, s.cfg, seed=s.seed)
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "adamix_" in name:
                    p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=dtype))
    return model, router, torch.randn(*s.shape, generator=g, dtype=dtype)


# ---- the oracle: Eq. 1 by hand -------------------------------------------------------------------
def side(m, name):
    """The experts of one side as plain tensors: ([W_j], [b_j]) (LoRA: zero biases)."""
    ws = [p.detach().clone() for p in getattr(m, f"adamix_{name}_weight")]
    bs = getattr(m, f"adamix_{name}_bias")
    if bs is None:
        return ws, [torch.zeros(w.shape[0], dtype=w.dtype) for w in ws]
    return ws, [p.detach().clone() for p in bs]
    return ws, bs


def layer_ref(m, x, wd, bd, wu, bu):
    W, b = m.base.weight.detach(), m.base.bias.detach()
    if isinstance(m, adamix.AdapterMixture):  # h + W_up GELU(W_down h + b_down) + b_up, h = W x + b
        h = x @ W.T + b
        z = h @ wd.T + bd
        return h + (0.5 * z * (1 + torch.erf(z / math.sqrt(2)))) @ wu.T + bu
    return x @ W.T + b + m.config.lora_alpha / m.config.r * (x @ wd.T) @ wu.T  # W x + b + s B A x


def net_ref(model, x, choose):
    """Net.forward by hand; choose(m) -> (W_down, b_down, W_up, b_up) for each layer's mixture."""
    for i, m in enumerate(model.layers):
        x = layer_ref(m, x if i == 0 else torch.tanh(x), *choose(m))
    return x


def routed(i, j):  # route (down i, up j); a shared side has one expert, index 0
    def choose(m):
        (dw, db), (uw, ub) = side(m, "down"), side(m, "up")
        return dw[i % len(dw)], db[i % len(db)], uw[j % len(uw)], ub[j % len(ub)]
    return choose


def planned(model, plan, view):  # the routes of `plan` (n_mixtures, V, 2) for one view
    return lambda m: routed(*plan[list(model.layers).index(m), view].tolist())(m)


def averaged(m):  # Eq. 4 by hand
    (dw, db), (uw, ub) = side(m, "down"), side(m, "up")
    return tuple(sum(ts) / len(ts) for ts in (dw, db, uw, ub))


def counts(m):
    return len(m.adamix_down_weight), len(m.adamix_up_weight)


# ---- merging ------------------------------------------------------------------------------------
@given(st.one_of(setups(kinds=("adapter",), shares=("down",)),
                 setups(kinds=("lora",), shares=("up", "down"))))
def test_merged_equals_mean_of_expert_forwards_when_one_projection_is_mixed(s):
    # adapter with the down side shared, LoRA with either side shared: the output is linear in the
    # one mixed projection, so the merged forward is exactly the mean of the per-expert forwards
    model, _, x = build(s)
    model.eval()
    m = model.layers[0]
    mixed = max(counts(m))
    expected = sum(net_ref(model, x, routed(k, k)) for k in range(mixed)) / mixed
    torch.testing.assert_close(model(x), expected, **TIGHT)


@given(setups(kinds=("lora",)))
def test_lora_merged_equals_mean_over_all_routes_and_ensemble(s):
    model, router, x = build(s)
    model.eval()
    md, mu = counts(model.layers[0])
    expected = sum(net_ref(model, x, routed(i, j)) for i in range(md) for j in range(mu)) / (md * mu)
    torch.testing.assert_close(model(x), expected, **TIGHT)  # bilinear in (A, B): exact for one layer
    torch.testing.assert_close(adamix.ensemble(model, lambda: model(x)), expected, **TIGHT)
    torch.testing.assert_close(adamix.ensemble(router, lambda: model(x)), expected, **TIGHT)
    assert all(m.inference == "merged" for m in adamix.mixtures(model))  # restored afterwards


@given(setups(kinds=("lora",), depth=2))
def test_lora_fold_equals_unfolded_and_unfold_restores_the_weight(s):
    model, _, x = build(s, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="while training"):
        adamix.fold_lora(model)
    model.eval()
    before = [m.base.weight.detach().clone() for m in model.layers]
    unfolded = model(x)
    counted = adamix.count_parameters(model)["inference"]
    adamix.fold_lora(model)
    torch.testing.assert_close(model(x), unfolded, rtol=1e-5, atol=1e-5)  # float32
    assert adamix.count_parameters(model)["inference"] == counted - sum(
        m.adamix_down_weight[0].numel() + m.adamix_up_weight[0].numel() for m in model.layers)
    model.train()
    with pytest.raises(RuntimeError, match="unfold_lora"):
        model(x)
    adamix.unfold_lora(model)
    for m, w in zip(model.layers, before):
        folded_max = (w.abs() + m.delta_weight().detach().abs()).max()
        tol = 4 * torch.finfo(torch.float32).eps * float(folded_max)  # 4 ulp of the folded weight
        torch.testing.assert_close(m.base.weight.detach(), w, rtol=0, atol=tol)


@given(setups(kinds=("adapter",), shares=("up", "none"), experts=(2, 8)))
def test_adapter_with_mixed_down_merges_into_one_adapter_with_averaged_weights(s):
    model, _, x = build(s)
    model.eval()
    torch.testing.assert_close(model(x), net_ref(model, x, averaged), **TIGHT)


def test_adapter_merge_differs_from_the_mean_of_routed_outputs_because_of_gelu():
    # two down experts of opposite sign: GELU(z) and GELU(-z) average to |z|/2-ish, GELU(0) = 0
    m = adamix.AdapterMixture(nn.Linear(2, 3).double(), AdaMixConfig(num_experts=2, r=2, share="up"))
    with torch.no_grad():
        m.base.weight.copy_(torch.eye(3, 2)), m.base.bias.zero_()
        m.adamix_down_weight[0].copy_(2 * torch.eye(2, 3))
        m.adamix_down_weight[1].copy_(-2 * torch.eye(2, 3))
        m.adamix_up_weight[0].copy_(torch.ones(3, 2))
    m.eval()
    x = torch.tensor([[1.0, -0.5]], dtype=torch.float64)
    output_mean = sum(layer_ref(m, x, *routed(k, 0)(m)) for k in range(2)) / 2
    merged = m(x)
    torch.testing.assert_close(merged, x @ torch.eye(3, 2, dtype=torch.float64).T)  # averaged down is 0
    assert not torch.allclose(merged, output_mean, atol=1e-3)


# ---- degenerate cases, invariances -------------------------------------------------------------
@given(setups(experts=(1, 1)))
def test_one_expert_equals_the_plain_adapter_or_lora(s):
    model, _, x = build(s)
    expected = net_ref(model, x, routed(0, 0))
    torch.testing.assert_close(model(x), expected, **TIGHT)  # training: the only route
    model.eval()
    torch.testing.assert_close(model(x), expected, **TIGHT)


@given(setups(depth=2))
def test_zero_initialised_up_leaves_the_wrapped_layers_unchanged(s):
    s.cfg.zero_up = True  # adapters; LoRA's B is zero by default
    plain = Net(s.widths).double()
    model, _, x = build(s, perturb=False)
    plain.load_state_dict({k.replace(".base", ""): v for k, v in model.state_dict().items()
                           if "adamix_" not in k})
    for mode in (True, False):
        model.train(mode), plain.train(mode)
        assert torch.equal(model(x), plain(x))


@given(setups(), st.randoms(use_true_random=False))
def test_eval_output_is_invariant_to_permuting_the_experts(s, rnd):
    model, _, x = build(s)
    model.eval()
    before = model(x)
    with torch.no_grad():
        for m in model.layers:
            for name in ("down", "up"):
                perm = list(range(len(getattr(m, f"adamix_{name}_weight"))))
                rnd.shuffle(perm)
                for suffix in ("weight", "bias"):
                    ps = getattr(m, f"adamix_{name}_{suffix}")
                    if ps is not None:
                        old = [p.clone() for p in ps]
                        for k, p in zip(perm, ps):
                            p.copy_(old[k])
    torch.testing.assert_close(model(x), before, **TIGHT)


@given(setups(depth=2), st.sampled_from(["merged", "expert:0"]))
def test_eval_is_deterministic_and_batched_equals_per_example(s, mode):
    model, _, x = build(s)
    model.eval()
    adamix.set_inference(model, mode)
    out = model(x)
    assert torch.equal(model(x), out)
    torch.testing.assert_close(torch.cat([model(x[b:b + 1]) for b in range(len(x))]), out, **TIGHT)
    if x.dim() == 3:  # (B, T, C) equals (B*T, C): one route for every token
        torch.testing.assert_close(model(x.reshape(-1, x.shape[-1])), out.reshape(-1, out.shape[-1]), **TIGHT)


# ---- training: gradients, optimiser, routing ---------------------------------------------------
@given(setups(depth=2, even_batch=True), st.sampled_from([1, 2]))
def test_only_routed_experts_get_gradient_and_adamw_leaves_the_rest_bit_identical(s, views):
    model, router, x = build(s)
    adamix.mark_only_adamix_trainable(model, head="head")
    router.views = views
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.head(model(x)).pow(2).mean().backward()
    plan = router.plan
    assert plan.shape == (len(model.layers), views, 2)
    untouched = set()
    for l, m in enumerate(model.layers):
        for k_side, name in enumerate(("down", "up")):
            chosen = set(plan[l, :, k_side].tolist())
            for suffix in ("weight", "bias"):
                for k, p in enumerate(getattr(m, f"adamix_{name}_{suffix}") or []):
                    assert (p.grad is not None) == (k in chosen)
                    if k not in chosen:
                        untouched.add(f"layers.{l}.adamix_{name}_{suffix}.{k}")
    opt.step()
    opt.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        if ("adamix_" not in n and not n.startswith("head.")) or n in untouched:
            assert torch.equal(p, snapshot[n]), n


def chi2_bound(df, z=4.75):
    """Wilson-Hilferty approximation of the chi-square quantile with tail probability about 1e-6."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@given(setups(depth=3, experts=(2, 8)))
def test_each_expert_is_chosen_with_frequency_one_over_m(s):
    model, router, x = build(s)
    steps = 60 * s.cfg.num_experts  # 60 expected draws per expert
    plans = []
    with torch.no_grad():
        for _ in range(steps):
            model(x)
            plans.append(router.plan)
    plans = torch.cat(plans, dim=1)  # (n_mixtures, steps, 2)
    for l, m in enumerate(model.layers):
        for k_side, size in enumerate(counts(m)):
            freq = torch.bincount(plans[l, :, k_side], minlength=size).double()
            assert len(freq) == size  # shared side: always 0
            if size > 1:
                expected = steps / size
                assert ((freq - expected) ** 2 / expected).sum() < chi2_bound(size - 1)


@given(setups(depth=2, even_batch=True, experts=(2, 8)), st.sampled_from([1, 2]))
def test_same_seed_gives_the_same_routes_and_router_state_resumes(s, views):
    runs = []
    for _ in range(2):
        model, router, x = build(s)
        router.views = views
        with torch.no_grad():
            plans = []
            for _ in range(4):
                model(x)
                plans.append(router.plan)
        runs.append((model, router, x, plans))
    for a, b in zip(runs[0][3], runs[1][3]):
        assert torch.equal(a, b)
    model, router, x, _ = runs[0]
    state = copy.deepcopy(router.state_dict())
    later = []
    for _ in range(3):
        model(x)
        later.append(router.plan)
    fresh_model, fresh_router, _ = build(Setup(s.kind, s.cfg, s.widths, s.seed + 1, s.shape))
    fresh_router.load_state_dict(state)
    for plan in later:
        fresh_model(x)
        assert torch.equal(fresh_router.plan, plan)
    other = adamix.Router(router.mixtures, seed=s.seed + 1)
    assert not all(torch.equal(other.sample(views), router.sample(views)) for _ in range(10))


@pytest.mark.parametrize("kind", ["adapter", "lora"])
def test_adamix_leaves_the_global_rng_and_dropout_masks_unchanged(kind):
    class DropNet(Net):
        def __init__(self):
            super().__init__([5, 7, 4])
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return self.layers[1](self.drop(torch.tanh(self.layers[0](self.drop(x)))))

    def run(with_adamix):
        model, masks = DropNet(), []
        model.drop.register_forward_hook(lambda mod, inp, out: masks.append(out == 0))
        torch.manual_seed(123)
        if with_adamix:  # LoRA's own dropout is off here: it draws from the global RNG like any dropout
            cfg = AdaMixConfig(num_experts=3, r=2, lora_dropout=0.0)
            adamix.add_adamix(model, ["layers.*"], kind, cfg, seed=7)
        for _ in range(3):
            model(torch.ones(4, 5))
        model.eval()
        adamix.set_inference(model, "random") if with_adamix else None
        model(torch.ones(4, 5))
        return masks, torch.get_rng_state()

    (masks_a, state_a), (masks_b, state_b) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(masks_a, masks_b)) and len(masks_a) == len(masks_b) == 8
    assert torch.equal(state_a, state_b)


@given(setups(depth=2, even_batch=True))
def test_two_views_in_one_batch_equal_two_separate_forwards(s):
    model, router, x = build(s)
    plan = router.sample(views=2)  # (n_mixtures, 2, 2)
    half = len(x) // 2
    with router.use(plan):
        both = model(x)
    for v, part in enumerate((x[:half], x[half:])):
        expected = net_ref(model, part, planned(model, plan, v))
        torch.testing.assert_close(both[v * half:(v + 1) * half], expected, **TIGHT)
        with router.use(plan[:, v:v + 1]):
            torch.testing.assert_close(model(part), expected, **TIGHT)
    router.views = 2
    with pytest.raises(ValueError, match="equal views"):
        model(x[:1])


# ---- inference modes ----------------------------------------------------------------------------
@given(setups(depth=2, experts=(2, 8)), st.data())
def test_inference_modes_by_name(s, data):
    model, router, x = build(s)
    model.eval()
    k = data.draw(st.integers(0, s.cfg.num_experts - 1))
    adamix.set_inference(model, f"expert:{k}")
    torch.testing.assert_close(model(x), net_ref(model, x, routed(k, k)), **TIGHT)
    adamix.set_inference(model, "random")
    rng = torch.get_rng_state()
    out = model(x)
    plan = router.plan
    assert plan.shape == (2, 1, 2) and torch.equal(torch.get_rng_state(), rng)
    torch.testing.assert_close(out, net_ref(model, x, planned(model, plan, 0)), **TIGHT)
    adamix.set_inference(model, "ensemble")
    with pytest.raises(RuntimeError, match="ensemble"):
        model(x)
    for bad in ("mean", "expert:x", f"expert:{s.cfg.num_experts}"):
        with pytest.raises(ValueError):
            adamix.set_inference(model, bad)
    model.train()
    model(x)  # training ignores the inference mode
    assert router.plan is not None


def souped(keep):  # Eq. 4 over the experts in `keep` by hand (a shared side: its one expert)
    def choose(m):
        sides = [side(m, "down"), side(m, "up")]
        out = []
        for ws, bs in sides:
            idx = keep if len(ws) > 1 else [0]
            out += [sum(ws[i] for i in idx) / len(idx), sum(bs[i] for i in idx) / len(idx)]
        return out
    return choose


@given(setups(depth=2, experts=(2, 8)), st.data())
def test_soup_averages_only_its_experts(s, data):
    """soup:i,j,... is Eq. 4 over those experts; over all of them it is merged, over one expert k
    it is expert:k; LoRA folds the soup; bad soups are refused."""
    model, router, x = build(s)
    model.eval()
    M = s.cfg.num_experts
    keep = data.draw(st.lists(st.integers(0, M - 1), min_size=1, max_size=M, unique=True))
    adamix.set_inference(model, "soup:" + ",".join(map(str, keep)))
    out = model(x)
    torch.testing.assert_close(out, net_ref(model, x, souped(keep)), **TIGHT)
    if s.kind == "lora":
        adamix.fold_lora(model)
        torch.testing.assert_close(model(x), out, **TIGHT)
        adamix.unfold_lora(model)
    adamix.set_inference(model, "soup:" + ",".join(map(str, range(M))))
    everything = model(x)
    adamix.set_inference(model, "merged")
    torch.testing.assert_close(everything, model(x), **TIGHT)
    adamix.set_inference(model, f"soup:{keep[0]}")
    single = model(x)
    adamix.set_inference(model, f"expert:{keep[0]}")
    torch.testing.assert_close(single, model(x), **TIGHT)
    for bad in ("soup:", f"soup:{M}", "soup:0,0", "soup:0;1"):
        with pytest.raises(ValueError):
            adamix.set_inference(model, bad)
    adamix.set_inference(model, "soup:" + ",".join(map(str, keep)))
    adamix.collapse_experts(model)  # one expert per side: the soup's mean
    assert max(counts(model.layers[0])) == 1 and model.layers[0].inference == "merged"
    torch.testing.assert_close(model(x), out, **TIGHT)


@given(setups(depth=2), st.sampled_from([dict(foreach=False), dict(foreach=True), dict(fused=True)]))
def test_train_step_then_eval_serves_the_new_weights(s, opt_kwargs):
    # fused AdamW updates in place without bumping tensor version counters: a cache keyed on them
    # would go stale, so merged weights are recomputed every forward
    model, router, x = build(s, dtype=torch.float32)
    adamix.mark_only_adamix_trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, **opt_kwargs)
    model.eval()
    old = model(x).detach()
    for _ in range(2):
        model.train()
        model(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()
        out = model(x)
        torch.testing.assert_close(out, net_ref(model, x, averaged), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, old)
    with torch.no_grad():  # a manual edit through .data (which bypasses version counters)
        for m in model.layers:
            m.adamix_up_weight[0].data.mul_(2.0)
    torch.testing.assert_close(model(x), net_ref(model, x, averaged), rtol=1e-4, atol=1e-4)


@given(setups(depth=2))
def test_collapse_experts_leaves_one_expert_with_the_merged_output(s):
    model, router, x = build(s)
    model.eval()
    merged = model(x)
    adamix.collapse_experts(model)
    assert all(counts(m) == (1, 1) for m in model.layers)
    torch.testing.assert_close(model(x), merged, **TIGHT)
    adamix.mark_only_adamix_trainable(model, head=None)
    n = adamix.count_parameters(model, head=None)
    assert n["trainable"] == n["inference"]
    model.train()
    model(x)
    assert router.plan.abs().sum() == 0


# ---- consistency loss ---------------------------------------------------------------------------
@st.composite
def logit_pairs(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**20)))
    shape = draw(st.sampled_from([(3, 5), (2, 4, 6), (4, 2), (1, 3, 3)]))
    a, b = (3 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    mask = (torch.rand(shape[:2], generator=g) < 0.6).double() if len(shape) == 3 else None
    if mask is not None:
        mask[0, 0] = 1.0
    return a, b, mask


def kl_rows(p_log, q_log):  # KL(p || q) per row, by hand
    return (p_log.exp() * (p_log - q_log)).sum(-1)


@given(logit_pairs())
def test_consistency_loss_matches_the_formula_and_is_symmetric_nonnegative_zero_on_equal(pair):
    a, b, mask = pair
    la, lb = a.log_softmax(-1), b.log_softmax(-1)
    per = 0.5 * (kl_rows(lb, la) + kl_rows(la, lb))
    expected = per[mask.bool()].mean() if mask is not None else per.mean()
    for kind in ("kl_sg", "kl"):
        loss = adamix.consistency_loss(a, b, mask, kind)
        torch.testing.assert_close(loss, expected, **TIGHT)
        torch.testing.assert_close(adamix.consistency_loss(b, a, mask, kind), loss, **TIGHT)
        assert loss >= 0 and adamix.consistency_loss(a, a, mask, kind) == 0
    if mask is not None:  # logits at non-target positions do not matter
        c = a.clone()
        c[~mask.bool()] += 100.0
        torch.testing.assert_close(adamix.consistency_loss(c, b, mask), expected, **TIGHT)
    mse = adamix.consistency_loss(a, b, mask, "mse")
    sq = (a - b).pow(2).sum(-1)
    torch.testing.assert_close(mse, sq[mask.bool()].mean() if mask is not None else sq.mean(), **TIGHT)


@given(logit_pairs())
def test_consistency_loss_stop_gradient_sends_nothing_into_the_detached_side(pair):
    a, b, mask = pair
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    n = mask.sum() if mask is not None else a[..., 0].numel()
    w = mask.unsqueeze(-1) if mask is not None else 1.0
    adamix.consistency_loss(a, b, mask, "kl_sg").backward()
    # d/da of 1/2 KL(sg(p_b) || p_a) is (p_a - p_b) / 2 per position; KL(sg(p_a) || p_b) adds nothing
    expected_a = 0.5 * (a.softmax(-1) - b.softmax(-1)).detach() * w / n
    torch.testing.assert_close(a.grad, expected_a, **TIGHT)
    torch.testing.assert_close(b.grad, -expected_a, **TIGHT)
    a.grad = None
    adamix.consistency_loss(a, b, mask, "kl").backward()  # without sg the second term adds to a.grad
    assert not torch.allclose(a.grad, expected_a)


def test_consistency_loss_for_a_one_logit_regression_head():
    a, b = torch.tensor([[0.3], [2.0]]), torch.tensor([[1.0], [-1.0]])
    assert adamix.consistency_loss(a, b, kind="kl_sg") == 0  # softmax over one logit is always 1
    torch.testing.assert_close(adamix.consistency_loss(a, b, kind="mse"), torch.tensor((0.49 + 9.0) / 2))
    with pytest.raises(ValueError):
        adamix.consistency_loss(a, b, kind="js")


# ---- helpers: freezing, counting, saving --------------------------------------------------------
class Stack(nn.Module):
    """A stand-in transformer: only the named linear layers, on the meta device (no memory)."""

    def __init__(self, layers, names, d):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({n: nn.Linear(d, d, device="meta") for n in names})
                                    for _ in range(layers))


@pytest.mark.parametrize("layers, d, r, trained, inference", [
    (12, 768, 48, 2_223_360, 894_528),     # BERT-base (the paper's counts)
    (24, 1024, 16, 1_992_192, 811_392),    # RoBERTa-large
])
def test_parameter_counts_match_the_paper_for_adapters(layers, d, r, trained, inference):
    model = Stack(layers, ["fc_out"], d)
    adamix.add_adamix(model, ["*.fc_out"], "adapter", AdaMixConfig(num_experts=4, r=r, share="up"))
    adamix.mark_only_adamix_trainable(model, head=None)
    assert adamix.count_parameters(model, head=None) == dict(trainable=trained, inference=inference)
    adamix.collapse_experts(model)
    assert adamix.count_parameters(model, head=None) == dict(trainable=inference, inference=inference)


def test_parameter_counts_match_the_paper_for_gpt2_medium_lora():
    model = Stack(24, ["query", "key", "value"], 1024)
    adamix.add_adamix(model, ["*.query", "*.value"], "lora", AdaMixConfig(num_experts=8, r=4, share="up"))
    adamix.mark_only_adamix_trainable(model, head=None)
    trained = 48 * (8 * 4 * 1024 + 1024 * 4)  # 24 layers x (q, v) x (8 A experts + one shared B)
    assert adamix.count_parameters(model, head=None) == dict(trainable=trained, inference=393_216)
    model.eval()
    adamix.fold_lora(model)
    assert adamix.count_parameters(model, head=None)["inference"] == 0


@given(setups(depth=2))
def test_mark_only_adamix_trainable(s):
    model, _, _ = build(s)
    adamix.mark_only_adamix_trainable(model, head="head")
    for name, p in model.named_parameters():
        assert p.requires_grad == ("adamix_" in name or name.startswith("head."))
    assert not any(p.requires_grad for m in model.layers for p in m.base.parameters())


@given(setups(depth=2))
def test_save_load_round_trip_and_strict_errors(s):
    model, _, x = build(s)
    saved = copy.deepcopy(adamix.adamix_state_dict(model))
    assert all("adamix_" in k or k.startswith("head.") for k in saved)
    fresh, _, _ = build(Setup(s.kind, s.cfg, s.widths, s.seed, s.shape), perturb=False)  # same base weights
    adamix.load_adamix_state_dict(fresh, saved)
    model.eval(), fresh.eval()
    assert torch.equal(fresh(x), model(x))
    missing = dict(saved)
    gone = sorted(missing)[0]
    del missing[gone]
    with pytest.raises(RuntimeError, match=r"missing keys \[" + re.escape(repr(gone))):
        adamix.load_adamix_state_dict(fresh, missing)
    with pytest.raises(RuntimeError, match=r"unexpected keys \['layers\.9\.adamix_x'\]"):
        adamix.load_adamix_state_dict(fresh, {**saved, "layers.9.adamix_x": torch.zeros(1)})
    wrong = {**saved, "layers.0.adamix_up_weight.0": torch.zeros(1, 1, 1)}
    with pytest.raises(RuntimeError, match=r"adamix_up_weight\.0: checkpoint \(1, 1, 1\) vs model"):
        adamix.load_adamix_state_dict(fresh, wrong)


def test_add_adamix_replaces_in_place_and_rejects_no_match():
    model = Net([3, 5, 2])
    first = model.layers[0]
    router = adamix.add_adamix(model, ["layers.0"], "lora")
    assert isinstance(model.layers[0], adamix.LoRAMixture) and model.layers[0].base is first
    assert isinstance(model.layers[1], nn.Linear) and len(router.mixtures) == 1
    with pytest.raises(ValueError, match="no nn.Linear"):
        adamix.add_adamix(model, ["layers.0"], "adapter")  # already wrapped: `.base` is not a target
    with pytest.raises(ValueError, match="share"):
        adamix.add_adamix(model, ["layers.1"], "adapter", AdaMixConfig(share="both"))


# ---- the study's tools: identical initialisation and the distance between experts ------------------

@given(setups(experts=(2, 8), shares=("up", "down", "none")))
def test_identical_init_copies_one_draw_and_independent_init_does_not(s):
    """init="identical": every expert of a side equals expert 0 (distance 0); "independent": all differ."""
    for init in ("identical", "independent"):
        s.cfg.init = init
        model, _, _ = build(s, perturb=False)
        for m in adamix.mixtures(model):
            for ws in (m.adamix_down_weight, m.adamix_up_weight):
                nonzero = ws[0].abs().sum() > 0  # LoRA's B starts at zero in both modes
                for w in ws[1:]:
                    assert torch.equal(w, ws[0]) == (init == "identical" or not nonzero)
        if init == "identical":
            assert all(d == pytest.approx(0.0, abs=1e-6) for ds in adamix.expert_distance(model).values() for d in ds)


def test_expert_distance_is_the_mean_pairwise_cosine_distance():
    """Three down experts set by hand: e1, e2 (orthogonal: 1), -e1 (opposite: 2) -> mean (1 + 2 + 1) / 3."""
    model = Net([4, 4])
    adamix.add_adamix(model, ["layers.*"], "adapter", AdaMixConfig(num_experts=3, r=1, share="up"))
    m = adamix.mixtures(model)[0]
    with torch.no_grad():
        for w, v in zip(m.adamix_down_weight, ([1., 0, 0, 0], [0, 2., 0, 0], [-3., 0, 0, 0])):
            w.copy_(torch.tensor([v]))
    assert adamix.expert_distance(model) == {"down": [pytest.approx(4 / 3)]}  # up is shared: left out
    with pytest.raises(ValueError, match="init must be"):
        adamix.add_adamix(Net([4, 4]), ["layers.*"], "adapter", AdaMixConfig(init="same"))


# ---- the mode of a new mixture ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["adapter", "lora"])
def test_add_adamix_leaves_each_mixture_in_the_mode_of_the_layer_it_wraps(kind):
    """A model in eval mode (as from_pretrained returns it) gets mixtures in eval mode: merged, with no
    random route and no LoRA dropout, and fold_lora works; a model in training mode gets them training.
    A layer whose mode differs from its model's is followed, not the model."""
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    model = Net([6, 7, 5]).eval()
    adamix.add_adamix(model, ["layers.*"], kind, AdaMixConfig(num_experts=4, r=2, lora_dropout=0.5))
    for m in adamix.mixtures(model):
        assert not any(sub.training for sub in m.modules())
        with torch.no_grad():  # make the experts differ, so that a random route would show
            for ws in (m.adamix_down_weight, m.adamix_up_weight):
                for w in ws:
                    w.normal_()
    assert torch.equal(model(x), model(x))  # no route drawn, no dropout
    assert all(m.last_route is None for m in adamix.mixtures(model))
    if kind == "lora":
        merged = model(x)
        adamix.fold_lora(model)  # raised "fold_lora while training" before
        torch.testing.assert_close(model(x), merged)

    model = Net([6, 7, 5]).train()
    model.layers[1].eval()
    adamix.add_adamix(model, ["layers.*"], kind, AdaMixConfig(num_experts=4, r=2))
    assert [m.training for m in adamix.mixtures(model)] == [True, False]
    assert all(sub.training == m.training for m in adamix.mixtures(model) for sub in m.modules())
