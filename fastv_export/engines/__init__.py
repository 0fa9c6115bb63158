"""Stage 6: TensorRT engines. :mod:`.trt_rtx` wraps the TensorRT-RTX Python bindings (plugin
loading, ONNX parsing, ahead-of-time builds)."""
