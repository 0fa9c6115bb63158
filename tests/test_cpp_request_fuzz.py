"""Seeded corruptions of fastv-run requests in the release and the ASan + UBSan builds: every case answered or
refused in one line, no signal or sanitizer report, and fastv-run accepts exactly what the Python front end accepts
(the prompt ids equal where both accept)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.cpp_requests import fail_line
from tests.helpers import json_nodes

# ---------------------------------------------------------------------------------------------- request fuzz
#: values a fuzzed request puts in place of any node: wrong types, edge numbers, odd strings, deep nesting
ODD_VALUES = [None, True, 0, -1, 2 ** 63, 2 ** 70, -2 ** 63, 1e308, -0.0, 0.5, 7, "", " ", "user", "image",
              "\u0000", "\ud7ff\ue000", "日本語 🙂 e\u0301", "<image>", "<|im_start|>", "x" * 5000, [], {}, [[[[[]]]]],
              {"type": "text"}, {"type": "image", "image": ""}, [{"type": "text", "text": "a"}] * 3]


def _mutate(rng, request, media: list[str]) -> bytes:
    """One seeded corruption of a request (its JSON text as bytes): a node replaced, removed or duplicated, a
    media path swapped for a corrupt, missing or directory one, bytes flipped or cut (invalid UTF-8 included)."""
    doc = json.loads(json.dumps(request))
    paths = [p for p, _ in json_nodes(doc)]
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
