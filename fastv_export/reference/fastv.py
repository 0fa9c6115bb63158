"""The PyTorch reference FastV: a plug-and-play, in-place pass on a Hugging Face VLM.

How it works (no eager attention, no masking trick, layer K-1 runs once):
- a forward pre-hook on the model reads ``input_ids`` / ``attention_mask`` of each call and
  decides whether the call is a prefill (no past) that must prune;
- layer K-1's attention module hands its post-rotary query and key to the ranking
  (:func:`~fastv_export.reference.capture.capture_query_key`: only the rows the ranking needs,
  O(rows x n) memory) and then runs the model's original implementation (SDPA, FlashAttention or
  eager) unchanged;
- forward pre-hooks on layers >= K gather the kept tokens' hidden states (at layer K) and
  substitute the matching attention mask, rotary embeddings and position ids
  (:mod:`~fastv_export.reference.gather`), so layers >= K run
  on n' tokens with their ORIGINAL positions and cache n' keys/values; during decode they drop
  the pruned columns from the mask of the longer, unpruned layers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from fastv_export.adapters import ModelAdapter, get_adapter
from fastv_export.config import FastVConfig
from fastv_export.errors import FastVError
from fastv_export.reference.capture import capture_query_key, original_attention
from fastv_export.reference.gather import gather_rows, gather_seq, prefill_substitutions
from fastv_export.reference.selection import candidate_scores, select_kept

log = logging.getLogger(__name__)

# original_attention lives in .capture; importing it from here keeps working
__all__ = ["FastVHandle", "apply_fastv", "original_attention"]


@dataclass
class _Prefill:
    """What one pruning prefill decided."""
    seq_len: int
    candidates: torch.Tensor              # [B, M]
    keep: int
    key_valid: torch.Tensor               # [B, n] bool
    scores: torch.Tensor | None = None    # [B, M] candidate scores
    kept: torch.Tensor | None = None      # [B, n'] kept positions


@dataclass
class _State:
    config: FastVConfig
    phase: str = "off"                    # "prefill" | "decode" | "off" for the running forward
    prefill: _Prefill | None = None       # the running (or last) prefill
    forced: torch.Tensor | None = None
    layer_kwargs: dict = field(default_factory=dict)  # substitutions for layers >= K in this forward


class FastVHandle:
    """Returned by :func:`apply_fastv`. ``remove()`` restores the model exactly."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, config: FastVConfig) -> None:
        self.model = model
        self.adapter = adapter
        self.config = config
        self._state = _State(config)
        self._hooks: list = []
        self._restore: list = []
        self._undo: list = []

    # ---- results of the last prefill ----------------------------------------------------------
    @property
    def kept_positions(self) -> torch.Tensor | None:
        """LongTensor [B, n'] of the prompt positions kept by the last prefill (ascending)."""
        p = self._state.prefill
        return None if p is None else p.kept

    @property
    def candidates(self) -> torch.Tensor | None:
        p = self._state.prefill
        return None if p is None else p.candidates

    @property
    def candidate_scores(self) -> torch.Tensor | None:
        """Scores [B, M] of the image tokens in the last prefill (None when forced or not pruned)."""
        p = self._state.prefill
        return None if p is None else p.scores

    def force_selection(self, kept_positions: torch.Tensor | None) -> None:
        """Keep exactly the image tokens named in ``kept_positions`` [B, n'] in the following prefills
        instead of ranking (validation: downstream numerics under the reference's selection; the
        same selection also serves the prompt followed by generated tokens). ``None`` ranks again."""
        self._state.forced = None if kept_positions is None else kept_positions.clone()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        for obj, attr, value in self._restore:
            setattr(obj, attr, value)
        for undo in self._undo:
            undo()
        self._hooks.clear()
        self._restore.clear()
        self._undo.clear()
        if getattr(self.model, "_fastv_handle", None) is self:
            del self.model._fastv_handle

    def __enter__(self) -> "FastVHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_fastv(model: nn.Module, config: FastVConfig) -> FastVHandle:
    """Apply FastV to ``model`` in place; ``model.generate`` / ``model(...)`` then prune in prefill."""
    if getattr(model, "_fastv_handle", None) is not None:
        raise FastVError("FastV is already applied to this model; call handle.remove() first")
    adapter = get_adapter(model)
    layers = adapter.layers()
    config.check_layers(len(layers))
    handle = FastVHandle(model, adapter, config)
    state = handle._state
    k = config.k

    handle._hooks.append(model.register_forward_pre_hook(
        lambda mod, args, kwargs: _start_forward(state, adapter, args, kwargs), with_kwargs=True))
    if k >= 1 and config.ranking != "random":
        handle._undo.append(capture_query_key(layers[k - 1].self_attn,
                                              lambda query, key, scale: _score(state, query, key, scale)))
    for i in range(k, len(layers)):
        handle._hooks.append(layers[i].register_forward_pre_hook(
            _layer_hook(state, first=(i == k)), with_kwargs=True))
    # per-position decoder inputs beyond hidden/mask/positions (DeepStack rows) follow the kept positions
    handle._undo.append(adapter.follow_kept_positions(
        lambda: state.prefill.kept if state.phase == "prefill" and state.prefill is not None else None))
    model._fastv_handle = handle
    log.info("FastV applied: %s on %s", config.describe(), type(model).__name__)
    return handle


