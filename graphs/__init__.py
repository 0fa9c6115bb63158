"""The ONNX side of the pipeline (installed as ``fastv_export.graphs``), a leaf: it takes plain
attributes and imports nothing else of fastv_export.

- :mod:`.op`: the fastv::TokenSelect op's constants and integer rules (pure Python);
- :mod:`.spec`: the I/O contract of every graph of a bundle (names, dtypes, symbolic dims);
- :mod:`.token_select`: the op's standard-ONNX function body and its node;
- :mod:`.schema`: the op as an ``onnx.defs.OpSchema`` (checker and shape inference);
- :mod:`.surgery`: inserting the op into an exported pre-K graph, naming dims.
"""
