"""fastv-run's request path against the Python front end (runtime/src/request.cpp, chat.cpp, sampler.cpp,
session.cpp; fastv_export/frontend, fastv_export/runtime/sampling.py, `fastv-export run`).

- the SplitMix64 sampler: the C++ draws equal Python's ``Sampler`` for the same logits, parameters and seeds;
- request errors: one line, a non-zero exit, the Python front end's message;
- ``fastv-run --dry-run``: the prompt ids and the sha256 of the float32 pixel values equal the Python front end's
  (the built-in presets, the trained demo and user-style checkpoints exported to bundles);
- end to end with the cpu executor: on the trained demo (tiny-llava-shapes) ``fastv-run --request`` answers held-out
  questions as ``fastv-export run`` does (greedy, and with seeded sampling the same tokens).

Videos: tests/test_cpp_request_video.py; malformed requests under the sanitizers: tests/test_cpp_request_fuzz.py.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.cpp_requests import HELD_OUT, compare_dry_run, fail_line, fastv_run, py_error


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


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-llava", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_dry_run_equals_the_python_front_end_on_presets(runtime_build, exported_bundle, pictures, tmp_path, model):
    bundle = exported_bundle(model)
    n = compare_dry_run(runtime_build, bundle, _conversations([pictures["square.png"], pictures["square2.png"]]),
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
    assert compare_dry_run(runtime_build, bundle, conversations, tmp_path) == len(conversations) - 1


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
        n += compare_dry_run(runtime_build, bundle, _conversations(user[k:k + 2]), tmp_path / str(k))
    assert n >= 5


@pytest.mark.slow
def test_dry_run_without_the_cpu_executor_equals_the_python_front_end(runtime_sanitize_build, user_bundle, pictures,
                                                                       tmp_path):
    """No Python on the request path: the AddressSanitizer + UBSan build has no cpu executor (no embedded Python
    interpreter) and no TensorRT; its --dry-run gives the Python front end's prompt ids, text and pixel checksum
    on the user-style LLaVA checkpoint, with no sanitizer report."""
    user = sorted(p for name, p in pictures.items() if name.startswith("user/"))
    assert compare_dry_run(runtime_sanitize_build, user_bundle("llava"), _conversations(user[:2]), tmp_path) >= 3


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
