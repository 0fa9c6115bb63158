"""`fastv-export run`: answer a request with a bundle's graphs, the checkpoint's own processing in front."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from fastv_export.commands.common import add_runner_argument
from fastv_export.errors import FastVError

log = logging.getLogger(__name__)

HELP = "answer a prompt with images / videos, or a chat request, with a bundle's graphs"
DESCRIPTION = """\
Drive the bundle exactly as a deployment runtime would: vision -> embed -> pre-K (TokenSelect) -> post-K,
then decode steps over the two KV caches. The request goes through the model's own processing, which every
bundle carries (the presets' included; --model DIR uses another directory's files): its chat template, its
image / video processor (resize, crop, normalize, smart resize, tiles; videos sampled at its fps / frame
count) and its tokenizer on the whole prompt, each image or video placeholder expanded to that medium's
tokens, as the Hugging Face processor does.

The prompt: the chat template is applied by default. The short form makes one user turn: the images, then
the videos, then --prompt (after a --system turn, where the template takes one); write no placeholders.
--raw sends --prompt as written, without the chat template, in the model's own format: put the model's
placeholders in it (e.g. "<image>" or "<|vision_start|><|image_pad|><|vision_end|>"; none: the media come
first). A typed \\n in --prompt / --system is a line break.
--request FILE takes the OpenAI chat format instead (a list of requests is one batch, left-padded):
  {"messages": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                             {"type": "text", "text": "What is this?"}]}],
   "max_tokens": 64, "temperature": 0.7, "top_p": 0.9, "seed": 1, "stop": ["\\n"]}

Generation: greedy by default (--temperature 0); --temperature T samples on the host from the tempered
softmax, within --top-k / --top-p, from a seeded generator (--seed: the same seed, the same tokens;
docs/design.md gives the algorithm). --stop TEXT ends a row at TEXT. Options given on the command line
override the request's.

Output: the prompt's size and what TokenSelect kept, then per row its tokens and text; --stream prints the
text as it is generated instead (one request); --json prints one record (per row: tokens, text,
finish_reason, prompt_tokens, kept_positions; per-stage times in ms).

examples:
  fastv-export run bundle --image photo.jpg --prompt "What is in the image?" --stream
  fastv-export run bundle --image photo.jpg --system "Answer in one word." --prompt "What animal is it?"
  fastv-export run bundle --image a.png --image b.jpg --prompt "Compare the two images." --max-new-tokens 64
  fastv-export run bundle --video clip.mp4 --prompt "What happens?" --temperature 0.7 --top-p 0.9 --seed 3
  fastv-export run bundle --video frames/ --prompt "Describe the scene." --top-k 40 --temperature 0.8
  fastv-export run bundle --raw --image cat.png --prompt "USER: <image>\\nWhat is it? ASSISTANT:"
  fastv-export run bundle --request req.json --json
  fastv-export run demo --image shapes.png --prompt "what colour at row 1 col 2 ?"   # demo: tiny-llava-shapes
  fastv-export run bundle --image cat.png --prompt "Describe it." --dump-inputs in/   # + fastv-run --inputs in/
