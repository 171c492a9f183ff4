"""The extract stage's faster steps (stages/extract_steps.py) against datatrove's originals: the same words, the same
keep/drop decisions and reasons, the same kept text, metadata and stats, on real pages (data/tiny-cc, and the shared
WARCs in /work/shared/data when present: bench/extract_speed.py's input) and on cases made to hit the edges."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from datatrove.data import Document
from datatrove.pipeline.dedup import MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.filters.gopher_repetition_filter import find_all_duplicate, find_top_duplicate, get_n_grams
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.lid import FT176LID
from datatrove.utils.text import TextNormConfig
from datatrove.utils.text import simplify_text as datatrove_simplify_text
from datatrove.utils.word_tokenizers import SpaCyTokenizer

from stages.extract_steps import (CountingPIIFormatter, FastC4QualityFilter, FastGopherQualityFilter,
                                  FastGopherRepetitionFilter, FastMinhashSignature, Meter, OfflineFT176LID, Resiliparse,
                                  all_duplicate_chars, longer_n_grams, shared_tokenizer, simple_words,
                                  simplify_text, top_duplicate_chars)
from stages.warc_reader import SafeWarcReader

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "data" / "tiny-cc"
SHARED = ROOT.parent / "shared" / "data"  # /work/shared/data next to the checkout; absent elsewhere (CI)
# A small Common Crawl WARC of tiny-cc: trafilatura (~35 ms a page) runs on its pages only, to keep this file fast
CC_SAMPLE = "crawl-data/CC-MAIN-2024-22/segments/1715971057216.39/warc"

# Made to hit the edges: empty and blank text, fewer words than an n-gram, repeated lines, paragraphs and n-grams,
# n-grams that join alike without a separator ("ab"+"c" = "a"+"bc"), ties for the top n-gram, five sentences then a
# page-dropping line, citations, policy and javascript lines, a word too long, Japanese-free but non-ASCII text.
EDGES = [
    "", " ", "\n\n", "word", "two words", "IS_ALPHA is a string that once broke spaCy's tokenizer.",
    "ab c ab c ab c a bc a bc a bc " * 20,
    "the cat sat on the mat. " * 30,
    "Line one is here and long enough.\nLine one is here and long enough.\n" * 10 + "A different line ends it.",
    "First paragraph with several words in it.\n\nFirst paragraph with several words in it.\n\nAnother one here.",
    "one two three four five six seven eight nine ten eleven twelve " * 3 + "thirteen fourteen fifteen.",
    "tie tie tie top top top other words follow here to pad the text out a bit",
    "\n".join(f"Sentence number {i} is long enough to be kept by C4. It has two sentences." for i in range(8))
    + "\nThen lorem ipsum dolor sit amet, which drops the whole page.",
    "\n".join(f"Sentence number {i} is long enough to be kept by C4." for i in range(6)) + "\nvar x = {a: 1};",
    "Read our privacy policy for more details today.\nEnable javascript to see this page now.\n"
    "A claim with a citation[1] and another[citation needed] in one line.\n" + "x" * 1200 + " is a long word.",
    "Ünïcödé wörds, “quotes”, em—dashes, and café au lait. Ça va? Très bien! 東京 is a city.\n" * 4,
    "Short.\nToo short.\nThree words here.\nThis line has enough words to be kept, surely.\n",
    # every combining mark (Unicode category Mn, which simplify_text drops) in this Python's Unicode tables, beside
    # regex syntax that a character class would have to escape; precomposed letters that NFD splits
    "e" + "".join(chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) == "Mn") + " x\u0301 [a]^\\- "
    "Ǻngström naïve façade Œuvre ﬁne 12,5 ٣٤ Monday january",
]


def html_pages(folder: Path) -> list[str]:
    """The HTML payload of every page in the WARCs under `folder`, as the stage's reader passes them on."""
    return [doc.text for warc in sorted(folder.rglob("*.warc.gz"))
            for doc in SafeWarcReader(str(warc.parent), 10 << 20).read_file(warc.name)]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Distinct texts: every tiny-cc (and shared) page through resiliparse as the stage runs it, the small CC WARC's
    pages through trafilatura with FineWeb's settings, and EDGES."""
    pages = html_pages(TINY) + (html_pages(SHARED / "warc") + html_pages(SHARED / "extraction")
                                if SHARED.is_dir() else [])
    resiliparse, trafilatura = Resiliparse(timeout=5), Trafilatura(favour_precision=True, timeout=5)
    out = [resiliparse.extract(html) for html in pages]
    out += [trafilatura.extract(html) or "" for html in html_pages(TINY / CC_SAMPLE)]
    return list(dict.fromkeys(out + EDGES))


