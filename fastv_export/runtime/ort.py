"""Drive a bundle's graphs with ONNX Runtime: vision -> embed -> pre-K (TokenSelect) -> post-K,
then decode steps over the two KV caches. Only the manifest and the ONNX files are used."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from fastv_export.bundle import Bundle
from fastv_export.errors import FastVError
from fastv_export.runtime.positions import decode_positions, prefill_positions

log = logging.getLogger(__name__)


def default_providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def default_session_options(threads: int | None = None) -> ort.SessionOptions:
    """Session options for a pipeline of sessions run in turn: no spinning, optional thread count."""
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    return so


@dataclass
class Generation:
    tokens: np.ndarray                     # [B, T] generated token ids
    step_logits: list[np.ndarray]          # T x [B, V] logits that chose each token
    kept_indices: np.ndarray               # [B, n'] kept prompt positions
    prefill_hidden: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)


class OrtRuntime:
    def __init__(self, bundle: Bundle, providers: list[str] | None = None, expose_layer_hidden: bool = False,
                 session_options: ort.SessionOptions | None = None):
        """``session_options`` (threads, profiling, ...) applies to all four sessions; by default
        intra-op threads do not spin after a run: the four sessions run one after another, each with
        its own thread pool, and a pool spinning after its graph finished steals the cores of the next
        graph (bench-llava on 2 cores, measured: pre_k 199 -> 141 ms, decode 69 -> 46 ms per token)."""
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.providers = providers or default_providers()
        so = session_options or default_session_options()
        so.log_severity_level = 3
        self.sessions = {}
        for name in ("vision", "embed", "pre_k", "post_k"):
            path = bundle.file(name)
            if name == "pre_k" and expose_layer_hidden:
                model = onnx.load(str(path))
                elem = onnx.TensorProto.FLOAT16 if bundle.manifest["precision"] == "fp16" else onnx.TensorProto.FLOAT
                model.graph.output.append(onnx.helper.make_tensor_value_info("layer_hidden", elem, None))
                src = model.SerializeToString()
            else:
                src = str(path)
            self.sessions[name] = ort.InferenceSession(src, so, providers=self.providers)
        self.k = self.manifest["fastv"]["k"]
        self.num_layers = self.manifest["source_model"]["num_layers"]
        self.float_type = np.float16 if self.manifest["precision"] == "fp16" else np.float32
        kv = self.manifest["kv_cache"]
        self.kv_shape = (kv["num_kv_heads"], kv["head_dim"])
        self.image_ids = np.array(self.manifest["image_tokens"]["token_ids"])

    # ---- stages ---------------------------------------------------------------------------------
    def image_features(self, images: list[np.ndarray]) -> np.ndarray:
        hidden = self.manifest["source_model"]["hidden_size"]
        if not images:
            return np.zeros((0, hidden), dtype=self.float_type)
        want = self.manifest["image_tokens"]["vision_input"]["shape"]
        feats = []
        for i, px in enumerate(images):
            if list(px.shape) != [d for d in want]:
                raise FastVError(f"image {i} has pixel_values of shape {list(px.shape)}; this bundle's vision graph "
                                 f"takes {want} (one image of the exported size)")
            feats.append(self.sessions["vision"].run(None, {"pixel_values": px.astype(self.float_type)})[0])
        return np.concatenate(feats, axis=0)

    def _empty_past(self, batch: int, layers: range) -> dict[str, np.ndarray]:
        z = np.zeros((batch, self.kv_shape[0], 0, self.kv_shape[1]), dtype=self.float_type)
        return {f"past_key_values.{i}.{t}": z for i in layers for t in ("key", "value")}

    @staticmethod
    def _presents(names: list[str], values: list[np.ndarray]) -> dict[str, np.ndarray]:
        return {n.replace("present.", "past_key_values."): v for n, v in zip(names, values) if n.startswith("present.")}

    def candidates(self, input_ids: np.ndarray) -> np.ndarray:
        is_image = np.isin(input_ids, self.image_ids)
        counts = is_image.sum(axis=1)
        if len(set(counts.tolist())) > 1:
            raise FastVError(f"the prompts of this batch hold different numbers of image tokens ({counts.tolist()})")
        return np.stack([np.nonzero(row)[0] for row in is_image]).astype(np.int64).reshape(len(input_ids), -1)

    # ---- generation -----------------------------------------------------------------------------
    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, images: list[np.ndarray],
                 max_new_tokens: int, forced_kept: np.ndarray | None = None,
                 eos_token_id: int | None = None) -> Generation:
        """Greedy generation. ``forced_kept`` [B, n'] replaces TokenSelect's choice (validation; the
        runtime must then have been built with expose_layer_hidden=True)."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        input_ids = input_ids.astype(np.int64)
        attention_mask = attention_mask.astype(np.int64)
        b, n = input_ids.shape
        feats = self.image_features(images)
        timings["vision"] = time.perf_counter() - t0
        positions = prefill_positions(self.manifest, input_ids, attention_mask)
        t1 = time.perf_counter()
        embeds = self.sessions["embed"].run(None, {"input_ids": input_ids, "image_features": feats})[0]
        pre = self.sessions["pre_k"]
        pre_names = [o.name for o in pre.get_outputs()]
        feeds = {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": positions,
                 "candidate_positions": self.candidates(input_ids), **self._empty_past(b, range(self.k))}
        outs = dict(zip(pre_names, pre.run(None, feeds)))
        kept = outs["kept_indices"]
        hidden, sel_pos = outs["hidden_states"], outs["selected_position_ids"]
        if forced_kept is not None:
            kept = forced_kept.astype(np.int64)
            full = outs["layer_hidden"]
            hidden = np.take_along_axis(full, kept[:, :, None], axis=1)
            sel_pos = (np.take_along_axis(positions, kept, axis=1) if positions.ndim == 2 else
                       np.stack([np.take_along_axis(p, kept, axis=1) for p in positions]))
        pre_past = self._presents(pre_names, [outs[n_] for n_ in pre_names])
        post_mask = np.take_along_axis(attention_mask, kept, axis=1)
        timings["pre_k"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        post = self.sessions["post_k"]
        post_names = [o.name for o in post.get_outputs()]
        res = post.run(None, {"hidden_states": hidden, "attention_mask": post_mask, "position_ids": sel_pos,
                              **self._empty_past(b, range(self.k, self.num_layers))})
        post_past = self._presents(post_names, res)
        logits = res[0][:, -1].astype(np.float32)
        timings["post_k"] = time.perf_counter() - t2
        timings["prefill"] = time.perf_counter() - t0
        tokens, step_logits = [], []
        no_features = np.zeros((0, embeds.shape[-1]), dtype=self.float_type)
        t3 = time.perf_counter()
        finished = np.zeros(b, dtype=bool)
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1).astype(np.int64)
            if eos_token_id is not None:
                nxt = np.where(finished, self.manifest["source_model"].get("pad_token_id") or 0, nxt)
                finished |= nxt == eos_token_id
            tokens.append(nxt)
            step_logits.append(logits)
            if step == max_new_tokens - 1 or finished.all():
                break
            ids = nxt[:, None]
            emb = self.sessions["embed"].run(None, {"input_ids": ids, "image_features": no_features})[0]
            pos = decode_positions(positions, step)
            ones = np.ones((b, 1), dtype=np.int64)
            attention_mask = np.concatenate([attention_mask, ones], axis=1)
            post_mask = np.concatenate([post_mask, ones], axis=1)
            o = dict(zip(pre_names, pre.run(None, {"inputs_embeds": emb, "attention_mask": attention_mask,
                                                   "position_ids": pos,
                                                   "candidate_positions": np.zeros((b, 0), dtype=np.int64),
                                                   **pre_past})))
            pre_past = self._presents(pre_names, [o[n_] for n_ in pre_names])
            res = post.run(None, {"hidden_states": o["hidden_states"], "attention_mask": post_mask,
                                  "position_ids": o["selected_position_ids"], **post_past})
            post_past = self._presents(post_names, res)
            logits = res[0][:, -1].astype(np.float32)
        steps = max(1, len(tokens) - 1)
        timings["decode_per_token"] = (time.perf_counter() - t3) / steps
        return Generation(np.stack(tokens, axis=1), step_logits, kept, timings=timings)
