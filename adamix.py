"""AdaMix: a mixture of adapters (or of LoRA modules) with stochastic routing, in one torch-only file.

Wang, Agarwal, Mukherjee, Liu, Gao, Awadallah, Gao. "AdaMix: Mixture-of-Adaptations for
Parameter-efficient Model Tuning." EMNLP 2022, arXiv 2210.17451.

Letters in shape comments: B batch, T tokens, C model width, M experts, r bottleneck (adapter) or rank
(LoRA). Every mixture has a "down" side (C -> r) and an "up" side (r -> C) with M experts each; one
side can be shared (a single expert). For LoRA, down is A and up is B.

1. Adapter expert (AdapterMixture.forward), on the output h = W x + b of the FFN output projection:
       out = h + W_up · GELU(W_down · h + b_down) + b_up
   LoRA expert (LoRAMixture.forward):   out = W x + b + (alpha / r) · B · A · dropout(x)
2. Routing (Router): in training, every forward pass picks one expert per side per mixture, uniformly,
   for the whole batch; no gate, no balancing loss. Plans come from the router's own generator, so
   turning AdaMix on leaves every dropout mask as it was and DDP ranks with one seed share routes.
3. Consistency (consistency_loss): two passes draw different routes; with p1, p2 their predictions
       L = CE(p1, y) + lambda · 1/2 [ KL(sg(p2) || p1) + KL(sg(p1) || p2) ],   sg = stop-gradient.
4. Merging (inference="merged"): each side's experts are averaged in weight space,
       W_bar = (1/M) sum_j W_j,  b_bar = (1/M) sum_j b_j;
   for LoRA, (alpha / r) B_bar A_bar can be folded into W (fold_lora): zero extra inference cost.

Exact vs not: a linear map commutes with the mean, and LoRA is bilinear in (A, B), so merged LoRA equals
the mean over all M x M routes (M routes with one side shared). An adapter with mixed down experts has
a GELU in between: merged is one adapter with averaged weights, NOT the mean of the routed outputs.
"""
import fnmatch
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

PREFIX = "adamix_"  # in every AdaMix parameter name: the freeze and save filter


@dataclass
class AdaMixConfig:
    num_experts: int = 4       # M; official GLUE scripts 4, GPT-2 scripts 8 (paper Sec. 4)
    r: int = 16                # bottleneck: RoBERTa-large 16, BERT-base 48, GPT-2 adapter 8; LoRA rank 4
    share: str = "up"          # "up" | "down" | "none": side with one shared expert (official: up / B)
    init_std: float = 0.02     # adapter weights ~ N(0, 0.02), biases 0 (official adapter init)
    zero_up: bool = False      # adapters: up weights 0, so training starts at the pretrained function
    lora_alpha: float = 32.0   # LoRA scale alpha / r (official GPT-2 E2E scripts: alpha 32, r 4)
    lora_dropout: float = 0.1  # dropout on the LoRA input x (official GPT-2 E2E scripts)
    init: str = "independent"  # "independent": one draw per expert (paper); "identical": copies of one draw


def init_experts(mixture, generator=None):
    """Initialise every AdaMix parameter of one mixture; each expert is drawn independently.

    adapter  adamix_down_weight[j] (r, C)   ~ N(0, init_std = 0.02)
             adamix_down_bias[j]   (r,)     = 0
             adamix_up_weight[j]   (C, r)   ~ N(0, init_std = 0.02), or = 0 with zero_up
             adamix_up_bias[j]     (C,)     = 0
    LoRA     adamix_down_weight[j] = A_j (r, C_in)  ~ U(-1/sqrt(C_in), 1/sqrt(C_in)):
                                     kaiming-uniform with a = sqrt(5), as nn.Linear and loralib
             adamix_up_weight[j]   = B_j (C_out, r) = 0, so B A = 0 at the start
    Draws come from `generator` (add_adamix passes one seeded from its seed, so the global RNG and
    hence every dropout mask is untouched); None uses the global RNG. With config.init "identical",
    every expert of a side is then set to a copy of expert 0 (the original code's LoRA start, an ablation):
    the experts can only drift apart through their different routes.
    """
    cfg, lora, m = mixture.config, isinstance(mixture, LoRAMixture), mixture
    with torch.no_grad():
        for w in m.adamix_down_weight:  # one draw per expert: experts differ from the start
            if lora:
                nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
            else:
                nn.init.normal_(w, 0.0, cfg.init_std, generator=generator)
        for w in m.adamix_up_weight:
            if lora or cfg.zero_up:
                w.zero_()
            else:
                nn.init.normal_(w, 0.0, cfg.init_std, generator=generator)
        for b in [*(m.adamix_down_bias or []), *(m.adamix_up_bias or [])]:
            b.zero_()
        if cfg.init == "identical":  # biases are all zero already
            for ws in (m.adamix_down_weight, m.adamix_up_weight):
                for w in ws[1:]:
                    w.copy_(ws[0])


