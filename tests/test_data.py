"""data.py: readers on hand-made files, metrics on hand-computed values, tokenisation and batching."""
import functools
import http.server
import io
import math
import tarfile
import threading
import zipfile

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing

from conftest import SHARED
import data
import formats

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<|endoftext|>"]
WORDS = "a b c d e good bad film name : Aromi | eatType pub is the".split()


@pytest.fixture
def tok():
    """A tiny BERT-style tokenizer: whole words, [CLS] a [SEP] (b [SEP]) with token types 0/1."""
    t = Tokenizer(WordLevel({w: i for i, w in enumerate(SPECIALS + WORDS)}, unk_token="[UNK]"))
    t.pre_tokenizer = Whitespace()
    t.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                          special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return t


def ids(tok, text):
    return [tok.token_to_id(w) for w in text.split()]

# ----------------------------------------------------------------------------- metrics


def test_classification_metrics_by_hand():
    # accuracy: 3 of 4 right
    assert data.accuracy([1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 0.75}
    # tp=2, fp=1, fn=0: precision 2/3, recall 1, F1 = 2*(2/3)*1/(2/3+1) = 0.8
    assert data.f1_accuracy([1, 0, 1, 1], [1, 0, 0, 1]) == pytest.approx({"f1": 0.8, "accuracy": 0.75})
    # tp=2 (0,4) fp=1 (1) tn=2 (2,3) fn=1 (5): (2*2 - 1*1) / sqrt(3*3*3*3) = 3/9
    assert data.matthews([1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1])["mcc"] == pytest.approx(1 / 3)
    assert data.matthews([1, 1, 1], [1, 0, 1])["mcc"] == 0.0      # one predicted class: undefined -> 0
    assert data.f1_accuracy([0, 0], [1, 0])["f1"] == 0.0
    with pytest.raises(ValueError):
        data.accuracy([1, 0], [1])


def test_correlations_by_hand():
    # x - mean = [-1.5, -.5, .5, 1.5], y - mean = [-3, -1, 0, 4]: sum dx*dy = 11, sum dx^2 = 5,
    # sum dy^2 = 26, Pearson = 11 / sqrt(130)
    assert data.correlations([1, 2, 3, 4], [2, 4, 5, 9])["pearson"] == pytest.approx(11 / math.sqrt(130))
    # ties: ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4], of [1, 3, 2, 4] are [1, 3, 2, 4]; centred:
    # [-1.5, 0, 0, 1.5] and [-1.5, .5, -.5, 1.5]: 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    got = data.correlations([1, 2, 2, 3], [1, 3, 2, 4])
    assert got["spearman"] == pytest.approx(math.sqrt(0.9))
    assert data._average_ranks(np.array([7, 5, 7, 9, 7])).tolist() == [3, 1, 3, 5, 3]


def test_bleu_by_hand():
    hyps = ["a b c d e", "a a a b"]
    refs = [["a b c d f g", "x y"], ["a b a c", "a a"]]
    # sentence 1: 1-grams 4/5, 2-grams 3/4 (ab bc cd), 3-grams 2/3, 4-grams 1/2; closest ref length 6.
    # sentence 2: 1-grams a:3 clipped to 2 (max over refs), b:1 -> 3/4; 2-grams aa x2 clipped to 1
    #   (second ref), ab 1 -> 2/3; 3-grams 0/2; 4-grams 0/1; closest ref length 4.
    # corpus: p1 = 7/9, p2 = 5/7, p3 = 2/5, p4 = 1/3, product 2/27; c = 9, r = 10, BP = exp(1 - 10/9)
    expected = math.exp(1 - 10 / 9) * (2 / 27) ** 0.25
    assert data.corpus_bleu(hyps, refs) == pytest.approx(expected)
    assert data.corpus_bleu(["The pub, Aromi."], [["x", "the pub , aromi ."]]) == pytest.approx(1.0)
    assert data.corpus_bleu(["a b c"], [["a b c"]]) == 0.0        # no 4-gram at all: p4 = 0, no smoothing
    # closest reference length: 4 and 6 are both 1 away from 5, the shorter wins: r = 4 < c, BP = 1
    # (with 6 it would be exp(1 - 6/5)); every n-gram of the hypothesis is in the second reference
    assert data.corpus_bleu(["a b c d e"], [["a b c d", "a b c d e f"]]) == pytest.approx(1.0)


def test_rouge_l_by_hand():
    # LCS with "a c d e f" = 3 (a c d): P 3/4, R 3/5; with "b d" = 2: P 2/4, R 2/2.
    # max P = 3/4, max R = 1: F = (1 + 1.44) * .75 * 1 / (1 + 1.44 * .75) = 1.83 / 2.08
    assert data.rouge_l(["a b c d"], [["a c d e f", "b d"]]) == pytest.approx(1.83 / 2.08)
    assert data.rouge_l(["a b", "x"], [["a b"], ["y"]]) == pytest.approx(0.5)    # mean of 1 and 0

# ----------------------------------------------------------------------------- GLUE readers

MNLI_HEAD = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
             "sentence1_parse\tsentence2_parse\tsentence1\tsentence2")
