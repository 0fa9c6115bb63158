#!/usr/bin/env python
"""Train the demo preset tiny-llava-shapes from scratch on CPU (a few minutes on 2 cores) and write
its weights to fastv_export/presets/weights/tiny-llava-shapes.safetensors, then print the test accuracy
beside the chance level (the best image-blind guesser).

    python scripts/train_demo.py                  # default settings, writes the committed weights
    python scripts/train_demo.py --steps 300 --out /tmp/w.safetensors   # a quick try
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields

from fastv_export.presets import demo


def main(argv: list[str] | None = None) -> int:
    defaults = demo.TrainSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(defaults):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name), help=f"(default {getattr(defaults, f.name)})")
    p.add_argument("--out", default=str(demo.WEIGHTS), help=f"weights file (default {demo.WEIGHTS})")
    p.add_argument("--summary", default=None, help="also write the summary JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = demo.TrainSettings(**{f.name: getattr(args, f.name) for f in fields(defaults)})
    summary = demo.train(settings, out=args.out)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.summary:
        from fastv_export.files import atomic_write_text
        atomic_write_text(args.summary, text + "\n")
    acc, chance = summary["test_accuracy"]["all"], summary["chance_accuracy"]
    print(f"trained in {summary['train_seconds']:.0f} s; test accuracy {acc:.3f} "
          f"(chance, the best image-blind guesser: {chance:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
