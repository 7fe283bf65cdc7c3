"""The Python API refuses bad arguments where they are given, naming them (issue 24): AdaMixConfig's
fields, add_adamix's kind and targets, and the state dicts that load_adamix_state_dict is handed.
Each test asserts the argument, key or dtype that the message names."""
import copy
import math

import pytest
import torch
import torch.nn as nn

import adamix
import export
from adamix import AdaMixConfig


class Net(nn.Module):
    """Two body layers to wrap and a head that must never be wrapped."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.body(x))


def wrapped(kind="lora", seed=0, **config):
    torch.manual_seed(seed)
    net = Net()
    adamix.add_adamix(net, ["body.*"], kind, AdaMixConfig(num_experts=2, r=2, **config), seed=seed)
    return net


# ---- AdaMixConfig: every field checked where the config is made ----------------------------------

BAD_FIELDS = [  # (field, value, exception)
    ("num_experts", 0, ValueError), ("num_experts", -2, ValueError),
    ("num_experts", 2.0, TypeError), ("num_experts", True, TypeError),
    ("num_experts", "4", TypeError),
    ("r", 0, ValueError), ("r", -1, ValueError), ("r", 2.5, TypeError),
    ("lora_alpha", 0, ValueError), ("lora_alpha", -8.0, ValueError),
    ("lora_alpha", math.inf, ValueError), ("lora_alpha", "32", TypeError),
    ("lora_dropout", 1.5, ValueError), ("lora_dropout", 1.0, ValueError),
    ("lora_dropout", -0.1, ValueError), ("lora_dropout", math.nan, ValueError),
    ("share", "both", ValueError), ("share", None, ValueError),
    ("init", "same", ValueError),
    ("init_std", -0.02, ValueError), ("init_std", math.nan, ValueError),
    ("zero_up", "no", TypeError),
]


@pytest.mark.parametrize("field, value, error", BAD_FIELDS)
def test_a_bad_config_field_is_refused_where_the_config_is_made_naming_it(field, value, error):
    with pytest.raises(error, match=rf"AdaMixConfig\.{field} "):
        AdaMixConfig(**{field: value})


@pytest.mark.parametrize("kind", ["adapter", "lora"])
def test_rank_zero_is_refused_for_both_kinds_never_a_zero_division(kind):
    """LoRA r=0 used to be a ZeroDivisionError (alpha / r), adapter r=0 an empty bottleneck."""
    with pytest.raises(ValueError, match=r"AdaMixConfig\.r must be at least 1, got 0"):
        adamix.add_adamix(Net(), ["body.*"], kind, AdaMixConfig(r=0))
    config = AdaMixConfig(r=2)
    config.r = 0  # a field changed after the config was made: add_adamix checks it again
    with pytest.raises(ValueError, match=r"AdaMixConfig\.r must be at least 1, got 0"):
        adamix.add_adamix(Net(), ["body.*"], kind, config)


def test_edge_values_that_make_sense_are_accepted():
    AdaMixConfig(num_experts=1, r=1, lora_alpha=0.5, lora_dropout=0.0, init_std=0.0)
    AdaMixConfig(lora_alpha=16, lora_dropout=0.999, share="none", init="identical")


def test_a_config_that_is_not_an_adamix_config_is_refused_naming_config():
    with pytest.raises(TypeError, match="config must be an AdaMixConfig"):
        adamix.add_adamix(Net(), ["body.*"], "lora", {"r": 4})


# ---- add_adamix: kind, targets, a layer wrapped twice -------------------------------------------

def test_an_unknown_kind_names_kind_and_the_choices():
    net = Net()
    with pytest.raises(ValueError, match=r"kind must be 'adapter' or 'lora', got 'moe'"):
        adamix.add_adamix(net, ["body.*"], "moe")
    assert not adamix.mixtures(net)


def test_targets_as_one_string_is_refused_before_anything_is_wrapped():
    """"body.*" used to be read character by character: its "*" wrapped every layer, the head
    too."""
    net = Net()
    with pytest.raises(TypeError, match=r"targets must be a list of name patterns.*\['body\.\*'\]"):
        adamix.add_adamix(net, "body.*", "lora")
    assert not adamix.mixtures(net) and isinstance(net.head, nn.Linear)
    with pytest.raises(TypeError, match=r"targets must be a list of name patterns \(str\), got 0"):
        adamix.add_adamix(net, ["body.*", 0], "lora")


def test_targets_may_be_any_iterable_of_patterns_even_a_generator():
    net = Net()
    router = adamix.add_adamix(net, (t for t in ["body.1", "body.0"]), "lora")
    assert len(router.mixtures) == 2 and isinstance(net.head, nn.Linear)


def test_a_layer_wrapped_twice_says_it_already_holds_a_mixture():
    net = wrapped()
    with pytest.raises(ValueError, match=r"body\.0 already holds a mixture.*add_adamix once"):
        adamix.add_adamix(net, ["body.0"], "adapter")
    with pytest.raises(ValueError, match=r"body\.0, body\.1 already hold"):
        adamix.add_adamix(net, ["body.*"], "lora")
    with pytest.raises(ValueError, match="no nn.Linear in the model matches"):  # nothing wrapped
        adamix.add_adamix(net, ["tail"], "lora")


# ---- load_adamix_state_dict: lora_alpha, NaN / inf, integer tensors, all at once ----------------

def test_lora_alpha_is_saved_beside_each_lora_mixture_and_a_different_one_is_refused():
    saved = adamix.adamix_state_dict(wrapped(lora_alpha=16.0))
    assert saved["body.0.adamix_lora_alpha"].item() == 16.0
    adapters = adamix.adamix_state_dict(wrapped("adapter"))
    assert not any(k.endswith("adamix_lora_alpha") for k in adapters)
    fresh = wrapped(seed=1, lora_alpha=32.0)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(RuntimeError, match=r"lora_alpha mismatches \['body\.0\.adamix_lora_alpha: "
                       r"checkpoint 16 vs model 32', 'body\.1\.adamix_lora_alpha: checkpoint 16"):
        adamix.load_adamix_state_dict(fresh, saved)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())  # nothing loaded
    adamix.load_adamix_state_dict(wrapped(seed=1, lora_alpha=16.0), saved)


def test_a_file_saved_before_lora_alpha_was_saved_still_loads():
    net = wrapped(lora_alpha=16.0)
    older = {k: v for k, v in adamix.adamix_state_dict(net).items() if "lora_alpha" not in k}
    fresh = wrapped(seed=1, lora_alpha=16.0)
    adamix.load_adamix_state_dict(fresh, older)
    assert all(torch.equal(v, adamix.adamix_state_dict(fresh)[k]) for k, v in older.items())
    partly = {**older, "body.0.adamix_lora_alpha": torch.tensor(16.0)}
    with pytest.raises(RuntimeError, match=r"missing keys \['body\.1\.adamix_lora_alpha'\]"):
        adamix.load_adamix_state_dict(fresh, partly)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_tensor_is_refused_naming_its_key(bad):
    saved = adamix.adamix_state_dict(wrapped())
    saved["body.1.adamix_down_weight.0"][0, 1] = bad
    with pytest.raises(RuntimeError,
                       match=r"not finite \(NaN or inf\) \['body\.1\.adamix_down_weight\.0'\]"):
        adamix.load_adamix_state_dict(wrapped(seed=1), saved)


def test_an_integer_tensor_for_a_float_parameter_is_refused_naming_key_and_dtype():
    saved = adamix.adamix_state_dict(wrapped("adapter"))
    saved["body.0.adamix_down_bias.1"] = saved["body.0.adamix_down_bias.1"].to(torch.int32)
    saved["head.weight"] = torch.ones(2, 8, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"not floating point \['body\.0\.adamix_down_bias\.1: "
                                           r"torch\.int32', 'head\.weight: torch\.bool'\]"):
        adamix.load_adamix_state_dict(wrapped("adapter", seed=1), saved)
    saved["head.weight"] = [[1.0] * 8] * 2  # not a tensor at all
    with pytest.raises(RuntimeError, match=r"'head\.weight: list, not a tensor'"):
        adamix.load_adamix_state_dict(wrapped("adapter", seed=1), saved)


@pytest.mark.parametrize("kind", ["adapter", "lora"])
def test_a_bfloat16_file_still_loads_into_a_float32_model(kind):
    """lora_alpha 0.3 in bfloat16 is 0.30078: equal to the model's in the precision of the file."""
    alpha = {"lora_alpha": 0.3} if kind == "lora" else {}
    saved = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
             for k, v in adamix.adamix_state_dict(wrapped(kind, **alpha)).items()}
    adamix.load_adamix_state_dict(wrapped(kind, seed=1, **alpha), saved)