GLUE_FILES = {  # task: (file text, expected examples)
    "mnli": (MNLI_HEAD + "\tlabel1\tgold_label\n0\t1\t1e\tgov\t(x)\t(y)\t(X)\t(Y)\tA \"quoted\tB\tneutral\tneutral\n"
             "1\t2\t2c\tfic\t(x)\t(y)\t(X)\t(Y)\tC\tD\tcontradiction\tcontradiction\n",
             [("A \"quoted", "B", 1), ("C", "D", 2)]),
    "qnli": ("index\tquestion\tsentence\tlabel\n0\tWho?\tHe.\tentailment\n1\tWhy?\tNo.\tnot_entailment\n",
             [("Who?", "He.", 0), ("Why?", "No.", 1)]),
    "sst2": ("sentence\tlabel\nit 's a \"charming film \t1\nbad \t0\n", [("it 's a \"charming film ", None, 1), ("bad ", None, 0)]),
    "qqp": ("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n7\t1\t2\tHow?\tHow so?\t1\n8\t3\t4\tA\tB\t0\n",
            [("How?", "How so?", 1), ("A", "B", 0)]),
    "mrpc": ("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t11\t12\tHe left.\tHe went.\n0\t13\t14\tX\tY\n",
             [("He left.", "He went.", 1), ("X", "Y", 0)]),
    "cola": ("gj04\t1\t\tOur friends won't buy this.\ngj04\t0\t*\tOne more pseudo.\n",
             [("Our friends won't buy this.", None, 1), ("One more pseudo.", None, 0)]),
    "rte": ("index\tsentence1\tsentence2\tlabel\n0\tP\tH\tnot_entailment\n", [("P", "H", 1)]),
    "stsb": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
             "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane.\tAn air plane.\t5.000\n"
             "1\tmain-news\tx\t2012\t2\tnone\tnone\tA\tB\t0.75\n", [("A plane.", "An air plane.", 5.0), ("A", "B", 0.75)]),
}


@pytest.mark.parametrize("task", sorted(GLUE_FILES))
def test_glue_readers(tmp_path, task):
    text, expected = GLUE_FILES[task]
    (tmp_path / "x.tsv").write_text(text, encoding="utf-8")
    got = data.read_glue(tmp_path / "x.tsv", task)
    assert [tuple(e) for e in got] == expected
    assert all(type(e.label) is (float if task == "stsb" else int) for e in got)


