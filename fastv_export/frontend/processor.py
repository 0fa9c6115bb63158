"""The front end: requests -> the inputs a bundle's graphs take, as the checkpoint's own HF processor makes them.

:meth:`Frontend.load` reads the Hugging Face files of a directory (a bundle holds them at its top level under
their HF names; a checkpoint directory holds the same files): the tokenizer (``AutoTokenizer``), the image
processor (the PIL class named by ``preprocessor_config.json``'s ``image_processor_type``: transformers here
has no torchvision, so its default classes cannot be built), the video processor config and the chat template.
:meth:`Frontend.prepare` then does what the HF processor does (``processing_llava.py``,
``processing_qwen2_5_vl.py``, ``processing_llava_onevision.py``, ``processing_internvl.py`` in transformers 5):

1. the chat template renders the conversation (``add_generation_prompt=True``; ``raw``: the text as is);
2. every image and video goes through the checkpoint's processor (resize, crop, resample, rescale, normalize,
   Qwen smart resize with its min/max pixels, OneVision anyres tiles);
3. each placeholder string of the text (``<image>``, ``<|image_pad|>``, ``<video>``, ...) is replaced by its
   medium's expansion (the placeholder repeated as many times as the medium has features; InternVL adds
   ``<img>``/``</img>`` around), in text order, as ``ProcessorMixin.get_text_with_replacements`` does;
4. the WHOLE text is tokenized at once, ``add_special_tokens`` as the processor's ``apply_chat_template``
   (True, unless the text already starts with the BOS token).

Token counts come from the processor's outputs and the bundle's manifest (its vision layout), never from a
model: LLaVA / fixed layouts take the exported image (``image_tokens.per_image``), the Qwen family
``t * h * w / merge^2`` of the processor's grid, OneVision the anyres layout (runtime/anyres.py).
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from fastv_export.errors import FastVError
from fastv_export.frontend.request import Part, Request
from fastv_export.frontend.video import Sampling, read_video
from fastv_export.media import Media

if TYPE_CHECKING:
    from fastv_export.bundle import Manifest

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
IMAGE_PROCESSOR = "preprocessor_config.json"
VIDEO_PROCESSOR = "video_preprocessor_config.json"
PROCESSOR = "processor_config.json"
CHAT_TEMPLATE_JSON = "chat_template.json"
#: a generic mark a user may write in prompt text for families whose own placeholder differs
GENERIC_MARKS = {"image": "<image>", "video": "<video>"}


# ---------------------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    """How one model family writes media into a prompt (the defaults of its HF processor)."""
    name: str
    image_token: str                     # the placeholder the processor expands
    video_token: str | None              # None: the family takes no videos here
    image_text: str                      # what a chat template writes for one image
    video_text: str | None


FAMILIES = {
    "LlavaForConditionalGeneration": Family("llava", "<image>", None, "<image>", None),
    "Qwen2VLForConditionalGeneration": Family("qwen2_vl", "<|image_pad|>", "<|video_pad|>",
                                              "<|vision_start|><|image_pad|><|vision_end|>",
                                              "<|vision_start|><|video_pad|><|vision_end|>"),
    "LlavaOnevisionForConditionalGeneration": Family("llava_onevision", "<image>", "<video>", "<image>", "<video>"),
    "InternVLForConditionalGeneration": Family("internvl", "<IMG_CONTEXT>", None, "<IMG_CONTEXT>", None),
}
FAMILIES["Qwen2_5_VLForConditionalGeneration"] = FAMILIES["Qwen2VLForConditionalGeneration"]
FAMILIES["Qwen3VLForConditionalGeneration"] = Family("qwen3_vl", "<|image_pad|>", None,
                                                     "<|vision_start|><|image_pad|><|vision_end|>", None)
QWEN = ("qwen2_vl", "qwen3_vl")


# ---------------------------------------------------------------------------------------------- outputs
@dataclass
class Processed:
    """One image or video after the checkpoint's processor."""
    kind: str                            # "image" | "video"
    media: Media                         # as the runtime describes it (see PreparedInputs.media)
    units: list[np.ndarray]              # the pixels of each vision-graph call
    count: int                           # placeholder tokens it expands to
    seconds: float | None = None         # seconds per temporal patch (videos of time-positioned families)
    source: str = ""


