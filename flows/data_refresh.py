"""Recurring data refresh: the WARC files of a crawl that no dataset version holds yet -> a new dataset version.

    crawl2chat refresh --preset small                        # the newest crawl (collinfo.json), new files only
    crawl2chat refresh --preset tiny --source data/tiny-cc --crawl CC-MAIN-2024-22
    crawl2chat schedule data-refresh --cron "0 3 * * 1"     # every Monday at 03:00, once deployed

A dataset version is a tokenize_shards artifact; the store alias `tokenize_shards/dataset` names the newest one
(before the first refresh, `tokenize_shards/latest`: the dataset that `crawl2chat run` made, if any).
Each refresh:
  1. resolves the crawl (`latest` reads Common Crawl's collinfo.json) and reads its WARC listing;
  2. collects the WARC files every earlier version holds (the download artifacts in the dataset's lineage) and
     keeps only the others (at most `max_files`, deterministically by seed);
  3. downloads and extracts only those; extract deduplicates the new documents against the MinHash indexes of
     every earlier version's extract artifact (each extract artifact carries the index of its documents), so
     the new version holds no near-duplicate of an earlier one;
  4. tokenizes only the new documents with the dataset's existing tokenizer, into a tokenize_shards artifact
     that lists the earlier version's shards by reference (nothing is copied or re-tokenized), and moves the
     `dataset` alias to it.
With nothing new to process it changes nothing and says so. Every step is an ordinary stage: a crashed refresh
re-run with the same arguments resumes where it stopped, and the lineage of a version reaches every WARC file.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace

from prefect import flow, get_run_logger

from flows import presets
from flows.tasks import run_stage
from stages import download, extract, tokenize_shards, train_tokenizer
from stages.artifacts import ArtifactStore
from stages.common import StageError

DATASET = "dataset"  # alias of the newest dataset version: tokenize_shards/dataset


def dataset_chain(store: ArtifactStore, version: str | None) -> list[dict]:
    """The manifests of a dataset version and every version it extends, newest first."""
    chain = []
    while version:
        manifest = store.manifest(tokenize_shards.NAME, version)
        chain.append(manifest)
        version = next((i["version"] for i in manifest["inputs"] if i["stage"] == tokenize_shards.NAME), None)
    return chain


def _inputs(manifest: dict, stage: str) -> list[tuple[str, str]]:
    return [(i["stage"], i["version"]) for i in manifest["inputs"] if i["stage"] == stage]


def held_files(store: ArtifactStore, chain: list[dict]) -> set[str]:
    """Listing paths of the WARC files that the versions of the chain were made from."""
    held = set()
    for manifest in chain:
        for _, ex in _inputs(manifest, extract.NAME):
            for _, dl in _inputs(store.manifest(extract.NAME, ex), download.NAME):
                files = json.loads((store.get(download.NAME, dl).path / "files.json").read_text())
                held.update(f["path"] for f in files)
    return held


@flow(name="data-refresh", flow_run_name="refresh {preset} {crawl}", validate_parameters=False)
def data_refresh(preset: str = "small", crawl: str = "latest", source: str | None = None, max_files: int = 8,
                 overrides: list[str] = (), root: str = "artifacts") -> str:
    """Returns the ref of the dataset version that holds the crawl's files afterwards."""
    log = get_run_logger()
    cfg = presets.load(preset, list(overrides), source)
    store = ArtifactStore(root)
    current = store.read_alias(tokenize_shards.NAME, DATASET)
    if current is None and store.read_alias(tokenize_shards.NAME, "latest"):
        # The first refresh of a store that `crawl2chat run` filled extends the dataset its models trained on:
        # its files count as held and its tokenizer stays, rather than a second, unrelated dataset starting.
        current = store.read_alias(tokenize_shards.NAME, "latest")
        log.info("no %s alias yet: extending %s/%s, the newest dataset of this store", DATASET,
                 tokenize_shards.NAME, current)
    chain = dataset_chain(store, current)
    held = held_files(store, chain)

    listing_cfg = replace(cfg.download, crawl=crawl)
    crawl_id = download.resolve_crawl(listing_cfg)
    listed, _ = download.read_listing(listing_cfg, crawl_id)
    new = download.pick([p for p in listed if p not in held], max_files, cfg.download.seed)
    log.info("%s: %d WARC files listed, %d held by %d earlier dataset version(s), %d to process",
             crawl_id, len(listed), len(set(listed) & held), len(chain), len(new))
    if not new:
        if current is None:
            raise StageError(f"{crawl_id} lists no WARC files at {cfg.download.source}: check --source/--crawl")
        log.info("nothing new in %s: the dataset stays %s/%s", crawl_id, tokenize_shards.NAME, current)
        return f"{tokenize_shards.NAME}/{current}"

    warcs = run_stage(download, replace(listing_cfg, crawl=crawl_id, files=tuple(sorted(new)), num_files=None,
                                        fraction=0.0), [], root)
    earlier_docs = [store.get(*ex) for m in chain for ex in _inputs(m, extract.NAME)]
    docs = run_stage(extract, cfg.extract, [warcs, *earlier_docs], root)
    if chain:  # the dataset keeps its tokenizer: token ids must mean the same thing in every shard
        tokenizer = store.get(*_inputs(chain[0], train_tokenizer.NAME)[0])
        previous = [store.get(tokenize_shards.NAME, current)]
    else:  # the first version trains the tokenizer on its own documents
        tokenizer = run_stage(train_tokenizer, cfg.train_tokenizer, [docs], root)
        previous = []
    dataset = run_stage(tokenize_shards, cfg.tokenize_shards, [docs, tokenizer, *previous], root)
    store.set_alias(tokenize_shards.NAME, DATASET, dataset.version)
    log.info("dataset %s: %d new documents on top of %d earlier version(s)", dataset.ref,
             dataset.manifest()["stats"]["new_train_docs"] + dataset.manifest()["stats"]["new_val_docs"], len(chain))
    return dataset.ref


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m flows.data_refresh", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--crawl", default="latest")
    p.add_argument("--source")
    p.add_argument("--max-files", type=int, default=8)
    p.add_argument("--root", default="artifacts")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(data_refresh(a.preset, a.crawl, a.source, a.max_files, a.overrides, a.root))


if __name__ == "__main__":
    main()