def test_every_problem_of_a_state_dict_is_listed_at_once():
    saved = adamix.adamix_state_dict(wrapped(lora_alpha=16.0))
    del saved["head.bias"]
    saved["body.0.adamix_down_weight.1"] = torch.zeros(3, 3)
    saved["body.1.adamix_up_weight.0"][0, 0] = math.nan
    saved["body.1.adamix_down_weight.1"] = saved["body.1.adamix_down_weight.1"].long()
    with pytest.raises(RuntimeError) as refused:
        adamix.load_adamix_state_dict(wrapped(seed=1, lora_alpha=32.0), saved)
    said = str(refused.value)
    for named in ("missing keys ['head.bias']", "body.0.adamix_down_weight.1: checkpoint (3, 3)",
                  "body.1.adamix_up_weight.0'", "body.1.adamix_down_weight.1: torch.int64",
                  "body.0.adamix_lora_alpha: checkpoint 16 vs model 32"):
        assert named in said, said


# ---- export_peft: adapters are not LoRA ----------------------------------------------------------

def test_export_of_adapters_says_that_the_peft_lora_format_holds_lora_only(tmp_path):
    for net in (wrapped("adapter"), adamix.unwrap(wrapped("adapter"))):
        with pytest.raises(ValueError, match=r"body\.0: an adapter; PEFT's LoRA format holds "
                           r"LoRA only \(adapters cannot be exported to it\)") as refused:
            export.export_peft(net, tmp_path / "peft", head="head")
        assert "unfold_lora" not in str(refused.value)
    assert not (tmp_path / "peft").exists()