@pytest.mark.parametrize("task, bad_line, message", [
    ("rte", "1\tP only\tentailment", "expected 4 tab-separated columns, found 3"),   # missing column
    ("qnli", "1\tQ\tS\tcontradiction", "unknown label 'contradiction'"),
    ("stsb", "1\tg\tf\ty\to\ts\ts\tA\tB\tfive", "score 'five' is not a number"),
    ("cola", "gj04\t2\t\tX", "unknown label '2'"),
    ("sst2", "", "expected 2 tab-separated columns, found 0"),                        # a blank line
])
def test_glue_bad_row_names_file_and_line(tmp_path, task, bad_line, message):
    lines = GLUE_FILES[task][0].splitlines()
    path = tmp_path / "train.tsv"
    path.write_text("\n".join(lines[:2] + [bad_line] + lines[2:]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path}:3: .*{message}"):
        data.read_glue(path, task)


def test_glue_empty_and_missing_header(tmp_path):
    for text in ["", "sentence\tlabel\n"]:                 # zero bytes; a header and no rows
        (tmp_path / "e.tsv").write_text(text)
        with pytest.raises(ValueError, match=r"e.tsv: no examples \(empty file\)"):
            data.read_glue(tmp_path / "e.tsv", "sst2")
    (tmp_path / "h.tsv").write_text("text\tlabel\nx\t1\n")
    with pytest.raises(ValueError, match=r"h.tsv:1: the header .* has no column \['sentence'\]"):
        data.read_glue(tmp_path / "h.tsv", "sst2")


def write_rte(folder, n_train=40):
    folder.mkdir(parents=True)
    rows = "".join(f"{i}\tgood film {i}\tthe film\t{data.NLI[i % 2]}\n" for i in range(n_train))
    (folder / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + rows)
    (folder / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\tbad\ta film\tentailment\n")


def test_load_task_glue_holds_out_dev_from_train(tmp_path, tok):
    write_rte(tmp_path / "RTE")
    task = data.load_task("RTE", tok, data_dir=tmp_path)
    assert (task.num_labels, task.main_metric, task.metric) == (2, "accuracy", data.accuracy)
    train, dev = task.texts["train"], task.texts["dev"]
    assert len(train) + len(dev) == 40 and 0 < len(dev) < 40 and not set(train) & set(dev)
    assert task.texts["test"] == [data.Example("bad", "a film", 0)]     # the GLUE dev file is the test
    assert task.splits["test"][0]["input_ids"].tolist() == [2] + ids(tok, "bad") + [3] + ids(tok, "a film") + [3]
    assert task.splits["test"][0]["token_type_ids"].tolist() == [0, 0, 0, 1, 1, 1]
    again = data.load_task("rte", tok, data_dir=tmp_path)
    assert again.texts == task.texts                                    # the split rule is seeded
    assert data.load_task("rte", tok, data_dir=tmp_path, split_seed=1).texts["dev"] != dev


def test_mnli_has_matched_and_mismatched_tests(tmp_path, tok):
    text = GLUE_FILES["mnli"][0]
    (tmp_path / "MNLI").mkdir()
    for name in ["train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"]:
        (tmp_path / "MNLI" / name).write_text(text)
    task = data.load_task("mnli", tok, data_dir=tmp_path)
    assert set(task.splits) == {"train", "dev", "test", "test_mismatched"} and task.num_labels == 3

# ----------------------------------------------------------------------------- GLUE download


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serves tmp_path/www on 127.0.0.1 as a stand-in for dl.fbaipublicfiles.com."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    (tmp_path / "www").mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=tmp_path / "www"))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield tmp_path / "www", f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_glue_download_from_local_server(tmp_path, tok, server):
    www, url = server
    write_rte(tmp_path / "src" / "RTE")
    (www / "glue" / "data").mkdir(parents=True)
    with zipfile.ZipFile(www / "glue" / "data" / "RTE.zip", "w") as z:
        for f in ["train.tsv", "dev.tsv"]:
            z.write(tmp_path / "src" / "RTE" / f, f"RTE/{f}")
    task = data.load_task("rte", tok, data_dir=tmp_path / "glue", base_url=url)
    assert len(task.texts["train"]) + len(task.texts["dev"]) == 40
    assert sorted(p.name for p in (tmp_path / "glue").iterdir()) == ["RTE"]     # no temporary left


def test_mrpc_download_splits_by_dev_ids(tmp_path, server):
    www, url = server
    (www / "senteval" / "senteval_data").mkdir(parents=True)
    (www / "glue" / "data").mkdir(parents=True)
    head = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    rows = ["1\t1\t2\tA\tB", "0\t3\t4\tC\tD", "1\t5\t6\tE\tF"]
    (www / "senteval" / "senteval_data" / "msr_paraphrase_train.txt").write_bytes(
        ("\ufeff" + "\r\n".join([head] + rows) + "\r\n").encode("utf-8"))   # BOM and CRLF as shipped
    (www / "glue" / "data" / "mrpc_dev_ids.tsv").write_text("3\t4\n")
    folder = data.download_glue("mrpc", tmp_path / "glue", base_url=url)
    assert (folder / "dev.tsv").read_text() == f"{head}\n{rows[1]}\n"
    assert [tuple(e) for e in data.read_glue(folder / "train.tsv", "mrpc")] == [("A", "B", 1), ("E", "F", 1)]


def test_glue_offline_says_where_to_put_files(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("ADAMIX_DATA_URL", "http://127.0.0.1:9")      # the discard port: refused
    with pytest.raises(FileNotFoundError, match="Put the GLUE files there yourself") as err:
        data.load_task("cola", tok, data_dir=tmp_path)
    assert str(tmp_path / "CoLA") in str(err.value)
    assert list(tmp_path.iterdir()) == []                             # nothing half-written

# ----------------------------------------------------------------------------- MR


def fake_sdist(path, text):
    """vaderSentiment's layout: a tar.gz holding a tar.gz holding the ground-truth file."""
    def tar_gz(name, payload):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as t:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))
        return buf.getvalue()
    payload = text if isinstance(text, bytes) else text.encode("utf-8")
    path.write_bytes(tar_gz(data.MR_ARCHIVE, tar_gz(data.MR_FILE, payload)))
    return path


def test_mr_from_fake_nested_archive(tmp_path):
    rows = ["1\t2.3\tA charming film .", "5331\t0.5\tclichés , but fun", "5332\t-1.8\tdull", "10605\t-2\tbad"]
    got = data.read_mr(fake_sdist(tmp_path / "v.tar.gz", "\r\n".join(rows)))   # no final line end
    assert [tuple(e) for e in got] == [("A charming film .", None, 1), ("clichés , but fun", None, 1),
                                      ("dull", None, 0), ("bad", None, 0)]
    with pytest.raises(ValueError, match=r"movieReviewSnippets_GroundTruth.txt:3: expected"):
        data.read_mr(fake_sdist(tmp_path / "b.tar.gz", "\r\n".join(rows[:2] + ["5332\tno sentence"])))
    with pytest.raises(ValueError, match="no examples"):
        data.read_mr(fake_sdist(tmp_path / "e.tar.gz", ""))


def test_mr_real_sdist(tok):
    try:
        sdist = data.pip_download(*data.MR_SDIST, sdist=True)
    except (FileNotFoundError, ValueError) as e:
        pytest.skip(f"vaderSentiment==3.3.2 sdist not available offline: {e}")
    rows = data.read_mr(sdist)
    assert len(rows) == 10605 and sum(e.label for e in rows) == 5331
    task = data.load_task("mr", tok)
    texts = task.texts
    assert {k: len(v) for k, v in texts.items()} == {"train": 8473, "dev": 1037, "test": 1095}  # stable
    assert sorted(e for split in texts.values() for e in split) == sorted(rows)  # a partition
    assert not ({e.text_a for e in texts["train"]} & {e.text_a for e in texts["test"] + texts["dev"]})
    assert data.load_task("mr", tok).texts == texts

# ----------------------------------------------------------------------------- E2E


def test_e2e_grouping_and_errors(tmp_path):
    (tmp_path / "t.txt").write_text("name : A||A is a pub . \nname : B||B .\nname : A||A pub . \n")
    assert data.read_e2e(tmp_path / "t.txt") == [("name : A", ["A is a pub .", "A pub ."]), ("name : B", ["B ."])]
    (tmp_path / "b.txt").write_text("name : A||ok\nname : A without separator\n")
    with pytest.raises(ValueError, match=r"b.txt:2: expected"):
        data.read_e2e(tmp_path / "b.txt")
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ValueError, match="no examples"):
        data.read_e2e(tmp_path / "e.txt")


