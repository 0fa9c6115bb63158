"""Choosing K and R for a model under a budget (installed as ``fastv_export.calibrate``).

A leaf over the public API: the presets (the trained demo ``tiny-llava-shapes`` and its shapes task
live in :mod:`fastv_export.presets`), the reference FastV (:mod:`fastv_export.reference`) and the
FLOPs analysis; nothing outside this package and the ``calibrate`` command imports it.

- :mod:`.dataset`: calibration sets (the demo task, synthetic prompts, a folder of images + JSONL);
- :mod:`.sweep`: the K x R x ranking sweep with prefix reuse and a resumable results file;
- :mod:`.report`: table (CSV, JSON), Pareto frontier and plot, recommendation under a constraint.

The CLI is ``fastv-export calibrate`` (fastv_export/commands/calibrate.py); see docs/calibrate.md.
"""
