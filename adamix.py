"""AdaMix: a mixture of adapters (or LoRA modules) with stochastic routing, in one torch-only file.

Wang, Agarwal, Mukherjee, Liu, Gao, Awadallah, Gao. "AdaMix: Mixture-of-Adaptations for
Parameter-efficient Model Tuning." EMNLP 2022, arXiv 2210.17451.

Letters in shape comments: B batch, T tokens, C model width, M experts, r bottleneck (adapter) or
rank (LoRA), P views (parts of one batch that take different routes; 1 unless router.views = 2).
Every mixture has a "down" side (C -> r) and an "up" side (r -> C) with M experts each; one side
can be shared (a single expert). For LoRA, down is A and up is B.

1. Adapter expert (AdapterMixture.forward), on the output h = W x + b of the FFN output projection:
       out = h + W_up · GELU(W_down · h + b_down) + b_up
   LoRA expert (LoRAMixture.forward):   out = W x + b + (alpha / r) · B · A · dropout(x)
2. Routing (Router): in training, every call of a mixture picks one expert per side, uniformly, for
   the whole batch; no gate, no balancing loss. The draws come from the router's own generator, so
   turning AdaMix on leaves every dropout mask as it was and DDP ranks with one seed share routes.
3. Consistency (consistency_loss): the batch goes through the model twice, predicting p1 and p2:
       L = CE(p1, y) + lambda · 1/2 [ KL(sg(p2) || p1) + KL(sg(p1) || p2) ],   sg = stop-gradient.
   The two routes are independent draws: in one mixture they coincide with probability
   1 / (M_down · M_up) (1/M with one side shared), unless router.differ = True.
4. Merging (inference="merged"): each side's experts are averaged in weight space,
       W_bar = (1/M) sum_j W_j,  b_bar = (1/M) sum_j b_j;
   for LoRA, (alpha / r) B_bar A_bar can be folded into W (fold_lora, or unwrap): zero extra cost.

Exact vs not: a linear map commutes with the mean, and LoRA is bilinear in (A, B), so merged LoRA
equals the mean over all M x M routes (M routes with one side shared). An adapter with mixed down
experts has a GELU in between: merged is one adapter with averaged weights, NOT the mean of the
routed outputs.

Below the divider ("---- below:"): the routing contract and what makes it safe in other models.
"""
import collections
import fnmatch
import math
import numbers
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
    r: int = 16                # bottleneck: RoBERTa-large 16, BERT-base 48, GPT-2 adapter 8; LoRA 4
    share: str = "up"          # "up" | "down" | "none": side with one shared expert (official: up)
    init_std: float = 0.02     # adapter weights ~ N(0, 0.02), biases 0 (official adapter init)
    zero_up: bool = False      # adapters: up weights 0: training starts at the pretrained function
    lora_alpha: float = 32.0   # LoRA alpha; the update is scaled by alpha / r (GPT-2 E2E: 32, r 4)
    lora_dropout: float = 0.1  # dropout on the LoRA input x (official GPT-2 E2E scripts)
    init: str = "independent"  # "independent": one draw per expert (paper); "identical": copies

    def __post_init__(self):  # a bad field fails here, where the config is made, naming the field
        _check_fields(self)


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
    every expert of a side is then set to a copy of expert 0 (the original code's LoRA start, an
    ablation): the experts can only drift apart through their different routes.
    """
    m = mixture
    cfg, lora = m.config, isinstance(m, LoRAMixture)
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
    make = lambda: torch.empty(*shape, device=like.device, dtype=like.dtype)
    return nn.ParameterList(nn.Parameter(make()) for _ in range(m))


class _Mixture(nn.Module):
    """What both kinds share: the wrapped `base`, M experts per side, and the choice of weights."""

    def __init__(self, base, config, lora, generator):
        super().__init__()
        self.d_in, self.d_out, self.transposed = _attach(self, base)  # nn.Linear or Conv1D: below
        self.base = base
        self.config = config
        m_down = 1 if config.share == "down" else config.num_experts
        m_up = 1 if config.share == "up" else config.num_experts
        w = base.weight
        d = self.d_in if lora else self.d_out  # adapters act on h (width C_out)
        self.adamix_down_weight = _experts(m_down, config.r, d, like=w)        # M x (r, d)
        self.adamix_up_weight = _experts(m_up, self.d_out, config.r, like=w)   # M x (C_out, r)
        self.adamix_down_bias = None if lora else _experts(m_down, config.r, like=w)
        self.adamix_up_bias = None if lora else _experts(m_up, self.d_out, like=w)
        self.inference = "merged"  # used when not training: see set_inference
        self.router = None         # set by the Router that owns this mixture
        self.index = 0             # this mixture's row in the Router's plans
        self.last_route = None     # LongTensor (P, 2) of (down, up) of the last routed call
        self.folded = False        # LoRA: B_bar A_bar added to base.weight by fold_lora
        init_experts(self, generator)

    def sizes(self):
        return len(self.adamix_down_weight), len(self.adamix_up_weight)

    def _side(self, name, idx=None):
        """(W, b) of one side: the merge (idx None: the mean over its experts, or over a soup's),
        expert idx, or stacked (P, ., .)."""
        ws = getattr(self, f"adamix_{name}_weight")
        bs = getattr(self, f"adamix_{name}_bias")
        if idx is None:  # merged, Eq. 4. Recomputed every forward, never cached: the original
            # code's cache went stale after training; one keyed on versions misses fused steps
            keep = self._soup() if len(ws) > 1 else [0]  # a shared side: its one expert
            pick = lambda ps: torch.stack([ps[i] for i in keep]).mean(0)  # M x (o, i) -> (o, i)
        elif len(idx) == 1:
            pick = lambda ps: ps[idx[0]]
        else:
            pick = lambda ps: torch.stack([ps[i] for i in idx])  # P x (out, in) -> (P, out, in)
        return pick(ws), None if bs is None else pick(bs)

    def _soup(self):
        """The experts that the merge averages: all of them, or those of the mode "soup:i,j,..."."""
        if self.inference.startswith("soup:"):
            return [int(k) for k in self.inference[5:].split(",")]
        return range(max(self.sizes()))

    @torch.compiler.disable  # Python choices: compiled graphs get the chosen tensors, not indices
    def weights(self, x):
        """((W_down, b_down), (W_up, b_up)) for this call, by training state and inference mode."""
        mode = "route" if self.training else self.inference
        if mode == "merged" or mode.startswith("soup:"):
            self.last_route = None
            return self._side("down"), self._side("up")
        if mode.startswith("expert:"):  # expert k on mixed sides, the shared expert 0 elsewhere
            route = torch.tensor([[int(mode[7:]) if m > 1 else 0 for m in self.sizes()]])
        elif self.router is None:
            raise RuntimeError("this mixture has no Router: create it with add_adamix")
        else:
            route = self.router.route(self, x)
        self.last_route = route
        idx = route.tolist()  # Python ints pick Parameters: an expert not chosen gets no gradient
        return self._side("down", [d for d, _ in idx]), self._side("up", [u for _, u in idx])

    def inference_numel(self):  # what one merged expert per side adds at inference; 0 when folded
        lists = (self.adamix_down_weight, self.adamix_down_bias,
                 self.adamix_up_weight, self.adamix_up_bias)
        return 0 if self.folded else sum(ps[0].numel() for ps in lists if ps is not None)


class AdapterMixture(_Mixture):
    """h = base(x); out = h + up(GELU(down(h))): Eq. 1 with M down and M up experts."""

    def __init__(self, base, config=None, generator=None):
        super().__init__(base, config or AdaMixConfig(), False, generator)

    def forward(self, x):                                   # x (B, T, C_in) or (B, C_in)
        h = self.base(x)                                    # (B, T, C)
        (wd, bd), (wu, bu) = self.weights(x)                # (r, C), (r,), (C, r), (C,) or (P, .)
        z = _split_views(h, wd)                             # (B, T, C) or (P, B/P*T, C)
        z = _linear(F.gelu(_linear(z, wd, bd)), wu, bu)     # (., C) -> (., r) -> (., C)
        return h + z.reshape(h.shape)                       # (B, T, C)


class LoRAMixture(_Mixture):
    """out = base(x) + (alpha / r) B A dropout(x), with M experts for A (down) and for B (up)."""

    def __init__(self, base, config=None, generator=None):
        config = config or AdaMixConfig()
        super().__init__(base, config, True, generator)
        self.scaling = config.lora_alpha / config.r
        self.lora_dropout = nn.Dropout(config.lora_dropout)

    def forward(self, x):                                   # x (B, T, C_in) or (B, C_in)
        y = self.base(x)                                    # (B, T, C_out)
        if self.folded:
            if self.training:
                raise RuntimeError("LoRA is folded into the weight: "
                                   "call unfold_lora(model) before training")
            return y                                        # (B, T, C_out)
        (a, _), (b, _) = self.weights(x)                    # A (r, C_in), B (C_out, r) or (P, .)
        z = _split_views(self.lora_dropout(x), a)          # (B, T, C_in) or (P, B/P*T, C_in)
        z = _linear(_linear(z, a), b)                       # (., C_in) -> (., r) -> (., C_out)
        return y + self.scaling * z.reshape(y.shape)        # (B, T, C_out)

    def delta_weight(self, a=None, b=None):
        """(alpha/r) B_bar A_bar: (C_out, r) @ (r, C_in) -> (C_out, C_in), the merged update of W.
        (A Conv1D base stores W transposed, (C_in, C_out): add delta.T to it.)"""
        a = self._side("down")[0] if a is None else a
        b = self._side("up")[0] if b is None else b
        return self.scaling * b @ a


class Router:
    """Draws routes, LongTensors (P, 2) of (down, up) expert indices, from its own seeded generator.
    A plan is the routes of all its mixtures at once, (n_mixtures, P, 2); views, differ: below."""

    def __init__(self, mixtures, seed=0):
        self.mixtures = list(mixtures)
        self.seed = seed
        for i, m in enumerate(self.mixtures):
            m.router = self
            m.index = i
        self.generator = torch.Generator().manual_seed(seed)
        self.views = 1       # routes per training call; the batch splits into this many equal parts
        self.differ = False  # True: a mixture never draws the route it drew last
        self._pinned = None  # a plan every call takes (set_plan, use)

    def _draw(self, m, views):
        """One route (views, 2): each index uniform in range(M) of its side (a shared side: 0)."""
        sizes = torch.tensor(m.sizes())
        raw = torch.randint(0, 2**62, (views, 2), generator=self.generator)
        if self.differ and sizes.prod() > 1:
            return _draw_differing(m, raw, sizes)                         # (P, 2)
        return raw % sizes                                                 # (P, 2)

    def route(self, m, x):
        """The route of one call of mixture m on input x (the routing contract: see the divider)."""
        if (replayed := _replay(m, x)) is not None:  # a checkpoint recompute: its forward's route
            return replayed
        if self._pinned is not None:
            route = self._pinned[m.index]
        elif not m.training and m.inference == "ensemble":
            raise RuntimeError("inference 'ensemble' needs a plan for every forward: call "
                               "adamix.ensemble(model, fn), which runs fn once per route")
        else:
            route = self._draw(m, self.views if m.training else 1)
        return _remember(m, x, route)  # training routes, kept for checkpoint recomputes

    def sample(self, views=1):
        """Draw a whole plan (n_mixtures, views, 2), e.g. for router.use; advances the generator."""
        return torch.stack([self._draw(m, views) for m in self.mixtures])

    @property
    def plan(self):
        """Each mixture's route in its last routed call (n_mixtures, P, 2); None if one has none."""
        return _last_plan(self)

    def set_plan(self, plan):
        """Pin `plan` for every call until set_plan(None)."""
        self._pinned = None if plan is None else _checked_plan(self, plan)

    def use(self, plan):
        """`with router.use(plan):` every call inside the block uses `plan`."""
        return _using_plan(self, plan)

    def state_dict(self):
        """The router's state, all tensors; adamix_state_dict saves it as `adamix_router.{i}.*`."""
        return {"generator": self.generator.get_state(),
                "seed": torch.tensor(self.seed),
                "views": torch.tensor(self.views),
                "differ": torch.tensor(self.differ)}

    def load_state_dict(self, state):
        """Also loads older states: Python numbers, and no seed (adamix_state_dict's, then)."""
        self.seed = int(state["seed"]) if "seed" in state else self.seed
        self.views = int(state["views"])
        self.differ = bool(state.get("differ", False))
        self.generator.set_state(state["generator"])


def consistency_loss(logits_a, logits_b, mask=None, kind="kl_sg"):
    """Consistency between two passes (Eq. 3). logits (B, K) or (B, T, K); mask (B, T), 1 = target.

    "kl_sg" (official): 1/2 [KL(sg(p_b) || p_a) + KL(sg(p_a) || p_b)], softmax over the last dim.
    "kl": the same without stop-gradient. "mse": (a - b)^2 summed over the last dim, for a one-logit
    regression head (B, 1), whose softmax KL is always zero (the official code's blind spot).
    Mean over the batch (and tokens), or over the target tokens only when `mask` is given.
    """
    if kind == "mse":
        per = (logits_a - logits_b).pow(2).sum(-1)                    # (B,) or (B, T)
    elif kind in ("kl_sg", "kl"):
        dtype = torch.promote_types(logits_a.dtype, torch.float32)  # bf16 / fp16 logits: in fp32
        la, lb = F.log_softmax(logits_a, -1, dtype=dtype), F.log_softmax(logits_b, -1, dtype=dtype)
        ta, tb = (la.detach(), lb.detach()) if kind == "kl_sg" else (la, lb)  # (B, K) or (B, T, K)
        kl_b_a = (tb.exp() * (tb - la)).sum(-1)                       # KL(p_b || p_a): (B,), (B, T)
        per = 0.5 * (kl_b_a + (ta.exp() * (ta - lb)).sum(-1))         # + KL(p_a || p_b)
    else:
        raise ValueError(f"unknown consistency kind {kind!r}")
    if mask is None:
        return per.mean()
    mask = mask.to(per.dtype)
    return (per * mask).sum() / mask.sum().clamp(min=1)


def add_adamix(model, targets, kind="adapter", config=None, seed=0):
    """Replace every nn.Linear (or GPT-2 Conv1D) whose name matches a pattern in `targets` (fnmatch,
    e.g. "*.mlp.fc_out") by a mixture wrapping it, and return the Router that draws their routes.
    Order: load the pretrained weights first, then add_adamix; load saved AdaMix weights after the
    same add_adamix call (same targets, kind, config). Each mixture starts in the train/eval mode
    of the layer it wraps (from_pretrained returns a model in eval mode: call .train() to train)."""
    model = _inner(model)
    config = config or AdaMixConfig()
    _check_config(config, kind)  # or a TypeError / ValueError naming the argument
    cls = {"adapter": AdapterMixture, "lora": LoRAMixture}[kind]
    names = _layers_to_wrap(model, targets)  # or a ValueError that lists what cannot be wrapped
    init = torch.Generator().manual_seed(seed + 1)  # init has its own stream: routes do not use it
    new = []
    for name in names:
        parent, _, child = name.rpartition(".")
        base = model.get_submodule(parent).get_submodule(child)
        new.append(cls(base, config, init).train(base.training))  # the mode of the layer it wraps
        setattr(model.get_submodule(parent), child, new[-1])
    return Router(new, seed)


def set_inference(model, mode="merged"):
    """Inference mode of every mixture (used whenever it is not training): "merged" (Eq. 4),
    "soup:i,j,..." (the same average over the experts i, j, ... only: a soup of some of them, as
    a greedy soup picks on held-out data; fold_lora, collapse_experts and unwrap then fold it),
    "random" (a fresh route at every call, from the router's generator), "expert:k", "ensemble"
    (only inside adamix.ensemble, which pins one route per forward; a plain forward raises)."""
    _check_mode(model, mode)  # or a ValueError: an unknown mode, or experts the mixtures lack
    for m in mixtures(model):
        m.inference = mode


def fold_lora(model):
    """W += (alpha/r) B_bar A_bar for every LoRA mixture (eval only); forward then skips LoRA.
    The update is computed once, here, and kept so that unfold_lora subtracts exactly it: experts
    changed while folded (a load, an edit) are not served until unfold_lora then fold_lora again,
    which is why load_adamix_state_dict refuses a folded model."""
    with torch.no_grad():
        for m in mixtures(model):
            if isinstance(m, LoRAMixture) and not m.folded:
                if m.training:
                    raise RuntimeError("fold_lora while training: call model.eval() first")
                m._folded_with = (m._side("down")[0].clone(), m._side("up")[0].clone())
                _add_to_weight(m, m.delta_weight(*m._folded_with))
                m.folded = True


def unfold_lora(model):
    """Undo fold_lora: subtract the very update that was added (allclose to the original W)."""
    with torch.no_grad():
        for m in mixtures(model):
            if isinstance(m, LoRAMixture) and m.folded:
                _add_to_weight(m, m.delta_weight(*m._folded_with), -1.0)
                m.folded = False
                m._folded_with = None


def mark_only_adamix_trainable(model, head="head"):
    """requires_grad only for AdaMix parameters and the task head (the module named `head`, or a
    list of names)."""
    for name, p in _named_parameters(model, head):
        p.requires_grad_(PREFIX in name or _is_head(name, head))


def count_parameters(model, head="head"):
    """trainable: parameters with requires_grad; inference: what the merged model adds to the frozen
    network (one expert per side per mixture, 0 for folded LoRA) plus the head."""
    named = _named_parameters(model, head)
    trainable = sum(p.numel() for _, p in named if p.requires_grad)
    inference = sum(p.numel() for n, p in named if _is_head(n, head))
    inference += sum(m.inference_numel() for m in mixtures(model))
    return dict(trainable=trainable, inference=inference)


def adamix_state_dict(model, head="head", router=True):
    """Only the AdaMix weights, the head, each LoRA mixture's alpha as `{layer}.adamix_lora_alpha`
    (a float32 scalar: the weights mean nothing under another alpha), and (router=True) each
    Router's state_dict() as `adamix_router.{i}.{generator,seed,views,differ}`: the small file to
    save. Names carry no wrapper prefix."""
    _named_parameters(model, head)  # checks the head
    out = {_unprefixed(k): v for k, v in _inner(model).state_dict().items()
           if PREFIX in k or _is_head(_unprefixed(k), head)}
    out.update(_lora_alphas(model))
    for i, r in enumerate(routers(model) if router else []):
        out.update({f"adamix_router.{i}.{k}": v for k, v in r.state_dict().items()})
    return out


def load_adamix_state_dict(model, state_dict, head="head"):
    """Load adamix_state_dict's output, all or nothing: every key, shape and lora_alpha must match,
    every float must be finite, and every mismatch is listed. Router entries restore the routers;
    router=False files load too, and so do older files without lora_alpha (unchecked, then)."""
    if any(getattr(m, "folded", False) for m in mixtures(model)):
        raise RuntimeError("LoRA is folded: call unfold_lora(model) before loading, fold_lora after")
    state_dict = _as_saved_now(model, state_dict)  # older files: no router seed, no lora_alpha
    with_router = any(k.startswith("adamix_router.") for k in state_dict)
    _all_or_nothing(adamix_state_dict(model, head, router=with_router), state_dict)
    inner = _inner(model)
    actual = {_unprefixed(k): k for k in inner.state_dict()}
    inner.load_state_dict({actual[k]: v for k, v in state_dict.items() if k in actual}, strict=False)
    for i, r in enumerate(routers(model) if with_router else []):
        prefix = f"adamix_router.{i}."
        r.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items()
                           if k.startswith(prefix)})


