"""An independent FastV computation for the tests: eager attention maps from an unmodified model,
ranking and selection written here in plain Python, layers >= K re-run by hand."""
from __future__ import annotations

import torch


def capture_layer_inputs(model, layer, inputs):
    """Run the unmodified model once (eager, attention maps on); return the output and the kwargs
    layer ``layer`` received (its mask, rotary cos/sin, position ids)."""
    seen = {}

    def hook(mod, args, kwargs):
        seen.update(kwargs)
        seen["hidden_states"] = args[0] if args else kwargs["hidden_states"]

    def text_hook(mod, args, kwargs):   # DeepStack (Qwen3-VL): the visual mask and rows the text model gets
        seen["visual_pos_masks"] = kwargs.get("visual_pos_masks")
        seen["deepstack_visual_embeds"] = kwargs.get("deepstack_visual_embeds")

    h = layer.register_forward_pre_hook(hook, with_kwargs=True)
    text = model.model.language_model if hasattr(model.model, "language_model") else None
    h_text = text.register_forward_pre_hook(text_hook, with_kwargs=True) if text is not None else None
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True, output_hidden_states=True, use_cache=False)
    finally:
        h.remove()
        if h_text is not None:
            h_text.remove()
    return out, seen


def _deepstack_rows_by_position(seen: dict) -> list[list[dict[int, torch.Tensor]]]:
    """Per DeepStack layer, per batch row: {prompt position: row added there} (empty list without DeepStack).
    The rows come in the order of the True entries of the visual mask (batch rows, then positions)."""
    embeds, vmask = seen.get("deepstack_visual_embeds"), seen.get("visual_pos_masks")
    if not embeds:
        return []
    where = [(r, p) for r in range(vmask.shape[0]) for p in range(vmask.shape[1]) if bool(vmask[r, p])]
    out = []
    for rows in embeds:
        per_row: list[dict[int, torch.Tensor]] = [{} for _ in range(vmask.shape[0])]
        for (r, p), row in zip(where, rows):
            per_row[r][p] = row
        out.append(per_row)
    return out


def python_select(scores: list[float], cand: list[int], n: int, keep: int) -> list[int]:
    """Top-`keep` candidates by score, ties to the lower position; plus all non-candidates; ascending."""
    ranked = sorted(zip(cand, scores), key=lambda cs: (-cs[1], cs[0]))
    chosen = {c for c, _ in ranked[:keep]}
    cset = set(cand)
    return [i for i in range(n) if i not in cset or i in chosen]


def independent_scores(attn: torch.Tensor, key_valid: torch.Tensor, ranking: str) -> torch.Tensor:
    """From a full eager attention map [B, H, n, n] of layer K-1: [B, n] scores."""
    attn = attn.double()
    if ranking == "last":
        return attn[:, :, -1, :].mean(dim=1)
    rows = key_valid.double()                                  # pad query rows add nothing
    summed = (attn * rows[:, None, :, None]).sum(dim=2)         # [B, H, n]
    return (summed / rows.sum(dim=1)[:, None, None]).mean(dim=1)


def independent_pruned_logits(eager_model, adapter, inputs, k: int, ranking: str, keep_fn, image_ids,
                              random_scores_fn=None, seed: int = 0):
    """Logits [B, n', V] of FastV computed independently, and the kept positions."""
    layers = adapter.layers()
    out, seen = capture_layer_inputs(eager_model, layers[k], inputs)
    ids = inputs["input_ids"]
    b, n = ids.shape
    key_valid = inputs["attention_mask"].bool()
    if ranking == "random":
        scores = None
    else:
        scores = independent_scores(out.attentions[k - 1], key_valid, ranking)
    kept_rows = []
    for r in range(b):
        cand = [i for i in range(n) if int(ids[r, i]) in image_ids]
        if ranking == "random":
            s = random_scores_fn(torch.tensor(cand), seed).tolist()
        else:
            s = [float(scores[r, c]) for c in cand]
        kept_rows.append(python_select(s, cand, n, keep_fn(len(cand))))
    kept = torch.tensor(kept_rows)
    hidden = torch.stack([seen["hidden_states"][r, kept[r]] for r in range(b)])
    cos, sin = seen["position_embeddings"]
    cos = torch.stack([cos.expand(b, -1, -1)[r, kept[r]] for r in range(b)])
    sin = torch.stack([sin.expand(b, -1, -1)[r, kept[r]] for r in range(b)])
    # causal mask over the kept tokens in their original order, padding keys masked
    kv = torch.stack([key_valid[r, kept[r]] for r in range(b)])
    n2 = kept.shape[1]
    causal = torch.tril(torch.ones(n2, n2, dtype=torch.bool))
    mask = causal[None, None] & kv[:, None, None, :]
    mask = mask | torch.eye(n2, dtype=torch.bool)[None, None]   # keep pad rows finite
    if seen["attention_mask"] is not None and seen["attention_mask"].dtype != torch.bool:
        mask = torch.zeros(mask.shape, dtype=hidden.dtype).masked_fill(~mask, torch.finfo(hidden.dtype).min)
    deepstack = _deepstack_rows_by_position(seen)
    with torch.no_grad():
        h = hidden
        for i, layer in enumerate(layers[k:], start=k):
            h = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=None,
                      past_key_values=None, use_cache=False)
            h = h[0] if isinstance(h, tuple) else h
            if i < len(deepstack):   # DeepStack: the kept visual positions get their own rows of layer i
                h = h.clone()
                for r in range(b):
                    for j, pos in enumerate(kept[r].tolist()):
                        if pos in deepstack[i][r]:
                            h[r, j] = h[r, j] + deepstack[i][r][pos]
        logits = adapter.lm_head()(adapter.text_model().norm(h))
    return logits, kept
