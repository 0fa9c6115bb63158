"""Built-in tiny models (real HF config classes, seeded random weights, or trained weights shipped
with the package for ``tiny-llava-shapes``) and local checkpoints.

No model hub is ever contacted: presets are built in code, checkpoints load from a directory.
Importing this module is light (no torch, no transformers): the CLI reads :data:`PRESETS` and
:data:`DEFAULT_MODEL` for its help; the functions import what they need.

- :mod:`.shapes`: the task the trained preset learned (coloured shapes on a grid; its word vocabulary);
- :mod:`.demo`: the trained preset ``tiny-llava-shapes`` (config, training, loading ``weights/``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from fastv_export.errors import FastVError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

DEFAULT_MODEL = "tiny-llava"
PRESET_SEED = 1234
# Larger than HF's 0.02 so that random attention is peaked enough to rank tokens meaningfully.
TINY_INIT_RANGE = 0.2


def _tiny_llava_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=7, projection_dim=32)           # 8 x 8 = 64 image tokens
    text = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       initializer_range=TINY_INIT_RANGE, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=500, image_seq_length=64,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       initializer_range=TINY_INIT_RANGE)


def _tiny_qwen2_vl_config():
    from transformers import Qwen2VLConfig

    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, initializer_range=TINY_INIT_RANGE)
    text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, initializer_range=TINY_INIT_RANGE,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                pad_token_id=0, bos_token_id=1, eos_token_id=2, use_sliding_window=False)
    return Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=500, video_token_id=501,
                         vision_start_token_id=502, vision_end_token_id=503, initializer_range=TINY_INIT_RANGE)


def _tiny_qwen2_5_vl_config():
    """Qwen2.5-VL: window attention in the vision tower (56 px windows = 2 x 2 merged tokens on the
    default 6 x 6 merged grid, so several windows; block 1 attends fully), out_hidden_size = the
    text model's hidden size; 2 temporal units per second of video."""
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=56,
                  fullatt_block_indexes=[1], tokens_per_second=2, initializer_range=TINY_INIT_RANGE)
    text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, initializer_range=TINY_INIT_RANGE,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                pad_token_id=0, bos_token_id=1, eos_token_id=2, use_sliding_window=False)
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=500, video_token_id=501,
                            vision_start_token_id=502, vision_end_token_id=503, initializer_range=TINY_INIT_RANGE)


def _tiny_qwen3_vl_config():
    """Qwen3-VL: DeepStack from vision blocks 0 and 1 into the hidden states after text layers 0 and 1
    (of 4: K = 1 prunes inside the DeepStack layers, K = 2 after them), a learned 8 x 8 position
    table resampled to the 12 x 12 patch grid, interleaved M-RoPE (mrope_section 4/2/2 of head_dim 16)."""
    from transformers import Qwen3VLConfig

    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1], initializer_range=TINY_INIT_RANGE)
    text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, initializer_range=TINY_INIT_RANGE,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                 "mrope_interleaved": True},
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Qwen3VLConfig(vision_config=vision, text_config=text, image_token_id=500, video_token_id=501,
                         vision_start_token_id=502, vision_end_token_id=503, tie_word_embeddings=False)


def _tiny_llava_onevision_config():
    """LLaVA-OneVision: SigLIP tiles of 28 px (4 x 4 = 16 features), anyres pinpoints up to 2 x 2
    tiles (the default image, 56 x 56 px: base tile 16 + 8 rows of 8 + newline = 88 tokens), Qwen2
    text model."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=28, patch_size=7)
    text = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       initializer_range=TINY_INIT_RANGE, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       use_sliding_window=False, tie_word_embeddings=False)
    return LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=500, video_token_index=501,
                                image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]],
                                vision_feature_layer=-1, vision_feature_select_strategy="full",
                                initializer_range=TINY_INIT_RANGE, tie_word_embeddings=False)


def _tiny_internvl_config():
    """InternVL: 56 px tiles of 7 px patches (8 x 8), pixel shuffle 0.5 -> 16 tokens per tile; an image
    is 1 to 6 tiles (+ a thumbnail) between <img> (502) and </img> (503), a video one tile per frame; Qwen2
    text model."""
    from transformers import InternVLConfig

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=[56, 56],
                  patch_size=[7, 7], initializer_range=TINY_INIT_RANGE)
    text = dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                initializer_range=TINY_INIT_RANGE, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                use_sliding_window=False, tie_word_embeddings=False)
    # <img> / </img>, which the processor writes around an image's context tokens, are tokenizer tokens in
    # InternVL checkpoints; the preset names their ids in its config (adapters/internvl.py image_delimiters)
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=500, downsample_ratio=0.5,
                          image_seq_length=16, initializer_range=TINY_INIT_RANGE, tie_word_embeddings=False,
                          start_image_token_id=502, end_image_token_id=503)


def _bench_llava_config():
    """LLaVA-1.5-shaped for CPU benchmarks: 576 image tokens (336 px, patch 14), 16 layers of hidden
    1024 with LLaVA-7B's MLP ratio; a one-layer vision tower so that the language model dominates."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=336, patch_size=14, projection_dim=64)
    text = LlamaConfig(vocab_size=32064, hidden_size=1024, intermediate_size=2752, num_hidden_layers=16,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576)