# ---- below: the machinery that makes the method safe in other people's models ------------------
#
# When a route is drawn (the routing contract):
# - every call of a mixture in training draws a fresh route, whatever module the call entered
#   through (the root model, a submodule called twice, a loop): no pass reuses an earlier pass's
#   route (two independent draws can still coincide by chance, see 3. at the top);
# - inside `with router.use(plan):` every call uses `plan` instead (train.py's batched two views,
#   ensemble);
# - a recompute under torch.utils.checkpoint (either use_reentrant) replays the route of the
#   forward it recomputes. The original forward is found by the random state that checkpoint
#   restores before it recomputes (CPU and the input's device); if two passes saw the same state
#   and drew different routes (a model without dropout), the recompute raises instead of guessing;
# - in eval, inference="random" draws a fresh route at every call (in decoding: at every new token).
# The choice of weights (_Mixture.weights) runs outside torch.compile (a graph break per mixture),
# so compiled graphs take the chosen weights as inputs and never recompile for a new route.

# --- checkpoint replay: the ledger of training routes

LEDGER = 32  # training routes each mixture remembers for checkpoint recomputes


def _in_backward():  # True while autograd runs a backward pass: where checkpoint recomputes
    return torch._C._current_graph_task_id() != -1


def _random_key(device):
    """A fingerprint of the random state that torch.utils.checkpoint saves at a checkpointed forward
    and restores before recomputing it: the CPU generator, and the device's when x is not on the
    CPU."""
    state = torch.get_rng_state()
    if device.type != "cpu":
        device_state = torch.get_device_module(device.type).get_rng_state(device)
        state = torch.cat([state, device_state.cpu()])
    return hash(state.numpy().tobytes())