# ---- forward start: is this a pruning prefill? ------------------------------------------------
def _start_forward(state: _State, adapter: ModelAdapter, args: tuple, kwargs: dict) -> None:
    state.layer_kwargs = {}
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    past = kwargs.get("past_key_values")
    past_len = past.get_seq_length() if past is not None else 0
    if past_len > 0:
        state.phase = "decode" if state.prefill is not None and state.prefill.kept is not None else "off"
        return
    state.phase, state.prefill = "off", None
    if input_ids is None:
        if kwargs.get("inputs_embeds") is not None:
            raise FastVError("FastV needs input_ids to find the image tokens; call the model with input_ids")
        return
    candidates = adapter.find_candidates(input_ids)
    m = candidates.shape[1]
    keep = state.config.keep_count(m)
    if m == 0 or (keep == m and state.forced is None):
        return  # nothing to drop: the unmodified model runs
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        key_valid = mask.bool()
    else:
        key_valid = torch.ones_like(input_ids, dtype=torch.bool)
    if state.config.ranking == "last" and state.forced is None and not bool(key_valid[:, -1].all()):
        rows = (~key_valid[:, -1]).nonzero().flatten().tolist()
        raise FastVError(f"ranking 'last' reads the last prompt token's attention row, but batch row(s) {rows} end in "
                         "padding (right padding): left-pad the batch (tokenizer.padding_side = 'left') or use "
                         "ranking 'mean'")
    state.prefill = _Prefill(seq_len=input_ids.shape[1], candidates=candidates, keep=keep, key_valid=key_valid)
    state.phase = "prefill"


# ---- layer K-1: scores from the post-rotary query and key -------------------------------------
def _score(state: _State, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
    pre = state.prefill
    if state.phase == "prefill" and state.forced is None and pre.scores is None:
        pre.scores = candidate_scores(state.config.ranking, pre.candidates.to(query.device), query=query, key=key,
                                      key_valid=pre.key_valid.to(query.device), scale=scale)


# ---- layers >= K: run on the kept tokens ------------------------------------------------------
def _layer_hook(state: _State, first: bool):
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        if state.phase == "off":
            return None
        if first and state.phase == "prefill":
            hidden = args[0] if args else kwargs["hidden_states"]
            kept = _decide(state, hidden.device)
            state.layer_kwargs = prefill_substitutions(kwargs, kept, state.prefill.seq_len)
            pruned = gather_seq(hidden, kept)
            args = (pruned,) + tuple(args[1:]) if args else args
            if not args:
                kwargs["hidden_states"] = pruned
        elif first and state.phase == "decode":
            state.layer_kwargs = _decode_substitutions(kwargs, state.prefill)
        kwargs.update(state.layer_kwargs)
        return args, kwargs
    return hook


def _decide(state: _State, device: torch.device) -> torch.Tensor:
    pre = state.prefill
    b, n = pre.candidates.shape[0], pre.seq_len
    if state.forced is not None:
        # forced: the candidates named in ``forced`` are kept, every non-candidate too (so a
        # selection taken from a prompt also serves that prompt followed by generated tokens)
        forced = torch.zeros(b, n, dtype=torch.bool, device=device)
        forced.scatter_(1, state.forced.to(device).clamp(max=n - 1), True)
        chosen = torch.gather(forced, 1, pre.candidates.to(device))
        if (chosen.sum(dim=1) != pre.keep).any():
            raise FastVError(f"forced selection keeps {chosen.sum(dim=1).tolist()} image tokens per row, "
                             f"this prefill keeps {pre.keep}")
        keep_mask = torch.ones(b, n, dtype=torch.bool, device=device)
        keep_mask.scatter_(1, pre.candidates.to(device), chosen)
        kept = keep_mask.nonzero()[:, 1].view(b, n - pre.candidates.shape[1] + pre.keep)
    else:
        if pre.scores is None:  # K = 0 or ranking "random": no attention needed
            pre.scores = candidate_scores("random", pre.candidates, seed=state.config.seed)
        kept = select_kept(pre.scores.to(device), pre.candidates.to(device), n, pre.keep)
    pre.kept = kept
    return kept


def _decode_substitutions(kwargs: dict, pre: _Prefill) -> dict:
    """Layers >= K hold n' cached tokens instead of n: drop the pruned columns from the mask."""
    mask = kwargs.get("attention_mask")
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 4):
        return {}
    total = mask.shape[3]
    new = torch.arange(pre.seq_len, total, device=mask.device).expand(pre.kept.shape[0], -1)
    cols = torch.cat([pre.kept.to(mask.device), new], dim=1)
    return {"attention_mask": gather_rows(mask, cols, dim=3)}
