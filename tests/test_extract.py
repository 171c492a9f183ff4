"""stages.extract on a small download artifact built by hand from the bundled sample plus two WARCs written here with
warcio (a page with an email and an IP address, a page copied across the two files, a near copy), with no network."""

from __future__ import annotations

import gzip
import io
import ipaddress
import json
import shutil
import socket
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from warcio.archiveiterator import ArchiveIterator
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from stages import extract
from stages.artifacts import Artifact
from stages.common import StageError
from stages.warc_reader import SKIP_REASONS

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny-cc"
SEG = "crawl-data/CC-MAIN-2024-22/segments"
SMALL = f"{SEG}/1715971057216.39/warc/CC-MAIN-20240517233122-20240518023122-00000.warc.gz"
DOLMA = f"{SEG}/tiny-samples/warc/dolma-wget-sample-0000.warc.gz"
ZYTE = f"{SEG}/tiny-samples/warc/zyte-aeb-part1.warc.gz"
TRUNCATED = f"{SEG}/bad/warc/truncated.warc.gz"
GARBAGE = f"{SEG}/bad/warc/garbage.warc.gz"
pytestmark = pytest.mark.filterwarnings("ignore:The 'registered_domain' property is deprecated")  # datatrove vs tldextract 5
COLUMNS = ["id", "url", "crawl", "warc", "warc_offset", "text", "language", "language_score", "n_chars", "n_words",
           "n_lines", "exact_duplicates", "minhash_cluster_size", "minhash_cluster_id"]
SYNTH_A = f"{SEG}/synthetic/warc/synthetic-a.warc.gz"  # warcinfo says isPartOf CC-MAIN-2024-18
SYNTH_B = f"{SEG}/synthetic/warc/synthetic-b.warc.gz"  # no warcinfo: the crawl comes from the path
EMAIL, IP = "margaret.okafor@riverside-allotments.net", "81.2.69.142"  # a public (is_global) address
COMPOST = [  # page 1: on https://riverside-allotments.net/compost and copied to a mirror in the other WARC
    "Good compost starts with a balance of green and brown material. Green material such as grass clippings, fruit "
    "peels and coffee grounds brings nitrogen, while brown material such as dry leaves, straw and shredded cardboard "
    "brings carbon.",
    "Most gardeners aim for roughly three parts brown to one part green by volume. A heap that smells sour usually has "
    "too much green material and too little air, so the fix is to add dry leaves and turn the pile with a fork.",
    "Moisture matters as much as the mix. The heap should feel like a wrung-out sponge: wet enough to keep the "
    "microbes working, but never so wet that water runs out of the bottom when you squeeze a handful.",
    "Turning the heap every week or two lets oxygen reach the centre, where the temperature can climb above sixty "
    "degrees in summer. That heat kills most weed seeds and speeds up the breakdown of tougher stems.",
    "Finished compost is dark, crumbly and smells of a forest floor. Depending on the season and how often it was "
    "turned, it takes between two months and a year before it is ready to spread on the beds.",
]
NEAR_COMPOST = [p.replace("two months", "three months").replace("every week", "every few days")
                .replace("dry leaves and turn", "dry leaves then turn") for p in COMPOST]  # three small edits