def _experts(m, *shape, like):  # M independent Parameters: an expert not routed keeps grad None
    return nn.ParameterList(nn.Parameter(torch.empty(*shape, device=like.device, dtype=like.dtype))
                            for _ in range(m))


def _linear(x, w, b=None):
    """x @ w.T + b; with per-view weights w (V, out, in) and x (V, N, in) a batched matmul."""
    if w.dim() == 2:
        return F.linear(x, w, b)
    y = torch.bmm(x, w.transpose(1, 2))  # (V, N, in) @ (V, in, out) -> (V, N, out)
    return y if b is None else y + b.unsqueeze(1)


def _split_views(x, w):
    """(B, T, C) -> (V, B/V*T, C) when w is (V, ., .): view v takes examples [v B/V, (v+1) B/V).
    E.g. B=8, T=128, C=768, V=2: (8, 128, 768) -> (2, 512, 768); row 0 holds examples 0-3."""
    if w.dim() == 2:
        return x
    if x.shape[0] % w.shape[0]:
        raise ValueError(f"batch of {x.shape[0]} cannot be split into {w.shape[0]} equal views")
    return x.reshape(w.shape[0], -1, x.shape[-1])


class _Mixture(nn.Module):
    """What both kinds share: the wrapped `base`, M experts per side, and the choice of weights."""

    def __init__(self, base, config, d_in, bias, generator):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"AdaMix wraps nn.Linear, got {type(base).__name__}")
        self.base, self.config, r = base, config, config.r
        m_down = 1 if config.share == "down" else config.num_experts
        m_up = 1 if config.share == "up" else config.num_experts
        w = base.weight
        self.adamix_down_weight = _experts(m_down, r, d_in, like=w)          # M x (r, d_in)
        self.adamix_up_weight = _experts(m_up, base.out_features, r, like=w)  # M x (C, r)
        self.adamix_down_bias = _experts(m_down, r, like=w) if bias else None
        self.adamix_up_bias = _experts(m_up, base.out_features, like=w) if bias else None
        self.inference = "merged"  # used when not training: see set_inference
        self.route = None          # [(down, up)] * V expert indices, set by the Router per forward
        self.folded = False
        init_experts(self, generator)

    def sizes(self):
        return len(self.adamix_down_weight), len(self.adamix_up_weight)

    def _side(self, name, idx=None):
        """(W, b) of one side: the mean over experts (idx None), expert idx, or stacked (V, ., .)."""
        ws, bs = getattr(self, f"adamix_{name}_weight"), getattr(self, f"adamix_{name}_bias")
        if idx is None:  # merged, Eq. 4. Recomputed every forward, never cached: the original code's cache
            # went stale after training, and a cache keyed on tensor versions misses fused AdamW steps
            pick = lambda ps: torch.stack(list(ps)).mean(0)  # M x (out, in) -> (out, in)
        elif len(idx) == 1:
            pick = lambda ps: ps[idx[0]]
        else:
            pick = lambda ps: torch.stack([ps[i] for i in idx])  # V x (out, in) -> (V, out, in)
        return pick(ws), None if bs is None else pick(bs)

    def weights(self):
        """((W_down, b_down), (W_up, b_up)) for this forward, by training state and inference mode."""
        mode = "route" if self.training else self.inference
        if mode == "merged":
            return self._side("down"), self._side("up")
        if mode.startswith("expert:"):  # expert k on mixed sides, the shared expert 0 elsewhere
            route = [tuple(int(mode.split(":")[1]) if m > 1 else 0 for m in self.sizes())]
        elif self.route is None:
            raise RuntimeError(f"mode {mode!r} needs a routing plan: call the root model given to "
                               "add_adamix (and, for 'ensemble', wrap the call in adamix.ensemble)")
        else:
            route = self.route
        return self._side("down", [d for d, _ in route]), self._side("up", [u for _, u in route])

    def inference_numel(self):  # what one merged expert per side adds at inference; 0 when folded
        lists = (self.adamix_down_weight, self.adamix_down_bias, self.adamix_up_weight, self.adamix_up_bias)
        return 0 if self.folded else sum(ps[0].numel() for ps in lists if ps is not None)


