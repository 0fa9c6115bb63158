"""The front end: a checkpoint's own processing (tokenizer, chat template, image and video processors) that
turns requests into the inputs of a bundle's graphs, and the streamed text back (see docs/design.md)."""
from fastv_export.frontend.processor import Frontend, PreparedInputs, has_serving_files
from fastv_export.frontend.request import Message, Part, Request, from_cli, load_requests, parse_requests
from fastv_export.frontend.stream import StopStrings, StreamDecoder

__all__ = ["Frontend", "PreparedInputs", "has_serving_files", "Message", "Part", "Request", "from_cli",
           "load_requests", "parse_requests", "StopStrings", "StreamDecoder"]