def test_the_pages_are_there(texts):
    assert len(texts) > 150 + len(EDGES)  # tiny-cc alone holds ~180 HTML pages


def assert_same_as_datatrove(ours, theirs, texts: list[str]) -> None:
    """Each text as a document through both filters: the same result, text and metadata; then the same stats."""
    results = []
    for text in texts:
        a, b = (Document(text=text, id="doc", metadata={"url": "https://example.com/"}) for _ in range(2))
        result = ours.filter(a)
        assert result == theirs.filter(b), text[:200]
        assert (a.text, a.metadata) == (b.text, b.metadata), text[:200]
        results.append(result)
    assert ours.stats.stats.to_dict() == theirs.stats.stats.to_dict()
    # the pages exercise both outcomes, else the comparison proves little
    assert True in results and any(r is not True for r in results)


def test_word_tokenize_matches_datatrove(texts):
    # every other page: datatrove's tokenizer frees its vocabulary after each call and so is slow (~20 ms a page)
    ours, theirs = shared_tokenizer("en"), SpaCyTokenizer("en")
    ours.forget_pieces()  # else pieces that earlier tests met come from the cache
    for text in texts[::2] + EDGES:
        assert ours.word_tokenize(text) == theirs.word_tokenize(text), text[:200]


def test_simple_words_match_spacy(texts):
    """simple_words gives plain words (and a word with one mark after it) their tokens without spaCy. Against spaCy
    itself: every such piece of the test pages; every special case bare, with each mark, and in other cases
    ("dont", "Dont.", "etc.", "Jan."); one- and two-letter words with a dot ("J." stays one token); seeded random
    words with marks."""
    import random
    import string

    english = shared_tokenizer("en")
    specials = english._matcher_cases().specials
    marks = ["", ",", ";", ":", "!", "?", ".", "'s", ")"]
    pieces = {piece for text in texts for piece in text.split()}
    for case in specials:
        for variant in (case, case.lower(), case.upper(), case.capitalize(), case.rstrip(".")):
            pieces.update(variant + mark for mark in marks)
    letters = string.ascii_letters
    pieces.update(a + mark for a in letters for mark in marks)
    pieces.update(a + b + "." for a in letters for b in letters)
    rng = random.Random(0)
    pieces.update("".join(rng.choices(letters, k=rng.randint(1, 10))) + rng.choice(marks) for _ in range(20_000))
    checked = 0
    for piece in sorted(pieces):
        words = simple_words(piece, specials)
        if words is not None:
            assert words == tuple(word for _, word in english._spacy_spans(piece)), piece
            checked += 1
    assert checked > 20_000 and simple_words("dont", specials) is None and simple_words("J.", specials) is None
    assert english._matcher_cases().plain_words  # this spaCy passes the start-up probe, so the fast path is on


def test_plain_words_go_through_spacy_when_simple_words_disagrees(monkeypatch):
    """A spaCy whose English rules differ from what simple_words assumes (here: simple_words made wrong) fails the
    probe when the tokenizer starts; every piece then goes through spaCy, and the words stay datatrove's."""
    from stages import extract_steps

    monkeypatch.setattr(extract_steps, "simple_words", lambda piece, specials: (piece.upper(),))
    fresh = extract_steps.SharedSpaCyTokenizer("en")  # not the shared one: its probe already ran
    assert not fresh._matcher_cases().plain_words
    text = "Plain words, and more: the end. Is it? Yes!"
    assert fresh.word_tokenize(text) == SpaCyTokenizer("en").word_tokenize(text)


