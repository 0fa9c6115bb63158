"""Write the trained demo model (tiny-llava-shapes) as a checkpoint directory, the way a user's own
checkpoint looks (config.json, model.safetensors, tokenizer.json, preprocessor_config.json,
chat_template.jinja, generation_config.json), and test images of its task with their questions.

The README's user path starts from it: export the directory, delete it, run the bundle on the images.

usage: python scripts/demo_checkpoint.py OUT_DIR [--images DIR] [--count 3]
  OUT_DIR        the checkpoint directory to write (must not exist)
  --images DIR   also write COUNT held-out task images as PNG (shapes-0.png, ...) and questions.txt
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from fastv_export.presets import demo, shapes
from fastv_export.presets.serving import write_preset_files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--images", type=Path, default=None)
    ap.add_argument("--count", type=int, default=3)
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists; choose a new directory")
    with tempfile.TemporaryDirectory(dir=args.out.parent if args.out.parent.exists() else None) as scratch:
        tmp = Path(scratch) / "checkpoint"
        tmp.mkdir()
        demo.build_trained().save_pretrained(tmp)
        write_preset_files(demo.PRESET, tmp)
        shutil.move(str(tmp), args.out)
    print(f"wrote {args.out} ({', '.join(sorted(p.name for p in args.out.iterdir()))})")
    if args.images:
        args.images.mkdir(parents=True, exist_ok=True)
        lines = []
        samples = [shapes.make_sample(shapes.TEST_SEED_OFFSET + i, shapes.KINDS[i % len(shapes.KINDS)])
                   for i in range(args.count)]          # held-out seeds, every question kind in turn
        for i, sample in enumerate(samples):
            # undo the CLIP normalisation: the image a user would hand in
            rgb = sample.pixels.transpose(1, 2, 0) * shapes.CLIP_STD + shapes.CLIP_MEAN
            Image.fromarray(np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)).save(args.images / f"shapes-{i}.png")
            answer = " ".join(shapes.VOCAB[t] for t in sample.answer if t != shapes.EOS_ID)
            lines.append(f"shapes-{i}.png\t{sample.question}\t{answer}")
        (args.images / "questions.txt").write_text("\n".join(lines) + "\n")
        print(f"wrote {args.count} images and questions.txt (image, question, answer) into {args.images}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