def _replay(m, x):
    """In a checkpoint recompute, the route of the forward it recomputes; else None."""
    if not (m.training and _in_backward()):
        return None
    key = _random_key(x.device)
    found = [i for i, (k, _) in enumerate(m.ledger) if k == key]
    if not found:
        raise RuntimeError("a checkpoint recompute found no route of its original forward: "
                           "checkpoint with preserve_rng_state=True (the default)")
    routes = [m.ledger[i][1] for i in found]
    if any(not torch.equal(r, routes[0]) for r in routes):
        raise RuntimeError("two training passes through this mixture saw the same random state and "
                           "drew different routes, so a checkpoint recompute cannot tell which to "
                           "replay (a model without dropout): run both passes as one forward of 2B "
                           "examples (with router.use(router.sample(views=2))), or do not "
                           "checkpoint")
    del m.ledger[found[0]]
    return routes[0]


def _remember(m, x, route):
    """Keep a training call's route under its random state, for a checkpoint recompute; -> route."""
    if m.training:
        m.ledger.append((_random_key(x.device), route))
    return route


def _check_mode(model, mode):
    """set_inference's mode: a known one, and only experts that every mixture has."""
    known = mode in ("merged", "random", "ensemble") or re.fullmatch(r"expert:\d+", mode)
    if not (known or re.fullmatch(r"soup:\d+(,\d+)*", mode)):
        raise ValueError(f"unknown inference mode {mode!r}")
    chosen = [int(k) for k in re.findall(r"\d+", mode)]  # expert:k or soup:i,j,...
    if len(set(chosen)) < len(chosen):
        raise ValueError(f"{mode}: an expert twice")
    for m in mixtures(model):
        if chosen and max(chosen) >= max(m.sizes()):
            raise ValueError(f"{mode}: the mixture has only {max(m.sizes())} experts")


