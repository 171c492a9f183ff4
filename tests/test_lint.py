"""No undefined names anywhere in the code, bench/ included: bench scripts run by hand, so nothing else would catch
a helper deleted by a refactor (bench/extraction_quality.py lost three that way and failed only when run)."""

import ast
from itertools import chain
from pathlib import Path

from pyflakes import checker, messages

REPO = Path(__file__).resolve().parent.parent
BUGS = (messages.UndefinedName, messages.UndefinedLocal, messages.UndefinedExport)


def test_no_undefined_names():
    files = sorted(chain(*(REPO.glob(pattern) for pattern in ("stages/**/*.py", "flows/*.py", "bench/*.py",
                                                                "tests/*.py"))))
    assert len(files) > 50
    found = [str(m) for path in files
             for m in checker.Checker(ast.parse(path.read_text(), str(path)), filename=str(path)).messages
             if isinstance(m, BUGS)]
    assert not found, "\n".join(found)
