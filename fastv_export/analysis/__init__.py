"""Cost and behaviour models beside the pipeline: :mod:`.flops` (paper Eq. 5, an exact count,
KV-cache and decode-traffic models) and :mod:`.attention` (attention allocation per layer,
paper Fig. 3/4)."""
