"""Stage 5: run a bundle's graphs. A :class:`~.runner.Runner` executes one graph by name; the
generation loop (:mod:`.generate`) is written once over that interface; :mod:`.ort` is the ONNX
Runtime runner; :mod:`.positions` computes the position ids the manifest's rules define."""