"""
DEFAULT_NEW_TOKENS = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory written by `fastv-export export`")
    what = parser.add_argument_group("the request")
    what.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file (repeatable)")
    what.add_argument("--video", action="append", default=[], metavar="PATH",
                      help="a video file, or a folder of frames (repeatable)")
    what.add_argument("--prompt", default=None,
                      help="the user's text (the chat template is applied to it; --raw: sent as written)")
    what.add_argument("--system", default=None, metavar="TEXT", help="a system message before the user's turn")
    what.add_argument("--raw", action="store_true", dest="as_written",
                      help="send --prompt as written, without the chat template (the model's own format and "
                           "placeholders)")
    what.add_argument("--request", default=None, metavar="JSON",
                      help="a request (or a list: one batch) in the OpenAI chat format, instead of the above")
    sampling = parser.add_argument_group("generation (override the request's)")
    sampling.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                          help="tokens to generate at most (default: the request's max_tokens, else "
                               f"{DEFAULT_NEW_TOKENS})")
    sampling.add_argument("--temperature", type=float, default=None, help="0 (default): greedy")
    sampling.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K likeliest (0: all)")
    sampling.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling (1: off)")
    sampling.add_argument("--seed", type=int, default=None, help="the sampler's seed (default 0)")
    sampling.add_argument("--stop", action="append", default=None, metavar="TEXT",
                          help="stop a row when its text contains TEXT, cut there (repeatable)")
    out = parser.add_argument_group("output")
    out.add_argument("--stream", action="store_true", help="print the text as it is generated (one request)")
    out.add_argument("--json", action="store_true",
                     help="print one JSON record: tokens, text, kept positions, prompt tokens, per-stage times")
    add_runner_argument(parser)
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="the directory whose tokenizer, processor and chat template files to use instead of "
                             "the bundle's (e.g. the checkpoint)")
    parser.add_argument("--dump-inputs", metavar="DIR", default=None,
                        help="also write the inputs fed to the graphs (token ids, attention mask, pixel values per "
                             "vision call, candidate positions) as inputs.json + raw .bin files for the C++ runtime's "
                             "`fastv-run --inputs DIR` (format: runtime/README.md), then generate as usual")


# ---------------------------------------------------------------------------------------------- requests
def _requests(args: argparse.Namespace) -> list:
    """The requests, their media checked to exist before anything is loaded."""
    requests = _parse_requests(args)
    for i, request in enumerate(requests):
        for part in request.media:
            path = Path(part.value)
            if not (path.is_file() or (part.kind == "video" and path.is_dir())):
                where = f"request {i}: " if len(requests) > 1 else ""
                raise FastVError(f"{where}{part.kind} {part.value} does not exist")
    return requests


def _parse_requests(args: argparse.Namespace) -> list:
    from fastv_export.frontend import from_cli, load_requests

    if args.request:
        if args.prompt is not None or args.image or args.video or args.system is not None:
            raise FastVError("--request FILE holds the whole request; drop --prompt / --image / --video / --system "
                             "(or drop --request)")
        return load_requests(args.request)
    if args.prompt is None:
        raise FastVError("give --prompt TEXT (with --image / --video), or --request FILE")
    if not args.prompt.strip():
        raise FastVError("--prompt is empty; give the instruction text")
    return [from_cli(_line_breaks(args.prompt), args.image, args.video, _line_breaks(args.system))]


def _line_breaks(text: str | None) -> str | None:
    """A typed backslash-n in --prompt / --system is a line break (shells pass it as two characters)."""
    return None if text is None else text.replace("\\n", "\n")


def _pick(cli_value, request_values: list, default, name: str):
    """The command line's value, else the requests' (the same in every request of a batch), else ``default``."""
    if cli_value is not None:
        return cli_value
    given = {v for v in request_values if v is not None}
    if len(given) > 1:
        raise FastVError(f"the requests of this batch ask for different {name} ({sorted(given)}); one batch samples "
                         f"with one setting: give --{name.replace('_', '-')} or run them separately")
    return given.pop() if given else default


def _sampling(args: argparse.Namespace, requests: list) -> dict:
    """temperature, top_k, top_p and seed (the keywords of fastv_export.runtime.sampling.SamplingParams)."""
    values = {"temperature": _pick(args.temperature, [r.temperature for r in requests], 0.0, "temperature"),
              "top_k": _pick(args.top_k, [r.top_k for r in requests], 0, "top_k"),
              "top_p": _pick(args.top_p, [r.top_p for r in requests], 1.0, "top_p"),
              "seed": _pick(args.seed, [r.seed for r in requests], 0, "seed")}
    if values["temperature"] < 0 or values["top_k"] < 0 or not 0 < values["top_p"] <= 1:
        raise FastVError("--temperature must be >= 0, --top-k >= 0 and --top-p in (0, 1]")
    return values


def _frontend(args: argparse.Namespace, bundle):
    """The front end over --model DIR, else over the bundle's own serving files (every bundle carries them)."""
    from fastv_export.frontend import Frontend, has_serving_files

    if args.model:
        if not Path(args.model).is_dir():
            raise FastVError(f"--model {args.model} is not a directory")
        return Frontend.load(args.model, bundle)
    if not has_serving_files(bundle.path):        # serving.tokenizer null: the checkpoint had none
        raise FastVError(f"{bundle.path} carries no tokenizer (its checkpoint had none when it was exported): pass "
                         "--model DIR with the model's tokenizer and processor files")
    return Frontend.load(bundle.path, bundle)


# ---------------------------------------------------------------------------------------------- output
class Rows:
    """Per row: its text as it comes (detokenized incrementally), its stop strings and whether it is done."""

    def __init__(self, decode, stops: list[list[str]], eos: list[int], stream) -> None:
        from fastv_export.frontend import StopStrings, StreamDecoder

        self.decoders = [StreamDecoder(decode) for _ in stops]
        self.stops = [StopStrings(s) for s in stops]
        self.eos = set(eos)
        self.done = [False] * len(stops)
        self.reason = ["length"] * len(stops)
        self.length = [0] * len(stops)           # tokens that count for each row
        self.stream = stream                     # a text file to stream row 0 to, or None
        self.shown = 0

    def on_token(self, step: int, tokens) -> bool:
        for r, token in enumerate(tokens):
            if self.done[r]:
                continue
            self.length[r] = step + 1
            if int(token) in self.eos:
                self.done[r], self.reason[r] = True, "stop"
                continue
            self.decoders[r].push(int(token))
            if self.stops[r].cut(self.decoders[r].text) is not None:
                self.done[r], self.reason[r] = True, "stop"
        self._show(False)
        return all(self.done)

    def text(self, r: int) -> str:
        d = self.decoders[r]
        return self.stops[r].visible(d.text + d.flush(), True)

    def _show(self, final: bool) -> None:
        if self.stream is None:
            return
        d = self.decoders[0]
        text = self.stops[0].visible(d.text, final or self.done[0])
        if len(text) > self.shown:
            self.stream.write(text[self.shown:])
            self.stream.flush()
            self.shown = len(text)

    def finish(self) -> list[str]:
        texts = [self.text(r) for r in range(len(self.decoders))]
        if self.stream is not None:
            if len(texts[0]) > self.shown:
                self.stream.write(texts[0][self.shown:])
            self.stream.write("\n")
            self.stream.flush()
        return texts