# --- wrapper prefixes: torch.compile, DataParallel, DDP; a model's mixtures and routers; heads

def _inner(model):
    """The user's model inside torch.compile (`_orig_mod.`) and DataParallel / DDP (`module.`)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def mixtures(model):
    return [m for m in _inner(model).modules() if isinstance(m, _Mixture)]


def routers(model):
    """The Routers of the model's mixtures, in order (one per add_adamix call)."""
    return list(dict.fromkeys(m.router for m in mixtures(model) if m.router is not None))


def _unprefixed(name):  # a name without the `_orig_mod.` of a compiled submodule
    return name.replace("_orig_mod.", "")


def head_names(head):
    """A head given as None, one module name ("head", "classifier") or a list of them -> a list."""
    return [] if head is None else [head] if isinstance(head, str) else list(head)


def _is_head(name, head):
    return any(name == h or name.startswith(h + ".") for h in head_names(head))


def _named_parameters(model, head):
    """(name without wrapper prefixes, parameter); a head given but matching nothing is an error."""
    named = [(_unprefixed(n), p) for n, p in _inner(model).named_parameters()]
    for h in head_names(head):
        if not any(_is_head(n, h) for n, _ in named):
            raise ValueError(f"head {h!r} matches no parameter of the model (head=None for no head)")
    return named


