"""A chat template pre-rendered for a runtime without a template engine (the manifest's ``serving.chat``).

The export derives it from the checkpoint's Jinja template (:mod:`fastv_export.export.chat_template`) and
keeps it only where it renders exactly what the template renders; :meth:`ChatForm.render` is the rule a
runtime follows (docs/manifest.md):

    start
    [system.prefix + text_prefix + default_system + text_suffix + system.suffix]   first message not system
    for each message: role.prefix + its parts + role.suffix
        parts in the given order, or (media_first) its images, then its videos, then its texts;
        a text part is text_prefix + text + text_suffix, an image part ``image``, a video part ``video``
    [generation_prompt]                                                             add_generation_prompt
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from fastv_export.errors import FastVError

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "image", "video")


@dataclass(frozen=True)
class RoleForm:
    """What a template writes around one message of a role."""
    prefix: str
    suffix: str


@dataclass(frozen=True)
class ChatForm:
    """The pre-rendered chat template (see the module's docstring for the rendering rule)."""
    start: str                      # written once before the first message (the BOS text where the template has it)
    bos_in_template: bool           # ``start`` is the tokenizer's BOS token (the tokenizer must not add another)
    default_system: str | None      # the system message a template writes when the conversation has none
    system: RoleForm | None         # None: the template refuses system messages
    user: RoleForm
    assistant: RoleForm
    text_prefix: str
    text_suffix: str
    image: str                      # the text of an image part
    video: str | None               # the text of a video part (None: the template writes no videos)
    media_first: bool               # a message's images, then videos, then texts, whatever their given order
    generation_prompt: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChatForm:
        roles = {r: None if d[r] is None else RoleForm(**d[r]) for r in ROLES}
        return cls(**dict(d, **roles))

    def role(self, name: str) -> RoleForm:
        form = getattr(self, name) if name in ROLES else None
        if form is None:
            what = "takes no system message" if name == "system" else f"has no role {name!r}"
            raise FastVError(f"the model's chat template {what}; roles it takes: "
                             f"{', '.join(r for r in ROLES if getattr(self, r) is not None)}")
        return form

    def part(self, part: Mapping[str, Any] | str) -> str:
        """The text one content part renders to (a plain string is a text part)."""
        if isinstance(part, str):
            return self.text_prefix + part + self.text_suffix
        kind = part.get("type")
        if kind == "text":
            return self.text_prefix + str(part["text"]) + self.text_suffix
        if kind == "image":
            return self.image
        if kind == "video":
            if self.video is None:
                raise FastVError("the model's chat template writes no video parts; give images or text")
            return self.video
        raise FastVError(f"content part type {kind!r} is not one of {', '.join(PART_TYPES)}")

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages`` (``{"role", "content": str | [parts]}``), as the template renders it."""
        out = self.start
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            system = self.role("system")
            out += system.prefix + self.part(self.default_system) + system.suffix
        for message in messages:
            form = self.role(message["role"])
            content = message["content"]
            parts = [content] if isinstance(content, str) else list(content)
            if self.media_first:
                kind = [p.get("type") if isinstance(p, Mapping) else "text" for p in parts]
                parts = [p for want in ("image", "video", "text") for p, k in zip(parts, kind) if k == want] + \
                        [p for p, k in zip(parts, kind) if k not in PART_TYPES]
            out += form.prefix + "".join(self.part(p) for p in parts) + form.suffix
        return out + (self.generation_prompt if add_generation_prompt else "")
