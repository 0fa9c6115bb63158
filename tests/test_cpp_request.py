"""fastv-run's request path against the Python front end (runtime/src/request.cpp, chat.cpp, sampler.cpp,
session.cpp; fastv_export/frontend, fastv_export/runtime/sampling.py, `fastv-export run`).

- the SplitMix64 sampler: the C++ draws equal Python's ``Sampler`` for the same logits, parameters and seeds;
- request errors: one line, a non-zero exit, the Python front end's message;
- ``fastv-run --dry-run``: the prompt ids and the sha256 of the float32 pixel values equal the Python front end's
  (the built-in presets, the trained demo and user-style checkpoints exported to bundles);
- end to end with the cpu executor: on the trained demo (tiny-llava-shapes) ``fastv-run --request`` answers held-out
  questions as ``fastv-export run`` does (greedy, and with seeded sampling the same tokens);
- videos given as a folder of frames (Qwen2-VL / Qwen2.5-VL bundles): ``--dry-run`` and the tokens equal the Python
  front end's and ``fastv-export run --video``'s; bad folders refused in one line.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import fastv_run_error, once_per_run, shared_dir

ROOT = Path(__file__).resolve().parents[1]
#: held-out questions of the trained demo answered by both runtimes (the end-to-end test)
HELD_OUT = 1000


def fastv_run(exe: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def fail_line(proc: subprocess.CompletedProcess) -> str:
    """The message of a refused run's one error line (non-zero exit, nothing on stdout)."""
    return fastv_run_error(proc)[len("fastv-run: error: "):]


def py_error(make) -> str:
    from fastv_export.errors import FastVError

    with pytest.raises(FastVError) as info:
        make()
    return str(info.value)


def pixel_sha256(images) -> str:
    return hashlib.sha256(b"".join(np.ascontiguousarray(u, dtype=np.float32).tobytes() for u in images)).hexdigest()


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    """The trained demo as a user's checkpoint (scripts/demo_checkpoint.py) exported to a bundle, and its
    held-out images with questions.txt (image, question, answer)."""
    root = shared_dir(tmp_path_factory) / "cpp-request-demo"

    def make(tmp: Path) -> None:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_checkpoint.py"), str(tmp / "checkpoint"),
                        "--images", str(tmp / "images"), "--count", str(HELD_OUT)], check=True, capture_output=True)
        from fastv_export.config import FastVConfig
        from fastv_export.export import ExportOptions, export_bundle

        export_bundle(tmp / "bundle", FastVConfig(k=2, ratio="1/2"), ExportOptions(model=str(tmp / "checkpoint")))

    once_per_run(root, make)
    return root / "bundle", root / "images"


@pytest.fixture(scope="session")
def user_bundle(tmp_path_factory):
    """``user_bundle(family)`` -> a bundle exported from tests/user_checkpoints.py's checkpoint (llava,
    qwen2_5_vl), once per run."""
    from tests import user_checkpoints as uc

    root = shared_dir(tmp_path_factory) / "cpp-request-user"

    def get(family: str) -> Path:
        def make(tmp: Path) -> None:
            from fastv_export.config import FastVConfig
            from fastv_export.export import ExportOptions, export_bundle

            tmp.mkdir(parents=True)
            checkpoint = uc.user_checkpoint(tmp / "checkpoints", family)
            export_bundle(tmp / "bundle", FastVConfig(k=2, ratio="1/2"), ExportOptions(model=str(checkpoint)))

        return once_per_run(root / family, make) / "bundle"
    return get


@pytest.fixture(scope="session")
def pictures(tmp_path_factory) -> dict[str, Path]:
    """PNG and JPEG test pictures: square ones (every preset's exported grid) and user-style sizes."""
    from tests import user_checkpoints as uc

    out = shared_dir(tmp_path_factory) / "cpp-request-pictures"

    def make(tmp: Path) -> None:
        from PIL import Image

        tmp.mkdir(parents=True)
        rng = np.random.RandomState(0)
        for name, (w, h) in {"square.png": (64, 64), "square2.png": (80, 80), "wide.png": (96, 40)}.items():
            Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).save(tmp / name)
        (tmp / "user").mkdir()
        uc.test_images(tmp / "user")

    once_per_run(out, make)
    found = {p.name: p for p in out.iterdir() if p.is_file()}
    found.update({f"user/{p.name}": p for p in (out / "user").iterdir()})
    return found