# --- the layers a mixture wraps: nn.Linear and GPT-2's Conv1D (folding); owners that skip it

def _is_conv1d(m):  # GPT-2's Conv1D in Hugging Face: y = x @ weight + bias, weight stored (in, out)
    w = getattr(m, "weight", None)
    return type(m).__name__ == "Conv1D" and w is not None and w.dim() == 2


def _no_fast_path(module, args):
    """A forward pre-hook that does nothing. nn.TransformerEncoderLayer's inference fast path reads
    linear1.weight / linear2.weight directly (skipping our forward), but is not taken when any of
    its submodules has a hook: this one keeps such a layer on the path that calls its layers."""


def _attach(mixture, base):
    """(C_in, C_out, transposed) of the layer a mixture wraps, nn.Linear or GPT-2's Conv1D; gives
    the mixture its checkpoint ledger and the hook that keeps TransformerEncoderLayer calling it."""
    if isinstance(base, nn.Linear):
        shape = (base.in_features, base.out_features, False)
    elif _is_conv1d(base):
        shape = (*base.weight.shape, True)
    else:
        raise TypeError(f"AdaMix wraps nn.Linear or GPT-2's Conv1D, got {type(base).__name__}")
    mixture.ledger = collections.deque(maxlen=LEDGER)  # (random-state key, route) of training calls
    mixture.register_forward_pre_hook(_no_fast_path)
    return shape


def _add_to_weight(m, delta, sign=1.0):  # W += sign * delta; W is (out, in), Conv1D's (in, out)
    m.base.weight += sign * (delta.T if m.transposed else delta).to(m.base.weight.dtype)


def _check_config(config, kind):  # add_adamix: the fields again, as they may have changed since
    if kind not in ("adapter", "lora"):
        raise ValueError(f"kind must be 'adapter' or 'lora', got {kind!r}")
    if not isinstance(config, AdaMixConfig):
        raise TypeError(f"config must be an AdaMixConfig, got {type(config).__name__}")
    _check_fields(config)