CONTACT = [  # page 2: the email address and the IP address to scrub, inside ordinary text
    "The Riverside Allotment Society was founded in 1952 by a group of neighbours who wanted to grow their own "
    "vegetables on a strip of unused railway land beside the river.",
    "Today the society looks after forty-two plots, a shared tool shed and a small orchard of apple and pear trees "
    "that members planted together during the winter of 1998.",
    f"If you would like to join the waiting list, please write to our secretary at {EMAIL} with your name, your "
    "address and the size of plot you are hoping for.",
    f"Members who use the booking system for the shared rotavator should note that it now runs on a new server at "
    f"{IP}, so old bookmarks to the previous address will no longer work.",
    "We hold an open day on the first Saturday of every June, when visitors can walk around the plots, buy seedlings "
    "and ask the older members for advice about their own gardens.",
]
BEES = [  # page 3: unrelated, survives everything
    "Honey bees communicate the direction and distance of food through a movement that researchers call the waggle "
    "dance, performed on the vertical surface of the comb inside the dark hive.",
    "The angle of the dance relative to straight up tells the other workers the angle of the food relative to the sun, "
    "and the length of the waggle run tells them roughly how far they will need to fly.",
    "Karl von Frisch described the dance in detail during the middle of the last century and later shared a Nobel "
    "Prize for his work on the senses and behaviour of insects.",
    "A strong colony in summer can contain fifty thousand workers, nearly all of them female, along with a few hundred "
    "drones and a single queen who may lay more than a thousand eggs in one day.",
    "Beekeepers check their hives regularly for signs of disease and make sure the colony has enough stored honey to "
    "survive the winter months, when there are no flowers to visit.",
]

INGREDIENTS = [  # page 4: a recipe whose many short lines FineWeb's short-line rule (over 67% under 30 chars) drops
    "a cup of plain flour", "two spoons of caster sugar", "a pinch of sea salt", "one large free range egg",
    "half a cup of whole milk", "a knob of soft butter", "the zest of one lemon", "a handful of blueberries",
    "some maple syrup to serve", "a little oil for the pan", "one ripe banana if you like", "a dash of vanilla",
    "a spoon of baking powder", "fresh mint for the top", "a bowl of thick yoghurt", "two ripe summer peaches",
    "a small jar of honey", "one sprig of thyme", "a cup of oat flakes", "a few chopped walnuts",
]
PANCAKES = [
    "These pancakes are what we cook on slow weekend mornings when the whole family is at home and nobody is in a "
    "hurry to be anywhere else.",
    "Whisk the dry things together first, then make a well in the middle and pour in the egg and the milk, stirring "
    "from the centre so that no lumps form in the batter.",
    "Let the batter rest for ten minutes while the pan heats, and cook each pancake until bubbles rise through it "
    "before you turn it over with a thin spatula. Keep the finished ones warm in a low oven. Serve them with the "
    "fruit and the yoghurt on the side. Any batter that is left keeps in the fridge until the next morning.",
]