# ---------------------------------------------------------------------------------------------- sampler
@pytest.mark.slow
def test_sampler_draws_equal_python(runtime_build, tmp_path):
    """Python's Sampler (the reference of docs/design.md §8) and the C++ one draw the same tokens for the same
    logits, parameters and seeds: 40 steps each over peaked, flat, tied and -inf logits, batches of 1-3 rows."""
    from fastv_export.runtime.sampling import Sampler, SamplingParams

    rng = np.random.RandomState(11)
    cases = []
    params = [(0.7, 0, 1.0), (1.0, 0, 1.0), (1.3, 5, 1.0), (0.5, 0, 0.9), (1.0, 3, 0.8), (2.0, 40, 0.95),
              (1e-3, 0, 1.0), (0.0, 0, 1.0), (1.0, 1, 1.0), (1.0, 0, 0.3)]
    seeds = [0, 1, 2 ** 64 - 1, 1234567]
    for i, (t, k, p) in enumerate(params):
        for j, seed in enumerate(seeds):
            rows, vocab = 1 + (i + j) % 3, [7, 64, 500][(i * 4 + j) % 3]
            logits = (rng.randn(rows, vocab) * [0.5, 3.0, 8.0][j % 3]).astype(np.float32)
            if j == 1:
                logits[:, : vocab // 2] = np.round(logits[:, : vocab // 2])   # ties
            if j == 2:
                logits[:, ::3] = -np.inf
            sampler = Sampler(SamplingParams(temperature=t, top_k=k, top_p=p, seed=seed), rows)
            steps = 40
            tokens = [sampler(logits).tolist() for _ in range(steps)]
            cases.append({"name": f"T{t}-k{k}-p{p}-seed{seed}-rows{rows}-V{vocab}", "temperature": t, "top_k": k,
                          "top_p": p, "seed": seed, "steps": steps, "tokens": tokens,
                          "logits": [[float(x) if np.isfinite(x) else None for x in row] for row in logits]})   # null: -inf
    path = tmp_path / "draws.json"
    path.write_text(json.dumps({"cases": cases}))
    proc = subprocess.run([str(runtime_build.parent / "fastv_request_tests"), "draws", str(path)], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and f"{len(cases)} passed, 0 failed" in proc.stdout, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------- requests
BAD_REQUESTS = [
    "[]",
    "3",
    "{}",
    '{"messages": []}',
    '{"messages": "hi"}',
    '{"messages": [{"role": "bot", "content": "x"}]}',
    '{"messages": [{"content": "x"}]}',
    '{"messages": [{"role": "user"}]}',
    '{"messages": [{"role": "user", "content": 3}]}',
    '{"messages": [{"role": "user", "content": ["x"]}]}',
    '{"messages": [{"role": "user", "content": [{"text": "x"}]}]}',
    '{"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}]}',
    '{"messages": [{"role": "user", "content": [{"type": "text", "text": null}]}]}',
    '{"messages": [{"role": "user", "content": [{"type": "image"}]}]}',
    '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
    '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}]}',
    '{"messages": [{"role": "user", "content": [{"type": "image", "image": "https://x.org/a.png"}]}]}',
    '[{"messages": [{"role": "user", "content": "a"}]}, {"messages": [{"role": "user", "content": "b"}], '
    '"max_tokens": 0}]',
    '{"messages": [{"role": "user", "content": "a"}], "max_tokens": 2.5}',
    '{"messages": [{"role": "user", "content": "a"}], "max_tokens": 2147483648}',
    '{"messages": [{"role": "user", "content": "a"}], "max_tokens": -0.0}',
    '{"messages": [{"role": "user", "content": "a"}], "top_k": 1e30}',
    '{"messages": [{"role": "user", "content": "a"}], "seed": 18446744073709551616}',
    '{"messages": [{"role": "user", "content": "a"}], "seed": 1.8446744073709552e19}',
    '{"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": "8"}',
    '{"messages": [{"role": "user", "content": "a"}], "temperature": -0.5}',
    '{"messages": [{"role": "user", "content": "a"}], "temperature": "hot"}',
    '{"messages": [{"role": "user", "content": "a"}], "top_k": -1}',
    '{"messages": [{"role": "user", "content": "a"}], "top_k": false}',
    '{"messages": [{"role": "user", "content": "a"}], "top_p": 0}',
    '{"messages": [{"role": "user", "content": "a"}], "top_p": 1.5}',
    '{"messages": [{"role": "user", "content": "a"}], "seed": -1}',
    '{"messages": [{"role": "user", "content": "a"}], "stop": [""]}',
    '{"messages": [{"role": "user", "content": "a"}], "stop": 3}',
]


@pytest.mark.slow
def test_request_errors_are_the_python_lines(runtime_build, demo, tmp_path):
    """Each malformed request: one line, a non-zero exit, the Python front end's message word for word."""
    from fastv_export.frontend import load_requests

    bundle, _ = demo
    for i, text in enumerate(BAD_REQUESTS):
        path = tmp_path / f"bad{i}.json"
        path.write_text(text)
        want = py_error(lambda: load_requests(path))
        got = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--request", path, "--dry-run"))
        assert got == want, text
    # not JSON: one line naming the file, line and column
    (tmp_path / "broken.json").write_text('{"messages": [\n  {"role": "user",, }]}')
    line = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--request", tmp_path / "broken.json"))
    assert line.startswith(f"request file {tmp_path / 'broken.json'} is not valid JSON (line 2, column")
    line = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--request", tmp_path / "none.json"))
    assert line == py_error(lambda: load_requests(tmp_path / "none.json"))


@pytest.mark.slow
def test_command_line_and_media_errors(runtime_build, demo, tmp_path):
    """The short form's errors and media the request path refuses: one line, non-zero exit."""
    bundle, images = demo
    image = images / "shapes-0.png"
    line = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--image", image, "--prompt", "  "))
    assert line == "--prompt is empty; give the instruction text"
    line = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--image", tmp_path / "no.png", "--prompt", "x"))
    assert line == f"image {tmp_path / 'no.png'} does not exist"
    (tmp_path / "req.json").write_text('{"messages": [{"role": "user", "content": "how many blue ?"}]}')
    line = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--request", tmp_path / "req.json", "--prompt", "x"))
    assert line.startswith("--request FILE holds the whole request")
    # corrupt and truncated images
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    line = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--image", tmp_path / "junk.png", "--prompt", "x"))
    assert "junk.png" in line
    data = image.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    line = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--image", tmp_path / "cut.png", "--prompt", "x"))
    assert "cut.png" in line
    # placeholders that do not match the media; a system turn the demo's template refuses; a word it lacks
    line = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--raw", "--image", image, "--prompt",
                               "<image> <image> how many blue ?", "--dry-run"))
    assert "the prompt holds 2 image placeholder(s) (<image>) but 1 image(s) were given" in line
    line = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--image", image, "--prompt", "how many blue ?",
                               "--system", "be brief", "--dry-run"))
    assert "takes no system message" in line
    line = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--image", image, "--prompt", "how many zebras ?",
                               "--dry-run"))
    assert "zebras" in line or "vocabulary" in line
    line = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--video", tmp_path, "--prompt", "x", "--dry-run"))
    assert "video" in line
    # sampling settings out of range
    line = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--prompt", "how many blue ?", "--top-p", "0",
                               "--dry-run"))
    assert line == "--temperature must be >= 0, --top-k >= 0 and --top-p in (0, 1]"


