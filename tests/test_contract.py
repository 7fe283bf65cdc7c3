"""adamix.py in models written from scratch: an MLP and an nn.TransformerEncoder, as a user would.

The routing contract (when a route is drawn), torch.utils.checkpoint, torch.compile, wrapper
prefixes, head names, targets beyond nn.Linear, and unwrap. Oracles: the routes an identically seeded
generator draws, the same model run without checkpoint / compile / wrapper, nn.Linear for Conv1D,
and the merged model for its unwrapped copy.
"""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import adamix
from adamix import AdaMixConfig

D, CLASSES = 16, 3


class MLP(nn.Module):
    def __init__(self, dropout=0.1):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(D, 24), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(24, 24), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(24, D))
        self.head = nn.Linear(D, CLASSES)
        self.ckpt = None  # None: no checkpoint; True / False: use_reentrant

    def forward(self, x):  # x (B, D) -> (B, CLASSES)
        h = self.encoder(x) if self.ckpt is None else checkpoint(self.encoder, x, use_reentrant=self.ckpt)
        return self.head(h)


class Encoder(nn.Module):
    def __init__(self, dropout=0.1, nested=False):
        super().__init__()
        layer = nn.TransformerEncoderLayer(D, 2, 32, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)
        self.head = nn.Linear(D, CLASSES)
        self.ckpt = None

    def forward(self, x):  # x (B, T, D) -> (B, CLASSES)
        if self.ckpt is None:
            h = self.encoder(x)
        else:
            h = x
            for layer in self.encoder.layers:
                h = checkpoint(layer, h, use_reentrant=self.ckpt)
        return self.head(h.mean(1))


TARGETS = {MLP: ["encoder.*"], Encoder: ["*.linear1", "*.linear2"]}


def make(cls, kind="adapter", seed=0, experts=4, share="none", **kw):
    torch.manual_seed(seed)
    net = cls(**kw)
    router = adamix.add_adamix(net, TARGETS[cls], kind, AdaMixConfig(num_experts=experts, r=4, share=share,
                                                                     lora_dropout=0.0), seed=seed)
    with torch.no_grad():  # trained-looking experts: LoRA's B starts at zero
        for n, p in net.named_parameters():
            if "adamix_" in n:
                p.add_(0.3 * torch.randn_like(p))
    adamix.mark_only_adamix_trainable(net, head="head")
    return net, router


def data(cls, batch=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, D, generator=g) if cls is MLP else torch.randn(batch, 5, D, generator=g)
    return x, torch.randint(CLASSES, (batch,), generator=g)


def expected_routes(state, mixtures, calls):
    """What the router must draw for `calls` calls of each mixture, by hand: from a generator with
    the router's state, one uniform (down, up) per call in call order (randint % M)."""
    g = torch.Generator()
    g.set_state(state)
    out = []
    for _ in range(calls):
        draw = lambda m: torch.randint(0, 2**62, (1, 2), generator=g) % torch.tensor(m.sizes())
        out.append(torch.stack([draw(m) for m in mixtures]))
    return out


# ---- when a route is drawn -----------------------------------------------------------------
@pytest.mark.parametrize("cls", [MLP, Encoder])
@pytest.mark.parametrize("kind", ["adapter", "lora"])
def test_two_passes_through_a_submodule_draw_fresh_routes(cls, kind):
    net, router = make(cls, kind)
    x, _ = data(cls)
    net.train()
    net(x)  # a pass through the root first
    state = router.generator.get_state()
    plans, outs = [], []
    for _ in range(2):  # then twice through a submodule, as a user's consistency step might
        outs.append(net.encoder(x))
        plans.append(router.plan)
    for plan, expected in zip(plans, expected_routes(state, router.mixtures, 2)):
        assert torch.equal(plan, expected)
    assert not torch.equal(plans[0], plans[1]) and not torch.allclose(outs[0], outs[1])
    net.eval()  # "random" inference through a submodule: a fresh route at every call as well
    adamix.set_inference(net, "random")
    state = router.generator.get_state()
    net.encoder(x)
    assert torch.equal(router.plan, expected_routes(state, router.mixtures, 1)[0])


def test_two_passes_coincide_with_probability_one_over_m_unless_differ():
    net, router = make(MLP, experts=4, share="up")  # one mixed side: 4 routes per mixture
    x, _ = data(MLP)
    m = router.mixtures[0]
    same = 0
    with torch.no_grad():
        for _ in range(400):
            net(x)
            first = m.last_route
            net(x)
            same += torch.equal(first, m.last_route)
    assert 400 / 4 - 4 * (400 * 3 / 16) ** 0.5 < same < 400 / 4 + 4 * (400 * 3 / 16) ** 0.5  # 1/4, 4 sigma
    router.differ = True
    counts = torch.zeros(4)
    with torch.no_grad():
        for _ in range(400):
            net(x)
            first = m.last_route
            net(x)
            assert not torch.equal(first, m.last_route)
            counts[first[0, 0]] += 1
    assert (counts > 60).all()  # still every expert, about 100 each
    plan = router.sample(views=2)  # and the two halves of a batched step differ too
    assert all(not torch.equal(plan[i, 0], plan[i, 1]) for i in range(len(plan)))


