"""A stage for tests of concurrent builds (tests/test_store_concurrency.py), run in subprocesses: it logs when it
starts and ends to $SLOW_STAGE_LOG, and writes its files slowly enough for another process to come in between."""

import os
import time
from dataclasses import dataclass

from stages.common import runtime

NAME = "slow"
CODE_VERSION = 1


@dataclass(frozen=True)
class Config:
    tag: str = "a"          # distinct tags are distinct recipes
    seconds: float = runtime(2.0)  # how long run() takes: not in the version, so one recipe can be slow or fast


def log(event: str) -> None:
    with open(os.environ["SLOW_STAGE_LOG"], "a") as f:
        f.write(f"{os.getpid()} {event}\n")


def run(cfg: Config, *inputs, out) -> dict:
    resumed = (out.path / "part-0.txt").exists()  # a killed builder's partial work
    log(f"start {cfg.tag}{' resumed' if resumed else ''}")
    for i in range(4):
        (out.path / f"part-{i}.txt").write_text(f"{cfg.tag} {i}\n" * 1000)
        time.sleep(cfg.seconds / 4)
    log(f"end {cfg.tag}")
    return {"tag": cfg.tag, "resumed": resumed}
