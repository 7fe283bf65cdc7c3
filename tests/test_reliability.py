"""Reliability, round two (issue 24): one run at a time in an out_dir, every file written whole or
not at all (a full disk or an unreplaceable file is one line naming it), flags that would fail or
mislead after training refused at the start, and a learning rate that never exceeds --lr."""
import dataclasses
import re
import shutil

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_hardening import cfg, stopped, tiny  # noqa: F401 (fixtures)

import train


# ----------------------------------------------------------------------------- the learning rate

@given(total=st.integers(1, 400),
       warmup=st.one_of(st.floats(0, 0.999), st.floats(1, 500), st.integers(0, 500)))
def test_the_learning_rate_never_exceeds_lr(total, warmup):
    """A fraction that rounds below one step (--warmup 0.01 of 3 steps) used to give 33 times --lr
    on the first step; a fractional number of steps (2.5) 1.2 times on its last warm-up step."""
    cfg = train.TrainConfig(lr=1e-3, warmup=float(warmup))
    rates = [train.get_lr(step, total, cfg) for step in range(total)]
    assert all(0 < lr <= 1e-3 for lr in rates), max(rates)


def test_a_warm_up_below_one_step_starts_at_lr():
    """--lr 1e-3 --warmup 0.01 on a 3-step run: the warm-up ends within the first step."""
    rates = [train.get_lr(s, 3, train.TrainConfig(lr=1e-3, warmup=0.01)) for s in range(3)]
    assert rates[0] == 1e-3 and rates == sorted(rates, reverse=True)


# ----------------------------------------------------------------------------- flags refused at start

def test_resume_refuses_another_eval_limit(tiny, stopped, tmp_path):
    """The best epoch is chosen by comparing dev scores: all on the same examples, or the resumed
    run tests another model than an uninterrupted run with either setting would."""
    out = shutil.copytree(stopped, tmp_path / "out")
    with pytest.raises(train.UserError, match=r"ckpt.pt was made with --eval_limit 0 \(now 5\): "):
        train.main(cfg(tiny, out, epochs=2, resume=True, eval_limit=5))


@pytest.mark.parametrize("flags, message", [
    (dict(test_modes="merged,expert:9"),
     "--test_modes expert:9: adamix-adapter here has 2 experts: expert:0 to expert:1"),
    (dict(method="adapter", test_modes="expert:1"),
     "--test_modes expert:1: adapter here has 1 expert: expert:0 only"),
    (dict(method="adapter", test_modes="ensemble"),
     "--test_modes ensemble: not a mode of --method adapter (by default it tests merged)"),
    (dict(method="head-only", test_modes="expert:0"),
     "--test_modes expert:0: not a mode of --method head-only (by default it tests merged)"),
])
def test_test_modes_that_do_not_apply_are_refused_before_training(tiny, tmp_path, flags,
                                                                   message):
    """They used to fail after the training (expert:9 of 2: a traceback, no metrics.json) or to be
    skipped without a word (ensemble of one adapter: nothing tested)."""
    with pytest.raises(train.UserError, match=re.escape(message)):
        train.main(cfg(tiny, tmp_path / "out", **flags))
    assert not (tmp_path / "out" / "ckpt.pt").exists()
