"""Write conversations of nano's own task families as fine-tuning JSONL (the input format of
`ossgpt finetune` and `ossgpt inspect router`), N per family, seeded:

    python benchmarks/nano_conversations.py /tmp/insp/nano_convs.jsonl --per-family 43

Families: those of nano's training mixture (ossgpt.data.FAMILIES); "tools" includes tool calls
with their results, and direct answers with tools declared. Each line also carries its family
(an extra key the readers ignore), so a report can be split by family afterwards."""

from __future__ import annotations

import argparse
import json

from ossgpt.data import FAMILIES, examples
from ossgpt.data.tasks import chat_record
from ossgpt.files import write_atomic


def conversations(per_family: int, seed: int = 0, split: str = "train") -> list[dict]:
    lines = []
    for family in FAMILIES:
        stream = examples(family, split, seed)
        for _ in range(per_family):
            ex = next(stream, None)
            if ex is None:
                break
            lines.append({**chat_record(ex), "family": family})
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output")
    parser.add_argument("--per-family", type=int, default=43)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lines = conversations(args.per_family, args.seed)
    write_atomic(args.output, "".join(json.dumps(line) + "\n" for line in lines))
    print(f"{len(lines)} conversations -> {args.output}")


if __name__ == "__main__":
    main()
