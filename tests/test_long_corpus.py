"""The opt-in long-run corpus: its three sources are read whole and cleanly, in one fixed order."""
import re

from megatron_est.data.corpus import kjv_books, shakespeare_files, sotu_files
from megatron_est.data.long_corpus import long_documents


def test_kjv_books_are_whole_and_free_of_verse_numbers():
    books = kjv_books()
    assert len(books) == 66
    assert books[0]["text"].startswith("The First Book of Moses, called Genesis\n\nIn the beginning God created")
    assert books[-1]["title"] == "The Revelation of Saint John the Divine"
    assert not any(re.search(r"\d+:\d+", b["text"]) for b in books)
    assert books[0]["text"].count("\n\n") == 50  # the title, then Genesis's 50 chapters, one paragraph each
    assert 4.0e6 < sum(len(b["text"]) for b in books) < 4.5e6


def test_long_documents_hold_every_source_once_in_a_fixed_order():
    docs = long_documents()
    assert len(docs) == len(shakespeare_files()) + len(sotu_files()) + 66 == 42 + 249 + 66
    titles = [d["title"] for d in docs]
    assert len(set(titles)) == len(titles)
    assert titles == [d["title"] for d in long_documents()]  # the split depends on this order
    assert 21e6 < sum(len(d["text"]) for d in docs) < 23e6
    last = titles[-12:]  # --split 969,30,1's validation and test documents: all three sources
    assert any(t.endswith("_gut.txt") for t in last) and any(t[:4].isdigit() for t in last)
    assert any(not t.endswith(".txt") for t in last)
