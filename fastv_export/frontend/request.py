"""Generation requests: the OpenAI chat format (``--request req.json``) and the short command-line form.

A request file holds one request object or a list of them (a batch)::

    {"messages": [{"role": "system", "content": "You are brief."},
                  {"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                               {"type": "text", "text": "What is in the image?"}]}],
     "max_tokens": 64, "temperature": 0.7, "top_k": 50, "top_p": 0.9, "seed": 1, "stop": ["\\n\\n"]}

``content`` is a string or a list of parts: ``{"type": "text", "text": ...}``, ``{"type": "image", "image":
PATH}`` (or OpenAI's ``{"type": "image_url", "image_url": {"url": PATH or file://...}}``) and ``{"type":
"video", "video": PATH}`` (a video file or a folder of frames). Relative paths are taken relative to the
request file's folder. Other top-level keys (``model``, ``stream``, ...) are ignored. Every error is one
:class:`FastVError` line naming the request, the message and the field.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from fastv_export.errors import FastVError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "image", "image_url", "video")
#: the largest max_tokens and top_k a request may ask for (both runtimes hold them in 32 bits' range)
INT32_MAX = 2 ** 31 - 1
KNOWN_KEYS = {"messages", "max_tokens", "max_completion_tokens", "temperature", "top_k", "top_p", "seed", "stop"}


@dataclass(frozen=True)
class Part:
    """One piece of a message: ``kind`` "text" (``value`` the text) or "image" / "video" (``value`` a path)."""
    kind: str
    value: str


@dataclass(frozen=True)
class Message:
    role: str
    parts: tuple[Part, ...]

    @property
    def media(self) -> list[Part]:
        return [p for p in self.parts if p.kind != "text"]


@dataclass
class Request:
    """One conversation to answer and how to sample its answer (None: the command's or the model's default)."""
    messages: list[Message]
    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    @property
    def media(self) -> list[Part]:
        """The images and videos of every message, in conversation order."""
        return [p for m in self.messages for p in m.media]


def from_cli(prompt: str, images: list[str] = (), videos: list[str] = (), system: str | None = None) -> Request:
    """The short form: one user turn with the images, then the videos, then the text (after a system turn)."""
    parts = [Part("image", str(p)) for p in images] + [Part("video", str(p)) for p in videos]
    if prompt:
        parts.append(Part("text", prompt))
    messages = [Message("system", (Part("text", system),))] if system else []
    return Request(messages + [Message("user", tuple(parts))])


def load_requests(path: str | Path) -> list[Request]:
    """The requests of a JSON file (one object, or a list of them)."""
    path = Path(path)
    if not path.is_file():
        raise FastVError(f"request file {path} does not exist; give a JSON file in the OpenAI chat format")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise FastVError(f"request file {path} is not UTF-8 text; write it as UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise FastVError(f"request file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
                         f"{exc.msg}); write one request object or a list of them") from None
    return parse_requests(data, base=path.parent)


def parse_requests(data: Any, base: str | Path | None = None) -> list[Request]:
    """Requests from parsed JSON: one request object or a non-empty list of them."""
    items = data if isinstance(data, list) else [data]
    if not items:
        raise FastVError("the request list is empty; give at least one request object")
    return [_request(item, i, Path(base) if base is not None else None) for i, item in enumerate(items)]


# ---------------------------------------------------------------------------------------------- parsing
def _request(item: Any, index: int, base: Path | None) -> Request:
    where = f"request {index}"
    if not isinstance(item, dict):
        raise FastVError(f"{where}: expected a JSON object with 'messages', got {_kind(item)}")
    unknown = sorted(set(item) - KNOWN_KEYS)
    if unknown:
        log.info("%s: ignoring field(s) %s", where, ", ".join(unknown))
    if "messages" not in item:
        raise FastVError(f"{where}: missing field 'messages' (a list of {{\"role\", \"content\"}} objects)")
    messages = item["messages"]
    if not isinstance(messages, list) or not messages:
        raise FastVError(f"{where}: 'messages' must be a non-empty list, got {_kind(messages)}")
    parsed = [_message(m, f"{where}: messages[{j}]", base) for j, m in enumerate(messages)]
    max_tokens = item.get("max_tokens", item.get("max_completion_tokens"))
    return Request(parsed,
                   max_tokens=_number(item, "max_tokens" if "max_tokens" in item else "max_completion_tokens",
                                      where, int, low=1, high=INT32_MAX) if max_tokens is not None else None,
                   temperature=_number(item, "temperature", where, float, low=0.0),
                   top_k=_number(item, "top_k", where, int, low=0, high=INT32_MAX),
                   top_p=_number(item, "top_p", where, float, low=0.0, high=1.0, open_low=True),
                   seed=_seed(item, where),
                   stop=_stop(item.get("stop"), where))


def _message(m: Any, where: str, base: Path | None) -> Message:
    if not isinstance(m, dict):
        raise FastVError(f"{where}: expected an object with 'role' and 'content', got {_kind(m)}")
    if "role" not in m:
        raise FastVError(f"{where}: missing field 'role' ({', '.join(ROLES)})")
    role = m["role"]
    if role not in ROLES:
        raise FastVError(f"{where}: unknown role {role!r}; use one of {', '.join(ROLES)}")
    if "content" not in m:
        raise FastVError(f"{where}: missing field 'content' (a string or a list of parts)")
    content = m["content"]
    if isinstance(content, str):
        return Message(role, (Part("text", content),))
    if not isinstance(content, list):
        raise FastVError(f"{where}.content: expected a string or a list of parts, got {_kind(content)}")
    return Message(role, tuple(_part(p, f"{where}.content[{k}]", base) for k, p in enumerate(content)))


def _part(p: Any, where: str, base: Path | None) -> Part:
    if not isinstance(p, dict):
        raise FastVError(f"{where}: expected an object with 'type', got {_kind(p)}")
    if "type" not in p:
        raise FastVError(f"{where}: missing field 'type' ({', '.join(PART_TYPES)})")
    kind = p["type"]
    if kind not in PART_TYPES:
        raise FastVError(f"{where}: unknown content type {kind!r}; use one of {', '.join(PART_TYPES)}")
    if kind == "text":
        return Part("text", _string(p, "text", where))
    if kind == "image_url":
        inner = p.get("image_url")
        if isinstance(inner, str):
            url = inner
        elif isinstance(inner, dict) and "url" in inner:
            url = _string(inner, "url", f"{where}.image_url")
        else:
            raise FastVError(f"{where}: missing field 'image_url.url' (a local path or a file:// URL)")
        return Part("image", _local_path(url, f"{where}.image_url.url", base))
    return Part(kind, _local_path(_string(p, kind, where), f"{where}.{kind}", base))


def _local_path(value: str, where: str, base: Path | None) -> str:
    url = urlparse(value)
    if url.scheme == "file":
        value = unquote(url.path)
    elif url.scheme in ("http", "https", "data") or (len(url.scheme) > 1 and "://" in value):
        raise FastVError(f"{where}: {value[:60]!r} is not a local file; give a path or a file:// URL "
                         "(nothing is downloaded)")
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return str(path)


def _string(d: dict, key: str, where: str) -> str:
    if key not in d:
        raise FastVError(f"{where}: missing field '{key}'")
    if not isinstance(d[key], str):
        raise FastVError(f"{where}.{key}: expected a string, got {_kind(d[key])}")
    return d[key]


def _number(d: dict, key: str, where: str, kind: type, low: float | None = None, high: float | None = None,
            open_low: bool = False):
    value = d.get(key)
    if value is None:
        return None
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = numeric and (kind is float or float(value).is_integer())
    if not ok:
        raise FastVError(f"{where}.{key}: expected {'an integer' if kind is int else 'a number'}, got {_kind(value)}")
    value = kind(value)
    if (low is not None and (value < low or (open_low and value == low))) or (high is not None and value > high):
        upper = f"{high}]" if high is not None else "inf)"
        rng = f"{'(' if open_low else '['}{low}, {upper}"
        raise FastVError(f"{where}.{key}: {value} is out of range {rng}")
    return value


def _seed(d: dict, where: str) -> int | None:
    seed = _number(d, "seed", where, int, low=0)
    if seed is not None and seed >= 2 ** 64:      # the sampler's state is 64 bits (docs/design.md §8)
        raise FastVError(f"{where}.seed: {seed} is out of range [0, 2^64)")
    return seed


def _stop(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise FastVError(f"{where}.stop: expected a non-empty string or a list of them, got {_kind(value)}")
    return list(value)


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
