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

    h = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True, output_hidden_states=True, use_cache=False)
    finally:
        h.remove()
    return out, seen


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
    with torch.no_grad():
        h = hidden
        for layer in layers[k:]:
            h = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=None,
                      past_key_values=None, use_cache=False)
            h = h[0] if isinstance(h, tuple) else h
        logits = adapter.lm_head()(adapter.text_model().norm(h))
    return logits, kept