@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """Any name lookup or TCP connection beyond this machine fails the test (unix sockets, 127.0.0.1 allowed)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
                raise AssertionError(f"network access to {address} during an extract test")
        return real_connect(self, address)

    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host not in (None, "localhost", "127.0.0.1", "::1"):
            raise AssertionError(f"name lookup of {host} during an extract test")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture(scope="module")
def download_artifact(tmp_path_factory) -> Artifact:
    """Two good WARCs, the first sixth of the 120-article one (cut mid-gzip), a file of garbage and the two WARCs
    written here."""
    root = tmp_path_factory.mktemp("download")
    for rel in (SMALL, DOLMA):
        (root / "warc" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(TINY / rel, root / "warc" / rel)
    (root / "warc" / TRUNCATED).parent.mkdir(parents=True)
    whole = (TINY / ZYTE).read_bytes()
    (root / "warc" / TRUNCATED).write_bytes(whole[: len(whole) // 6])
    (root / "warc" / GARBAGE).write_bytes(b"\x1f\x8bnot really gzip" * 50)
    (root / "files.json").write_text("[]")
    write_synthetic_warcs(root)
    return Artifact("download", "handmade", root)


@pytest.fixture(scope="module")
def synthetic_artifact(tmp_path_factory) -> Artifact:
    """Only the two WARCs written here."""
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_warcs(root)
    return Artifact("download", "synthetic", root)


def page(title: str, paragraphs: list[str]) -> bytes:
    body = "".join(f"<p>{p}</p>\n" for p in paragraphs)
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{title}</title></head><body>"
            f"<nav><a href=/>Home</a> <a href=/about>About</a></nav><article><h1>{title}</h1>\n{body}</article>"
            f"<footer>Riverside Allotment Society</footer></body></html>").encode()


def recipe() -> bytes:
    paragraphs = "".join(f"<p>{p}</p>" for p in PANCAKES + INGREDIENTS)  # a <ul> would go as navigation
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>Pancakes</title></head><body><article>"
            f"<h1>Sunday pancakes</h1>{paragraphs}</article></body></html>").encode()


def write_warc(path: Path, pages: list[tuple[str, bytes]], crawl: str | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)  # one gzip member per record, as Common Crawl writes them
        if crawl:
            writer.write_record(writer.create_warcinfo_record(path.name, {"isPartOf": crawl, "publisher": "tests"}))
        for url, html in pages:
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(html),
                                                          http_headers=http))


def write_synthetic_warcs(root: Path) -> None:
    compost = page("Making good compost", COMPOST)
    write_warc(root / "warc" / SYNTH_A, [("https://riverside-allotments.net/compost", compost),
                                         ("https://riverside-allotments.net/contact", page("About us", CONTACT)),
                                         ("https://bees.example.org/waggle-dance", page("The waggle dance", BEES)),
                                         ("https://riverside-allotments.net/pancakes", recipe())],
               crawl="CC-MAIN-2024-18")
    write_warc(root / "warc" / SYNTH_B, [("https://mirror.example.com/compost", compost),
                                         ("https://gardening.example.com/compost-notes",
                                          page("Making good compost", NEAR_COMPOST))], crawl=None)


COMPOST_URLS = {"https://riverside-allotments.net/compost", "https://mirror.example.com/compost",
                "https://gardening.example.com/compost-notes"}


def run_extract(tmp_path: Path, dl: Artifact, name: str = "out", **kw) -> tuple[dict, Path]:
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    return extract.run(extract.Config(**kw), dl, out=Artifact("extract", "test", out)), out


def check_funnel(stats: dict) -> None:
    rows = stats["funnel"]
    for row in rows:
        assert row["docs_in"] - row["dropped"] == row["docs_out"] >= 0, row
        if row["step"] != "pii":  # the only step that may lengthen text ("firstname.lastname@example.org")
            assert row["bytes_out"] <= row["bytes_in"], row
        assert (row["bytes_out"] > 0) == (row["docs_out"] > 0), row
        if "reasons" in row:
            assert sum(row["reasons"].values()) <= row["dropped"]
    for before, after in zip(rows, rows[1:]):
        assert (before["docs_out"], before["bytes_out"]) == (after["docs_in"], after["bytes_in"]), (before, after)
    assert rows[0]["docs_in"] == stats["records"]
    assert rows[-1]["docs_out"] == stats["documents"]
    assert rows[-1]["chars"] == stats["characters"]
    assert rows[-1]["bytes_out"] == stats["bytes"]


def excluded(out: Path, step: str) -> list[dict]:
    return [json.loads(line) for f in (out / "excluded" / step).glob("*.jsonl.gz") for line in gzip.open(f, "rt")]


def check_dedup_and_pii(stats: dict, out: Path) -> None:
    """The compost page (twice, identical) and its near copy leave one document; the contact page is scrubbed."""
    rows = {r["url"]: r for r in pq.read_table(out / "docs").to_pylist()}
    by_step = {r["step"]: r for r in stats["funnel"]}
    exact, near = excluded(out, "exact_dedup"), excluded(out, "minhash_dedup")
    assert len(exact) == by_step["exact_dedup"]["dropped"] >= 1
    assert len(near) == by_step["minhash_dedup"]["dropped"] >= 1
    assert {d["metadata"]["filter_reason"] for d in exact} == {"exact_duplicate"}
    assert {d["metadata"]["filter_reason"] for d in near} == {"minhash_duplicate"}
    dropped = [d["metadata"]["url"] for d in exact + near if d["metadata"]["url"] in COMPOST_URLS]
    kept = [rows[u] for u in COMPOST_URLS if u in rows]
    assert len(dropped) == 2 and len(kept) == 1, (dropped, list(rows))
    assert kept[0]["minhash_cluster_size"] == 2  # itself and the near copy (the exact copy went before MinHash)
    near_copy = kept[0]["url"] == "https://gardening.example.com/compost-notes"
    assert kept[0]["exact_duplicates"] == (0 if near_copy else 1)
    assert [d["metadata"]["minhash_cluster_id"] for d in near if d["metadata"]["url"] in COMPOST_URLS] == [
        kept[0]["minhash_cluster_id"]]
    assert {d["metadata"]["url"] for d in exact} & {"https://riverside-allotments.net/compost",
                                                     "https://mirror.example.com/compost"}

    contact = rows["https://riverside-allotments.net/contact"]["text"]
    assert EMAIL not in contact and IP not in contact
    assert "example.com" in contact or "example.org" in contact  # datatrove's stand-in addresses
    assert "our secretary at" in contact and "new server at" in contact  # the text around them is kept
    assert by_step["pii"]["scrubbed"] >= 1
    for f in (out / "filtered").glob("*.jsonl.gz"):  # nor do the files the dedup stages read
        assert EMAIL not in gzip.open(f, "rt").read()
    crawls = {r["warc"]: r["crawl"] for r in list(rows.values()) + [d["metadata"] for d in exact + near]}
    assert crawls[f"warc/{SYNTH_A}"] == "CC-MAIN-2024-18"  # from its warcinfo record
    assert crawls[f"warc/{SYNTH_B}"] == "CC-MAIN-2024-22"  # from its path
    bees = rows["https://bees.example.org/waggle-dance"]
    assert (bees["exact_duplicates"], bees["minhash_cluster_size"], bees["minhash_cluster_id"]) == (0, 1, -1)


def check_columns_and_offsets(download: Artifact, out: Path) -> list[dict]:
    """Every row's (warc, warc_offset) leads back to its record: re-read the .warc.gz from that byte."""
    table = pq.read_table(out / "docs")
    assert table.column_names == COLUMNS
    assert pq.ParquetFile(next((out / "docs").glob("*.parquet"))).metadata.row_group(0).column(0).compression == "ZSTD"
    rows = table.to_pylist()
    for r in rows:
        with open(download.path / r["warc"], "rb") as f:
            f.seek(r["warc_offset"])
            record = next(iter(ArchiveIterator(f)))
            assert record.rec_headers.get_header("WARC-Target-URI") == r["url"]
            assert record.rec_headers.get_header("WARC-Record-ID") == r["id"]
        assert r["n_chars"] == len(r["text"]) and r["n_words"] == len(r["text"].split()) >= 50
        assert r["minhash_cluster_size"] >= 1 and r["exact_duplicates"] >= 0
    return rows


