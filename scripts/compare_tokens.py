#!/usr/bin/env python
"""Do two generations of the same request agree? Compares the tokens and kept positions of two JSON records, each
from `fastv-export run --json` ({"rows": [{"tokens", "kept_positions"}, ...]}) or `fastv-run --json`
({"tokens": [[...]], "kept_positions": [[...]]} with --inputs, or "rows" with a request).

Tokens agree when they are equal, or when one row stopped at its end-of-sequence token and the other continues
after that point with one repeated id only (fastv-run fills a finished row with the pad id). Kept positions must
be equal. Prints one line per row and exits 0 when every row agrees, 1 otherwise (2: unreadable input).

usage: python scripts/compare_tokens.py EXPECTED.json ACTUAL.json [--labels onnxruntime,tensorrt]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def rows_of(record: dict) -> list[tuple[list[int], list[int]]]:
    """(tokens, kept positions) per row of a record of either format."""
    if "rows" in record:
        return [(list(r["tokens"]), list(r.get("kept_positions", []))) for r in record["rows"]]
    tokens, kept = record["tokens"], record.get("kept_positions", [[] for _ in record["tokens"]])
    return [(list(t), list(k)) for t, k in zip(tokens, kept)]


def compare_row(expected: list[int], actual: list[int]) -> str | None:
    """None when the rows agree (see the module docstring), else what differs."""
    short, long = (expected, actual) if len(expected) <= len(actual) else (actual, expected)
    for i, (a, b) in enumerate(zip(expected, actual)):
        if a != b:
            return f"first difference at token {i}: {a} vs {b}"
    tail = long[len(short):]
    if tail and not short:
        return f"{'expected' if not expected else 'actual'} row is empty, the other holds {len(long)} tokens"
    if len(set(tail)) > 1:
        return f"lengths {len(expected)} vs {len(actual)}, and the longer row goes on with {tail[:8]}"
    return None


def compare(expected: dict, actual: dict, labels: tuple[str, str] = ("expected", "actual")) -> list[str]:
    """One line per row; a line starting with 'DIFFERENT' for each disagreement."""
    a_rows, b_rows = rows_of(expected), rows_of(actual)
    if len(a_rows) != len(b_rows):
        return [f"DIFFERENT: {labels[0]} has {len(a_rows)} rows, {labels[1]} {len(b_rows)}"]
    if not a_rows:
        return ["DIFFERENT: no rows to compare"]
    lines = []
    for r, ((ta, ka), (tb, kb)) in enumerate(zip(a_rows, b_rows)):
        problem = compare_row(ta, tb)
        if problem is None and ka != kb:
            problem = f"kept positions differ ({len(ka)} vs {len(kb)} positions)"
        if problem is None:
            lines.append(f"row {r}: equal ({min(len(ta), len(tb))} tokens, {len(ka)} kept positions)")
        else:
            lines.append(f"DIFFERENT row {r}: {problem}; {labels[0]} {ta[:16]}, {labels[1]} {tb[:16]}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("expected")
    ap.add_argument("actual")
    ap.add_argument("--labels", default="expected,actual", help="two names for the records, comma-separated")
    args = ap.parse_args(argv)
    labels = tuple(args.labels.split(",", 1)) if "," in args.labels else ("expected", "actual")
    records = []
    for path in (args.expected, args.actual):
        try:
            text = Path(path).read_text().strip().splitlines()
            records.append(json.loads(text[-1]))           # the record is the last line printed
        except (OSError, IndexError, json.JSONDecodeError) as exc:
            print(f"compare_tokens.py: cannot read a JSON record from {path}: {exc}", file=sys.stderr)
            return 2
    try:
        lines = compare(records[0], records[1], labels)     # type: ignore[arg-type]
    except (KeyError, TypeError) as exc:
        print(f"compare_tokens.py: not a run record (tokens / rows missing): {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 1 if any(line.startswith("DIFFERENT") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
