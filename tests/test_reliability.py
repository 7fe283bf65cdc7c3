"""Reliability, round two (issue 24): one run at a time in an out_dir, every file written whole or
not at all (a full disk or an unreplaceable file is one line naming it), flags that would fail or
mislead after training refused at the start, and a learning rate that never exceeds --lr."""
import dataclasses
import errno
import json
import os
import re
import resource
import runpy
import shutil
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
import torch
from conftest import ROOT
from test_hardening import cfg, stopped, tiny  # noqa: F401 (fixtures)

import adamix
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


# ------------------------------------------------------------------------ flags refused at start

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


# ----------------------------------------------------------------------------- one run at a time

def forked(fn):
    """fn() in a forked child; -> (pid, a file that reads what the child writes to its fd 1)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        sys.stdout = os.fdopen(write, "w", buffering=1)
        try:
            fn()
        except BaseException as e:
            print(f"{type(e).__name__}: {e}")
        finally:
            os._exit(0)
    os.close(write)
    return pid, os.fdopen(read)


def test_a_second_run_or_resume_in_the_same_out_dir_is_refused_naming_the_first(
        tiny, stopped, tmp_path, monkeypatch):
    """The lock is held for the whole run and released by the OS when the process dies (kill -9
    here): the same --resume then goes through."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # it would warn about the fork
    out = shutil.copytree(stopped, tmp_path / "out")

    def hold():  # the first run, halted once it has started (its first line printed)
        monkeypatch.setattr(train, "describe", lambda *a: print("started") or time.sleep(120))
        train.main(cfg(tiny, out, epochs=2, resume=True))
    pid, lines = forked(hold)
    assert lines.readline() == "started\n"
    refused = (rf"--out_dir {re.escape(str(out))} is in use by another run \(pid {pid}, started "
               r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\): wait for it to end, or use another --out_dir")
    before = (out / "ckpt.pt").read_bytes()
    for again in (cfg(tiny, out, epochs=2, resume=True), cfg(tiny, out, epochs=2)):
        with pytest.raises(train.UserError, match=f"^{refused}$"):
            train.main(again)
    assert (out / "ckpt.pt").read_bytes() == before
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    lines.close()
    assert train.main(cfg(tiny, out, epochs=2, resume=True))["history"][-1]["step"] == 12


def test_a_new_run_is_refused_where_a_stopped_run_waits_for_resume(tiny, stopped, tmp_path):
    """Forgetting --resume used to overwrite the stopped run's ckpt.pt; a finished run's out_dir
    can still be reused (tests/test_hardening.py: a run never reports a model.pt ...)."""
    out = shutil.copytree(stopped, tmp_path / "out")
    run_id = torch.load(out / "ckpt.pt", weights_only=True)["run_id"]
    before = (out / "ckpt.pt").read_bytes()
    with pytest.raises(train.UserError, match=re.escape(
            f"{out / 'ckpt.pt'} holds run {run_id}, stopped at step 2: continue it with --resume, "
            "or start this run in another --out_dir")):
        train.main(cfg(tiny, out, epochs=2))
    assert (out / "ckpt.pt").read_bytes() == before


def test_resume_of_a_finished_run_says_so_and_changes_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    done = train.main(cfg(tiny, out))
    files = {name: (out / name).read_bytes() for name in ("ckpt.pt", "model.pt", "metrics.json")}
    capsys.readouterr()
    again = train.main(cfg(tiny, out, resume=True))
    assert capsys.readouterr().out == (
        f"{out / 'ckpt.pt'}: run {done['run_id']} finished at step 6; its test results are in "
        f"{out / 'metrics.json'}: nothing to resume\n")
    assert again == json.loads(files["metrics.json"])  # not re-tested with steps_per_s 0.0
    assert {name: (out / name).read_bytes() for name in files} == files


# ----------------------------------------------------------------------------- every write whole