@pytest.fixture(scope="module")
def default_run(download_artifact, tmp_path_factory):
    """The default recipe (resiliparse, English, FineWeb filters, PII, dedup), its 6 tasks run in this process: the
    no_internet guard sees every connection, and worker start-up (spaCy, block lists: ~15 s a process) is paid once."""
    return run_extract(tmp_path_factory.mktemp("extract"), download_artifact, workers=1)


def test_docs_are_english_text_with_the_contracted_columns(download_artifact, default_run):
    stats, out = default_run
    rows = check_columns_and_offsets(download_artifact, out)
    assert len(rows) == stats["documents"] >= 10
    assert sum(len(r["text"]) for r in rows) == stats["characters"]
    for r in rows:
        assert r["text"].strip() and "<html" not in r["text"].lower()
        assert r["language"] == "en" and r["language_score"] > 0.65
        assert r["url"].startswith("http") and r["id"]
        assert r["warc"].startswith("warc/crawl-data/") and r["warc"].endswith(".warc.gz")
        assert r["crawl"]  # warcinfo isPartOf (CC-MAIN-…, or what a non-CC file says), else the path
    assert len({r["id"] for r in rows}) == len(rows)


def test_funnel_adds_up_and_exclusions_are_kept(default_run):
    stats, out = default_run
    check_funnel(stats)
    steps = [r["step"] for r in stats["funnel"]]
    assert steps == ["read_warc", "url", "resiliparse", "language", "gopher_repetition", "gopher_quality",
                     "c4_quality", "fineweb_quality", "pii", "exact_dedup", "minhash_dedup", "write_parquet"]
    by_step = {r["step"]: r for r in stats["funnel"]}
    for step in ("url", "language", "gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality",
                 "exact_dedup", "minhash_dedup"):
        kept = excluded(out, step)
        assert len(kept) == by_step[step]["dropped"], step
        assert all(d["metadata"]["filter_reason"] for d in kept), step
        assert sum(by_step[step]["reasons"].values()) == by_step[step]["dropped"], step
    reader = by_step["read_warc"]  # every record not passed on has one reason: requests, warcinfo, PDFs, ...
    assert sum(reader["reasons"].values()) == reader["dropped"] and reader["reasons"]["not_page"] > 0, reader
    assert stats["damaged_spans"] == 2  # the truncated file's last member, the garbage file
    assert all(stats[f"skipped_{r}"] == reader["reasons"].get(r, 0) for r in SKIP_REASONS)  # flat, for the UI table
    assert set(by_step["language"]["reasons"]) - {"lang_en"}  # the sample has non-English pages
    assert "https://riverside-allotments.net/pancakes" in {d["metadata"]["url"] for d in excluded(out, "fineweb_quality")
                                                            if d["metadata"]["filter_reason"] == "short_line_ratio"}
    assert by_step["resiliparse"]["bytes_out"] < by_step["resiliparse"]["bytes_in"] / 5  # HTML in, text out
    assert all(d["metadata"]["filter_reason"].startswith("gopher_") for d in excluded(out, "gopher_quality"))


