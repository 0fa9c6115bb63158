"""What serving needs in a bundle: the tokenizer, special-token, processor, chat-template and generation files
at the bundle's top level under their Hugging Face names (so that ``AutoTokenizer.from_pretrained(bundle)`` and
the image processor classes load from the bundle alone), and the manifest's ``serving`` section describing
them (docs/manifest.md).

A checkpoint's files are copied byte for byte; a template kept inside ``tokenizer_config.json`` (or
``processor_config.json``) is also written as ``chat_template.jinja``; a checkpoint without ``tokenizer.json``
whose tokenizer loads gets the one that tokenizer saves; one without ``generation_config.json`` gets the one its
config implies; one without a tokenizer exports with ``serving.tokenizer`` null (and a warning). Presets write
theirs by code (fastv_export/presets/serving.py). The section is read back from the bundle's own copies.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastv_export.errors import FastVError

log = logging.getLogger(__name__)

#: role -> the Hugging Face file names that hold it, in order of preference
ROLE_FILES: dict[str, tuple[str, ...]] = {
    "tokenizer": ("tokenizer.json",),
    "tokenizer_config": ("tokenizer_config.json",),
    "special_tokens_map": ("special_tokens_map.json",),
    "chat_template": ("chat_template.jinja", "chat_template.json"),
    "image_processor": ("preprocessor_config.json",),
    "video_processor": ("video_preprocessor_config.json",),
    "processor": ("processor_config.json",),
    "generation_config": ("generation_config.json",),
}
ROLES = tuple(ROLE_FILES)
#: files a tokenizer may also need beside tokenizer.json (copied when the checkpoint has them)
TOKENIZER_EXTRAS = ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json")
#: the generation settings recorded from generation_config.json (null where it leaves them unset)
SAMPLING = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")
PROBE = "Hello, wörld! 1 2 3\n  <tab>\tend"


def write_serving_files(model: str | Path, config, out: Path) -> dict:
    """Write the serving files of ``model`` (a preset name or a checkpoint directory, whose HF ``config``
    is given) into the bundle directory ``out``; return the manifest's ``serving`` section."""
    from fastv_export.presets import PRESETS

    if str(model) in PRESETS:
        from fastv_export.presets.serving import write_preset_files

        write_preset_files(str(model), out)
        name = str(model)
    else:
        _copy_checkpoint_files(Path(model), config, out)
        name = Path(model).name
    return serving_section(out, config, name)


def _copy_checkpoint_files(checkpoint: Path, config, out: Path) -> None:
    copied = [f for names in ROLE_FILES.values() for f in names if (checkpoint / f).is_file()]
    copied += [f for f in TOKENIZER_EXTRAS if (checkpoint / f).is_file()]
    for f in copied:
        shutil.copyfile(checkpoint / f, out / f)
    _template_file(out)
    tokenizer = _load_tokenizer(checkpoint)
    with tempfile.TemporaryDirectory() as scratch:
        if tokenizer is not None and not (out / "tokenizer.json").is_file():
            if not getattr(tokenizer, "is_fast", False):
                raise FastVError(f"the tokenizer of {checkpoint} has no fast (tokenizer.json) form, which a bundle "
                                 "needs; convert it (AutoTokenizer.from_pretrained(..., use_fast=True)"
                                 ".save_pretrained(DIR)) and export again")
            tokenizer.save_pretrained(scratch)
            for f in ("tokenizer.json", "tokenizer_config.json"):
                if (Path(scratch) / f).is_file() and not (out / f).is_file():
                    shutil.copyfile(Path(scratch) / f, out / f)
            log.info("%s has no tokenizer.json: the bundle holds the one its tokenizer saves", checkpoint)
        if not (out / "generation_config.json").is_file():
            from transformers import GenerationConfig

            GenerationConfig.from_model_config(config).save_pretrained(scratch)
            shutil.copyfile(Path(scratch) / "generation_config.json", out / "generation_config.json")
    if tokenizer is None:
        log.warning("%s holds no tokenizer: the bundle has none (serving.tokenizer is null); a runtime must be "
                    "given token ids", checkpoint)
        return
    again = _load_tokenizer(out)
    probe = probe_text(tokenizer)
    if again is None or again.encode(probe) != tokenizer.encode(probe):
        raise FastVError(f"the tokenizer of {checkpoint} does not load the same from the files a bundle holds "
                         f"({', '.join(copied)}); save it with save_pretrained (which writes tokenizer.json) and "
                         "export again")