class AdapterMixture(_Mixture):
    """h = base(x); out = h + up(GELU(down(h))): Eq. 1 with M down and M up experts."""

    def __init__(self, base, config=None, generator=None):
        super().__init__(base, config or AdaMixConfig(), base.out_features, True, generator)

    def forward(self, x):                                   # x (B, T, C_in) or (B, C_in)
        h = self.base(x)                                    # (B, T, C)
        (wd, bd), (wu, bu) = self.weights()
        z = _split_views(h, wd)                             # (B, T, C) or (V, B/V*T, C)
        z = _linear(F.gelu(_linear(z, wd, bd)), wu, bu)     # (., C) -> (., r) -> (., C)
        return h + z.reshape(h.shape)


class LoRAMixture(_Mixture):
    """out = base(x) + (alpha / r) B A dropout(x), with M experts for A (down) and for B (up)."""

    def __init__(self, base, config=None, generator=None):
        config = config or AdaMixConfig()
        super().__init__(base, config, base.in_features, False, generator)
        self.scaling = config.lora_alpha / config.r
        self.lora_dropout = nn.Dropout(config.lora_dropout)

    def forward(self, x):                                   # x (B, T, C_in) or (B, C_in)
        y = self.base(x)                                    # (B, T, C_out)
        if self.folded:
            if self.training:
                raise RuntimeError("LoRA is folded into the weight: call unfold_lora(model) before training")
            return y
        (a, _), (b, _) = self.weights()
        z = _split_views(self.lora_dropout(x), a)          # (B, T, C_in) or (V, B/V*T, C_in)
        z = _linear(_linear(z, a), b)                       # (., C_in) -> (., r) -> (., C_out)
        return y + self.scaling * z.reshape(y.shape)

    def delta_weight(self, a=None, b=None):
        """(alpha/r) B_bar A_bar: (C_out, r) @ (r, C_in) -> (C_out, C_in), the merged update of W."""
        a = self._side("down")[0] if a is None else a
        b = self._side("up")[0] if b is None else b
        return self.scaling * b @ a


class Router:
    """Routing plans: LongTensor (n_mixtures, V, 2) of (down, up) expert indices, V views per batch.

    A forward pre-hook on the root model draws one plan per forward pass (training, or inference mode
    "random") from `self.generator` only, outside any activation-checkpointed region. `views = 2`
    routes the two halves of the batch separately (a batched two-view consistency step).
    """

    def __init__(self, mixtures, seed=0):
        self.mixtures, self.seed = list(mixtures), seed
        self.generator = torch.Generator().manual_seed(seed)
        self.views = 1      # routes per training forward; the batch splits into this many equal parts
        self.plan = None    # the last plan used (None: no routes, e.g. merged inference); loggable
        self._pinned = None

    def sample(self, views=1):
        """Draw a plan: every index uniform in range(M) of its side; shared sides always give 0."""
        sizes = torch.tensor([m.sizes() for m in self.mixtures])                  # (n, 2)
        raw = torch.randint(0, 2**62, (len(self.mixtures), views, 2), generator=self.generator)
        return raw % sizes.unsqueeze(1)                                           # (n, V, 2)

    def set_plan(self, plan):
        """Pin `plan` for every forward until set_plan(None)."""
        if plan is not None:
            plan = torch.as_tensor(plan, dtype=torch.long)
            sizes = torch.tensor([m.sizes() for m in self.mixtures])                   # (n, 2)
            ok = plan.dim() == 3 and plan.shape[::2] == sizes.shape
            if not (ok and ((plan >= 0) & (plan < sizes.unsqueeze(1))).all()):
                raise ValueError(f"a plan is ({len(sizes)}, views, 2) with indices below the expert counts")
        self._pinned = plan

    @contextmanager
    def use(self, plan):
        """`with router.use(plan):` every forward inside the block uses `plan`."""
        previous = self._pinned
        self.set_plan(plan)
        try:
            yield self._pinned
        finally:
            self._pinned = previous

    def before_forward(self, root, args):  # forward pre-hook on the root model
        plan = self._pinned
        if plan is None and (root.training or any(m.inference == "random" for m in self.mixtures)):
            plan = self.sample(self.views if root.training else 1)
        self.plan = plan  # None (merged, expert:k) clears stale routes
        routes = plan.tolist() if plan is not None else [None] * len(self.mixtures)
        for m, route in zip(self.mixtures, routes):
            m.route = route

    def state_dict(self):
        return {"seed": self.seed, "views": self.views, "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.seed, self.views = state["seed"], state["views"]
        self.generator.set_state(state["generator"])


def mixtures(model):
    return [m for m in model.modules() if isinstance(m, _Mixture)]


def add_adamix(model, targets, kind="adapter", config=None, seed=0):
    """Replace every nn.Linear whose name matches a pattern in `targets` (fnmatch, e.g. "*.mlp.fc_out")
    by a mixture wrapping it, register the routing hook on `model`, and return the Router."""
    config, cls = config or AdaMixConfig(), {"adapter": AdapterMixture, "lora": LoRAMixture}[kind]
    if config.share not in ("up", "down", "none"):
        raise ValueError(f"share must be 'up', 'down' or 'none', got {config.share!r}")
    if config.init not in ("independent", "identical"):
        raise ValueError(f"init must be 'independent' or 'identical', got {config.init!r}")
    inside = {n for m_name, m in model.named_modules() if isinstance(m, _Mixture)
              for n, _ in m.named_modules(prefix=m_name)}
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in inside
             and any(fnmatch.fnmatchcase(n, t) for t in targets)]
    if not names:
        raise ValueError(f"no nn.Linear in the model matches {targets}")
    init = torch.Generator().manual_seed(seed + 1)  # init has its own stream: routes do not depend on it
    new = []
    for name in names:
        parent, _, child = name.rpartition(".")
        new.append(cls(model.get_submodule(parent).get_submodule(child), config, init))
        setattr(model.get_submodule(parent), child, new[-1])
    router = Router(new, seed)
    model.register_forward_pre_hook(router.before_forward)
    return router