def _check_fields(c):  # AdaMixConfig.__post_init__, _check_config
    """A TypeError or ValueError naming the first field of AdaMixConfig `c` that is out of range."""
    def bad(field, rule, error=ValueError):
        raise error(f"AdaMixConfig.{field} must be {rule}, got {getattr(c, field)!r}")
    for field in ("num_experts", "r"):  # a count: 2.5 experts or a rank of 0 mean nothing
        if not isinstance(getattr(c, field), numbers.Integral) or type(getattr(c, field)) is bool:
            bad(field, "an int", TypeError)
        if getattr(c, field) < 1:
            bad(field, "at least 1")
    for field in ("init_std", "lora_alpha", "lora_dropout"):
        if not isinstance(getattr(c, field), numbers.Real) or type(getattr(c, field)) is bool:
            bad(field, "a number", TypeError)
    if not 0 <= c.init_std < math.inf:
        bad("init_std", "finite and >= 0 (a standard deviation)")
    if not 0 < c.lora_alpha < math.inf:
        bad("lora_alpha", "finite and > 0 (the LoRA update is scaled by lora_alpha / r)")
    if not 0 <= c.lora_dropout < 1:
        bad("lora_dropout", "in [0, 1) (the probability of zeroing an input of LoRA)")
    if not isinstance(c.zero_up, bool):
        bad("zero_up", "True or False", TypeError)
    if c.share not in ("up", "down", "none"):
        bad("share", "'up', 'down' or 'none'")
    if c.init not in ("independent", "identical"):
        bad("init", "'independent' or 'identical'")


def _refuse(model, name):
    """Why `name` cannot be wrapped (None if it can): owners that read the layer's `.weight`
    themselves would skip the mixture's forward, so they are refused here instead of failing (or
    worse) later."""
    parent = model.get_submodule(name.rpartition(".")[0])
    if isinstance(parent, nn.MultiheadAttention):
        return (f"{name}: nn.MultiheadAttention passes out_proj.weight to its attention kernel and "
                "never calls out_proj; wrap the layers around the attention instead (e.g. the "
                "FFN's linear1, linear2)")
    for owner_name, owner in model.named_modules():
        if (isinstance(owner, nn.TransformerEncoder) and getattr(owner, "use_nested_tensor", False)
                and name.startswith(owner_name + "." if owner_name else "")):
            return (f"{name}: nn.TransformerEncoder {owner_name or '(root)'} has a nested-tensor "
                    "fast path that reads its layers' weights directly; build it with "
                    "enable_nested_tensor=False")
    return None


def _layers_to_wrap(model, targets):
    """The names of the nn.Linear / Conv1D layers that match `targets` and are not inside a mixture
    already; a TypeError for targets that are not a list of patterns (one string: each character
    would be a pattern, "*" among them), a ValueError if no layer matches (naming the matching ones
    that hold a mixture already), or listing every one that cannot be wrapped."""
    if isinstance(targets, str):
        raise TypeError(f"targets must be a list of name patterns, not one string: pass "
                        f"[{targets!r}] (each character of {targets!r} would be a pattern)")
    targets = list(targets) if hasattr(targets, "__iter__") else [targets]
    if (bad := [t for t in targets if not isinstance(t, str)]):
        raise TypeError(f"targets must be a list of name patterns (str), got {bad[0]!r}")
    matches = lambda n: any(fnmatch.fnmatchcase(_unprefixed(n), t) for t in targets)
    held = {n: m for n, m in model.named_modules() if isinstance(m, _Mixture)}
    inside = {n for m_name, m in held.items() for n, _ in m.named_modules(prefix=m_name)}
    names = [n for n, m in model.named_modules()
             if (isinstance(m, nn.Linear) or _is_conv1d(m)) and n not in inside and matches(n)]
    if not names and (twice := [n for n in held if matches(n)]):
        raise ValueError(f"no nn.Linear in the model matches {targets}: {', '.join(twice)} already "
                         f"{'holds' if len(twice) == 1 else 'hold'} a mixture (call add_adamix "
                         "once per layer)")
    if not names:
        raise ValueError(f"no nn.Linear in the model matches {targets}")
    refused = [why for n in names if (why := _refuse(model, n))]
    if refused:
        raise ValueError("cannot wrap these layers:\n  " + "\n  ".join(refused))
    return names


# --- batched views: P routes in one forward, one per part of the batch; plans; differ

def _linear(x, w, b=None):
    """x @ w.T + b; with per-view weights w (P, out, in) and x (P, N, in) a batched matmul."""
    if w.dim() == 2:
        return F.linear(x, w, b)
    y = torch.bmm(x, w.transpose(1, 2))  # (P, N, in) @ (P, in, out) -> (P, N, out)
    return y if b is None else y + b.unsqueeze(1)


def _split_views(x, w):
    """(B, T, C) -> (P, B/P*T, C) when w is (P, ., .): view v takes examples [v B/P, (v+1) B/P).
    E.g. B=8, T=128, C=768, P=2: (8, 128, 768) -> (2, 512, 768); row 0 holds examples 0-3."""
    if w.dim() == 2:
        return x
    if x.shape[0] % w.shape[0]:
        raise ValueError(f"batch of {x.shape[0]} cannot be split into {w.shape[0]} equal views")
    return x.reshape(w.shape[0], -1, x.shape[-1])


