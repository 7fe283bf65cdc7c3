"""Hardening, tried as a hostile user would: every bad flag, file and state is refused before training with a
message that names the flag, the file or the line; a run reports only what it produced; a run killed with
kill -9 at random moments resumes to the weights and metrics of an uninterrupted run."""
import dataclasses
import json
import os
import random
import re
import runpy
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, ROOT
from test_data import fake_sdist
from test_train import synthetic_sst2, tiny_checkpoint
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import adamix
import data
import formats
import model
import train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BERT with our words and a small synthetic SST-2: a whole run takes about a second."""
    root = tmp_path_factory.mktemp("tiny")
    return tiny_checkpoint(root / "ckpt"), synthetic_sst2(root / "glue", n_train=96, n_test=32)


def cfg(tiny, out_dir, **kw):
    ckpt, glue = tiny
    base = dict(model=str(ckpt), task="sst2", data_dir=str(glue), experts=2, bottleneck=8, epochs=1, batch_size=16,
                lr=1e-2, max_len=16, eval_batch_size=64, log_interval=10_000, out_dir=str(out_dir))
    return train.TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def stopped(tiny, tmp_path_factory):
    """An out_dir whose run stopped (as if killed) after step 2: ckpt.pt, no model.pt yet."""
    out = tmp_path_factory.mktemp("stopped")
    assert train.main(cfg(tiny, out, epochs=2, stop_after=2)) is None
    return out

# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("flags, message", [
    (dict(batch_size=0), "--batch_size 0: must be >= 1"),
    (dict(experts=0), "--experts 0: must be >= 1"),
    (dict(eval_limit=-1), "--eval_limit -1: must be >= 0"),
    (dict(log_interval=0), "--log_interval 0: must be >= 1"),
    (dict(grad_accum=0), "--grad_accum 0: must be >= 1"),
    (dict(max_len=0), "--max_len 0: must be >= 1"),
    (dict(seed=-1), "--seed -1: must be in [0, 2^63)"),
    (dict(lr=0.0), "--lr 0.0: must be > 0"),
    (dict(lr=float("nan")), "--lr nan: expected a finite number"),
    (dict(lora_dropout=1.0), "--lora_dropout 1.0: must be in [0, 1)"),
    (dict(label_smoothing=-0.1), "--label_smoothing -0.1: must be in [0, 1)"),
    (dict(warmup=-1.0), "--warmup -1.0: must be >= 0"),
    (dict(consistency=-0.5), "--consistency -0.5: must be >= 0, or -1"),
    (dict(method="moe"), "--method 'moe': choose one of adamix-adapter,"),
    (dict(out_dir=" "), "--out_dir ' ': must be a non-empty string"),
    (dict(batch_size="8"), "--batch_size '8': expected int"),
    (dict(resume=1), "--resume 1: expected bool"),
    (dict(epochs=0), "--epochs 0 and --max_steps 0: nothing to train"),
])
def test_a_bad_flag_is_refused_by_name_before_anything_is_read(flags, message, tmp_path):
    config = dataclasses.replace(train.TrainConfig(model=str(tmp_path / "no-such-model"), out_dir=str(tmp_path / "o")),
                                 **flags)
    with pytest.raises(train.UserError, match=re.escape(message)):
        train.main(config)
    assert list(tmp_path.iterdir()) == []  # refused before any folder was made or any file read


def test_every_number_flag_has_a_range_check():
    """A new int or float flag in TrainConfig needs its check= (a rule of train.RULES) in flag(...)."""
    fields = dataclasses.fields(train.TrainConfig)
    checked = {f.name for f in fields if "check" in f.metadata}
    assert {f.metadata["check"] for f in fields if f.name in checked} <= set(train.RULES)
    any_number = {"length_penalty"}  # below 0 favours short texts, above 0 long ones: any finite value
    assert {f.name for f in fields if type(f.default) in (int, float)} - checked - any_number == set()
    assert all(f.default in f.metadata.get("choices", [f.default]) for f in fields)
    train.check_config(train.TrainConfig())  # the defaults pass their own checks


def test_help_groups_every_flag_with_its_comment():
    """--help's groups are TrainConfig's commented sections, in order; each flag's help is the comment
    after its field, continued on the lines under it."""
    groups, comments = train.flag_help()
    assert list(groups) == ["what to train", "adaptation modules",
                            "optimisation (out of memory? lower batch_size and raise grad_accum)",
                            "evaluation and output"]
    names = [name for group in groups.values() for name in group]
    assert names == [f.name for f in dataclasses.fields(train.TrainConfig)]
    assert comments["method"] == "baselines: one adapter, one LoRA, the head alone, everything (full)"
    assert comments["precision"].endswith("else fp32; --resume: the run's own")
    assert comments["log_interval"] == "" and comments["lora_rank"] == "LoRA rank r (GPT-2 E2E: 4)"
    may_change = {f.name for f in dataclasses.fields(train.TrainConfig) if f.metadata.get("on_resume")}
    # how to evaluate and where to write; not eval_limit: the best epoch is chosen by its dev scores
    assert may_change == set(groups["evaluation and output"]) - {"eval_limit"}


def test_python_train_py_prints_one_line_and_exits_nonzero_for_a_user_error(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--batch_size", "0", "--experts", "0", "--lr", "1e-3"])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    # SystemExit with a string: Python prints it to stderr, without a traceback, and exits with status 1
    assert exit.value.code == "error: --experts 0: must be >= 1; --batch_size 0: must be >= 1"


def test_an_internal_error_keeps_its_traceback(tiny, tmp_path, monkeypatch):
    """A ValueError raised by the training itself is a bug, not the user's: it is not made a one-line message."""
    def broken(*args, **kw):
        raise ValueError("a bug inside the loop")
    monkeypatch.setattr(adamix, "consistency_loss", broken)
    ckpt, glue = tiny
    monkeypatch.setattr(sys, "argv", ["train.py", "--model", str(ckpt), "--task", "sst2", "--data_dir", str(glue),
                                      "--max_len", "16", "--experts", "2", "--out_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="a bug inside the loop"):
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")

# ----------------------------------------------------------------------------- the data and the model fit


def test_max_len_too_short_for_the_special_tokens(tiny, tmp_path):
    for n in (1, 2):  # tokenizers silently ignores such a max_len (1: no truncation at all; 2: [CLS] [SEP] only)
        with pytest.raises(train.UserError, match=f"max_len {n} leaves no room for text: the tokenizer adds 2 "
                                                  "special tokens to each sentence; use >= 3"):
            train.main(cfg(tiny, tmp_path / "out", max_len=n))
    tok = formats.load_tokenizer(tiny[0])
    with pytest.raises(ValueError, match="adds 3 special tokens to each pair; use >= 5"):
        data.encode_examples([data.Example("a film", "the plot", 1)], tok, max_len=4)
    assert len(data.encode_examples([data.Example("a film", "the plot", 1)], tok, max_len=5)[0]["input_ids"]) == 5


def test_an_example_longer_than_the_positions_in_the_test_split_is_refused_before_training(tiny, tmp_path):
    glue = synthetic_sst2(tmp_path / "glue", n_train=64, n_test=16)
    with open(glue / "SST-2" / "dev.tsv", "a") as f:  # GLUE's dev file is our test split, read only at the end
        f.write(" ".join(["film"] * 80) + "\t1\n")
    with pytest.raises(train.UserError, match=r"test split: an example of 82 tokens, but .* has 64 positions: "
                                              r"use --max_len 64 or less"):
        train.main(cfg((tiny[0], glue), tmp_path / "out", max_len=100))
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_token_types_beyond_the_model_are_refused_before_training(tmp_path):
    """A BERT vocab.txt (pairs get token types 0 and 1) with a RoBERTa model (type_vocab_size 1)."""
    ckpt = tiny_checkpoint(tmp_path / "roberta", source="tiny-roberta")
    (tmp_path / "glue" / "RTE").mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        rows = ["index\tsentence1\tsentence2\tlabel"] + [f"{i}\tthe film {i}\ta plot\tentailment" for i in range(30)]
        (tmp_path / "glue" / "RTE" / name).write_text("\n".join(rows) + "\n")
    with pytest.raises(train.UserError, match=r"train split: token type 1, but .* has type_vocab_size 1"):
        train.main(cfg((ckpt, tmp_path / "glue"), tmp_path / "out", task="rte"))


def test_forward_refuses_token_ids_and_types_outside_the_model():
    net = model.from_pretrained(FIXTURES / "tiny-bert")  # vocab_size 1000, type_vocab_size 2
    with pytest.raises(ValueError, match="token ids run from 1 to 1000, but the model's vocab_size is 1000"):
        net(torch.tensor([[1, 2, 1000]]))
    with pytest.raises(ValueError, match="token ids run from -1 to 2"):
        net(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="token types run from 0 to 2, but the model's type_vocab_size is 2"):
        net(torch.tensor([[1, 2]]), token_type_ids=torch.tensor([[0, 2]]))
    assert net(torch.tensor([[0, 999]]), token_type_ids=torch.tensor([[0, 1]])).shape == (1, 2, 32)  # the edges


def tiny_e2e(tmp_path):
    """A tiny GPT-2 (64 positions) with a word-level tokenizer, and E2E files; the test prompt has 15 tokens."""
    vocab = ["<|endoftext|>"] + "name food area serves in the [ ] , . Aromi Italian riverside".split()
    folder = shutil.copytree(FIXTURES / "tiny-gpt2", tmp_path / "gpt2")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece(prefix="##")
    tok.save(str(folder / "tokenizer.json"))
    mr = "name [ Aromi ] , food [ Italian ] , area [ riverside ]"
    lines = [f"{mr}{' .' * i}||Aromi serves Italian food in the riverside ." for i in range(30)]  # 30 mrs
    (tmp_path / "e2e").mkdir()
    (tmp_path / "e2e" / "valid.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "e2e" / "test.txt").write_text(lines[0] + "\n")
    return folder, tmp_path / "e2e"


def test_a_decoder_prompt_plus_new_tokens_beyond_the_positions_is_refused_before_training(tmp_path):
    gpt2, e2e = tiny_e2e(tmp_path)
    config = cfg((gpt2, e2e), tmp_path / "out", task="e2e", method="adamix-lora", max_len=64, max_new_tokens=50)
    with pytest.raises(train.UserError, match=r"test split: a prompt of 15 tokens plus --max_new_tokens 50 is "
                                              r"more than the 64 positions"):
        train.main(config)
    assert not (tmp_path / "out" / "ckpt.pt").exists()
    with pytest.raises(train.UserError, match="--task e2e trains a language model: --model must be a decoder"):
        train.main(dataclasses.replace(config, model=str(tiny_checkpoint(tmp_path / "bert"))))


def test_empty_splits_are_refused_with_their_sizes(tiny, tmp_path):
    glue = synthetic_sst2(tmp_path / "glue", n_train=1, n_test=4)
    with pytest.raises(train.UserError, match=r"--task sst2: \d train / \d dev / 4 test examples after splitting; "
                                              "every split needs at least one"):
        train.main(cfg((tiny[0], glue), tmp_path / "out"))
    (tmp_path / "file").write_text("")
    with pytest.raises(train.UserError, match=re.escape(f"{tmp_path / 'file'} is a file, not a folder of data")):
        train.main(cfg((tiny[0], tmp_path / "file"), tmp_path / "out"))


def test_an_out_dir_that_cannot_be_written_is_refused_at_the_start(tiny, tmp_path):
    (tmp_path / "file").write_text("")
    unwritable = [tmp_path / "file", tmp_path / "file" / "sub"] + [Path("/proc/self")] * Path("/proc/self").is_dir()
    for out in unwritable:  # /proc/self: a folder that exists, where even root cannot create a file
        with pytest.raises(train.UserError, match=f"--out_dir {re.escape(str(out))}: "):
            train.main(cfg(tiny, out))

# ----------------------------------------------------------------------------- files name themselves


def test_a_tsv_or_e2e_file_that_is_not_utf8_or_has_a_huge_line_names_file_and_line(tmp_path):
    f = tmp_path / "train.tsv"
    f.write_bytes(b"sentence\tlabel\ngood film\t1\nun caf\xe9 bad\t0\n")
    with pytest.raises(ValueError, match=r"train.tsv:3: byte 0xe9 at column 7 is not UTF-8"):
        data.read_glue(f, "sst2")
    f.write_text("sentence\tlabel\ngood film\t1\n" + "word " * 30_000 + "\t0\n")
    with pytest.raises(ValueError, match=r"train.tsv:3: field larger than field limit"):
        data.read_glue(f, "sst2")
    e2e = tmp_path / "valid.txt"
    e2e.write_bytes(b"name [A]||A .\nname [Caf\xe9]||Caf\xe9 .\n")
    with pytest.raises(ValueError, match=r"valid.txt:2: byte 0xe9 at column 10 is not UTF-8"):
        data.read_e2e(e2e)
    sdist = fake_sdist(tmp_path / "v.tar.gz", b"1\t2.3\tA film .\r\n2\t0.5\tclich\xe9s\r\n")
    with pytest.raises(ValueError, match=r"movieReviewSnippets_GroundTruth.txt:2: byte 0xe9"):
        data.read_mr(sdist)


def test_an_e2e_meaning_representation_that_fills_max_len_names_the_folder_and_split(tmp_path):
    gpt2, e2e = tiny_e2e(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"{e2e}, train split: the meaning representation")):
        data.load_task("e2e", formats.load_tokenizer(gpt2), data_dir=e2e, max_len=10)


GOOD = json.loads((FIXTURES / "tiny-bert" / "config.json").read_text())


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object {...}, found a list"),
    (json.dumps({**GOOD, "model_type": ["bert"]}), "model_type ['bert'] is not supported"),
    (json.dumps({**GOOD, "hidden_size": "32"}), "hidden_size is '32', expected a positive integer"),
    (json.dumps({**GOOD, "num_hidden_layers": 2.5}), "num_hidden_layers is 2.5, expected a positive integer"),
    (json.dumps({**GOOD, "num_attention_heads": 0}), "num_attention_heads is 0, expected a positive integer"),
    (json.dumps({**GOOD, "hidden_dropout_prob": "x"}), "hidden_dropout_prob is 'x', expected a number in [0, 1)"),
    (json.dumps({**GOOD, "type_vocab_size": True}), "type_vocab_size is True, expected an integer >= 0"),
])
def test_a_bad_config_json_names_the_file_and_the_key(tmp_path, text, message):
    folder = shutil.copytree(FIXTURES / "tiny-bert", tmp_path / "m")
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'config.json'}: {message}")):
        model.from_pretrained(folder, num_labels=2)


