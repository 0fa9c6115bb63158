// The graph I/O names of a fastv-export bundle: the C++ spelling of graphs/spec.py, the one place in the
// runtime where they are written. Each constant kFooBar is spec.FOO_BAR (tests/test_cpp_drift.py parses this
// file and compares every constant with the spec both ways; the ctest compares the functions with golden
// vectors that graphs/spec.py wrote: runtime/tests/data/golden.json).
#pragma once

#include <string>

namespace fastv {

// ---- graphs, KV kinds, vision layouts ---------------------------------------------------------------
inline constexpr const char* kGraphs[] = {"vision", "embed", "pre_k", "post_k"};
inline constexpr const char* kKvKinds[] = {"key", "value"};
inline constexpr const char* kVisionLayouts[] = {"fixed", "patch_grid", "tiles"};

// ---- tensor names --------------------------------------------------------------------------------------
inline constexpr const char* kPixelValues = "pixel_values";
inline constexpr const char* kVisionPositionIds = "vision_position_ids";   // patch_grid
inline constexpr const char* kWindowIndex = "window_index";                // patch_grid
inline constexpr const char* kCuWindowSeqlens = "cu_window_seqlens";       // patch_grid
inline constexpr const char* kPackIndex = "pack_index";                    // tiles
inline constexpr const char* kImageFeatures = "image_features";
inline constexpr const char* kInputIds = "input_ids";
inline constexpr const char* kInputsEmbeds = "inputs_embeds";
inline constexpr const char* kAttentionMask = "attention_mask";
inline constexpr const char* kPositionIds = "position_ids";
inline constexpr const char* kCandidatePositions = "candidate_positions";
inline constexpr const char* kHiddenStates = "hidden_states";
inline constexpr const char* kSelectedPositionIds = "selected_position_ids";
inline constexpr const char* kKeptIndices = "kept_indices";
inline constexpr const char* kLogits = "logits";
inline constexpr const char* kPastPrefix = "past_key_values";
inline constexpr const char* kPresentPrefix = "present";
// DeepStack (Qwen3-VL): one tensor per level l, named level_name(prefix, l)
inline constexpr const char* kDeepstackFeatures = "deepstack_features";
inline constexpr const char* kDeepstackEmbeds = "deepstack_embeds";
inline constexpr const char* kKeptDeepstackEmbeds = "kept_deepstack_embeds";

// ---- names with an index (spec.past_name, present_name, level_name, is_present, present_to_past) ------
/// past_key_values.{layer}.{kind} (kind: "key" or "value")
inline std::string past_name(int layer, const std::string& kind) {
  return std::string(kPastPrefix) + "." + std::to_string(layer) + "." + kind;
}
/// present.{layer}.{kind}
inline std::string present_name(int layer, const std::string& kind) {
  return std::string(kPresentPrefix) + "." + std::to_string(layer) + "." + kind;
}
/// {prefix}.{level}: deepstack_features.{l} and the other DeepStack per-level names
inline std::string level_name(const std::string& prefix, int level) { return prefix + "." + std::to_string(level); }
/// whether name is one level of prefix (prefix + ".")
inline bool is_level(const std::string& name, const std::string& prefix) { return name.rfind(prefix + ".", 0) == 0; }
inline bool is_present(const std::string& name) { return is_level(name, kPresentPrefix); }
/// present.{i}.key -> past_key_values.{i}.key (a decode step feeds back its presents)
inline std::string present_to_past(const std::string& name) {
  return std::string(kPastPrefix) + name.substr(std::string(kPresentPrefix).size());
}

}  // namespace fastv
