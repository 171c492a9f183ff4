"""Problems with checkable answers, and the verifier that scores a reply: rewards for RL without a reward model.

Problems are `{"question": str, "answer": str}` in GSM8K's format: the answer may hold worked steps, and its final
number comes after '####' ("... so 3 + 4 = 7.\\n#### 7"). They come from a JSONL file (GSM8K's train split, say)
or from `arithmetic_problems`, a seeded generator of small-number sums and differences whose held-out part is
disjoint from its training part. A reply is right when its final number (stages.evaluate.final_number, the rule
the GSM8K evaluation uses) equals the answer's; an optional bonus rewards ending the reply with "#### <number>".
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from stages.common import StageError
from stages.evaluate import final_number
from stages.lm.examples import read_jsonl

# A reply that ends with the GSM8K answer line: "#### 71" (a sign, thousands separators, decimals allowed).
ANSWER_LINE = re.compile(r"####\s*-?\d[\d,]*(?:\.\d+)?\s*$")
OPS = ("+", "-")


def reference(answer: str) -> str:
    """The number a reply must end with: the answer's final number, after '####' when there is one."""
    value = final_number(str(answer))
    if value is None:
        raise StageError(f"the answer {answer!r} holds no number: give each problem a numeric answer "
                         f"(GSM8K style: '... #### 42')")
    return value


def score(reply: str, answer: str, format_reward: float = 0.0) -> tuple[float, bool]:
    """(reward, correct): 1 when the reply's final number equals the answer's, plus format_reward when the reply
    ends with '#### <number>'. So the reward is one of 0, format_reward, 1 and 1 + format_reward."""
    correct = final_number(reply) == reference(answer)
    return float(correct) + (format_reward if ANSWER_LINE.search(reply) else 0.0), correct


def check_problem(rec: dict) -> str | None:
    if not isinstance(rec.get("question"), str) or not rec["question"].strip():
        return "no 'question' string"
    if not isinstance(rec.get("answer"), (str, int, float)) or final_number(str(rec["answer"])) is None:
        return "no numeric 'answer' (GSM8K style: '... #### 42')"
    return None


def load_problems(path: Path | str) -> tuple[list[dict], list[dict]]:
    """(problems, malformed lines) from a JSONL of {"question", "answer"}; answers become strings."""
    records, malformed = read_jsonl(path, check_problem)
    return [{"question": r["question"], "answer": str(r["answer"])} for r in records], malformed


def arithmetic_space(max_value: int) -> int:
    """How many distinct problems the generator can draw: a + b with a, b in [0, max_value], and a - b with
    a >= b (so no answer is negative)."""
    n = max_value + 1
    return n * n + n * (n + 1) // 2


def worked_steps(a: int, op: str, b: int, width: int) -> str:
    """Column arithmetic, ones digit first, one step per digit with its carry (+) or borrow (-) always written:
    "3 + 8 + 0 = 11. 2 + 4 + 1 = 7." for 23 + 48; "11 - 8 - 0 = 3. 7 - 4 - 1 = 2." for 71 - 48 (a borrowing
    step writes the digit plus 10). Each step is a one-digit lookup, which a tiny model learns far more
    reliably than the whole sum at once (Lee et al. 2023, "Teaching arithmetic to small transformers")."""
    steps, carry = [], 0
    for i in range(width):
        da, db = a // 10 ** i % 10, b // 10 ** i % 10
        if op == "+":
            steps.append(f"{da} + {db} + {carry} = {da + db + carry}.")
            carry = (da + db + carry) // 10
        else:
            borrow = int(da - db - carry < 0)
            steps.append(f"{da + 10 * borrow} - {db} - {carry} = {da + 10 * borrow - db - carry}.")
            carry = borrow
    return " ".join(steps)


def arithmetic_problems(max_value: int, n_train: int, n_val: int, seed: int,
                        worked: bool = False) -> tuple[list[dict], list[dict]]:
    """(train, held-out) lists of distinct problems "What is a + b?" / "What is a - b?" with 0 <= a, b <= max_value.

    Deterministic by seed. Held-out problems are drawn first and training problems are never one of them, so the
    two are disjoint and the held-out set depends only on (max_value, n_val, seed), not on n_train. The answer is
    written out GSM8K style, "23 + 48 = 71. #### 71", so it also serves as the target reply for SFT; with
    `worked`, as column arithmetic (worked_steps) before the "#### 71" line. Only the final number is checked.
    """
    space = arithmetic_space(max_value)
    if n_train < 1 or n_val < 1:
        raise ValueError("arithmetic_problems needs at least one training and one held-out problem")
    # Drawing by rejection needs more draws as the space fills up; half the space keeps it under 2x on average.
    if n_train + n_val > space // 2:
        raise StageError(f"{n_train + n_val} distinct problems asked of a space of {space} (numbers up to "
                         f"{max_value}): raise rl.arithmetic_max or ask for fewer (at most {space // 2})")
    rng = np.random.default_rng(seed)
    seen: set[tuple[int, str, int]] = set()
    drawn: list[tuple[int, str, int]] = []
    while len(drawn) < n_val + n_train:
        a, b = (int(v) for v in rng.integers(0, max_value + 1, size=2))
        op = OPS[int(rng.integers(0, len(OPS)))]
        if op == "-" and a < b:
            a, b = b, a
        if (a, op, b) not in seen:
            seen.add((a, op, b))
            drawn.append((a, op, b))

    def problem(a: int, op: str, b: int) -> dict:
        c = a + b if op == "+" else a - b
        work = worked_steps(a, op, b, len(str(max_value))) if worked else f"{a} {op} {b} = {c}."
        return {"question": f"What is {a} {op} {b}?", "answer": f"{work} #### {c}"}

    return [problem(*t) for t in drawn[n_val:]], [problem(*t) for t in drawn[:n_val]]