def expert_distance(model):
    """How far apart the experts are: for every mixture and every side with M > 1 experts, the mean
    pairwise cosine distance 1 - cos(W_i, W_j) over pairs i < j of its flattened weights. 0: experts that
    point the same way (merging changes little); about 1: unrelated directions (independent random draws).
    -> {"down": [one float per mixture], "up": [...]} (a side shared by all experts is left out)."""
    out = {}
    for side in ("down", "up"):
        per_mixture = []
        for m in mixtures(model):
            ws = getattr(m, f"adamix_{side}_weight")
            if len(ws) < 2:
                continue
            x = torch.stack([w.detach().flatten().float() for w in ws])  # (M, P)
            n = x.norm(dim=1, keepdim=True)                                # (M, 1)
            cos = (x @ x.T) / (n * n.T).clamp_min(1e-30)                   # (M, M)
            cos = torch.where((n == 0) & (n.T == 0), 1.0, cos)  # two zero experts (LoRA's B at start) are equal
            i, j = torch.triu_indices(len(ws), len(ws), offset=1)
            per_mixture.append((1 - cos[i, j]).mean().item())
        if per_mixture:
            out[side] = per_mixture
    return out


def set_inference(model, mode="merged"):
    """Inference mode of every mixture (used whenever it is not training): "merged" (Eq. 4),
    "random" (one expert per side per forward, from the router's generator), "expert:k", "ensemble"."""
    if not (mode in ("merged", "random", "ensemble") or re.fullmatch(r"expert:\d+", mode)):
        raise ValueError(f"unknown inference mode {mode!r}")
    for m in mixtures(model):
        if mode.startswith("expert:") and int(mode[7:]) >= max(m.sizes()):
            raise ValueError(f"{mode}: the mixture has only {max(m.sizes())} experts")
        m.inference = mode


def ensemble(router_or_model, fn):
    """Mean of fn()'s outputs (e.g. logits, not probabilities) over all routes: all mixtures take the
    same (down i, up j); M forwards with one side shared, M x M otherwise."""
    router = router_or_model
    if not isinstance(router, Router):  # the Router whose hook add_adamix put on this model
        found = [getattr(h, "__self__", None) for h in router._forward_pre_hooks.values()]
        found = [r for r in found if isinstance(r, Router)]
        if len(found) != 1:
            raise ValueError(f"the model has {len(found)} routers: pass the Router itself")
        router = found[0]
    sizes = {m.sizes() for m in router.mixtures}
    if len(sizes) != 1:
        raise ValueError(f"ensemble needs the same expert counts in every mixture, got {sizes}")
    (m_down, m_up), n = sizes.pop(), len(router.mixtures)
    modes = [m.inference for m in router.mixtures]
    outs = []
    try:
        for m in router.mixtures:
            m.inference = "ensemble"
        for i in range(m_down):
            for j in range(m_up):
                with router.use(torch.tensor([i, j]).expand(n, 1, 2)):
                    outs.append(fn())
    finally:
        for m, mode in zip(router.mixtures, modes):
            m.inference = mode
    return torch.stack(outs).mean(0)