# ---------------------------------------------------------------------------------------------- --dry-run
def _conversations(images: list[Path], square: bool = False) -> list[tuple[dict, bool]]:
    """(request JSON, raw) pairs: the short form, system + user, a finished turn then a question, two images,
    an assistant message to continue, and --raw with the family's own or the generic placeholder."""
    a, b = (str(p) for p in images[:2])

    def user(*parts):
        return {"role": "user", "content": list(parts)}

    def img(p):
        return {"type": "image", "image": p}

    def txt(t):
        return {"type": "text", "text": t}

    out = [({"messages": [user(img(a), txt("What is in the image?"))]}, False),
           ({"messages": [{"role": "system", "content": "Answer in one word."}, user(txt("Describe it:"), img(a))]},
            False),
           ({"messages": [user(img(a), txt("What colour?")), {"role": "assistant", "content": "Red."},
                          user(txt("And the shape?"))]}, False),
           ({"messages": [user(img(a), txt("Compare"), img(b), txt("these two."))]}, False),
           ({"messages": [user(img(b), txt("Name it.")), {"role": "assistant", "content": "It is"}]}, False),
           ({"messages": [user(txt("<image>\nWhat is this?"), img(a))]}, True),
           ({"messages": [user(img(a), txt("no marks here"))]}, True)]
    return out


def _compare_dry_run(exe: Path, bundle: Path, conversations, tmp_path: Path, skip_system: bool = False) -> int:
    """fastv-run --dry-run against the Python front end on each conversation; returns how many were compared."""
    from fastv_export.bundle import load_bundle
    from fastv_export.errors import FastVError
    from fastv_export.frontend import Frontend, parse_requests

    b = load_bundle(bundle)
    front = Frontend.load(b.path, b)
    tmp_path.mkdir(parents=True, exist_ok=True)
    compared = 0
    for i, (request, raw) in enumerate(conversations):
        path = tmp_path / f"req{i}.json"
        path.write_text(json.dumps(request))
        proc = fastv_run(exe, "--bundle", bundle, "--request", path, "--dry-run", *(["--raw"] if raw else []))
        try:
            prepared = front.prepare(parse_requests(request), raw=raw)
        except FastVError as exc:   # refused by Python: refused by C++ too
            assert proc.returncode != 0, f"{request}: Python refuses ({exc}), fastv-run accepts"
            fail_line(proc)
            continue
        assert proc.returncode == 0, f"{request}: {proc.stderr}"
        row = json.loads(proc.stdout)["rows"][0]
        assert row["prompt_text"] == prepared.prompts[0], request
        assert row["prompt_ids"] == prepared.input_ids[0].tolist(), request
        assert row["pixel_sha256"] == pixel_sha256(prepared.images), request
        compared += 1
    return compared


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-llava", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_dry_run_equals_the_python_front_end_on_presets(runtime_build, exported_bundle, pictures, tmp_path, model):
    bundle = exported_bundle(model)
    n = _compare_dry_run(runtime_build, bundle, _conversations([pictures["square.png"], pictures["square2.png"]]),
                         tmp_path)
    assert n >= 5


@pytest.mark.slow
def test_dry_run_equals_the_python_front_end_on_the_demo(runtime_build, demo, tmp_path):
    bundle, images = demo
    questions = [line.split("\t") for line in (images / "questions.txt").read_text().splitlines()[:20]]
    conversations = [({"messages": [{"role": "user", "content": [{"type": "image", "image": str(images / f)},
                                                                 {"type": "text", "text": q}]}]}, False)
                     for f, q, _ in questions]
    conversations.append(({"messages": [{"role": "user", "content": "<image> how many red ?"}]}, True))
    assert _compare_dry_run(runtime_build, bundle, conversations, tmp_path) == len(conversations) - 1


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_dry_run_equals_the_python_front_end_on_user_checkpoints(runtime_build, user_bundle, pictures, tmp_path,
                                                                 family):
    """Trained tokenizers (Llama-style with byte fallback, Qwen-style byte-level BPE), non-default processors and
    real-style templates; the user-style images of several sizes, aspect ratios and formats (PNG, JPEG)."""
    bundle = user_bundle(family)
    user = sorted(p for name, p in pictures.items() if name.startswith("user/"))
    n = 0
    for k in range(0, len(user) - 1, 2):
        n += _compare_dry_run(runtime_build, bundle, _conversations(user[k:k + 2]), tmp_path / str(k))
    assert n >= 5


@pytest.mark.slow
def test_dry_run_without_the_cpu_executor_equals_the_python_front_end(runtime_sanitize_build, user_bundle, pictures,
                                                                       tmp_path):
    """No Python on the request path: the AddressSanitizer + UBSan build has no cpu executor (no embedded Python
    interpreter) and no TensorRT; its --dry-run gives the Python front end's prompt ids, text and pixel checksum
    on the user-style LLaVA checkpoint, with no sanitizer report."""
    user = sorted(p for name, p in pictures.items() if name.startswith("user/"))
    assert _compare_dry_run(runtime_sanitize_build, user_bundle("llava"), _conversations(user[:2]), tmp_path) >= 3