def _last_plan(router):  # Router.plan
    routes = [m.last_route for m in router.mixtures]
    if any(r is None for r in routes) or len({r.shape for r in routes}) != 1:
        return None
    return torch.stack(routes)


def _checked_plan(router, plan):  # Router.set_plan: a LongTensor (n_mixtures, P, 2), in range
    plan = torch.as_tensor(plan, dtype=torch.long)
    sizes = torch.tensor([m.sizes() for m in router.mixtures])                 # (n, 2)
    ok = plan.dim() == 3 and plan.shape[::2] == sizes.shape
    if not (ok and ((plan >= 0) & (plan < sizes.unsqueeze(1))).all()):
        raise ValueError(f"a plan is ({len(sizes)}, views, 2) with indices below the expert counts")
    return plan


@contextmanager
def _using_plan(router, plan):  # Router.use
    previous = router._pinned
    router.set_plan(plan)
    try:
        yield router._pinned
    finally:
        router._pinned = previous


def _draw_differing(m, raw, sizes):
    """Router.differ: routes (P, 2) that each differ from the one drawn before. Numbers the routes
    c = down * M_up + up and draws c uniformly among all but the last one."""
    n, m_up = int(sizes.prod()), int(sizes[1])
    last = None
    if m.last_route is not None:
        last = int(m.last_route[-1, 0]) * m_up + int(m.last_route[-1, 1])
    codes = []
    for k in raw[:, 0].tolist():
        c = k % (n if last is None else n - 1)
        last = c + (last is not None and c >= last)  # skip over the last route's number
        codes.append(last)
    codes = torch.tensor(codes)
    return torch.stack([codes // m_up, codes % m_up], dim=1)          # (P, 2)


# --- loading: all or nothing; router states saved before the seed was

def _all_or_nothing(own, state_dict):
    """Raise, naming every problem at once, unless `state_dict` has exactly the keys and shapes of
    `own` (what the model would save): missing and unexpected keys, shape mismatches, and where the
    model holds floats, values that are not floating-point tensors (load_state_dict would cast an
    integer tensor's values to weights silently) or that hold NaN or inf."""
    missing = sorted(own.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - own.keys())
    both = [(k, state_dict[k], v) for k, v in own.items() if k in state_dict]
    shapes = [f"{k}: checkpoint {tuple(t.shape)} vs model {tuple(v.shape)}"
              for k, t, v in both if torch.is_tensor(t) and t.shape != v.shape]
    floats = [(k, t) for k, t, v in both if v.is_floating_point()]
    not_float = [f"{k}: {t.dtype}" if torch.is_tensor(t) else f"{k}: {type(t).__name__}, not a "
                 "tensor" for k, t in floats if not (torch.is_tensor(t) and t.is_floating_point())]
    not_finite = [k for k, t in floats if torch.is_tensor(t) and t.is_floating_point()
                  and not torch.isfinite(t).all()]
    eps = lambda t: max(1e-6, torch.finfo(t.dtype).eps)  # alphas equal in the dtype of the file
    alphas = [f"{k}: checkpoint {t.item():g} vs model {v.item():g}" for k, t, v in both
              if k.endswith(ALPHA) and k not in not_finite and torch.is_tensor(t)
              and t.is_floating_point() and t.shape == v.shape
              and not math.isclose(t.item(), v.item(), rel_tol=eps(t))]
    if missing or unexpected or shapes or not_float or not_finite or alphas:
        more = [f"not floating point {not_float}"] if not_float else []
        more += [f"not finite (NaN or inf) {not_finite}"] if not_finite else []
        more += [f"lora_alpha mismatches {alphas} (LoRA's update is scaled by lora_alpha / r: "
                 "build the model with the lora_alpha it was saved with)"] if alphas else []
        raise RuntimeError(", ".join([
            f"AdaMix state dict does not match the model: missing keys {missing}",
            f"unexpected keys {unexpected}", f"shape mismatches {shapes}", *more]))


def _as_saved_now(model, state_dict):
    """An adamix_state_dict saved before routers saved their seed (it held only generator, views,
    differ) loads as if it held each router's current seed; one saved before LoRA mixtures saved
    their alpha (no key `*adamix_lora_alpha` at all) as if it held the model's alphas."""
    older = {f"adamix_router.{i}.seed": torch.tensor(r.seed) for i, r in enumerate(routers(model))
             if f"adamix_router.{i}.generator" in state_dict
             and f"adamix_router.{i}.seed" not in state_dict}
    if not any(k.endswith(ALPHA) for k in state_dict):
        older.update(_lora_alphas(model))
    return {**state_dict, **older} if older else state_dict


ALPHA = PREFIX + "lora_alpha"  # adamix_state_dict's key for each LoRA mixture's alpha


def _lora_alphas(model):
    """{"{layer}.adamix_lora_alpha": alpha} of every LoRA mixture, the alpha that its scaling
    alpha / r was made with (r: the rows of A)."""
    return {(_unprefixed(n) + "." if n else "") + ALPHA:
            torch.tensor(m.scaling * m.adamix_down_weight[0].shape[0], dtype=torch.float32)
            for n, m in _inner(model).named_modules() if isinstance(m, LoRAMixture)}


# --- tools built on routes and merging: ensemble, expert distance, collapse, LoRA factors, unwrap

def ensemble(router_or_model, fn):
    """Mean of fn()'s outputs (e.g. logits, not probabilities) over the routes (down i, up j) that
    every mixture takes together: the same i and j in every layer, so M forwards with one side
    shared and M x M otherwise, not every combination of layers."""
    router = router_or_model
    if not isinstance(router, Router):  # the Router that add_adamix returned for this model
        found = routers(router)
        if len(found) != 1:
            raise ValueError(f"the model has {len(found)} routers: pass the Router itself")
        router = found[0]
    sizes = {m.sizes() for m in router.mixtures}
    if len(sizes) != 1:
        raise ValueError(f"ensemble needs the same expert counts in every mixture, got {sizes}")
    m_down, m_up = sizes.pop()
    n = len(router.mixtures)
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


def expert_distance(model):
    """How far apart the experts are: for every mixture and every side with M > 1 experts, the mean
    pairwise cosine distance 1 - cos(W_i, W_j) over pairs i < j of its flattened weights. 0: experts
    that point the same way (merging changes little); about 1: unrelated directions (independent
    random draws). -> {"down": [one float per mixture], "up": [...]} (a side shared by all experts
    is left out)."""
    out = {}
    for side in ("down", "up"):
        per_mixture = []
        for m in mixtures(model):
            ws = getattr(m, f"adamix_{side}_weight")
            if len(ws) < 2:
                continue
            x = torch.stack([w.detach().flatten().float() for w in ws])  # (M, numel)
            n = x.norm(dim=1, keepdim=True)                                # (M, 1)
            cos = (x @ x.T) / (n * n.T).clamp_min(1e-30)                   # (M, M)
            both_zero = (n == 0) & (n.T == 0)  # two zero experts (LoRA's B at start) are equal
            cos = torch.where(both_zero, 1.0, cos)
            i, j = torch.triu_indices(len(ws), len(ws), offset=1)
            per_mixture.append((1 - cos[i, j]).mean().item())
        if per_mixture:
            out[side] = per_mixture
    return out


def collapse_experts(model):
    """Replace each side's M experts by their mean (M = 1; under a "soup:..." mode, the mean of the
    soup's experts): one plain adapter / LoRA per mixture, so the model's parameter count is that
    of the underlying method. The mode becomes "merged". Build a new optimiser after."""
    with torch.no_grad():
        for m in mixtures(model):
            keep = list(m._soup())
            for name in ("down_weight", "down_bias", "up_weight", "up_bias"):
                ps = getattr(m, PREFIX + name)
                if ps is not None and len(ps) > 1:
                    mean = torch.stack([ps[i] for i in keep]).mean(0)
                    mean = nn.Parameter(mean, requires_grad=ps[0].requires_grad)
                    setattr(m, PREFIX + name, nn.ParameterList([mean]))
            if m.inference.startswith("soup:"):
                m.inference = "merged"


def merged_lora(model):
    """{layer name: (A_bar (r, C_in), B_bar (C_out, r), alpha / r)} for every LoRA mixture: the
    merged update is scaling · B_bar @ A_bar, in the factored form that LoRA files (e.g. PEFT's)
    store."""
    out = {}
    for name, m in _inner(model).named_modules():
        if isinstance(m, _Mixture):
            if not isinstance(m, LoRAMixture) or m.folded:
                raise ValueError(f"{name}: only unfolded LoRA mixtures have LoRA factors "
                                 "(unfold_lora first)")
            out[_unprefixed(name)] = (m._side("down")[0].detach(), m._side("up")[0].detach(),
                                      m.scaling)
    return out


class Adapter(nn.Module):
    """One plain adapter after `base`: out = h + up(GELU(down(h))), h = base(x). What unwrap leaves
    of an AdapterMixture; it needs nothing else from this file (copy the class to serve without
    AdaMix), only torch, torch.nn as nn and torch.nn.functional as F."""

    def __init__(self, base, down, up):
        super().__init__()
        self.base = base
        self.down = down
        self.up = up
        self.register_forward_pre_hook(self._no_fast_path)  # as for the mixtures

    @staticmethod
    def _no_fast_path(module, args):
        """Does nothing: any hook keeps nn.TransformerEncoderLayer off its fast path, which reads
        linear1.weight / linear2.weight itself instead of calling this module."""

    def forward(self, x):
        h = self.base(x)
        return h + self.up(F.gelu(self.down(h)))


def unwrap(model):
    """Leave AdaMix behind, in place: every LoRA mixture becomes its base layer with (alpha/r)
    B_bar A_bar folded into the weight, every adapter mixture one Adapter with the averaged experts
    (nn.Linear down and up). Returns the model, now without AdaMix parameters; the Routers no longer
    apply."""
    inner = _inner(model)
    with torch.no_grad():
        for name, m in [(n, m) for n, m in inner.named_modules() if isinstance(m, _Mixture)]:
            if isinstance(m, LoRAMixture):
                if not m.folded:
                    _add_to_weight(m, m.delta_weight())
                plain = m.base
            else:
                (wd, bd), (wu, bu) = m._side("down"), m._side("up")
                down = nn.Linear(*wd.shape[::-1])
                up = nn.Linear(*wu.shape[::-1])
                for layer, w, b in ((down, wd, bd), (up, wu, bu)):
                    layer.to(w)
                    layer.weight.copy_(w)
                    layer.bias.copy_(b)
                plain = Adapter(m.base, down, up)
            plain.train(m.training)
            parent, _, child = name.rpartition(".")
            setattr(inner.get_submodule(parent), child, plain)
    return model