def test_dedup_and_pii_scrubbing(default_run):
    check_dedup_and_pii(*default_run)


def test_damaged_warcs_are_reported_not_fatal(default_run):
    stats, out = default_run
    named = " ".join(stats["unreadable_warcs"])
    assert len(stats["unreadable_warcs"]) == 2 and f"warc/{TRUNCATED}" in named and f"warc/{GARBAGE}" in named
    warcs = set(pq.read_table(out / "docs", columns=["warc"]).column("warc").to_pylist())
    assert f"warc/{DOLMA}" in warcs
    assert f"warc/{TRUNCATED}" in warcs  # the articles before the cut are kept


def test_rerun_skips_finished_tasks(download_artifact, default_run):
    stats, out = default_run
    before = {p: p.stat().st_mtime_ns for p in (out / "docs").glob("*.parquet")}
    again = extract.run(extract.Config(workers=1), download_artifact, out=Artifact("extract", "test", out))
    assert again == stats
    assert {p: p.stat().st_mtime_ns for p in (out / "docs").glob("*.parquet")} == before


def test_trafilatura_all_languages_in_process(synthetic_artifact, tmp_path, monkeypatch):
    """Trafilatura, every language, one task per WARC: the compost page and its copies are in different tasks, so dedup
    must work across them. In this process, so the no_internet guard sees every connection datatrove might attempt.
    Progress is reported while the pipelines run, as finished datatrove tasks of all of them."""
    from stages import extract_executors
    from stages.common import reporting

    reports = []
    monkeypatch.setattr(extract_executors, "PROGRESS_EVERY_S", 0.05)
    with reporting(lambda done, total, unit: reports.append((done, total, unit))):
        stats, out = run_extract(tmp_path, synthetic_artifact, extractor="trafilatura", languages=(), workers=1)
    cfg = extract.Config()
    total = 2 + 1 + 2 + 2 * cfg.minhash_buckets + 1 + 2  # per WARC: filter, minhash_signature, write; + the rest
    assert {(t, u) for _, t, u in reports} == {(total, "datatrove tasks")}
    dones = [d for d, _, _ in reports]
    assert dones == sorted(dones) and dones[-1] == total and len(set(dones)) >= 3, dones
    check_funnel(stats)
    assert stats["funnel"][2]["step"] == "trafilatura"
    check_columns_and_offsets(synthetic_artifact, out)
    check_dedup_and_pii(stats, out)
    assert stats["documents"] == 3 and stats["unreadable_warcs"] == []