# ---------------------------------------------------------------------------------------------- end to end
def _python_answers(bundle: Path, requests: list[dict], **sampling) -> list[dict]:
    """`fastv-export run --json` for each request, in one process (its front end, runner and Rows)."""
    from fastv_export.bundle import load_bundle
    from fastv_export.commands.run import Rows
    from fastv_export.frontend import Frontend, parse_requests
    from fastv_export.runtime.generate import generate
    from fastv_export.runtime.runners import open_runner
    from fastv_export.runtime.sampling import Sampler, SamplingParams

    b = load_bundle(bundle)
    front = Frontend.load(b.path, b)
    runner = open_runner(b, "onnxruntime")
    out = []
    for request in requests:
        req = parse_requests(request)
        prepared = front.prepare(req)
        eos = front.eos_token_ids
        rows = Rows(front.decode, [req[0].stop], eos, None)
        sampler = Sampler(SamplingParams(**sampling)) if sampling.get("temperature") else None
        gen = generate(runner, prepared.input_ids, prepared.attention_mask, prepared.images,
                       req[0].max_tokens or 32, eos_token_id=eos[0] if eos else None, media=prepared.media,
                       sampler=sampler, on_token=rows.on_token)
        texts = rows.finish()
        out.append({"tokens": gen.tokens[0, :rows.length[0] or gen.tokens.shape[1]].tolist(), "text": texts[0],
                    "finish_reason": rows.reason[0], "prompt_tokens": prepared.prompt_tokens[0],
                    "kept_positions": gen.kept[0].tolist()})
    return out


def _demo_requests(images: Path, count: int, **extra) -> tuple[list[dict], list[str]]:
    lines = [line.split("\t") for line in (images / "questions.txt").read_text().splitlines()[:count]]
    requests = [{"messages": [{"role": "user", "content": [{"type": "image", "image": str(images / f)},
                                                           {"type": "text", "text": q}]}], **extra}
                for f, q, _ in lines]
    return requests, [a for _, _, a in lines]


@pytest.mark.slow
def test_answers_equal_fastv_export_run_on_held_out_questions(runtime_build, demo, tmp_path):
    """The trained demo answers HELD_OUT held-out questions: fastv-run --request (one session, --each) gives the
    tokens, text, finish reason and kept positions `fastv-export run --json` gives, so the same accuracy."""
    bundle, images = demo
    requests, answers = _demo_requests(images, HELD_OUT)
    path = tmp_path / "questions.json"
    path.write_text(json.dumps(requests))
    t0 = time.perf_counter()
    proc = fastv_run(runtime_build, "--bundle", bundle, "--request", path, "--each", "--json", "--executor", "cpu")
    cpp_seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    cpp = [json.loads(line)["rows"][0] for line in proc.stdout.splitlines()]
    t0 = time.perf_counter()
    py = _python_answers(bundle, requests)
    py_seconds = time.perf_counter() - t0
    assert len(cpp) == len(py) == HELD_OUT
    for i, (c, p) in enumerate(zip(cpp, py)):
        assert c == p, f"question {i}: {requests[i]['messages'][0]['content'][1]['text']!r}"
    correct = sum(c["text"].strip() == a for c, a in zip(cpp, answers))
    print(f"{HELD_OUT} held-out questions: {correct} answered correctly by both; fastv-run {cpp_seconds:.1f} s, "
          f"Python {py_seconds:.1f} s")
    assert correct >= 0.5 * HELD_OUT      # the trained demo answers its task (a broken prompt would not)


@pytest.mark.slow
def test_seeded_sampling_equals_fastv_export_run(runtime_build, demo, tmp_path):
    """Sampling with a seed (temperature, top-k, top-p from the request): the same tokens as Python's."""
    bundle, images = demo
    sampling = {"temperature": 1.5, "top_k": 8, "top_p": 0.95, "seed": 5}
    requests, _ = _demo_requests(images, 12, max_tokens=6, **sampling)
    path = tmp_path / "sampled.json"
    path.write_text(json.dumps(requests))
    proc = fastv_run(runtime_build, "--bundle", bundle, "--request", path, "--each", "--json")
    assert proc.returncode == 0, proc.stderr
    cpp = [json.loads(line)["rows"][0] for line in proc.stdout.splitlines()]
    assert cpp == _python_answers(bundle, requests, **sampling)


@pytest.mark.slow
def test_stream_prints_the_json_text(runtime_build, demo):
    bundle, images = demo
    args = ["--bundle", bundle, "--image", images / "shapes-2.png", "--prompt", "where is green ?"]
    streamed = fastv_run(runtime_build, *args, "--stream")
    record = fastv_run(runtime_build, *args, "--json")
    assert streamed.returncode == 0 and record.returncode == 0, streamed.stderr + record.stderr
    assert streamed.stdout == json.loads(record.stdout)["rows"][0]["text"] + "\n"
    # a stop string cuts the text (and ends the row)
    cut = fastv_run(runtime_build, *args, "--json", "--stop", "col")
    row = json.loads(cut.stdout)["rows"][0]
    assert "col" not in row["text"] and row["finish_reason"] == "stop"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_user_checkpoint_tokens_equal_fastv_export_run(runtime_build, user_bundle, pictures, tmp_path, family):
    """User-style checkpoints exported to bundles: greedy and seeded tokens equal Python's for every test
    picture (LLaVA: the processor makes the fixed size; Qwen2.5-VL: each picture's own patch grid)."""
    bundle = user_bundle(family)
    user = sorted(p for name, p in pictures.items() if name.startswith("user/"))
    requests = [{"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": [{"type": "image", "image": str(p)},
                                                           {"type": "text", "text": "What is in the image?"}]}],
                 "max_tokens": 8} for p in user + [pictures["square.png"], pictures["wide.png"]]]
    for sampling in ({}, {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 3}):
        batch = [dict(r, **sampling) for r in requests]
        path = tmp_path / "batch.json"
        path.write_text(json.dumps(batch))
        proc = fastv_run(runtime_build, "--bundle", bundle, "--request", path, "--each", "--json")
        assert proc.returncode == 0, proc.stderr
        cpp = [json.loads(line)["rows"][0] for line in proc.stdout.splitlines()]
        py = _python_answers(bundle, batch, **sampling)
        assert [dict(c, text=None) for c in cpp] == [dict(p, text=None) for p in py], sampling
        tok = _hf_tokenizer(bundle)
        for c, p in zip(cpp, py):
            # the text: Python's, or where Python's windowed stream decoder splits a byte-fallback run that HF's
            # decode of the whole answer turns into U+FFFD per byte (random weights emit such runs), HF's
            full = tok.decode([t for t in c["tokens"] if t not in tok.all_special_ids], skip_special_tokens=True)
            assert c["text"] in (p["text"], full), (c, p, full)