def _bench_qwen2_5_vl_config():
    """Qwen2.5-VL-shaped for long-prompt CPU benchmarks: 12 layers of hidden 768 (12 query / 4 KV heads,
    head_dim 64), a two-block vision tower so that the language model dominates; a 16-frame 560 x 560 video
    is 8 x 20 x 20 = 3,200 visual tokens."""
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=768, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=112,
                  fullatt_block_indexes=[1], tokens_per_second=2)
    text = dict(vocab_size=32064, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                num_key_value_heads=4, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
                pad_token_id=0, bos_token_id=1, eos_token_id=2, use_sliding_window=False)
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=32000, video_token_id=32001,
                            vision_start_token_id=32002, vision_end_token_id=32003)


def _shapes_llava_config():
    """The trained demo (presets/demo.py): 64 image tokens, 4 Llama layers, trained on the shapes task."""
    from fastv_export.presets.demo import demo_config

    return demo_config()


PRESETS: dict[str, Callable] = {
    "tiny-llava": _tiny_llava_config,
    "tiny-qwen2-vl": _tiny_qwen2_vl_config,
    "tiny-qwen2.5-vl": _tiny_qwen2_5_vl_config,
    "tiny-qwen3-vl": _tiny_qwen3_vl_config,
    "tiny-llava-onevision": _tiny_llava_onevision_config,
    "tiny-internvl": _tiny_internvl_config,
    "bench-llava": _bench_llava_config,
    "bench-qwen2.5-vl": _bench_qwen2_5_vl_config,
    "tiny-llava-shapes": _shapes_llava_config,
}
_CLASSES = {"tiny-llava": "LlavaForConditionalGeneration", "tiny-qwen2-vl": "Qwen2VLForConditionalGeneration",
            "tiny-qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration", "tiny-qwen3-vl": "Qwen3VLForConditionalGeneration",
            "tiny-llava-onevision": "LlavaOnevisionForConditionalGeneration",
            "tiny-internvl": "InternVLForConditionalGeneration",
            "bench-llava": "LlavaForConditionalGeneration", "bench-qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration",
            "tiny-llava-shapes": "LlavaForConditionalGeneration"}
#: presets whose weights are trained (loaded from the package), not seeded random
TRAINED_PRESETS = ("tiny-llava-shapes",)


def build_preset_config(name: str):
    """The HF config of a built-in preset."""
    if name not in PRESETS:
        raise FastVError(f"unknown preset {name!r}; built-in presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


def build_preset(name: str, attn_implementation: str = "sdpa", dtype: torch.dtype | None = None) -> nn.Module:
    """A deterministic tiny model: same weights on every machine (seeded CPU init, or the trained
    weights of :data:`TRAINED_PRESETS`); ``dtype`` defaults to float32."""
    import torch
    import transformers

    if name in TRAINED_PRESETS:
        from fastv_export.presets.demo import build_trained

        return build_trained(attn_implementation, dtype)
    config = build_preset_config(name)
    config._attn_implementation = attn_implementation
    cls = getattr(transformers, _CLASSES[name])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PRESET_SEED)
        model = cls(config)
    return model.to(dtype or torch.float32).eval()


def load_model(spec: str | Path = DEFAULT_MODEL, attn_implementation: str = "sdpa",
               dtype: torch.dtype | None = None) -> nn.Module:
    """A preset name (``tiny-llava``, ``tiny-qwen2-vl``, ``tiny-llava-shapes``, ...) or a local HF
    checkpoint directory; ``dtype`` defaults to float32."""
    spec = str(spec)
    if spec in PRESETS:
        return build_preset(spec, attn_implementation, dtype)
    path = Path(spec)
    if not path.is_dir():
        raise FastVError(f"model {spec!r} is neither a built-in preset ({', '.join(PRESETS)}) nor a directory; "
                         "pass --model DIR with a local Hugging Face checkpoint")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FastVError(f"{path} has no config.json: is it a Hugging Face checkpoint directory?")
    try:
        archs = json.loads(cfg_file.read_text()).get("architectures") or []
    except json.JSONDecodeError as exc:
        raise FastVError(f"{cfg_file} is not valid JSON ({exc})") from None
    if not archs:
        raise FastVError(f"{cfg_file} names no 'architectures'; cannot pick a model class")
    import torch
    import transformers

    from fastv_export.adapters import adapter_class_for

    adapter_class_for(archs[0])  # unsupported architecture -> clear error before loading weights
    log.info("loading %s from %s", archs[0], path)
    from fastv_export.memory import dropping_file_pages

    cls = getattr(transformers, archs[0])
    # the shards' pages are released as they are read: the weights are held once (in the load dtype), not twice
    with dropping_file_pages(path.glob("*.safetensors")):
        model = cls.from_pretrained(path, local_files_only=True, attn_implementation=attn_implementation,
                                    dtype=dtype or torch.float32)
    return model.eval()