class Evil:
    def __reduce__(self):  # unpickling this would run print(...): weights_only must refuse it
        return (print, ("pwned",))


def test_corrupt_tokenizer_and_weight_files_name_the_file(tmp_path):
    folder = tiny_checkpoint(tmp_path / "m")
    (folder / "tokenizer.json").write_text("{bad")
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'tokenizer.json'}: not a valid tokenizer file")):
        formats.load_tokenizer(folder)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").write_text("[")
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'tokenizer_config.json'}: not valid JSON")):
        formats.load_tokenizer(folder)
    (folder / "tokenizer_config.json").unlink()
    (folder / "vocab.txt").write_bytes(b"[PAD]\n[UNK]\n[CLS]\n[SEP]\ncaf\xe9\n")
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'vocab.txt'}: not a valid tokenizer file")):
        formats.load_tokenizer(folder)
    weights = folder / "pytorch_model.bin"
    torch.save({"wte.weight": Evil()}, weights)
    with pytest.raises(ValueError, match=re.escape(f"{weights}: refused, it holds objects other than tensors")):
        model.from_pretrained(folder)
    torch.save({"a": torch.zeros(100)}, weights)
    weights.write_bytes(weights.read_bytes()[:300])
    with pytest.raises(ValueError, match=re.escape(f"{weights}: not a readable torch.save file")):
        model.from_pretrained(folder)


