"""Choosing K and R for a model under a budget (installed as ``fastv_export.calibrate``).

- :mod:`.shapes`: the demo task (coloured shapes on a grid; colour / count / position questions);
- :mod:`.demo`: the trained demo preset ``tiny-llava-shapes`` (training and loading);
- :mod:`.dataset`: calibration sets (the demo task, synthetic prompts, a folder of images + JSONL);
- :mod:`.sweep`: the K x R x ranking sweep with prefix reuse and a resumable results file;
- :mod:`.report`: table (CSV, JSON), Pareto frontier and plot, recommendation under a constraint.

The CLI is ``fastv-export calibrate`` (fastv_export/commands/calibrate.py); see docs/calibrate.md.
"""