def _hf_tokenizer(bundle: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundle, local_files_only=True)


# ---------------------------------------------------------------------------------------------- request fuzz
#: values a fuzzed request puts in place of any node: wrong types, edge numbers, odd strings, deep nesting
ODD_VALUES = [None, True, 0, -1, 2 ** 63, 2 ** 70, -2 ** 63, 1e308, -0.0, 0.5, 7, "", " ", "user", "image",
              "\u0000", "\ud7ff\ue000", "日本語 🙂 e\u0301", "<image>", "<|im_start|>", "x" * 5000, [], {}, [[[[[]]]]],
              {"type": "text"}, {"type": "image", "image": ""}, [{"type": "text", "text": "a"}] * 3]


def _tree_paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _tree_paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _tree_paths(v, path + (i,))


def _mutate(rng, request, media: list[str]) -> bytes:
    """One seeded corruption of a request (its JSON text as bytes): a node replaced, removed or duplicated, a
    media path swapped for a corrupt, missing or directory one, bytes flipped or cut (invalid UTF-8 included)."""
    doc = json.loads(json.dumps(request))
    paths = list(_tree_paths(doc))
    kind = int(rng.integers(0, 6))
    if kind <= 3:
        path = paths[int(rng.integers(0, len(paths)))]
        if not path:
            doc = ODD_VALUES[int(rng.integers(0, len(ODD_VALUES)))] if kind == 0 else [doc, doc]
        else:
            parent = doc
            for key in path[:-1]:
                parent = parent[key]
            last = path[-1]
            if kind in (0, 1):
                parent[last] = ODD_VALUES[int(rng.integers(0, len(ODD_VALUES)))]
            elif kind == 2:
                del parent[last]
            elif isinstance(parent, list):
                parent.insert(last, json.loads(json.dumps(parent[last])))
            else:
                parent[f"{last}_"] = parent[last]
        return json.dumps(doc, ensure_ascii=bool(rng.integers(0, 2))).encode()
    if kind == 4:
        text = json.dumps(doc)
        for m in media:
            if m in text:
                text = text.replace(m, media[int(rng.integers(0, len(media)))], 1)
        return text.encode()
    data = bytearray(json.dumps(doc, ensure_ascii=False).encode())
    if rng.integers(0, 2):
        for _ in range(int(rng.integers(1, 6))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
    else:
        data = data[:int(rng.integers(0, len(data)))]
    return bytes(data)


def _python_accepts(front, path: Path):
    """What `fastv-export run --request PATH` checks before it generates: the parsed requests, their media, the
    batch's settings, the prepared prompts; a FastVError is a refusal (anything else fails the test)."""
    import argparse

    from fastv_export.commands.run import DEFAULT_NEW_TOKENS, _pick, _sampling
    from fastv_export.frontend import load_requests

    requests = load_requests(path)
    for i, r in enumerate(requests):
        for part in r.media:
            p = Path(part.value)
            if not (p.is_file() or (part.kind == "video" and p.is_dir())):
                from fastv_export.errors import FastVError
                raise FastVError(f"{part.kind} {part.value} does not exist")
    if _pick(None, [r.max_tokens for r in requests], DEFAULT_NEW_TOKENS, "max_tokens") < 1:
        from fastv_export.errors import FastVError
        raise FastVError("max_tokens < 1")
    _sampling(argparse.Namespace(temperature=None, top_k=None, top_p=None, seed=None), requests)
    return front.prepare(requests, raw=False)


@pytest.mark.slow
@pytest.mark.parametrize("build", ["release", "asan+ubsan"])
def test_seeded_request_corruptions_agree_with_python(build, request, user_bundle, pictures, tmp_path):
    """200 seeded corruptions of requests (nodes replaced by wrong types and edge values, removed, duplicated;
    media swapped for corrupt, missing or directory paths; bytes flipped or cut) through `fastv-run --dry-run` on
    the user-style Qwen2.5-VL bundle: each is answered (JSON on stdout) or refused with one line and a non-zero
    exit, never a signal or a sanitizer report; fastv-run accepts exactly what the Python front end accepts, and
    where both accept, the prompt ids equal."""
    from fastv_export.bundle import load_bundle
    from fastv_export.errors import FastVError
    from fastv_export.frontend import Frontend

    exe = request.getfixturevalue("runtime_build" if build == "release" else "runtime_sanitize_build")
    bundle = user_bundle("qwen2_5_vl")
    b = load_bundle(bundle)
    front = Frontend.load(b.path, b)
    good = [str(pictures["user/" + name]) for name in sorted(n[5:] for n in pictures if n.startswith("user/"))][:2]
    (tmp_path / "cut.png").write_bytes(Path(good[0]).read_bytes()[:200])
    (tmp_path / "text.png").write_text("not a picture")
    media = good + [str(tmp_path / "cut.png"), str(tmp_path / "text.png"), str(tmp_path / "missing.png"),
                    str(tmp_path)]
    bases = [{"messages": [{"role": "user", "content": [{"type": "image", "image": good[0]},
                                                        {"type": "text", "text": "What is in the image?"}]}],
              "max_tokens": 4, "temperature": 0.7, "seed": 5},
             {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": [{"type": "text", "text": "Compare"},
                                                        {"type": "image_url", "image_url": {"url": good[1]}},
                                                        {"type": "image", "image": good[0]}]},
                           {"role": "assistant", "content": "They differ."},
                           {"role": "user", "content": "How?"}], "stop": ["."], "top_p": 0.9}]
    rng = np.random.default_rng(2124)
    outcomes = {"answered": 0, "refused": 0}
    for i in range(200):
        path = tmp_path / f"r{i}.json"
        path.write_bytes(_mutate(rng, bases[i % 2], media))
        proc = subprocess.run([str(exe), "--bundle", str(bundle), "--request", str(path), "--dry-run"],
                              capture_output=True, timeout=300)
        proc = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                           proc.stderr.decode(errors="replace"))
        try:
            prepared = _python_accepts(front, path)
        except FastVError as exc:
            assert proc.returncode == 1, f"case {i}: Python refuses ({exc}), fastv-run: {proc.returncode} " \
                                         f"{proc.stdout[:300]} {proc.stderr[-2000:]}"
            fail_line(proc)
            outcomes["refused"] += 1
            continue
        assert proc.returncode == 0, f"case {i}: Python accepts {path.read_bytes()[:400]!r}; {proc.stderr[-2000:]}"
        rows = json.loads(proc.stdout)["rows"]
        mask = prepared.attention_mask.astype(bool)
        assert [r["prompt_ids"] for r in rows] == [prepared.input_ids[r][mask[r]].tolist()
                                                   for r in range(len(rows))], f"case {i}"
        outcomes["answered"] += 1
    assert outcomes["answered"] >= 20 and outcomes["refused"] >= 100, outcomes