@pytest.mark.parametrize("damage, message", [
    ("truncate", "not a readable torch.save file"),
    ("foreign", "not a checkpoint of this train.py (no run_id, config, step"),
    ("list", "holds a list, expected a dict"),
    ("evil", "refused, it holds objects other than tensors"),
])
def test_a_damaged_or_foreign_ckpt_pt_is_refused_by_name(tiny, stopped, tmp_path, damage, message):
    out = shutil.copytree(stopped, tmp_path / "out")
    path = out / "ckpt.pt"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-200])
    else:
        torch.save({"list": [1, 2], "evil": {"x": Evil()}, "foreign": {"state_dict": {}}}[damage], path)
    with pytest.raises(train.UserError, match=re.escape(f"{path}: {message}")):
        train.main(cfg(tiny, out, epochs=2, resume=True))

# ----------------------------------------------------------------------------- a run reports only what it produced


def test_resume_refuses_flags_that_differ_from_the_checkpoint_and_names_them(tiny, stopped, tmp_path):
    out = shutil.copytree(stopped, tmp_path / "out")
    with pytest.raises(train.UserError) as err:
        train.main(cfg(tiny, out, epochs=2, resume=True, batch_size=8, lr=0.5, seed=3))
    assert str(err.value).startswith(f"{out / 'ckpt.pt'} was made with --lr 0.01 (now 0.5), --batch_size 16 (now 8), "
                                     "--seed 0 (now 3): --resume continues a run with its own flags; ")
    stored = train.TrainConfig(**torch.load(out / "ckpt.pt", weights_only=True)["config"])
    allowed = dict(out_dir="elsewhere", log_interval=1, eval_batch_size=3, stop_after=9, beam=2)
    keys = "step"
    assert train.load_checkpoint(out / "ckpt.pt", "cpu", keys, dataclasses.replace(stored, **allowed))["step"] == 2
    with pytest.raises(train.UserError, match=r"--grad_accum 1 \(now 2\)"):
        train.load_checkpoint(out / "ckpt.pt", "cpu", keys, dataclasses.replace(stored, grad_accum=2))
    with pytest.raises(train.UserError, match="made by 1 ranks, not 2: resume it with as many"):
        train.load_checkpoint(out / "ckpt.pt", "cpu", keys, stored, world=2)
    with pytest.raises(train.UserError, match="does not exist: nothing to resume, start without --resume"):
        train.main(cfg(tiny, tmp_path / "empty", resume=True))
    legacy = torch.load(out / "ckpt.pt", weights_only=True)  # from a train.py before run ids: still resumable
    del legacy["run_id"]
    torch.save(legacy, out / "ckpt.pt")
    assert train.load_checkpoint(out / "ckpt.pt", "cpu", "run_id weights", stored)["run_id"] == "before run ids"