def probe_text(tokenizer) -> str:
    """A text ``tokenizer`` encodes: :data:`PROBE`, or for a tokenizer without an unknown token that cannot
    encode it (a word-level vocabulary), its first ordinary tokens decoded."""
    try:
        tokenizer.encode(PROBE)
        return PROBE
    except Exception:      # the tokenizers library raises its own Exception for words it cannot encode
        special = set(tokenizer.all_special_ids)
        ids = [i for i in sorted(tokenizer.get_vocab().values()) if i not in special][:8]
        return tokenizer.decode(ids)


def _template_file(out: Path) -> None:
    """A checkpoint that keeps its chat template inside ``tokenizer_config.json`` or ``processor_config.json``
    (older checkpoints) gets it written as ``chat_template.jinja`` too, the file transformers reads first: the
    template then has a file of its own (``serving.chat_template``) whatever the checkpoint's layout."""
    if any((out / f).is_file() for f in ROLE_FILES["chat_template"]):
        return
    for holder in ("tokenizer_config.json", "processor_config.json"):
        if (out / holder).is_file():
            try:
                template = _chat_template_text(out, holder)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                continue
            if template:
                (out / "chat_template.jinja").write_text(template, encoding="utf-8")
                log.info("the chat template of %s is written as chat_template.jinja", holder)
                return


def _load_tokenizer(directory: Path):
    """The directory's tokenizer, or None when it holds none that loads."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - no tokenizer files, or ones transformers cannot read
        log.debug("no tokenizer in %s: %s", directory, exc)
        return None


def _chat_template_text(out: Path, role_file: str | None) -> str | None:
    """The Jinja text of the bundle's chat template (``role_file``: the file that holds it)."""
    if role_file is None:
        return None
    if role_file.endswith(".jinja"):
        return (out / role_file).read_text(encoding="utf-8")
    template = json.loads((out / role_file).read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):       # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def generation_section(out: Path, config) -> dict:
    """``serving.generation``: EOS / BOS / pad ids and sampling defaults from the bundle's generation_config.json
    (the text config's ids where it names none)."""
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(out, local_files_only=True)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def pick(name: str):
        value = getattr(gen, name, None)
        return value if value is not None else getattr(text, name, None)

    bos, pad = pick("bos_token_id"), pick("pad_token_id")
    section: dict[str, Any] = {"eos_token_ids": _ids(pick("eos_token_id")),
                               "bos_token_id": None if bos is None else int(bos),
                               "pad_token_id": None if pad is None else int(_ids(pad)[0])}
    for name in SAMPLING:
        value = getattr(gen, name, None)
        section[name] = value if value is None or isinstance(value, bool) else (
            int(value) if name in ("top_k", "max_new_tokens") else float(value))
    return section


def serving_section(out: Path, config, name: str) -> dict:
    """The manifest's ``serving`` section of the bundle directory ``out`` (files already in place)."""
    from fastv_export.export.chat_template import prerender

    roles: dict[str, str | None] = {}
    for role, names in ROLE_FILES.items():
        roles[role] = next((f for f in names if (out / f).is_file()), None)
    tokenizer = _load_tokenizer(out) if roles["tokenizer"] else None
    if roles["tokenizer"] and tokenizer is None:
        raise FastVError(f"the tokenizer files of {name} do not load (AutoTokenizer.from_pretrained); "
                         "check them with transformers and export again")
    template = _chat_template_text(out, roles["chat_template"])
    chat = None
    if template is None:
        log.warning("%s has no chat template: serving.chat is null (prompts must be written in the model's format)",
                    name)
    elif tokenizer is None:
        log.warning("%s has a chat template but no tokenizer to render it with: serving.chat is null", name)
    else:
        form = prerender(tokenizer, template, name)
        chat = None if form is None else form.to_dict()
    adds_bos = None
    if tokenizer is not None:
        adds_bos = _adds_bos(tokenizer)
    return {**roles, "tokenizer_adds_bos": adds_bos, "generation": generation_section(out, config), "chat": chat}


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer writes its BOS token before a text (probed on its EOS token's text, which every
    vocabulary holds: a word-level vocabulary cannot encode an arbitrary word)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    probe = tokenizer.eos_token or tokenizer.pad_token or "a"
    with_special = tokenizer.encode(probe)
    plain = tokenizer.encode(probe, add_special_tokens=False)
    return len(with_special) > len(plain) and with_special[:1] == [bos]