# ---------------------------------------------------------------------------------------------- videos
#: folders of frames: name -> [(file name, width, height), ...] (a .jpg name is written as JPEG); "scene" is
#: tests/user_checkpoints.py's moving scene (16 PNG frames of 160x112)
FRAME_FOLDERS = {
    "four": [(f"f{i}.png", 64, 64) for i in range(4)],
    "three": [(f"f{i}.png", 64, 64) for i in range(3)],                  # odd: the last frame repeated
    "one": [("only.png", 80, 80)],
    "wide": [(f"w{i:02d}.png", 96, 40) for i in range(5)],
    "jpeg": [(f"j{i}.jpg", 72, 56) for i in range(6)],
    "mixed": [("a.png", 64, 64), ("b.png", 80, 48), ("c.png", 40, 72), ("d.png", 64, 64)],   # resized to the first's
    "names": [("b.png", 64, 64), ("A.PNG", 64, 64), ("a10.jpg", 64, 64), ("a9.png", 64, 64), ("c.JPEG", 64, 64)],
    "many": [(f"m{i:02d}.png", 48, 32) for i in range(21)],              # sampled by the user checkpoint's rule
}


@pytest.fixture(scope="session")
def frame_folders(tmp_path_factory) -> dict[str, Path]:
    """Folders of video frames (FRAME_FOLDERS, the scene) and bad ones: empty, no image files, an unreadable
    frame, a cut frame."""
    from tests import user_checkpoints as uc

    out = shared_dir(tmp_path_factory) / "cpp-request-frames"

    def make(tmp: Path) -> None:
        from PIL import Image

        rng = np.random.RandomState(21)
        for name, files in FRAME_FOLDERS.items():
            (tmp / name).mkdir(parents=True)
            for i, (file, w, h) in enumerate(files):
                pixels = (rng.rand(h, w, 3) * 255).astype("uint8")
                pixels[:, : w // 2] //= 1 + i                  # frames differ in time
                fmt = "JPEG" if file.lower().endswith((".jpg", ".jpeg")) else "PNG"
                Image.fromarray(pixels).save(tmp / name / file, format=fmt, quality=90)
        (tmp / "names" / "notes.txt").write_text("not a frame")
        uc.test_frames_dir(tmp, "scene")
        (tmp / "empty").mkdir()
        (tmp / "text-only").mkdir()
        (tmp / "text-only" / "readme.txt").write_text("no frames here")
        (tmp / "junk").mkdir()
        Image.fromarray(np.zeros((64, 64, 3), "uint8")).save(tmp / "junk" / "a.png")
        (tmp / "junk" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
        (tmp / "cut").mkdir()
        Image.fromarray(np.zeros((64, 64, 3), "uint8")).save(tmp / "cut" / "a.png")
        data = (tmp / "scene" / "frame_000.png").read_bytes()
        (tmp / "cut" / "b.png").write_bytes(data[: len(data) // 2])

    once_per_run(out, make)
    return {p.name: p for p in out.iterdir() if p.is_dir()}


def _video_conversations(video: Path, image: Path) -> list[tuple[dict, bool]]:
    """(request JSON, raw) pairs with a video: alone, after a system turn, with an image before and after it, and
    --raw with the generic <video> mark or none."""
    v, a = str(video), str(image)

    def user(*parts):
        return {"role": "user", "content": list(parts)}

    def vid(p):
        return {"type": "video", "video": p}

    def img(p):
        return {"type": "image", "image": p}

    def txt(t):
        return {"type": "text", "text": t}

    return [({"messages": [user(vid(v), txt("What happens in the video?"))]}, False),
            ({"messages": [{"role": "system", "content": "Answer briefly."}, user(txt("Describe:"), vid(v))]}, False),
            ({"messages": [user(img(a), txt("and"), vid(v), txt("compare them."))]}, False),
            ({"messages": [user(vid(v), txt("then"), img(a), txt("which came first?"))]}, False),
            ({"messages": [user(txt("<video>\nWhat is this?"), vid(v))]}, True),
            ({"messages": [user(vid(v), txt("no marks here"))]}, True)]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_video_dry_run_equals_the_python_front_end_on_presets(runtime_build, exported_bundle, pictures,
                                                               frame_folders, tmp_path, model):
    """Folders of frames (several counts, sizes, formats, mixed sizes, names in every case) with and beside
    images: fastv-run --dry-run gives the Python front end's prompt text, ids and pixel sha256, or refuses
    where it refuses (Qwen2-VL's fixed layout takes its exported grid only; Qwen3-VL takes no videos)."""
    bundle = exported_bundle(model)
    n = 0
    for name in ("four", "three", "one", "wide", "jpeg", "mixed", "names", "scene"):
        n += _compare_dry_run(runtime_build, bundle, _video_conversations(frame_folders[name], pictures["square.png"]),
                              tmp_path / name)
    if model == "tiny-qwen3-vl":
        assert n == 0
        line = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--video", frame_folders["four"], "--prompt",
                                   "x", "--dry-run"))
        assert line == "Qwen3VLForConditionalGeneration bundles take images only; give images (or frames as images)"
    else:
        assert n >= 30


@pytest.mark.slow
def test_video_dry_run_equals_the_python_front_end_on_the_user_checkpoint(runtime_build, user_bundle, pictures,
                                                                          frame_folders, tmp_path):
    """The user-style Qwen2.5-VL checkpoint: its video_preprocessor_config.json samples frames (2 fps, 4..768
    frames, whole temporal patches) and bounds each frame to 4..16 merged tokens; too few frames are refused."""
    bundle = user_bundle("qwen2_5_vl")
    image = sorted(p for name, p in pictures.items() if name.startswith("user/"))[0]
    n = 0
    for name in ("four", "three", "one", "wide", "jpeg", "mixed", "names", "many", "scene"):
        n += _compare_dry_run(runtime_build, bundle, _video_conversations(frame_folders[name], image), tmp_path / name)
    assert n >= 40
    line = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--video", frame_folders["one"], "--prompt", "x",
                               "--dry-run"))
    assert line == "the video has 1 frames: too few to sample whole temporal patches of 2 frames; give a longer video"


