"""Choosing K and R for a model under a FLOPs or latency budget (installed as
``fastv_export.calibrate``). Not implemented yet: today K and R are chosen by hand, with
``fastv-export flops`` (cost) and ``fastv-export generate`` / ``validate`` (agreement with the
unpruned model) as the tools; see docs/design.md §6."""