def fold_lora(model):
    """W += (alpha/r) B_bar A_bar for every LoRA mixture (eval only); forward then skips the LoRA path."""
    with torch.no_grad():
        for m in mixtures(model):
            if isinstance(m, LoRAMixture) and not m.folded:
                if m.training:
                    raise RuntimeError("fold_lora while training: call model.eval() first")
                m._folded_with = (m._side("down")[0].clone(), m._side("up")[0].clone())
                m.base.weight += m.delta_weight(*m._folded_with).to(m.base.weight.dtype)
                m.folded = True


def unfold_lora(model):
    """Undo fold_lora: subtract the very update that was added (allclose to the original W)."""
    with torch.no_grad():
        for m in mixtures(model):
            if isinstance(m, LoRAMixture) and m.folded:
                m.base.weight -= m.delta_weight(*m._folded_with).to(m.base.weight.dtype)
                m.folded, m._folded_with = False, None


def collapse_experts(model):
    """Replace each side's M experts by their mean (M = 1): one plain adapter / LoRA per mixture, so the
    model's parameter count is that of the underlying method. Build a new optimiser afterwards."""
    with torch.no_grad():
        for m in mixtures(model):
            for name in ("down_weight", "down_bias", "up_weight", "up_bias"):
                ps = getattr(m, PREFIX + name)
                if ps is not None and len(ps) > 1:
                    mean = nn.Parameter(torch.stack(list(ps)).mean(0), requires_grad=ps[0].requires_grad)
                    setattr(m, PREFIX + name, nn.ParameterList([mean]))


def consistency_loss(logits_a, logits_b, mask=None, kind="kl_sg"):
    """Consistency between two passes (Eq. 3). logits (B, K) or (B, T, V); mask (B, T), 1 = target token.

    "kl_sg" (official): 1/2 [KL(sg(p_b) || p_a) + KL(sg(p_a) || p_b)], softmax over the last dim.
    "kl": the same without stop-gradient. "mse": (a - b)^2 summed over the last dim, for a one-logit
    regression head (B, 1), where the softmax KL is identically zero (the official code's blind spot).
    Mean over the batch (and tokens), or over the target tokens only when `mask` is given.
    """
    if kind == "mse":
        per = (logits_a - logits_b).pow(2).sum(-1)                      # (B,) or (B, T)
    elif kind in ("kl_sg", "kl"):
        dtype = torch.promote_types(logits_a.dtype, torch.float32)  # bf16 / fp16 logits: in fp32
        la, lb = F.log_softmax(logits_a, -1, dtype=dtype), F.log_softmax(logits_b, -1, dtype=dtype)
        ta, tb = (la.detach(), lb.detach()) if kind == "kl_sg" else (la, lb)
        per = 0.5 * ((tb.exp() * (tb - la)).sum(-1) + (ta.exp() * (ta - lb)).sum(-1))  # (B,) / (B, T)
    else:
        raise ValueError(f"unknown consistency kind {kind!r}")
    if mask is None:
        return per.mean()
    mask = mask.to(per.dtype)
    return (per * mask).sum() / mask.sum().clamp(min=1)


def _is_head(name, head):
    return head is not None and (name == head or name.startswith(head + "."))


def mark_only_adamix_trainable(model, head="head"):
    """requires_grad only for AdaMix parameters and the task head (names starting with `head`)."""
    for name, p in model.named_parameters():
        p.requires_grad_(PREFIX in name or _is_head(name, head))


def count_parameters(model, head="head"):
    """trainable: parameters with requires_grad; inference: what the merged model adds to the frozen
    network (one expert per side per mixture, 0 for folded LoRA) plus the head."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inference = sum(p.numel() for n, p in model.named_parameters() if _is_head(n, head))
    return dict(trainable=trainable, inference=inference + sum(m.inference_numel() for m in mixtures(model)))


def adamix_state_dict(model, head="head"):
    """Only the AdaMix weights (and the head): the small file to save."""
    return {k: v for k, v in model.state_dict().items() if PREFIX in k or _is_head(k, head)}


def load_adamix_state_dict(model, state_dict, head="head"):
    """Load adamix_state_dict's output; every key and shape must match (names listed otherwise)."""
    own = adamix_state_dict(model, head)
    missing, unexpected = sorted(own.keys() - state_dict.keys()), sorted(state_dict.keys() - own.keys())
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise RuntimeError(f"AdaMix state dict does not match the model: missing keys {missing}, "
                           f"unexpected keys {unexpected}, shape mismatches {shapes}")
    model.load_state_dict(state_dict, strict=False)  # strict=False is safe: every key checked above