def test_a_run_never_reports_a_model_pt_it_did_not_write(tiny, tmp_path):
    out = tmp_path / "out"
    first = train.main(cfg(tiny, out))
    assert torch.load(out / "model.pt", weights_only=True)["run_id"] == first["run_id"]
    before = (out / "metrics.json").read_bytes()
    with pytest.raises(train.UserError, match="--epochs 0 and --max_steps 0: nothing to train"):
        train.main(cfg(tiny, out, epochs=0))  # used to test the old model.pt and report it as this run's
    assert (out / "metrics.json").read_bytes() == before
    # a second run in the same out_dir stops after its last step; meanwhile the first run's model.pt comes back
    old = (out / "model.pt").read_bytes()
    assert train.main(cfg(tiny, out, max_steps=1, stop_after=1)) is None
    (out / "model.pt").write_bytes(old)
    with pytest.raises(train.UserError, match=f"model.pt was written by run {first['run_id']}, not this run"):
        train.main(cfg(tiny, out, max_steps=1, stop_after=1, resume=True))
    assert (out / "metrics.json").read_bytes() == before


def test_leftover_batches_of_gradient_accumulation_are_used(tiny, tmp_path, monkeypatch):
    seen, real = [], train.training_loss
    monkeypatch.setattr(train, "training_loss", lambda net, router, batch, *a: seen.append(len(batch["labels"]))
                        or real(net, router, batch, *a))
    results = train.main(cfg(tiny, tmp_path / "out", grad_accum=4))
    n_train = len(data.load_task("sst2", formats.load_tokenizer(tiny[0]), tiny[1], max_len=16).splits["train"])
    assert len(seen) % 4 != 0  # the case of interest: 4 does not divide the batches
    assert sum(seen) == n_train  # every training example once
    assert results["history"][-1]["step"] == -(-len(seen) // 4)  # the last step took the leftover batches


def test_a_nan_before_the_first_checkpoint_names_no_checkpoint(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "training_loss", lambda *a: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit, match=r"^step 0: the loss is nan; stopping \(no checkpoint yet\)\. Start again"):
        train.main(cfg(tiny, tmp_path / "out"))
    assert not (tmp_path / "out" / "ckpt.pt").exists()

# ----------------------------------------------------------------------------- kill -9


def run_forked(config, kill_after=None):
    """train.main(config) in a forked child (torch is already imported: no start-up cost), killed with
    SIGKILL kill_after seconds after it prints its first line (loading done), unless it ends before.
    -> (killed, seconds from its first line to its end)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one run of train.py
        os.close(read)
        sys.stdout = os.fdopen(write, "w", buffering=1)
        code = 1
        try:
            train.main(config)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as lines:
        lines.readline()  # the first line: parameter counts and sizes, printed when training starts
        t0 = time.time()
        if kill_after is not None:
            time.sleep(kill_after)
            os.kill(pid, signal.SIGKILL)  # no effect if it has ended already
        lines.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 0, "the child failed: see its traceback above"
    return os.WIFSIGNALED(status), time.time() - t0


@pytest.mark.parametrize("native_bf16", [False, True])
def test_kill_9_at_random_moments_then_resume_ends_like_an_uninterrupted_run(tiny, tmp_path, monkeypatch,
                                                                             native_bf16):
    """With --precision auto (the default), on a processor with native bf16 and on one without: every
    process of the run, forked and resumed, trains in the same precision and ends bit-identical."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # it would warn about the fork
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: native_bf16)
    kw = dict(epochs=3, batch_size=16, log_interval=1)  # 6 steps an epoch, a checkpoint after each
    _, seconds = run_forked(cfg(tiny, tmp_path / "straight", **kw))  # training and test, after loading
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    total = straight["history"][-1]["step"]
    rng, out, kills, resumed = random.Random(0), tmp_path / "killed", [], 0
    for attempt in range(8):
        resume = (out / "ckpt.pt").exists()
        done = torch.load(out / "ckpt.pt", weights_only=True)["step"] / total if resume else 0.0
        kill_after = rng.uniform(0.05, 0.7) * (1 - done) * seconds if len(kills) < 3 else None  # then to the end
        killed, _ = run_forked(cfg(tiny, out, resume=resume, **kw), kill_after)
        if not killed and not kills:  # it ended before the first kill (the machine was faster): start again
            shutil.rmtree(out)
            continue
        resumed += resume
        if not killed:
            break
        kills.append(f"{kill_after:.3f} s after loading, from step {round(done * total)}")
    assert kills and resumed, f"no kill landed: kills {kills}, runs resumed {resumed}"
    got = json.loads((out / "metrics.json").read_text())
    assert got["precision"] == straight["precision"] == ("bf16" if native_bf16 else "fp32")
    assert got["test"] == straight["test"], kills
    assert [(h["step"], h["dev"], h["train_loss"]) for h in got["history"]] == \
        [(h["step"], h["dev"], h["train_loss"]) for h in straight["history"]], kills
    for name in ("ckpt.pt", "model.pt"):
        a, b = (torch.load(d / name, weights_only=True)["weights"] for d in (tmp_path / "straight", out))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (name, kills)