@pytest.mark.slow
def test_video_folder_errors(runtime_build, exported_bundle, frame_folders, tmp_path):
    """Bad folders of frames: one line and a non-zero exit, the Python front end's message where it reads them
    (an empty folder, no image files, an unreadable or cut frame); a video file is refused (fastv-run reads
    folders of frames only)."""
    from fastv_export.bundle import load_bundle
    from fastv_export.frontend import Frontend

    bundle = exported_bundle("tiny-qwen2.5-vl")
    b = load_bundle(bundle)
    front = Frontend.load(b.path, b)
    for name in ("empty", "text-only"):
        line = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--video", frame_folders[name], "--prompt", "x",
                                   "--dry-run"))
        assert line == py_error(lambda: front.process_video(str(frame_folders[name])))
    for name in ("junk", "cut"):
        line = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--video", frame_folders[name], "--prompt", "x",
                                   "--dry-run"))
        assert line.startswith(f"frame {frame_folders[name] / 'b.png'} cannot be read as an image ("), line
        py_error(lambda: front.process_video(str(frame_folders[name])))
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
    line = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--video", tmp_path / "clip.mp4", "--prompt", "x",
                               "--dry-run"))
    assert line.startswith(f"video {tmp_path / 'clip.mp4'}: fastv-run reads videos given as a folder of frames")
    line = fail_line(fastv_run(runtime_build, "--bundle", bundle, "--video", tmp_path / "none", "--prompt", "x",
                               "--dry-run"))
    assert line == f"video {tmp_path / 'none'} does not exist"


