"""Pre-rendering a checkpoint's Jinja chat template (the manifest's ``serving.chat``).

The template is rendered through the tokenizer's ``apply_chat_template`` on conversations whose texts are
sentinel words, and the pieces between the sentinels are its per-role prefixes and suffixes, text-part
affixes, image and video texts and generation prompt (:class:`~fastv_export.bundle.chat.ChatForm`). The
form is then checked against the template on the conversations of :func:`check_conversations` (system /
user / assistant turns, images before and after text, videos); a template it does not reproduce exactly
gives None (the caller records ``chat: null`` and warns) rather than a wrong form.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

from fastv_export.bundle.chat import ChatForm, RoleForm

log = logging.getLogger(__name__)

# sentinel texts: plain lower-case words no template changes and none contains another
SYSTEM, USER1, ASSISTANT, USER2, TEXT2 = "qzsyswq", "qzusraq", "qzasstq", "qzusrbq", "qztxtbq"

Render = Callable[[list[dict], bool], str]


class NotPrerenderable(Exception):
    """The template does not follow the pre-rendered form (the message says where)."""


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def message(role: str, *parts: dict) -> dict:
    return {"role": role, "content": list(parts)}


IMAGE, VIDEO = {"type": "image"}, {"type": "video"}


def jinja_renderer(tokenizer, template: str) -> Render:
    """``render(messages, add_generation_prompt)`` through ``tokenizer.apply_chat_template`` with ``template``."""
    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    return render


def _try(render: Render, messages: list[dict], add_generation_prompt: bool = False) -> str | None:
    """The rendering, or None when the template refuses the conversation (raise_exception, a bad field)."""
    try:
        return render(messages, add_generation_prompt)
    except Exception:  # noqa: BLE001 - a template may raise anything for a conversation it refuses
        return None


def _between(rendered: str, before: str, after: str | None) -> str:
    """The text between the sentinels ``before`` and ``after`` (None: to the end)."""
    if rendered.count(before) != 1 or (after is not None and rendered.count(after) != 1):
        raise NotPrerenderable(f"a sentinel text is not rendered exactly once in {rendered!r}")
    start = rendered.index(before) + len(before)
    stop = len(rendered) if after is None else rendered.index(after)
    if stop < start:
        raise NotPrerenderable("the template reorders the messages")
    return rendered[start:stop]


def _cut_prefix(s: str, prefix: str, what: str) -> str:
    if not s.startswith(prefix):
        raise NotPrerenderable(f"{what}: {s!r} does not start with {prefix!r}")
    return s[len(prefix):]


def _cut_suffix(s: str, suffix: str, what: str) -> str:
    if not s.endswith(suffix):
        raise NotPrerenderable(f"{what}: {s!r} does not end with {suffix!r}")
    return s[:len(s) - len(suffix)]


def derive(render: Render, bos_token: str | None) -> list[ChatForm]:
    """The candidate pre-rendered forms of the template behind ``render`` (not yet checked against it: see
    :func:`prerender`), one per way the text between two text parts splits into a suffix and a prefix."""
    r = lambda messages, gen=False: _try(render, messages, gen)   # noqa: E731
    user_only = r([message("user", text(USER1))])
    user_gen = r([message("user", text(USER1))], True)
    two_turns = r([message("user", text(USER1)), message("assistant", text(ASSISTANT))])
    three_turns = r([message("user", text(USER1)), message("assistant", text(ASSISTANT)),
                     message("user", text(USER2))])
    two_texts = r([message("user", text(USER1), text(TEXT2))])
    if None in (user_only, user_gen, two_turns, three_turns, two_texts):
        raise NotPrerenderable("the template refuses a plain user / assistant conversation")
    generation_prompt = _cut_prefix(user_gen, user_only, "the generation prompt")
    head = user_only[:user_only.index(USER1)] if USER1 in user_only else ""
    user_tail = _between(user_only, USER1, None)                          # text_suffix + user.suffix
    assistant_tail = _between(two_turns, ASSISTANT, None)                 # text_suffix + assistant.suffix
    assistant_head = _cut_prefix(_between(two_turns, USER1, ASSISTANT), user_tail, "user -> assistant")
    user_head = _cut_prefix(_between(three_turns, ASSISTANT, USER2), assistant_tail, "assistant -> user")
    start_default = _cut_suffix(head, user_head, "the first user message")   # start [+ default system turn]

    # text-part affixes: what separates two text parts splits into the suffix of one and the prefix of the next;
    # each split the role texts allow is a candidate (the checks against the template pick one)
    separator = _between(two_texts, USER1, TEXT2)
    splits = [(separator[:k], separator[k:]) for k in range(len(separator) + 1)
              if all(t.startswith(separator[:k]) for t in (user_tail, assistant_tail))
              and all(h.endswith(separator[k:]) for h in (user_head, assistant_head))]
    if not splits:
        raise NotPrerenderable(f"two text parts are separated by {separator!r}, not a text suffix + prefix")
    forms, problems = [], []
    for suffix, prefix in splits:
        try:
            forms.append(_form(r, bos_token, generation_prompt, start_default, user_head, user_tail,
                               assistant_head, assistant_tail, suffix, prefix))
        except NotPrerenderable as exc:
            problems.append(str(exc))
    if not forms:
        raise NotPrerenderable(problems[0])
    return forms


def _form(r, bos_token: str | None, generation_prompt: str, start_default: str, user_head: str, user_tail: str,
          assistant_head: str, assistant_tail: str, suffix: str, prefix: str) -> ChatForm:
    """The form for one split of the text-part separator into ``suffix`` + ``prefix``."""
    user = RoleForm(user_head[:len(user_head) - len(prefix)], user_tail[len(suffix):])
    assistant = RoleForm(assistant_head[:len(assistant_head) - len(prefix)], assistant_tail[len(suffix):])

    start = bos_token if bos_token and start_default.startswith(bos_token) else ""
    system, default_system = None, None
    with_system = r([message("system", text(SYSTEM)), message("user", text(USER1))])
    if with_system is not None:
        if with_system.count(SYSTEM) != 1:
            raise NotPrerenderable("the template does not write a system message's text once")
        system_head = _cut_suffix(with_system[:with_system.index(SYSTEM)], prefix, "the system message")
        system_prefix = _cut_prefix(system_head, start, "the first system message")
        between = _cut_suffix(_cut_prefix(_between(with_system, SYSTEM, USER1), suffix, "system -> user"),
                              user_head, "system -> user")
        system = RoleForm(system_prefix, between)
        if start_default != start:
            inner = _cut_prefix(start_default, start + system.prefix + prefix, "the default system message")
            default_system = _cut_suffix(inner, suffix + system.suffix, "the default system message")
    elif start_default != start:
        raise NotPrerenderable(f"the template writes {start_default!r} before the first user message")

    def media_text(part: dict) -> str | None:
        rendered = r([message("user", part, text(USER1))])
        if rendered is None or USER1 not in rendered:
            return None
        return _cut_suffix(_cut_prefix(rendered[:rendered.index(USER1)], start_default + user.prefix,
                                       "a media part"), prefix, "a media part") or None

    image = media_text(IMAGE)
    if image is None:
        raise NotPrerenderable("the template writes nothing for an image part")
    video = media_text(VIDEO)
    media_first = r([message("user", text(USER1), IMAGE)]) == r([message("user", IMAGE, text(USER1))])
    return ChatForm(start=start, bos_in_template=bool(start), default_system=default_system, system=system,
                    user=user, assistant=assistant, text_prefix=prefix, text_suffix=suffix, image=image, video=video,
                    media_first=media_first, generation_prompt=generation_prompt)


def check_conversations(form: ChatForm) -> list[list[dict]]:
    """The conversations a pre-rendered form must render exactly as the template does: user only; two text
    parts; images before, after and between texts; system + user; system + user + assistant + user;
    user + assistant + user with an image in each user turn; videos where the template writes them."""
    convs = [
        [message("user", text("What is in the image?"))],
        [message("user", text("Describe"), text("briefly."))],
        [message("user", IMAGE, text("What is in the image?"))],
        [message("user", text("What is in the image?"), IMAGE)],
        [message("user", text("Compare"), IMAGE, text("and"), IMAGE, text("please."))],
        [message("user", IMAGE, text("Hi")), message("assistant", text("A cat.")),
         message("user", IMAGE, text("And this one?"))],
        [message("user", text("Hi")), message("assistant", text("Hello!")), message("user", text("Bye"))],
    ]
    if form.system is not None:
        convs += [
            [message("system", text("You are terse.")), message("user", text("Hi"))],
            [message("system", text("You are terse.")), message("user", IMAGE, text("What is it?")),
             message("assistant", text("A dog.")), message("user", text("Colour?"))],
        ]
    if form.video is not None:
        convs += [[message("user", VIDEO, text("What happens?"))],
                  [message("user", text("Compare"), IMAGE, VIDEO)]]
    return convs


def mismatch(form: ChatForm, render: Render, conversations: Sequence[list[dict]]) -> str | None:
    """The first conversation (and generation-prompt setting) the form renders differently, or None."""
    for conv in conversations:
        for gen in (False, True):
            want = _try(render, conv, gen)
            if want is None:
                continue            # the template refuses it (e.g. an assistant turn last with a prompt)
            got = form.render(conv, gen)
            if got != want:
                roles = "+".join(m["role"] for m in conv)
                return f"a {roles} conversation renders as {want!r}, the pre-rendered form gives {got!r}"
    return None


def prerender(tokenizer, template: str, name: str = "the checkpoint") -> ChatForm | None:
    """The checked pre-rendered form of ``template`` rendered through ``tokenizer``, or None (with a warning)
    where the template does not follow it."""
    render = jinja_renderer(tokenizer, template)
    bos = getattr(tokenizer, "bos_token", None)
    try:
        forms = derive(render, bos if isinstance(bos, str) else None)
    except NotPrerenderable as exc:
        problem: str | None = str(exc)
    else:
        for form in forms:
            problem = mismatch(form, render, check_conversations(form))
            if problem is None:
                return form
    log.warning("the chat template of %s cannot be pre-rendered (%s): the manifest's serving.chat is null; "
                "a runtime needs a Jinja engine for it", name, problem)
    return None