# ---------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    from fastv_export.bundle import load_bundle
    from fastv_export.runtime.generate import generate
    from fastv_export.runtime.runners import open_runner

    requests = _requests(args)
    bundle = load_bundle(args.bundle)
    front = _frontend(args, bundle)
    max_new = _pick(args.max_new_tokens, [r.max_tokens for r in requests], DEFAULT_NEW_TOKENS, "max_tokens")
    if max_new < 1:
        raise FastVError("--max-new-tokens must be >= 1")
    params = _sampling(args, requests)
    stops = [list(args.stop) if args.stop is not None else list(r.stop) for r in requests]
    prepared = front.prepare(requests, raw=args.as_written, check_engines=args.runner == "tensorrt")
    if args.dump_inputs:
        from fastv_export.runtime.dump import dump_inputs
        from fastv_export.runtime.generate import find_candidates

        grids = None
        if bundle.vision_layout["kind"] == "patch_grid":
            from fastv_export.runtime.vision_feeds import media_grid

            grids = [media_grid(bundle.vision_layout, m, bundle.grid_thw) for m in prepared.media]
        dump_inputs(args.dump_inputs, prepared.input_ids, prepared.attention_mask, prepared.images,
                    find_candidates(prepared.input_ids, bundle.image_token_ids), prepared.video_seconds or None,
                    grids)
    eos = front.eos_token_ids
    streamed = args.stream and not args.json and len(requests) == 1     # a batch prints its rows at the end
    rows = Rows(front.decode, stops, eos, sys.stdout if streamed else None)
    sampler = _sampler(params, len(requests))
    gen = generate(open_runner(bundle, args.runner), prepared.input_ids, prepared.attention_mask, prepared.images,
                   max_new, eos_token_id=eos or None, media=prepared.media,
                   video_seconds=prepared.video_seconds or None, sampler=sampler, on_token=rows.on_token)
    texts = rows.finish()
    tokens = [gen.tokens[r, :rows.length[r] or gen.tokens.shape[1]].tolist() for r in range(len(requests))]
    if args.json:
        record = {"rows": [{"tokens": tokens[r], "text": texts[r], "finish_reason": rows.reason[r],
                            "prompt_tokens": prepared.prompt_tokens[r],
                            "kept_positions": gen.kept[r].tolist()} for r in range(len(requests))],
                  "timings_ms": {k: round(v * 1e3, 3) for k, v in gen.timings.items()}}
        print(json.dumps(record, ensure_ascii=False))
        return 0
    if streamed:
        _stats(gen, bundle, prepared, sys.stderr, verbose_only=True)
        return 0
    _stats(gen, bundle, prepared, sys.stdout)
    for r in range(len(requests)):
        prefix = f"[{r}] " if len(requests) > 1 else ""
        print(f"{prefix}tokens: {tokens[r]}")
        print(f"{prefix}text  : {texts[r]!r}")
    if log.isEnabledFor(logging.INFO):   # -v
        for stage, sec in gen.timings.items():
            print(f"  {stage:>16}: {sec * 1e3:8.2f} ms")
    return 0


def _sampler(values: dict, batch: int):
    """None (greedy, the graphs' argmax as before) for temperature 0, else the seeded host sampler."""
    if values["temperature"] == 0:
        return None
    from fastv_export.runtime.sampling import Sampler, SamplingParams

    return Sampler(SamplingParams(**values), batch)


def _stats(gen, bundle, prepared, out, verbose_only: bool = False) -> None:
    if verbose_only and not log.isEnabledFor(logging.INFO):
        return
    f = bundle.fastv
    media = len(prepared.media) // max(1, len(prepared.prompts))
    print(f"prompt: {prepared.input_ids.shape[1]} tokens ({media} image(s)/video(s)); kept {gen.kept.shape[1]} "
          f"after TokenSelect (K={f.k}, R={f.r.numerator}/{f.r.denominator}, {f.ranking})", file=out)
