"""The generative benchmark's tasks, generated here: exact-match scoring, and train and test
disjoint by construction (every row of a file is a distinct question, so no test question is
ever seen in training, whatever the split).

- `arithmetic`: two-operand addition of numbers below 1,000, as prompt/completion pairs
  ("What is 347 + 58?" -> "405"): the side network must compute.
- `dates`: an ISO date written in words, as chats ("Write 2023-04-17 as a date in words." ->
  "April 17, 2023"): a text-format conversion, which a side network mostly reformats.

    python -m bench.gen_tasks arithmetic FILE.jsonl [--rows N] [--seed S]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

MONTHS = (
    "January February March April May June July August September October November December"
).split()


def arithmetic(rows: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < rows:
        pairs.add((rng.randrange(1000), rng.randrange(1000)))
    return [
        {"prompt": f"What is {a} + {b}?", "completion": str(a + b)}
        for a, b in sorted(pairs, key=lambda _: rng.random())
    ]


def dates(rows: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    first = dt.date(1900, 1, 1)
    days = rng.sample(range((dt.date(2099, 12, 31) - first).days + 1), rows)
    out = []
    for n in days:
        d = first + dt.timedelta(days=n)
        question = f"Write {d.isoformat()} as a date in words."
        answer = f"{MONTHS[d.month - 1]} {d.day}, {d.year}"
        out.append(
            {
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return out


TASKS = {"arithmetic": arithmetic, "dates": dates}


def write(task: str, path: str | Path, rows: int, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in TASKS[task](rows, seed)))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("out")
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(write(args.task, args.out, args.rows, args.seed))


if __name__ == "__main__":
    main()