@pytest.mark.skipif(not (SHARED / "data" / "e2e").is_dir(), reason="../shared/data/e2e is not beside the checkout")
def test_e2e_shared_files(tok):
    for name, lines, mrs in [("valid.txt", 4672, 547), ("test.txt", 4693, 630)]:
        groups = data.read_e2e(SHARED / "data" / "e2e" / name)
        assert (sum(len(r) for _, r in groups), len(groups)) == (lines, mrs)
        assert formats.sha256_of(SHARED / "data" / "e2e" / name) == data.E2E_FILES[name]  # the pinned hashes
    task = data.load_task("e2e", tok, data_dir=SHARED / "data" / "e2e")
    assert len(task.texts["train"]) + len(task.texts["dev"]) == 547 and len(task.prompts["test"]) == 630
    assert not {mr for mr, _ in task.texts["train"]} & {mr for mr, _ in task.texts["dev"]}


def test_e2e_download_from_a_local_server(tok, tmp_path, server, monkeypatch):
    """No data_dir: valid.txt and test.txt come from E2E_URL (here a local http.server) into <cache>/e2e,
    each checked against its pinned sha256; then the cached copies are used without the network."""
    www, url = server
    (www / "valid.txt").write_text("".join(f"name : {w}||{w} is a pub . \n" for w in "abcdefghij"))
    (www / "test.txt").write_text("name : Aromi||Aromi is a pub . \nname : Aromi||a pub \n")
    monkeypatch.setattr(data, "E2E_FILES", {f: formats.sha256_of(www / f) for f in ("valid.txt", "test.txt")})
    task = data.load_task("e2e", tok, base_url=url, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache" / "e2e").iterdir()) == ["test.txt", "valid.txt"]
    assert task.texts["test"] == [("name : Aromi", ["Aromi is a pub .", "a pub"])]
    assert len(task.texts["train"]) + len(task.texts["dev"]) == 10
    again = data.load_task("e2e", tok, base_url="http://127.0.0.1:9", cache_dir=tmp_path / "cache")  # offline
    assert again.texts == task.texts
    (www / "test.txt").write_text("name : X||changed upstream \n")  # a file that is not the pinned one
    with pytest.raises(ValueError, match="test.txt: sha256 [0-9a-f]{64} does not match the expected"):
        data.load_task("e2e", tok, base_url=url, cache_dir=tmp_path / "other")
    assert not (tmp_path / "other" / "e2e" / "test.txt").exists()  # never kept


def test_e2e_offline_says_what_to_do(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"could not download http://127.0.0.1:9/valid.txt.*\n"
                                                r"Offline: pass --data_dir"):
        data.load_task("e2e", tok, base_url="http://127.0.0.1:9", cache_dir=tmp_path)


def test_lm_template_labels_and_prompts(tok):
    groups = [("name : Aromi", ["Aromi is a pub .", "a pub"]), ("eatType : pub", ["the pub"])]
    eos = tok.token_to_id("<|endoftext|>")
    ex = data.encode_lm(groups, tok, eos)
    context = ids(tok, "name : Aromi") + [eos]             # mr, then the separator (GPT-2's bos = eos)
    assert ex[0]["input_ids"].tolist() == context + ids(tok, "Aromi is a pub") + [1, eos]   # "." is [UNK]
    assert ex[0]["labels"].tolist() == [-100] * 4 + ids(tok, "Aromi is a pub") + [1, eos]
    assert len(ex) == 3 and "token_type_ids" not in ex[0]
    assert [p.tolist() for p in data.encode_prompts(groups, tok, eos)] == [context, ids(tok, "eatType : pub") + [eos]]
    batch = data.collate(ex, pad_id=eos)
    assert batch["labels"].shape == batch["input_ids"].shape == (3, 10) and set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["labels"][1].tolist() == [-100] * 4 + ids(tok, "a pub") + [eos] + [-100] * 3
    assert batch["attention_mask"][1].tolist() == [1] * 7 + [0] * 3
    prompts = data.pad_prompts(data.encode_prompts(groups, tok, eos), pad_id=0)
    assert prompts["input_ids"].tolist() == [context, ids(tok, "eatType : pub") + [eos]]   # same lengths here
    assert data.encode_lm(groups, tok, eos, max_len=6)[0]["labels"].tolist() == [-100] * 4 + ids(tok, "Aromi is")

# ----------------------------------------------------------------------------- tokenisation and batching


def test_encode_pairs_truncates_but_keeps_sep(tok):
    before = tok.to_str()
    ex = [data.Example("a b c d e", "good film", 1), data.Example("good", None, 0)]
    full = data.encode_examples(ex, tok, max_len=32)
    assert full[0]["input_ids"].tolist() == [2] + ids(tok, "a b c d e") + [3] + ids(tok, "good film") + [3]
    assert full[1]["input_ids"].tolist() == [2, ids(tok, "good")[0], 3]
    cut = data.encode_examples(ex, tok, max_len=7)[0]      # longest first: the first sentence loses 3
    assert cut["input_ids"].tolist() == [2] + ids(tok, "a b") + [3] + ids(tok, "good film") + [3]
    assert cut["token_type_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert tok.to_str() == before                          # the caller's tokenizer is untouched


def fake_examples(n, score=False):
    return [{"input_ids": np.arange(1, 2 + i % 7, dtype=np.int32), "token_type_ids": np.zeros(1 + i % 7, np.int32),
             "label": float(i) if score else i} for i in range(n)]


def test_batches_pad_mask_and_order():
    ex = fake_examples(10)
    batches = list(data.make_batches(ex, 4, pad_id=9))
    assert [b["labels"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]   # eval: in order
    b = batches[0]
    assert b["input_ids"].tolist()[0] == [1, 9, 9, 9] and b["attention_mask"].tolist()[0] == [1, 0, 0, 0]
    assert b["input_ids"].shape == (4, 4) and b["labels"].dtype == torch.long
    assert next(iter(data.make_batches(fake_examples(3, score=True), 4)))["labels"].dtype == torch.float32
    with pytest.raises(ValueError):
        data.make_batches([], 4)
    by_length = [b["labels"].tolist() for b in data.make_batches(ex, 4, by_length=True)]
    lengths = [1 + i % 7 for i in range(10)]                    # fake_examples: example i has 1 + i % 7 tokens
    assert sum(by_length, []) == sorted(range(10), key=lambda i: (lengths[i], i))   # a stable sort by length


def test_shuffled_batches_bucket_and_cover_everything_once():
    ex = fake_examples(1000)
    order = [b["labels"].tolist() for b in data.make_batches(ex, 8, shuffle=True, seed=3)]
    assert sorted(sum(order, [])) == list(range(1000))                      # each example exactly once
    assert order == [b["labels"].tolist() for b in data.make_batches(ex, 8, shuffle=True, seed=3)]
    assert order != [b["labels"].tolist() for b in data.make_batches(ex, 8, shuffle=True, seed=4)]
    widths = [len(set(i % 7 for i in b)) for b in order]                     # distinct lengths per batch
    assert np.mean(widths) < 2.5                                            # bucketed (random: ~5.7)
    shards = [data.make_batches(ex, 8, shuffle=True, seed=3, rank=r, world_size=3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1 and sum(len(s) for s in shards) == 123  # 125 batches -> 123


def test_k_per_class_draws_k_of_each_label_by_seed():
    examples = [dict(input_ids=[i], label=i % 3) for i in range(30)]  # 10 of each of 3 labels
    a, b, c = (data.k_per_class(examples, 4, seed) for seed in (0, 0, 1))
    assert a == b and a != c                                  # the seed decides, and only the seed
    assert sorted(e["label"] for e in a) == [0] * 4 + [1] * 4 + [2] * 4
    assert [e["input_ids"] for e in a] == sorted(e["input_ids"] for e in a)  # original order kept
    assert len({e["input_ids"][0] for e in a}) == 12          # without replacement
    with pytest.raises(ValueError, match="fewer"):
        data.k_per_class(examples, 11, 0)
    with pytest.raises(ValueError, match="scores"):
        data.k_per_class([dict(input_ids=[0], label=0.5)], 1, 0)