def no_temporaries(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path):
    """Any OSError while writing: one line naming the file and the reason; the temporary removed,
    the previous file as it was."""
    path = tmp_path / "metrics.json"
    path.write_text("{}")

    def full(f):
        f.write(b"{" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(train.UserError, match=re.escape(
            f"{path}: could not write it (No space left on device); the previous metrics.json "
            "is kept")):
        train.write_atomic(path, full)
    assert path.read_text() == "{}" and no_temporaries(tmp_path)
    with pytest.raises(train.UserError, match=re.escape(
            f"{tmp_path / 'new.pt'}: could not write it (No space left on device); nothing "
            "was written")):
        train.write_atomic(tmp_path / "new.pt", full)
    assert not (tmp_path / "new.pt").exists() and no_temporaries(tmp_path)


def test_a_file_size_limit_during_a_run_is_one_line_and_the_checkpoint_is_kept(
        tiny, stopped, tmp_path, monkeypatch):
    """ulimit -f in a forked child: torch.save's RuntimeError ("unexpected pos") becomes the
    OSError it hides. The stopped run resumes, and its first model.pt (18 kB) fails."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    out = shutil.copytree(stopped, tmp_path / "out")
    before = (out / "ckpt.pt").read_bytes()

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000))
        train.main(cfg(tiny, out, epochs=2, resume=True))
    pid, lines = forked(limited)
    said = lines.read().splitlines()[-1]
    os.waitpid(pid, 0)
    assert said == (f"UserError: {out / 'model.pt'}: could not write it (File too large); "
                    "nothing was written")
    assert (out / "ckpt.pt").read_bytes() == before and no_temporaries(out)


def test_a_full_disk_at_metrics_json_names_it(tiny, tmp_path, monkeypatch):
    """The disk fills while metrics.json is synced: the file's earlier content stays."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    sync = os.fsync

    def full_at_metrics(fd):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(out / ".metrics.json.")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        sync(fd)
    monkeypatch.setattr(os, "fsync", full_at_metrics)
    with pytest.raises(train.UserError, match=re.escape(
            f"{out / 'metrics.json'}: could not write it (No space left on device); the previous "
            "metrics.json is kept")):
        train.main(cfg(tiny, out))
    assert (out / "metrics.json").read_text() == "{}" and no_temporaries(out)


def test_a_symlink_planted_at_a_temporary_name_is_not_followed(tiny, tmp_path):
    """The temporaries used to be opened by fixed names (ckpt.pt.tmp), following symlinks: a link
    planted in a shared out_dir made the run overwrite a file outside it."""
    out, victim = tmp_path / "out", tmp_path / "victim"
    out.mkdir()
    victim.write_text("precious")
    for name in ("ckpt.pt", "model.pt", "metrics.json", ".lock"):
        (out / f"{name}.tmp").symlink_to(victim)
    (out / ".ckpt.pt.k9x2ab7q.tmp").write_text("half")  # left by a kill -9: removed at the start
    train.main(cfg(tiny, out))
    assert victim.read_text() == "precious" and not (out / ".ckpt.pt.k9x2ab7q.tmp").exists()
    assert all((out / f"{name}.tmp").is_symlink() for name in ("ckpt.pt", "model.pt"))
    (out / ".lock").unlink()
    (out / ".lock").symlink_to(victim)  # the lock file itself: refused, not followed
    with pytest.raises(train.UserError, match=re.escape(
            f"--out_dir {out}: [Errno {errno.ELOOP}] Too many levels of symbolic links: "
            f"'{out / '.lock'}'")):
        train.main(cfg(tiny, out))
    assert victim.read_text() == "precious"


def test_a_file_the_run_cannot_replace_is_refused_at_the_start(tiny, tmp_path):
    """A folder named model.pt; an immutable model.pt (chattr +i, as root): both used to fail after
    an epoch of training."""
    out = tmp_path / "out"
    (out / "model.pt").mkdir(parents=True)
    with pytest.raises(train.UserError, match=re.escape(
            f"{out / 'model.pt'} is a folder: the run writes its best weights there; move it, or "
            "use another --out_dir")):
        train.main(cfg(tiny, out))
    assert not (out / "ckpt.pt").exists()
    (out / "model.pt").rmdir()
    (out / "model.pt").write_text("an old model")
    if os.geteuid() != 0 or subprocess.run(["chattr", "+i", str(out / "model.pt")]).returncode:
        pytest.skip("chattr +i needs root and a file system that supports it")
    try:
        with pytest.raises(train.UserError, match=re.escape(
                f"{out / 'model.pt'}: the run could not replace it (Operation not permitted)")):
            train.main(cfg(tiny, out))
    finally:
        subprocess.run(["chattr", "-i", str(out / "model.pt")])
    assert not (out / "ckpt.pt").exists() and no_temporaries(out)
    assert (out / "model.pt").read_text() == "an old model"


def test_ctrl_c_says_where_the_last_checkpoint_is_and_exits_130(tiny, tmp_path, monkeypatch,
                                                                capsys):
    ckpt, glue = tiny
    calls = []
    real = adamix.consistency_loss

    def interrupted_at(n):
        def loss(*a, **kw):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real(*a, **kw)
        return loss
    for n, out, said in [  # 6 steps an epoch; each runpy has its own train module and locks
            (1, tmp_path / "a", "stopped (Ctrl-C) before the first checkpoint: nothing to resume"),
            (9, tmp_path / "b", f"stopped (Ctrl-C); the last checkpoint is "
                                f"{tmp_path / 'b' / 'ckpt.pt'}: continue with --resume")]:
        calls.clear()
        monkeypatch.setattr(adamix, "consistency_loss", interrupted_at(n))
        monkeypatch.setattr(sys, "argv", [
            "train.py", "--model", str(ckpt), "--task", "sst2", "--data_dir", str(glue),
            "--max_len", "16", "--experts", "2", "--bottleneck", "8", "--batch_size", "16",
            "--epochs", "2", "--out_dir", str(out)])
        with pytest.raises(SystemExit) as exit:
            runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
        assert exit.value.code == 130
        assert capsys.readouterr().err.splitlines()[-1] == said


def test_a_file_system_without_locks_warns_and_runs(tiny, tmp_path, monkeypatch, capsys):
    """Lustre mounted without -o flock, say: the run goes on, and says what it cannot promise."""
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(train.fcntl, "flock", no_locks)
    out = tmp_path / "out"
    assert train.main(cfg(tiny, out))["history"][-1]["step"] == 6
    assert capsys.readouterr().out.startswith(
        f"warning: {out / '.lock'}: could not lock it (No locks available); another run in "
        f"--out_dir {out} would not be noticed\n")