# ---- torch.utils.checkpoint ---------------------------------------------------------------------
def consistency_step(net, x, y):
    torch.manual_seed(7)  # the same dropout masks in every run
    a, b = net(x), net(x)
    (F.cross_entropy(a, y) + adamix.consistency_loss(a, b)).backward()
    return {n: p.grad for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cls", [MLP, Encoder])
@pytest.mark.parametrize("kind", ["adapter", "lora"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpoint_recomputes_with_the_route_of_its_original_forward(cls, kind, reentrant):
    x, y = data(cls)
    x.requires_grad_(True)  # the reentrant variant only sends gradients through inputs that need them
    grads = []
    for ckpt in (None, reentrant):
        net, router = make(cls, kind)
        router.differ = True  # the two passes surely take different experts
        net.train()
        net.ckpt = ckpt
        grads.append(consistency_step(net, x, y))
    plain, checked = grads
    assert plain.keys() == checked.keys() and any("adamix_" in k for k in plain)
    for k in plain:
        torch.testing.assert_close(checked[k], plain[k], rtol=1e-5, atol=1e-6)


def test_checkpoint_without_dropout_raises_instead_of_guessing_and_batched_views_work():
    x, y = data(MLP)
    x.requires_grad_(True)
    net, router = make(MLP, dropout=0.0)
    router.differ = True
    net.train()
    net.ckpt = False
    with pytest.raises(RuntimeError, match="cannot tell which to replay"):
        consistency_step(net, x, y)
    grads = []
    for ckpt in (None, False):  # the way out the error names: both views in one forward
        net, router = make(MLP, dropout=0.0)
        net.train()
        net.ckpt = ckpt
        plan = router.sample(views=2)
        with router.use(plan):
            a, b = net(torch.cat([x, x])).chunk(2)
        (F.cross_entropy(a, y) + adamix.consistency_loss(a, b)).backward()
        grads.append({n: p.grad for n, p in net.named_parameters() if p.grad is not None})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-6)


# ---- torch.compile -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["adapter", "lora"])
def test_compile_does_not_recompile_for_a_new_route(kind):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    net, router = make(MLP, kind)
    x, _ = data(MLP)
    compiled = torch.compile(net, backend="eager")
    net.train()
    for _ in range(2):  # warm up: the graphs of a training step
        compiled(x).sum().backward()
    graphs, plans = counters["stats"]["unique_graphs"], []
    for _ in range(8):
        compiled(x).sum().backward()
        plans.append(router.plan)
    assert len({tuple(p.flatten().tolist()) for p in plans}) > 4  # the routes changed ...
    assert counters["stats"]["unique_graphs"] == graphs  # ... the graphs did not
    with router.use(plans[-1]), torch.no_grad():  # and compiled computes what eager does
        outs = [(torch.manual_seed(3), f(x))[1] for f in (compiled, net)]  # the same dropout masks
        torch.testing.assert_close(*outs)


# ---- wrappers, names, saved state ---------------------------------------------------------------
def ddp(net, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    return nn.parallel.DistributedDataParallel(net)


@pytest.mark.parametrize("wrap", ["compile", "data_parallel", "ddp"])
def test_wrapper_prefixes_are_handled(wrap, tmp_path):
    net, _ = make(MLP)
    reference = copy.deepcopy(adamix.adamix_state_dict(net))
    count = adamix.count_parameters(net)
    wrapped = {"compile": lambda: torch.compile(net, backend="eager"),
               "data_parallel": lambda: nn.DataParallel(net),
               "ddp": lambda: ddp(net, tmp_path)}[wrap]()
    try:
        net.requires_grad_(True)
        adamix.mark_only_adamix_trainable(wrapped, head="head")
        trainable = lambda n: "adamix_" in n or n.startswith("head.")
        assert all(p.requires_grad == trainable(n) for n, p in net.named_parameters())
        assert adamix.count_parameters(wrapped) == count
        saved = adamix.adamix_state_dict(wrapped)
        assert saved.keys() == reference.keys() and any(k.startswith("head.") for k in saved)
        assert all(torch.equal(saved[k], reference[k]) for k in saved)
        fresh, _ = make(MLP, seed=3)
        adamix.load_adamix_state_dict(fresh, saved)  # saved from the wrapper, loads into the model
        adamix.load_adamix_state_dict(wrapped, adamix.adamix_state_dict(fresh))  # and back
        back = adamix.adamix_state_dict(fresh)
        assert all(torch.equal(v, back[k]) for k, v in adamix.adamix_state_dict(net).items())
    finally:
        if wrap == "ddp":
            dist.destroy_process_group()


def test_a_head_that_matches_nothing_is_an_error():
    net, _ = make(MLP)
    for call in (adamix.mark_only_adamix_trainable, adamix.adamix_state_dict, adamix.count_parameters):
        with pytest.raises(ValueError, match="'classifier' matches no parameter"):
            call(net, head="classifier")
    adamix.mark_only_adamix_trainable(net, head=["head", "encoder.0.base"])  # several names
    assert net.encoder[0].base.weight.requires_grad and not net.encoder[3].base.weight.requires_grad


def test_router_state_is_saved_and_restored_with_the_weights():
    net, router = make(MLP)
    x, _ = data(MLP)
    net.train()
    router.views, router.differ = 2, True
    saved = copy.deepcopy(adamix.adamix_state_dict(net))
    later = [(net(x), router.plan)[1] for _ in range(3)]
    fresh, fresh_router = make(MLP, seed=5)
    adamix.load_adamix_state_dict(fresh, saved)
    assert (fresh_router.views, fresh_router.differ) == (2, True)
    fresh.train()
    for plan in later:
        fresh(x)
        assert torch.equal(fresh_router.plan, plan)
    assert not any(k.startswith("adamix_router.") for k in adamix.adamix_state_dict(net, router=False))


def test_router_state_has_one_format_and_older_formats_still_load():
    net, router = make(MLP)
    x, _ = data(MLP)
    net.train()
    router.views, router.differ = 2, True
    saved = copy.deepcopy(adamix.adamix_state_dict(net))
    own = router.state_dict()  # the one format: the same keys and tensors, in both places
    prefix = "adamix_router.0."
    in_file = {k.removeprefix(prefix): v for k, v in saved.items() if k.startswith(prefix)}
    assert in_file.keys() == own.keys() == {"generator", "seed", "views", "differ"}
    assert all(isinstance(v, torch.Tensor) and torch.equal(v, own[k]) for k, v in in_file.items())
    later = [(net(x), router.plan)[1] for _ in range(3)]

    fresh, fresh_router = make(MLP, seed=5)
    adamix.load_adamix_state_dict(fresh, saved)
    assert (fresh_router.seed, fresh_router.views, fresh_router.differ) == (0, 2, True)

    # an older adamix.pt (no seed); an older ckpt.pt["router"] of train.py (Python numbers)
    older_file = {k: v for k, v in saved.items() if k != prefix + "seed"}
    older_router = {"seed": 0, "views": 2, "differ": True, "generator": saved[prefix + "generator"]}
    for older in ("file", "router"):
        fresh, fresh_router = make(MLP, seed=5)
        if older == "file":
            adamix.load_adamix_state_dict(fresh, older_file)
        else:
            fresh_router.load_state_dict(copy.deepcopy(older_router))
        assert (fresh_router.views, fresh_router.differ) == (2, True)
        assert type(fresh_router.views) is int and type(fresh_router.differ) is bool
        assert fresh_router.seed == (5 if older == "file" else 0)  # no seed saved: its own
        fresh.train()
        for plan in later:
            fresh(x)
            assert torch.equal(fresh_router.plan, plan)
    with pytest.raises(RuntimeError, match=r"missing keys \['adamix_router.0.differ'\]"):
        no_differ = {k: v for k, v in saved.items() if k != prefix + "differ"}
        adamix.load_adamix_state_dict(fresh, no_differ)


def test_loading_into_a_folded_model_is_refused():
    net, _ = make(MLP, "lora")
    saved = adamix.adamix_state_dict(net)
    net.eval()
    adamix.fold_lora(net)
    with pytest.raises(RuntimeError, match="unfold_lora"):
        adamix.load_adamix_state_dict(net, saved)


# ---- targets beyond nn.Linear -------------------------------------------------------------------
def test_layers_whose_owner_reads_the_weight_are_refused():
    net = Encoder()
    with pytest.raises(ValueError, match="MultiheadAttention"):
        adamix.add_adamix(net, ["*.self_attn.out_proj"], "lora")
    with pytest.raises(ValueError, match="enable_nested_tensor=False"):
        adamix.add_adamix(Encoder(nested=True), ["*.linear1"], "lora")
    assert not adamix.mixtures(net)  # nothing was half-wrapped


@pytest.mark.parametrize("kind", ["adapter", "lora"])
def test_transformer_encoder_layer_in_eval_runs_the_mixtures(kind):
    net, _ = make(Encoder, kind)
    x, _ = data(Encoder)
    net.eval()
    with torch.no_grad():
        out = net(x)  # eval: TransformerEncoderLayer's fast path would read linear1.weight itself
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            slow = net(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        base = copy.deepcopy(net)
        for layer in base.encoder.layers:
            layer.linear1, layer.linear2 = layer.linear1.base, layer.linear2.base
        assert not torch.allclose(base(x), out, atol=1e-4)  # the experts are really in `out`
    torch.testing.assert_close(out, slow)


class Conv1D(nn.Module):
    """GPT-2's linear layer in Hugging Face transformers: y = x @ weight + bias, weight (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(0.3 * torch.randn(nx, nf))
        self.bias = nn.Parameter(0.1 * torch.randn(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


@pytest.mark.parametrize("kind", ["adapter", "lora"])
def test_gpt2_conv1d_is_wrapped_like_the_linear_layer_it_transposes(kind):
    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(7, 5), nn.Tanh(), Conv1D(4, 7))
    lin = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    with torch.no_grad():
        for c, l in ((conv[0], lin[0]), (conv[2], lin[2])):
            l.weight.copy_(c.weight.T), l.bias.copy_(c.bias)
    cfg = AdaMixConfig(num_experts=3, r=2, share="none", lora_dropout=0.0)
    rc, rl = (adamix.add_adamix(n, ["0", "2"], kind, cfg, seed=4) for n in (conv, lin))
    with torch.no_grad():
        for p, q in zip([p for n, p in conv.named_parameters() if "adamix_" in n],
                        [p for n, p in lin.named_parameters() if "adamix_" in n]):
            assert p.shape == q.shape
            q.copy_(p.add_(0.3 * torch.randn_like(p)))  # trained-looking, and the same in both
    x = torch.randn(3, 2, 5)
    plan = rl.sample()
    with rc.use(plan), rl.use(plan):
        torch.testing.assert_close(conv(x), lin(x))
    conv.eval(), lin.eval()
    merged = lin(x)
    torch.testing.assert_close(conv(x), merged)
    if kind == "lora":
        adamix.fold_lora(conv)
        torch.testing.assert_close(conv(x), merged)
        adamix.unfold_lora(conv)
    adamix.unwrap(conv)
    assert isinstance(conv[0], Conv1D if kind == "lora" else adamix.Adapter)
    torch.testing.assert_close(conv(x), merged)


# ---- leaving AdaMix behind ----------------------------------------------------------------------
@pytest.mark.parametrize("cls", [MLP, Encoder])
@pytest.mark.parametrize("kind", ["adapter", "lora"])
def test_unwrap_returns_a_plain_model_with_the_merged_function(cls, kind):
    net, _ = make(cls, kind, share="up")
    x, _ = data(cls)
    net.eval()
    with torch.no_grad():
        merged = net(x)
        plain = adamix.unwrap(copy.deepcopy(net))
        assert not adamix.mixtures(plain) and not any("adamix_" in n for n, _ in plain.named_parameters())
        kinds = {type(m) for n, m in plain.named_modules() if n.endswith(("linear1", "linear2")) or
                 (n.startswith("encoder.") and n.count(".") == 1 and n[-1] in "036")}
        assert kinds == ({nn.Linear} if kind == "lora" else {adamix.Adapter})
        torch.testing.assert_close(plain(x), merged, rtol=1e-5, atol=1e-6)


def test_adapter_class_works_copied_alone_and_unwrapped_models_pickle():
    import inspect
    import io
    scope = {"torch": torch, "nn": nn, "F": F}  # what its docstring says it needs: no adamix.py
    exec(inspect.getsource(adamix.Adapter), scope)
    torch.manual_seed(0)
    layers = nn.Linear(D, D), nn.Linear(D, 4), nn.Linear(4, D)
    copied, ours = scope["Adapter"](*layers), adamix.Adapter(*layers)
    x, _ = data(MLP)
    torch.testing.assert_close(copied(x), ours(x))
    assert len(copied._forward_pre_hooks) == 1  # keeps nn.TransformerEncoderLayer off its fast path
    net, _ = make(Encoder, "adapter")
    net.eval()
    plain = adamix.unwrap(net)
    buffer = io.BytesIO()
    torch.save(plain, buffer)  # the hooks of Adapter (and of the mixtures, before) pickle by name
    buffer.seek(0)
    x, _ = data(Encoder)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), plain(x))


def test_head_names_normalises_none_a_name_or_a_list():
    assert adamix.head_names(None) == []
    assert adamix.head_names("classifier") == ["classifier"]
    assert adamix.head_names(["head", "pooler"]) == ["head", "pooler"]
    assert adamix.head_names(("head", "pooler")) == ["head", "pooler"]