@dataclass
class PreparedInputs:
    """What :func:`fastv_export.runtime.generate.generate` takes for a batch of requests.

    ``media``: every row's media, rows in order; ``size`` is what the bundle's vision layout reads: the
    processed size (Qwen family: the resized image, a multiple of patch x merge), the original size
    (OneVision: the anyres layout follows it) or None (a fixed layout's exported image)."""
    input_ids: np.ndarray                # [B, n] int64, left-padded
    attention_mask: np.ndarray           # [B, n] int64
    images: list[np.ndarray]             # the pixels of each vision-graph call, prompt order, rows in order
    media: list[Media]
    video_seconds: list[float]
    prompts: list[str]                   # the rendered text of each row (before the placeholders' expansion)
    processed: list[list[Processed]] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> list[int]:
        return self.attention_mask.sum(axis=1).astype(int).tolist()


# ---------------------------------------------------------------------------------------------- loading
def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FastVError(f"{path} cannot be read as JSON ({type(exc).__name__}); restore the file") from None


def has_serving_files(directory: str | Path) -> bool:
    """Whether ``directory`` holds a tokenizer (what :meth:`Frontend.load` needs at the least)."""
    d = Path(directory)
    return d.is_dir() and any((d / f).is_file() for f in TOKENIZER_FILES)


def image_processor_class(name: str):
    """The PIL image processor class for ``image_processor_type`` ``name`` (e.g. CLIPImageProcessor[Fast]
    -> CLIPImageProcessorPil)."""
    import transformers

    base = name[:-4] if name.endswith("Fast") else name[:-3] if name.endswith("Pil") else name
    cls = getattr(transformers, base + "Pil", None)
    if cls is None:
        raise FastVError(f"image processor {name!r} has no PIL implementation in transformers "
                         f"{transformers.__version__}; fastv-export needs one (torchvision is not available)")
    return cls