def _python_run_json(bundle: Path, *args: str) -> dict:
    """`fastv-export run BUNDLE ARGS --json` (the onnxruntime runner) in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "fastv_export.cli", "run", str(bundle), *map(str, args), "--json",
                           "--runner", "onnxruntime"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-qwen2.5-vl", "tiny-qwen2-vl", "user-qwen2_5_vl"])
def test_video_answers_equal_fastv_export_run(runtime_build, exported_bundle, user_bundle, frame_folders, pictures,
                                              model):
    """End to end with the cpu executor: `fastv-run --video DIR` gives the tokens, text, kept positions and prompt
    length of `fastv-export run --video DIR` (greedy; Qwen2.5-VL also with seeded sampling, and a video beside an
    image), so the video's pixels, grid, seconds per temporal patch and M-RoPE positions agree."""
    bundle = user_bundle("qwen2_5_vl") if model.startswith("user") else exported_bundle(model)
    cases = [("--video", frame_folders["four"], "--prompt", "What happens?", "--max-new-tokens", "6")]
    if model != "tiny-qwen2-vl":   # the fixed layout takes 168x168 frames only: the square folders
        cases.append(("--video", frame_folders["scene"], "--prompt", "Describe the motion.", "--max-new-tokens", "6",
                      "--temperature", "0.8", "--top-k", "20", "--seed", "7"))
        cases.append(("--image", pictures["square.png"], "--video", frame_folders["mixed"], "--prompt", "Compare.",
                      "--max-new-tokens", "5"))
    else:
        cases.append(("--video", frame_folders["three"], "--prompt", "Describe.", "--max-new-tokens", "6",
                      "--temperature", "0.7", "--seed", "3"))
    if model.startswith("user"):   # 20 of 21 frames sampled: 1.05 s per temporal patch
        cases.append(("--video", frame_folders["many"], "--prompt", "Count the frames.", "--max-new-tokens", "4"))
    for args in cases:
        py = _python_run_json(bundle, *args)["rows"][0]
        proc = fastv_run(runtime_build, "--bundle", bundle, *args, "--json", "--executor", "cpu")
        assert proc.returncode == 0, proc.stderr[-3000:]
        cpp = json.loads(proc.stdout.strip().splitlines()[-1])["rows"][0]
        for key in ("tokens", "text", "finish_reason", "prompt_tokens", "kept_positions"):
            assert cpp[key] == py[key], (args, key, cpp, py)


#: video processor settings over the user-style checkpoint's (frame sampling by count and bounds, the temporal patch,
#: the frames' pixel bounds and resampling filter)
VIDEO_CONFIG_VARIANTS = [
    {"max_frames": 6},
    {"num_frames": 5},
    {"num_frames": 7},
    {"num_frames": 40},                                   # more than the folder holds: refused
    {"do_sample_frames": False},
    {"fps": 3.0, "min_frames": 30},
    {"temporal_patch_size": 3, "max_frames": 9},
    {"size": {"shortest_edge": 28 * 28 * 8, "longest_edge": 28 * 28 * 8}, "resample": 2},
    {"size": None, "min_pixels": 28 * 28 * 2},            # no size of its own: the image processor's
]


@pytest.mark.slow
def test_video_sampling_variants_equal_the_python_front_end(runtime_build, user_bundle, frame_folders, tmp_path):
    """The user-style Qwen2.5-VL bundle with its video_preprocessor_config.json changed (VIDEO_CONFIG_VARIANTS): the
    frames kept, their size and layout (--dry-run ids and pixel sha256) equal the Python front end's, refusals too."""
    import shutil

    source = user_bundle("qwen2_5_vl")
    compared = 0
    for i, change in enumerate(VIDEO_CONFIG_VARIANTS):
        bundle = tmp_path / f"bundle{i}"
        shutil.copytree(source, bundle)
        path = bundle / "video_preprocessor_config.json"
        config = json.loads(path.read_text())
        for key, value in change.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        path.write_text(json.dumps(config, indent=2))
        manifest = json.loads((bundle / "manifest.json").read_text())
        data = path.read_bytes()
        manifest["files"][path.name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
        for name in ("many", "scene", "three"):
            request = {"messages": [{"role": "user", "content": [{"type": "video", "video": str(frame_folders[name])},
                                                                 {"type": "text", "text": "What happens?"}]}]}
            compared += _compare_dry_run(runtime_build, bundle, [(request, False)], tmp_path / f"r{i}-{name}")
    assert compared >= 20


@pytest.mark.slow
def test_video_dry_run_under_sanitizers(runtime_sanitize_build, user_bundle, pictures, frame_folders, tmp_path):
    """The AddressSanitizer + UBSan build (no cpu executor): folders of frames and bad ones through --dry-run on the
    user-style Qwen2.5-VL bundle give the Python front end's ids and pixels or one line, with no sanitizer report."""
    bundle = user_bundle("qwen2_5_vl")
    image = sorted(p for name, p in pictures.items() if name.startswith("user/"))[0]
    n = 0
    for name in ("three", "mixed", "many", "jpeg"):
        n += _compare_dry_run(runtime_sanitize_build, bundle, _video_conversations(frame_folders[name], image)[:3],
                              tmp_path / name)
    assert n >= 9
    for name in ("empty", "junk", "cut", "one"):
        proc = fastv_run(runtime_sanitize_build, "--bundle", bundle, "--video", frame_folders[name], "--prompt", "x",
                         "--dry-run")
        assert proc.returncode == 1 and "Sanitizer" not in proc.stderr, proc.stderr[-2000:]
        fail_line(proc)


@pytest.mark.slow
def test_video_batch_equals_fastv_export_run(runtime_build, exported_bundle, frame_folders, tmp_path):
    """A left-padded batch of two video requests (tiny-qwen2.5-vl, cpu executor): each row's tokens, text and kept
    positions equal `fastv-export run --request`'s (the seconds per temporal patch and grids of every row)."""
    bundle = exported_bundle("tiny-qwen2.5-vl")
    video = str(frame_folders["four"])
    requests = [{"messages": [{"role": "user", "content": [{"type": "video", "video": video},
                                                           {"type": "text", "text": text}]}], "max_tokens": 6}
                for text in ("What happens?", "Describe the colours of every frame in one short sentence.")]
    path = tmp_path / "batch.json"
    path.write_text(json.dumps(requests))
    py = _python_run_json(bundle, "--request", path)["rows"]
    proc = fastv_run(runtime_build, "--bundle", bundle, "--request", path, "--json", "--executor", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cpp = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    assert len(cpp) == len(py) == 2
    for c, p in zip(cpp, py):
        for key in ("tokens", "text", "finish_reason", "prompt_tokens", "kept_positions"):
            assert c[key] == p[key], (key, c, p)