def test_word_tokenize_pieces_match_spacy_in_context():
    """word_tokenize looks up the words of each whitespace-free piece; spaCy's special cases (":)", "e.g.", "Mr.")
    can be blocked by a match across whitespace (") :" is one), so such neighbours must go through spaCy together.
    Seeded random text dense with those cases and with every kind of whitespace makes thousands of such
    neighbours; each text is tokenized twice (new pieces, then all known) and must equal datatrove's words."""
    import random

    rng = random.Random(0)
    parts = list("ab.,:;)(!?'\"-—–…$%&*/\\[]{}<>#@=_^|0123456789") + [
        " ", "  ", "\t", "\n", "\r", "\x0b", "\x0c", "\xa0", "\u2003", "\u3000", "\x1c", "\x85",
        "can't", "U.S.", ":)", ":-(", "<3", "e.g.", "Mr.", "'s", "’s", "n't", "and/or", "a.m.", "o.O", "^_^",
        "http://x.com/a?b=1", "3.5", "1,000", "Let's", "It's"]
    texts = ["".join(rng.choice(parts) for _ in range(rng.randint(0, 120))) for _ in range(1500)]
    ours, theirs = shared_tokenizer("en"), SpaCyTokenizer("en")
    ours.forget_pieces()
    in_context = 0
    original = ours._words_in_context

    def counted(*args):
        nonlocal in_context
        in_context += 1
        return original(*args)

    ours._words_in_context = counted
    try:
        for text in texts:
            expected = theirs.word_tokenize(text)
            assert ours.word_tokenize(text) == expected, repr(text)
            assert ours.word_tokenize(text) == expected, repr(text)
    finally:
        del ours._words_in_context
    assert in_context > 100  # the neighbours that need spaCy together were there, and were handled


@pytest.mark.parametrize("kwargs", [
    {},  # FineWeb's thresholds, as the stage runs it
    # thresholds in decreasing n, n = 1 and stricter limits: the n-gram bookkeeping must start again, and drop more
    {"top_n_grams": ((4, 0.05), (2, 0.05)), "dup_n_grams": ((10, 0.01), (1, 0.05), (6, 0.02)),
     "dup_line_frac": None, "dup_para_frac": None, "dup_line_char_frac": None, "dup_para_char_frac": None},
])
def test_gopher_repetition_matches_datatrove(texts, kwargs):
    english = shared_tokenizer("en")
    ours = FastGopherRepetitionFilter(language=english, **kwargs)
    assert_same_as_datatrove(ours, GopherRepetitionFilter(language=english, **kwargs), texts)


@pytest.mark.parametrize("kwargs", [
    {"min_doc_words": 50},  # the stage's setting (Config.min_doc_words)
    # every rule stricter: each rule but the "#" count then drops some of the pages; then the last two rules alone
    {"min_doc_words": 20, "max_doc_words": 2000, "min_avg_word_length": 4, "max_avg_word_length": 6,
     "max_symbol_word_ratio": 0.01, "max_bullet_lines_ratio": 0.2, "max_ellipsis_lines_ratio": 0.05,
     "max_non_alpha_words_ratio": 0.9, "min_stop_words": 8},
    {"min_doc_words": 1, "max_doc_words": None, "min_avg_word_length": None, "max_avg_word_length": None,
     "max_symbol_word_ratio": None, "max_bullet_lines_ratio": None, "max_ellipsis_lines_ratio": None,
     "max_non_alpha_words_ratio": 0.85, "min_stop_words": 4},
])
def test_gopher_quality_matches_datatrove(texts, kwargs):
    english = shared_tokenizer("en")
    ours = FastGopherQualityFilter(language=english, **kwargs)
    assert_same_as_datatrove(ours, GopherQualityFilter(language=english, **kwargs), texts)


@pytest.mark.parametrize("kwargs", [
    {"filter_no_terminal_punct": False},  # FineWeb's setting, as the stage runs it
    {},  # C4's own defaults
    {"split_paragraph": False, "min_num_sentences": 3},  # sentences, not lines, as the units
    {"min_num_sentences": -1, "min_words_per_line": 1},  # no sentence count at all
])
def test_c4_quality_matches_datatrove(texts, kwargs):
    english = shared_tokenizer("en")
    ours = FastC4QualityFilter(language=english, **kwargs)
    assert_same_as_datatrove(ours, C4QualityFilter(language=english, **kwargs), texts)