def test_bad_words_from_a_local_list(tmp_path):
    from datatrove.data import Document

    words = tmp_path / "en.txt"
    words.write_text("turnip\nparsnip soup\n")
    f = extract.LocalBadWordsFilter(str(words))
    assert f.filter(Document(text="We grew a Turnip this year.", id="1", metadata={"language": "en"})) == (
        False, "document_removed_with_badwords")
    assert f.filter(Document(text="We grew turnips and parsnips.", id="2", metadata={"language": "fr"})) is True


def test_cluster_executors_fail_with_the_fix(download_artifact, tmp_path, monkeypatch):
    monkeypatch.setattr(extract.shutil, "which", lambda name: None)  # no sbatch here, even on a Slurm login node
    with pytest.raises(StageError, match="sbatch"):
        run_extract(tmp_path, download_artifact, executor="slurm", slurm_partition="cpu")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, installed or not
    with pytest.raises(StageError, match="pip install ray"):
        run_extract(tmp_path, download_artifact, executor="ray")


def test_input_without_warcs_names_the_fix(tmp_path):
    empty = tmp_path / "dl"
    (empty / "warc").mkdir(parents=True)
    with pytest.raises(StageError, match="stages.download"):
        run_extract(tmp_path, Artifact("download", "empty", empty))
    with pytest.raises(StageError, match="one download artifact"):
        extract.run(extract.Config(), out=Artifact("extract", "x", tmp_path))


def test_config_validation():
    with pytest.raises(ValueError, match="extractor"):
        extract.Config(extractor="beautifulsoup")
    with pytest.raises(ValueError, match="language_threshold"):
        extract.Config(language_threshold=1.5)
    with pytest.raises(ValueError, match="languages"):
        extract.Config(languages="en")
    with pytest.raises(ValueError, match="slurm_partition"):
        extract.Config(executor="slurm")
    with pytest.raises(ValueError, match="executor"):
        extract.Config(executor="dask")
    with pytest.raises(ValueError, match="badwords_path"):
        extract.Config(badwords_path="/nonexistent/en.txt")
    assert extract.lid_model_path().is_file()


def test_shared_tokenizer_gives_datatrove_tokens():
    """The quality filters' faster tokenizer returns exactly what datatrove's spaCy tokenizer returns (words, sentences,
    sentence spans) on real articles, is one object per process through deepcopy and pickle (datatrove copies the
    pipeline for every task), and starts afresh past its vocabulary bound with the same tokens."""
    import copy
    import pickle

    from datatrove.utils.word_tokenizers import load_word_tokenizer
    from docs_fixture import real_docs

    from stages import extract_steps

    reference, shared = load_word_tokenizer("en"), extract_steps.shared_tokenizer("en")
    assert copy.deepcopy(shared) is shared and pickle.loads(pickle.dumps(shared)) is shared
    texts = [d["text"] for d in real_docs()[:20]] + ["", "Don't stop: e-mail me at a@b.org!\n\nNew line.\n"]
    for method in ("word_tokenize", "sent_tokenize", "span_tokenize"):
        assert [getattr(shared, method)(t) for t in texts] == [getattr(reference, method)(t) for t in texts], method
    # spaCy can raise on the literal "IS_ALPHA" (an attribute name), depending on the vocabulary's history; datatrove
    # then tokenizes the text without it. Neither tokenizer may fail on it.
    assert shared.word_tokenize("IS_ALPHA is a spaCy name.")[-3:] == reference.word_tokenize("a spaCy name.")[-3:]
    words = shared.word_tokenize(texts[0])
    limit, extract_steps.VOCAB_LIMIT = extract_steps.VOCAB_LIMIT, 10
    try:
        before = shared.tokenizer
        shared.forget_pieces()  # else word_tokenize finds every piece's words in its cache and spaCy does not run
        assert shared.word_tokenize(texts[0]) == words and shared.tokenizer is not before  # a fresh pipeline
    finally:
        extract_steps.VOCAB_LIMIT = limit