class Frontend:
    """A checkpoint's processing (tokenizer, image / video processors, chat template) for one bundle."""

    def __init__(self, bundle: Manifest, tokenizer, image_processor, video_config: dict, family: Family,
                 chat_template: str | None, processor_config: dict, directory: Path) -> None:
        self.bundle = bundle
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.video_config = video_config
        self.family = family
        self.chat_template = chat_template
        self.processor_config = processor_config
        self.directory = directory

    @classmethod
    def load(cls, directory: str | Path, bundle: Manifest) -> Frontend:
        directory = Path(directory)
        if not has_serving_files(directory):
            raise FastVError(f"{directory} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}); pass --model "
                             "DIR with the checkpoint's tokenizer and processor files")
        family = FAMILIES.get(bundle.architecture)
        if family is None:
            raise FastVError(f"the front end does not know {bundle.architecture} yet; feed token ids and pixels "
                             "through the Python API fastv_export.runtime.generate.generate")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any loading failure is the same user problem
            raise FastVError(f"{directory} holds no usable tokenizer ({type(exc).__name__}: "
                             f"{_first_line(exc)}); restore its tokenizer files") from None
        processor_config = _read_json(directory / PROCESSOR) if (directory / PROCESSOR).is_file() else {}
        family = _own_tokens(family, tokenizer, processor_config)
        image_processor = _load_image_processor(directory, bundle, family, processor_config)
        video_config = _processor_section(directory, VIDEO_PROCESSOR, "video_processor", processor_config)[0] or {}
        template = tokenizer.chat_template
        if template is None and (directory / CHAT_TEMPLATE_JSON).is_file():
            template = _read_json(directory / CHAT_TEMPLATE_JSON).get("chat_template")
        if template is None and "chat_template" in processor_config:
            template = processor_config["chat_template"]
        return cls(bundle, tokenizer, image_processor, video_config, family, template, processor_config, directory)

    # ------------------------------------------------------------------------------------------ text
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def eos_token_ids(self) -> list[int]:
        """The ids generation stops at: the checkpoint's generation config (the bundle's ``serving.generation``, every
        id ``model.generate`` stops at), else the model config's, else the tokenizer's."""
        ids = self.bundle.serving.generation.eos_token_ids if getattr(self.bundle, "has_serving", False) else None
        if ids:
            return [int(e) for e in ids]
        eos = self.bundle.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]

    def render(self, request: Request, raw: bool = False) -> str:
        """The prompt text of ``request``: the chat template's rendering, or (``raw``) its text parts as they
        are, the family's media text first when the text marks no media."""
        media = request.media
        if not raw and self.chat_template is None:
            log.warning("%s has no chat template: the prompt is sent as written (as with --raw)", self.directory)
            raw = True
        if raw:
            text = "".join(self._marks_to_own(p.value) for m in request.messages for p in m.parts if p.kind == "text")
            if media and not any(self._count_marks(text).values()):
                text = "".join(self._media_text(p) for p in media) + text
            return text
        conversation = [{"role": m.role, "content": [self._template_part(p) for p in m.parts]}
                        for m in request.messages]
        last_is_assistant = request.messages[-1].role == "assistant"
        try:
            return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, tokenize=False,
                                                      add_generation_prompt=not last_is_assistant,
                                                      continue_final_message=last_is_assistant)
        except Exception as exc:  # noqa: BLE001 - a template error is the user's conversation or template
            raise FastVError(f"the chat template cannot render this conversation ({type(exc).__name__}: "
                             f"{_first_line(exc)}); fix the messages or use --raw") from None

    def _template_part(self, part: Part) -> dict:
        if part.kind == "text":
            return {"type": "text", "text": self._marks_to_own(part.value)}
        return {"type": part.kind}

    def _media_text(self, part: Part) -> str:
        if part.kind == "video":
            self._require_video()
            return self.family.video_text
        return self.family.image_text

    def _marks_to_own(self, text: str) -> str:
        """Generic ``<image>`` / ``<video>`` marks -> the family's own media text (where it differs)."""
        for kind, mark in GENERIC_MARKS.items():
            own = self.family.image_text if kind == "image" else self.family.video_text
            if own is not None and own != mark and mark in text:
                text = text.replace(mark, own)
        return text

    def _placeholders(self) -> dict[str, str]:
        out = {"image": self.family.image_token}
        if self.family.video_token:
            out["video"] = self.family.video_token
        return out

    def _count_marks(self, text: str) -> dict[str, int]:
        return {kind: text.count(token) for kind, token in self._placeholders().items()}

    def _require_video(self) -> None:
        if self.family.video_token is None:
            raise FastVError(f"{self.bundle.architecture} bundles take images only in `run`; give --image "
                             "(or frames as images)")

    # ------------------------------------------------------------------------------------------ media
    def process_image(self, path: str) -> Processed:
        from PIL import Image, UnidentifiedImageError

        if not Path(path).is_file():
            raise FastVError(f"image {path} does not exist")
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise FastVError(f"image {path} cannot be read as an image ({exc})") from None
        return self._image(image, path)

    def _image(self, image, source: str) -> Processed:
        out = self.image_processor(images=image, return_tensors="np")
        name, layout = self.family.name, self.bundle.vision_layout
        w, h = image.size
        if name in QWEN:
            px, (t, gh, gw) = out["pixel_values"], [int(x) for x in out["image_grid_thw"][0]]
            merge, patch = self._qwen_geometry()
            self._check_grid(source, "image", (h, w), (gh, gw), patch)
            return Processed("image", Media("image", (gh * patch, gw * patch)), [px], t * gh * gw // merge ** 2,
                             source=source)
        if name == "llava_onevision":
            from fastv_export.runtime.anyres import anyres_layout

            px = out["pixel_values"][0]
            oh, ow = (int(x) for x in out["image_sizes"][0])
            tiles, index = anyres_layout("image", oh, ow, 1, layout)
            if px.shape[0] < tiles:
                raise FastVError(f"image {source}: the image processor made {px.shape[0]} tiles, the bundle's anyres "
                                 f"layout needs {tiles}; the processor config and the model disagree")
            return Processed("image", Media("image", (oh, ow)), [px[:tiles]], int(len(index)), source=source)
        px = out["pixel_values"]
        if name == "internvl":
            want = [int(x) for x in self.bundle.vision_input_shape[1:]]
            if list(px.shape[1:]) != want:
                self._wrong_size(source, (h, w), list(px.shape[1:]), want)
            return Processed("image", Media("image", (h, w)), [px[i:i + 1] for i in range(len(px))],
                             len(px) * self.bundle.tokens_per_image, source=source)
        want = [int(x) for x in self.bundle.vision_input_shape]
        if list(px.shape) != want:
            self._wrong_size(source, (h, w), list(px.shape), want)
        return Processed("image", Media("image"), [px], self.bundle.tokens_per_image, source=source)

    def _qwen_geometry(self) -> tuple[int, int]:
        ip = self.image_processor
        merge, patch = int(ip.merge_size), int(ip.patch_size)
        layout = self.bundle.vision_layout
        want_merge = self.bundle.spatial_merge_size or merge
        if merge != want_merge or (layout.get("patch_size") not in (None, patch)):
            raise FastVError(f"the image processor's patch {patch} / merge {merge} differ from the bundle's "
                             f"(patch {layout.get('patch_size')}, merge {want_merge}); use the checkpoint's own "
                             f"{IMAGE_PROCESSOR}")
        return merge, patch

    def _check_grid(self, source: str, kind: str, size: tuple[int, int], grid: tuple[int, int], patch: int) -> None:
        """A fixed-layout Qwen bundle takes its exported grid only."""
        if self.bundle.vision_layout["kind"] != "fixed":
            return
        _, h0, w0 = self.bundle.grid_thw
        if grid != (h0, w0):
            raise FastVError(f"{kind} {source} ({size[1]}x{size[0]} px): the checkpoint's processor makes it "
                             f"{grid[1] * patch}x{grid[0] * patch} px ({grid[0]}x{grid[1]} patches); this bundle's "
                             f"vision graph takes only {w0 * patch}x{h0 * patch} px (fixed layout): give an image that "
                             f"resizes to that, or export the model with a dynamic vision layout")

    def _wrong_size(self, source: str, size: tuple[int, int], got: list[int], want: list[int]) -> None:
        raise FastVError(f"image {source} ({size[1]}x{size[0]} px): the checkpoint's image processor makes pixel "
                         f"values {got}; this bundle's vision graph takes {want} (the exported size): re-export with "
                         f"the processor's size, or use the image processor config the bundle was exported for")

    def process_video(self, path: str) -> Processed:
        self._require_video()
        name = self.family.name
        config = {**self._image_config(), **self.video_config}
        sampling = Sampling.from_config(config, qwen_rule=name in QWEN)
        video = read_video(path, sampling)
        if name in QWEN:
            return self._qwen_video(video, config, path)
        return self._onevision_video(video, config, path)

    def _image_config(self) -> dict:
        return self.image_processor.to_dict() if hasattr(self.image_processor, "to_dict") else {}

    def _qwen_video(self, video, config: dict, source: str) -> Processed:
        from fastv_export.frontend.pixels import qwen_video_patches, smart_resize

        merge, patch = self._qwen_geometry()
        tp = int(config.get("temporal_patch_size") or 2)
        size = config.get("size") or {}
        lo = size.get("shortest_edge") or config.get("min_pixels") or 56 * 56
        hi = size.get("longest_edge") or config.get("max_pixels") or 28 * 28 * 1280
        w, h = video.frames[0].size
        rh, rw = smart_resize(h, w, patch * merge, lo, hi)
        pixels, (t, gh, gw) = qwen_video_patches(self.image_processor, video.frames, (rh, rw), tp, config)
        self._check_grid(source, "video", (h, w), (gh, gw), patch)
        rows = gh * gw
        units = [pixels[i * rows:(i + 1) * rows] for i in range(t)]
        media = Media("video", (rh, rw), frames=t * tp, fps=video.sampled_fps)
        seconds = tp / video.sampled_fps if self.bundle.video_tokens_per_second is not None else None
        return Processed("video", media, units, t * rows // merge ** 2, seconds, source)

    def _onevision_video(self, video, config: dict, source: str) -> Processed:
        from fastv_export.frontend.pixels import resize_normalize
        from fastv_export.runtime.anyres import anyres_layout

        layout = self.bundle.vision_layout
        tile = int(layout["tile"])
        frames = resize_normalize(video.frames, (tile, tile), config)
        count, index = anyres_layout("video", tile, tile, len(frames), layout)
        return Processed("video", Media("video", frames=len(frames)), [frames], int(len(index)), source=source)

    # ------------------------------------------------------------------------------------------ prompts
    def prepare(self, requests: Request | Sequence[Request], raw: bool = False,
                check_engines: bool = False) -> PreparedInputs:
        """Token ids, mask and vision inputs of ``requests`` (one batch; rows left-padded)."""
        requests = [requests] if isinstance(requests, Request) else list(requests)
        if not requests:
            raise FastVError("no request to prepare")
        rows, prompts, processed = [], [], []
        for i, request in enumerate(requests):
            where = f"request {i}: " if len(requests) > 1 else ""
            text = self.render(request, raw)
            kinds = [p.kind for p in request.media]
            self._check_marks(text, kinds, where)
            if self.family.name == "llava_onevision" and kinds.count("image") > 1:
                # the processor gives each image of a multi-image prompt its base tile only, the bundle's
                # anyres layout all of its tiles: refuse rather than answer differently from the model
                raise FastVError(f"{where}LLaVA-OneVision takes one image per prompt here (several images are "
                                 "encoded differently by its processor); send them as separate requests")
            media = [self.process_image(p.value) if p.kind == "image" else self.process_video(p.value)
                     for p in request.media]
            ids, ordered = self._tokenize(text, media, where)
            rows.append(ids)
            prompts.append(text)
            processed.append(ordered)
        counts = [sum(p.count for p in row) for row in processed]
        if len(set(counts)) > 1:
            raise FastVError(f"the requests of this batch hold different numbers of image tokens ({counts}); FastV "
                             "needs the same count in every row: batch requests with the same media sizes, or run "
                             "them one at a time")
        layouts = [[(p.kind, p.media) for p in row] for row in processed]
        if self.bundle.vision_layout["kind"] == "patch_grid" and any(l != layouts[0] for l in layouts):
            raise FastVError("the requests of this batch hold different media layouts; this bundle batches requests "
                             "with the same images and videos sizes only: run them one at a time")
        n = max(len(r) for r in rows)
        if check_engines:
            self._check_engines(len(rows), n)
        pad = self.tokenizer.pad_token_id
        pad = int(pad if pad is not None else self.bundle.pad_token_id)
        input_ids = np.full((len(rows), n), pad, dtype=np.int64)
        mask = np.zeros((len(rows), n), dtype=np.int64)
        for r, ids in enumerate(rows):
            input_ids[r, n - len(ids):] = ids
            mask[r, n - len(ids):] = 1
        return PreparedInputs(input_ids, mask, [u for row in processed for p in row for u in p.units],
                              [p.media for row in processed for p in row],
                              [p.seconds for row in processed for p in row if p.seconds is not None],
                              prompts, processed)

    def _tokenize(self, text: str, media: list[Processed], where: str) -> tuple[list[int], list[Processed]]:
        """The placeholders of ``text`` expanded (media of each kind in order), then the whole text tokenized."""
        tokens = self._placeholders()
        self._check_marks(text, [m.kind for m in media], where)
        queues = {kind: iter([m for m in media if m.kind == kind]) for kind in ("image", "video")}
        pattern = "|".join(f"(?P<{k}>{re.escape(t)})" for k, t in tokens.items())
        ordered: list[Processed] = []

        def expand(match: re.Match) -> str:
            medium = next(queues[match.lastgroup])
            ordered.append(medium)
            return self._expansion(match.lastgroup, medium.count)

        expanded = re.sub(pattern, expand, text)
        bos = self.tokenizer.bos_token
        try:
            ids = self.tokenizer(expanded, add_special_tokens=not (bos and expanded.startswith(bos)))["input_ids"]
        except Exception as exc:  # noqa: BLE001 - e.g. a word-level vocabulary without an unknown token
            raise FastVError(f"{where}the model's tokenizer cannot encode this prompt ({_first_line(exc)})"
                             f"{self._unknown_words(text)}") from None
        want = sum(m.count for m in media)
        got = int(np.isin(ids, self.bundle.image_token_ids).sum())
        if got != want:
            raise FastVError(f"{where}the tokenized prompt holds {got} image/video tokens where its media make {want}: "
                             f"the tokenizer does not keep the placeholder {tokens['image']} as one token (id "
                             f"{self.bundle.image_token_ids}), or the text holds placeholder ids of its own")
        return [int(t) for t in ids], ordered

    def _unknown_words(self, text: str) -> str:
        """``: words it lacks: ...`` for the whitespace-separated words of ``text`` outside the vocabulary."""
        for token in self.tokenizer.get_added_vocab():
            text = text.replace(token, " ")
        vocab = self.tokenizer.get_vocab()
        unknown = list(dict.fromkeys(w for w in text.split() if w not in vocab))
        if not unknown:
            return "; write the text in words its vocabulary holds"
        return f": its vocabulary lacks {', '.join(map(repr, unknown[:8]))}; write the prompt in words it knows"

    def _check_marks(self, text: str, kinds: list[str], where: str) -> None:
        """One placeholder in ``text`` per image and per video given, as the HF processor requires."""
        if "video" in kinds:
            self._require_video()
        tokens, marks = self._placeholders(), self._count_marks(text)
        for kind in ("image", "video"):
            given = kinds.count(kind)
            if marks.get(kind, 0) != given:
                token = tokens.get(kind, GENERIC_MARKS[kind])
                raise FastVError(f"{where}the prompt holds {marks.get(kind, 0)} {kind} placeholder(s) ({token}) but "
                                 f"{given} {kind}(s) were given; give one placeholder per {kind} (or none with "
                                 f"--raw: the media then come first)")

    def _expansion(self, kind: str, count: int) -> str:
        token = self.family.video_token if kind == "video" else self.family.image_token
        if self.family.name == "internvl":
            start = getattr(self.tokenizer, "start_image_token", "<img>")
            end = getattr(self.tokenizer, "end_image_token", "</img>")
            return f"{start}{token * count}{end}"
        return token * count

    def _check_engines(self, batch: int, n: int) -> None:
        engines = self.bundle.engines
        if engines is None:
            return
        if n > engines.lengths.prompt:
            raise FastVError(f"the prompt takes {n} tokens; this bundle's engines take at most "
                             f"{engines.lengths.prompt} (--max-prompt of `fastv-export build`): shorten the prompt, use "
                             "smaller images, or rebuild with a larger --max-prompt")
        most = int(engines.limits.get("max_batch", 1))
        if batch > most:
            raise FastVError(f"a batch of {batch} requests; this bundle's engines take at most {most} (--max-batch of "
                             "`fastv-export build`): send fewer requests at once, or rebuild")


def _own_tokens(family: Family, tokenizer, processor_config: dict) -> Family:
    """The family's placeholders as the checkpoint names them (tokenizer attributes, processor config)."""
    image = getattr(tokenizer, "image_token", None) or processor_config.get("image_token") or family.image_token
    if family.name == "internvl":
        image = getattr(tokenizer, "context_image_token", None) or image
    video = family.video_token
    if video is not None:
        video = getattr(tokenizer, "video_token", None) or processor_config.get("video_token") or video
    image_text = family.image_text.replace(family.image_token, image)
    video_text = family.video_text.replace(family.video_token, video) if video is not None else None
    return Family(family.name, image, video, image_text, video_text)


def _processor_section(directory: Path, file: str, key: str, processor_config: dict) -> tuple[dict | None, Path]:
    """An image / video processor's config: its own file (``preprocessor_config.json``, the older layout) or its
    section of ``processor_config.json`` (what transformers 5 saves)."""
    path = directory / file
    if path.is_file():
        return _read_json(path), path
    section = processor_config.get(key)
    return (dict(section), directory / PROCESSOR) if isinstance(section, dict) else (None, path)


def _load_image_processor(directory: Path, bundle: Manifest, family: Family, processor_config: dict):
    config, path = _processor_section(directory, IMAGE_PROCESSOR, "image_processor", processor_config)
    if config is None:
        return _default_image_processor(bundle, family, directory)
    name = config.get("image_processor_type")
    if not name:
        raise FastVError(f"{path} names no image_processor_type; restore the checkpoint's image processor config")
    cls = image_processor_class(name)
    config = {k: v for k, v in config.items() if k not in ("image_processor_type", "processor_class", "auto_map")}
    try:
        return cls.from_dict(config)
    except Exception as exc:  # noqa: BLE001 - any loading failure is the same user problem
        raise FastVError(f"{path} cannot be loaded as {cls.__name__} ({type(exc).__name__}: "
                         f"{_first_line(exc)})") from None


def _default_image_processor(bundle: Manifest, family: Family, directory: Path):
    """No image processor config: the family's processor for the exported image size (what export used for
    its example inputs), with a warning; the checkpoint's own config is what makes the model's pixels."""
    log.warning("%s has no %s: images are processed with the family's defaults for the exported size",
                directory, IMAGE_PROCESSOR)
    import transformers

    if family.name == "llava":
        side = int(bundle.vision_input_shape[-1])
        return transformers.CLIPImageProcessorPil(size={"shortest_edge": side},
                                                  crop_size={"height": side, "width": side})
    if family.name in QWEN:
        t, h, w = bundle.grid_thw
        layout = bundle.vision_layout
        patch = int(layout.get("patch_size", 14))
        merge = int(bundle.spatial_merge_size or 2)
        pixels = h * w * patch * patch
        kwargs = {"min_pixels": pixels, "max_pixels": pixels} if layout["kind"] == "fixed" else {}
        return transformers.Qwen2VLImageProcessorPil(patch_size=patch, merge_size=merge, **kwargs)
    raise FastVError(f"{directory} has no {IMAGE_PROCESSOR}; add the checkpoint's image processor config")


# ---------------------------------------------------------------------------------------------- a loaded model
def model_view(adapter) -> Manifest:
    """The manifest fields the front end reads, for a loaded model instead of a bundle (calibration, validation
    against the model): its image tokens, vision layout and positions sections as export writes them."""
    import torch

    from fastv_export.bundle.view import Manifest
    from fastv_export.bundle.write import image_tokens_section, positions_section

    pixels = adapter.vision_units([Media()], adapter.vision_inputs(1, torch.Generator()))[0]   # one graph call
    text = adapter.text_config
    raw = {"source_model": {"architecture": type(adapter.model).__name__, "eos_token_id": text.eos_token_id,
                            "pad_token_id": text.pad_token_id},
           "image_tokens": image_tokens_section(adapter, {"shape": list(pixels.shape)}),
           "positions": positions_section(adapter), "engines": None}
    return Manifest(raw)


def model_vision_inputs(processed: Sequence[Processed], family: Family) -> dict[str, np.ndarray]:
    """The vision inputs of the HF model's forward for ``processed`` (one prompt's media, prompt order), as its
    processor returns them: LLaVA / InternVL ``pixel_values``; Qwen ``pixel_values`` + ``image_grid_thw`` (and
    the video's); OneVision ``pixel_values`` [images, most tiles, 3, s, s] (zero-padded) + ``image_sizes``."""
    images = [p for p in processed if p.kind == "image"]
    videos = [p for p in processed if p.kind == "video"]
    out: dict[str, np.ndarray] = {}
    if family.name in QWEN:
        for kind, chosen, px, grid in (("image", images, "pixel_values", "image_grid_thw"),
                                       ("video", videos, "pixel_values_videos", "video_grid_thw")):
            if not chosen:
                continue
            out[px] = np.concatenate([u for p in chosen for u in p.units])
            grids = []
            for p in chosen:
                rows = p.units[0].shape[0]
                h, w = p.media.size
                patch = int(round(math.sqrt(h * w / rows)))
                grids.append([len(p.units), h // patch, w // patch])
            out[grid] = np.asarray(grids, dtype=np.int64)
            if kind == "video" and all(p.seconds is not None for p in chosen):
                out["second_per_grid_ts"] = np.asarray([p.seconds for p in chosen], dtype=np.float32)
        return out
    if family.name == "llava_onevision":
        if images:
            most = max(p.units[0].shape[0] for p in images)
            px = np.zeros((len(images), most, *images[0].units[0].shape[1:]), dtype=np.float32)
            for i, p in enumerate(images):
                px[i, :p.units[0].shape[0]] = p.units[0]
            out["pixel_values"] = px
            out["image_sizes"] = np.asarray([p.media.size for p in images], dtype=np.int64)
        if videos:
            out["pixel_values_videos"] = np.stack([p.units[0] for p in videos])
        return out
    if images:
        out["pixel_values"] = np.concatenate([u for p in images for u in p.units])
    return out