def test_n_gram_helpers_match_datatrove(texts):
    """The helpers alone, over every n the filter could be given, on word lists from the pages."""
    english = shared_tokenizer("en")
    for text in texts[:: max(1, len(texts) // 80)] + EDGES:
        words = english.word_tokenize(text)
        n_grams = words
        for n in range(1, 12):
            if n > 1:
                n_grams = longer_n_grams(n_grams, words, n - 1)
            assert n_grams == ["".join(words[i:i + n]) for i in range(len(words) - n + 1)]
            assert all_duplicate_chars(n_grams, n) == find_all_duplicate(words, n)
            theirs = get_n_grams(words, n)
            assert top_duplicate_chars(words, n) == (find_top_duplicate(theirs) if theirs else None)



@pytest.mark.parametrize("languages", [["en"], ["de", "en", "xx"], None])
def test_language_id_matches_datatrove(texts, languages):
    """The same best language, score and wanted-language scores as datatrove's predict, with the same model; "xx" is
    no fastText label."""
    ours, theirs = OfflineFT176LID(languages), FT176LID(languages)
    theirs._model = ours.model
    results = [ours.predict(Document(text=text, id="d")) for text in texts if text.strip()]
    assert results == [theirs.predict(Document(text=text, id="d")) for text in texts if text.strip()]
    assert len({best for best, _ in results}) > 3  # several languages among the pages


PII = ["Mail jane.doe@example.org or root@[10.0.0.1]; call 8.8.8.8 or 192.168.1.20 (private), not 300.1.1.1.",
       "Version 1.2.3 and 3.14 hold digit.digit but no address.", "a@b", "@ alone", "1.1.1.1", "no address here",
       "The server at 93.184.216.34 answered; write to ops@example.net."]


@pytest.mark.parametrize("kwargs", [{}, {"only_remove_public_ips": False}, {"remove_emails": False}])
def test_pii_matches_datatrove(texts, kwargs):
    """The regexes run only on texts with an "@" or a "digit.digit": the same text as datatrove's on every page and
    on addresses of each kind; the "scrubbed" count is the number of texts changed."""
    ours, theirs = CountingPIIFormatter(**kwargs), PIIFormatter(**kwargs)
    changed = 0
    for text in texts + PII:
        scrubbed = ours.format(text)
        assert scrubbed == theirs.format(text), text[:200]
        changed += scrubbed != text
    assert changed >= 3 and ours.stats.stats["scrubbed"].total == changed  # without the shared pages too (CI)


def test_meter_counts_utf8_bytes():
    """Meter.utf8_bytes: ASCII by length, the last text measured from memory, anything else encoded."""
    accented, other = "café " * 3, "naïve"
    assert [Meter.utf8_bytes(t) for t in ("", "plain", accented, accented, "x" + accented[1:], other, accented)] == \
        [len(t.encode()) for t in ("", "plain", accented, accented, "x" + accented[1:], other, accented)]


@pytest.mark.parametrize("config", [TextNormConfig(), TextNormConfig(norm_weekdays=True, norm_monthnames=True),
                                    TextNormConfig(norm_unicode_diacritics=False, lowercase=False)])
def test_simplify_text_matches_datatrove(texts, config):
    for text in texts:
        assert simplify_text(text, config) == datatrove_simplify_text(text, config), text[:200]


def test_minhash_shingles_match_datatrove(texts, tmp_path):
    """The stage's MinHash settings (5-grams, 64-bit hashes): the same shingles, hence the same signatures."""
    config = MinhashConfig(hash_config=HashConfig(precision=64))
    ours = FastMinhashSignature(str(tmp_path / "ours"), config=config, language=shared_tokenizer("en"))
    theirs = MinhashDedupSignature(str(tmp_path / "theirs"), config=config, language=shared_tokenizer("en"))
    for text in texts[::2] + EDGES:
        assert ours.get_shingles(text).tolist() == theirs.get_shingles(text).tolist(), text[:200]


def test_loguru_formatter_lib_dirs_cached_but_unchanged():
    """stages/extract_executors.py computes loguru's standard-library directories once per process (datatrove adds
    three log handlers per task); a formatter must still get what loguru itself computes."""
    import os
    import sys
    import sysconfig

    import loguru._better_exceptions as better

    import stages.extract_executors  # noqa: F401  (applies the cache)

    paths = {sysconfig.get_path(name, scheme) for scheme in sysconfig.get_scheme_names()
             for name in ("stdlib", "platstdlib", "platlib", "purelib")}
    expected = [os.path.abspath(path).lower() + os.sep for path in paths if path in sys.path]
    assert sorted(better.ExceptionFormatter()._lib_dirs) == sorted(expected) != []
