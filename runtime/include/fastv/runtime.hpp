// fastv_runtime: the C++ runtime of a fastv-export bundle (runtime/README.md).
//
// load_bundle() verifies manifest.json (schema, fields, every file's size and sha256);
// read_inputs() reads the raw inputs written by `fastv-export run --dump-inputs`;
// generate() runs vision -> embed -> pre_k (TokenSelect in the graph) -> post_k and greedy
// decoding over the two KV caches through any Executor (TensorRT, or ONNX Runtime on the CPU).
#pragma once

#include "fastv/graph_names.hpp"

#include <nlohmann/json.hpp>

#include <array>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace fastv {

/// Every user error: one line naming the file and field.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class DType { F32, F16, I64 };
std::string dtype_name(DType d);   // "float32", "float16", "int64" (numpy names, as in the manifest)
DType dtype_from_name(const std::string& name, const std::string& where);
size_t dtype_size(DType d);

/// A host tensor: row-major, owning its bytes.
struct Tensor {
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;

  static Tensor zeros(DType dtype, std::vector<int64_t> shape);
  static Tensor from_i64(std::vector<int64_t> shape, const std::vector<int64_t>& values);
  size_t numel() const;
  size_t nbytes() const { return numel() * dtype_size(dtype); }
  template <class T> T* as() { return reinterpret_cast<T*>(data.data()); }
  template <class T> const T* as() const { return reinterpret_cast<const T*>(data.data()); }
  float float_at(size_t i) const;   // F32 or F16 element as float
};
std::string shape_str(const std::vector<int64_t>& shape);

using TensorMap = std::map<std::string, Tensor>;
using Feeds = std::map<std::string, const Tensor*>;

/// The graphs of a bundle and what the pipeline reads from manifest.json.
struct Bundle {
  std::filesystem::path dir;
  nlohmann::json manifest;
  int k = 0, num_layers = 0, hidden_size = 0, num_kv_heads = 0, head_dim = 0;
  /// source_model.deepstack_layers (Qwen3-VL): visual feature levels added after the first L decoder
  /// layers; their tensors pass vision -> embed -> pre_k -> post_k by name (graphs/spec.py)
  int deepstack_layers = 0;
  DType float_dtype = DType::F32;
  std::vector<int64_t> image_token_ids;
  int64_t tokens_per_image = 0;
  std::vector<int64_t> vision_input_shape;
  std::optional<int64_t> eos_token_id;
  int64_t pad_token_id = 0;
  int position_rank = 2;
  int64_t spatial_merge_size = 1;
  std::vector<int64_t> grid_thw;           // M-RoPE: one image's (t, h, w) before merging
  std::optional<int64_t> video_token_id;   // M-RoPE: positions.video_token_id (runs of it are videos)
  std::optional<float> video_tokens_per_second;   // M-RoPE: temporal index scale of a video (Qwen2.5-VL)
  /// image_tokens.vision_layout.kind: "fixed", or "patch_grid" (Qwen2.5-VL), whose grid-derived feeds
  /// fastv-run computes per medium from its patch grid (Inputs::row_grids), those of the exported grid once
  std::string vision_layout = "fixed";
  TensorMap vision_grid_feeds;   // patch_grid: the exported grid's feeds
  int64_t vision_window = 0;     // patch_grid: merged patches per side of an attention window
  std::filesystem::path graph_file(const std::string& graph) const;
  bool has_engines() const { return manifest.contains("engines") && !manifest["engines"].is_null(); }
};

inline constexpr int kSchemaVersion = 3;   // fastv_export.bundle.SCHEMA_VERSION (the golden vectors check they agree)
inline constexpr const char* kManifest = "manifest.json";
inline constexpr const char* kPluginLibrary = "libfastv_plugins.so";
/// The manifest's required top-level fields (fastv_export/manifest.schema.json 'required'; golden vectors)
inline constexpr const char* kRequiredFields[] = {"schema_version", "producer", "source_model", "fastv", "precision",
                                                  "image_tokens", "graphs", "pipeline", "kv_cache", "positions",
                                                  "plugin", "engines", "serving", "files"};

/// Verify a bundle directory as fastv_export/bundle/verify.py does (manifest.json strict JSON, schema_version,
/// the JSON Schema manifest.schema.json and check_manifest's cross-checks; every file of 'files' inside the
/// bundle directory, present, size, sha256; each ONNX graph's inputs, outputs and TokenSelect node; the engines
/// section's checksums) and read it. Throws Error naming the file and field.
Bundle load_bundle(const std::filesystem::path& dir);
/// manifest.json parsed as strict JSON (UTF-8, no NaN/Infinity, no repeated keys), an object; Error otherwise.
nlohmann::json read_manifest(const std::filesystem::path& mpath);
/// The manifest (of any schema_version 3 bundle) checked without its files: no file name leaving the bundle,
/// then fastv_export/bundle/manifest.schema.json (compiled into the library; the first violation names its JSON
/// path), then what the schema cannot say (verify.py _check_consistency). ``where`` names the manifest in errors.
void check_manifest(const nlohmann::json& manifest, const std::string& where);
void check_manifest_paths(const nlohmann::json& manifest, const std::string& where);
void check_manifest_schema(const nlohmann::json& manifest, const std::string& where);
void check_manifest_consistency(const nlohmann::json& manifest, const std::string& where);
/// Loads the compiled-in schema (Error when it uses a keyword the C++ validator does not read).
void check_manifest_schema_loads();
/// ``dir / name`` where ``name`` stays inside ``dir``: not absolute, no '..', not a symbolic link resolving
/// outside it; Error naming ``field`` otherwise.
std::filesystem::path bundle_file(const std::filesystem::path& dir, const std::string& name, const std::string& field);
/// Each graph file of a checked manifest against it: parses as ONNX, the manifest's inputs/outputs, pre_k's one
/// TokenSelect node with the fastv section's attributes, external data inside the bundle.
void check_graph_files(const std::filesystem::path& dir, const nlohmann::json& manifest);
std::string sha256_file(const std::filesystem::path& path);
/// Read what the position ids and candidate positions follow into ``b``: image_tokens.token_ids, per_image,
/// grid_thw and the 'positions' section (rank; M-RoPE: spatial_merge_size, video_token_id,
/// video_tokens_per_second). ``where`` names the manifest in errors.
void read_position_rules(const nlohmann::json& manifest, Bundle& b, const std::string& where);
/// The grid-derived vision feeds of one h x w patch grid (layout patch_grid; the numpy original:
/// fastv_export/runtime/vision_feeds.py): vision_position_ids, window_index, cu_window_seqlens.
/// ``window``: merged patches per window side.
TensorMap patch_grid_feeds(int64_t h, int64_t w, int64_t merge, int64_t window);
/// The same feeds under a manifest's image_tokens.vision_layout (spatial_merge_size, window_size, patch_size).
TensorMap patch_grid_feeds(const nlohmann::json& manifest, int64_t h, int64_t w, const std::string& where);

/// --dump-inputs tensors that are not graph inputs (fastv_export/runtime/dump.py): each medium's patch grid
/// (patch_grid bundles), seconds per temporal patch of each timed video.
inline constexpr const char* kMediaGridThw = "media_grid_thw";
inline constexpr const char* kVideoSeconds = "video_seconds";

/// The (t, h, w) patch grid of each medium of each row.
using RowGrids = std::vector<std::vector<std::array<int64_t, 3>>>;

/// Inputs of one generation (runtime/README.md: the --dump-inputs format).
struct Inputs {
  Tensor input_ids;                        // int64 [B, n], left-padded
  Tensor attention_mask;                   // int64 [B, n]
  std::vector<Tensor> images;              // pixel values of one image each, in prompt order
  std::optional<Tensor> candidate_positions;   // int64 [B, M] as Python computed it (cross-checked)
  std::vector<float> video_seconds;        // seconds per temporal patch of each video, rows in order
  /// patch_grid bundles: each row's media (rows in order, media in prompt order) as (t, h, w) patch grids;
  /// empty: every image of the exported grid. A medium makes t vision calls (one per temporal patch).
  RowGrids row_grids;
};
Inputs read_inputs(const std::filesystem::path& dir, const Bundle& bundle);

// ---- positions (the manifest's 'positions' rules; fastv_export/runtime/positions.py) ----------
/// ``video_seconds``: seconds per temporal patch of each video of the batch, rows in order (bundles whose
/// video positions follow time: positions.video_tokens_per_second). ``row_grids``: each row's media as patch
/// grids (patch_grid bundles; empty: images of the exported grid, videos of its frame size).
Tensor prefill_positions(const Bundle& b, const Tensor& input_ids, const Tensor& attention_mask,
                         const std::vector<float>& video_seconds = {}, const RowGrids& row_grids = {});
Tensor decode_positions(const Tensor& prompt_positions, int64_t step);
/// [B, M] ascending positions of the tokens whose id is in image_tokens.token_ids.
Tensor find_candidates(const Bundle& b, const Tensor& input_ids);

// ---- execution ----------------------------------------------------------------------------------
/// Which optimization profile of an engine a call of the generation loop runs on.
enum class Phase { Prefill, Decode };
/// An input taken from an output of the latest call of a graph, where the executor keeps it.
struct Link {
  std::string graph, output;
};
using Links = std::map<std::string, Link>;   // input name -> output
/// An output of a call() to copy back to the host: whole, or (last_position) only the last position of each row of
/// a [rows, seq, ...] output, as [rows, 1, ...] (post_k's prefill logits: the first token needs no other position).
struct Fetch {
  std::string name;
  bool last_position = false;
  Fetch(std::string n, bool last = false) : name(std::move(n)), last_position(last) {}   // NOLINT: implicit
  Fetch(const char* n, bool last = false) : name(n), last_position(last) {}              // NOLINT: implicit
};

/// Runs one graph of the bundle by name with named inputs; returns every output by name.
class Executor {
 public:
  virtual ~Executor() = default;
  virtual std::string name() const = 0;
  virtual TensorMap run(const std::string& graph, const Feeds& inputs) = 0;
  /// One call of the generation loop: ``graph`` in ``phase`` with the host ``inputs`` and the ``links`` (a decode
  /// step's past_key_values.{i}.{kind} linked to the same graph's present.{i}.{kind}, the tensors passed from graph
  /// to graph linked to the outputs that made them); returns the outputs named in ``fetch`` on the host. This
  /// default keeps every graph's latest outputs on the host and calls run(); the TensorRT executor
  /// (fastv/device_executor.hpp) keeps them on the GPU and copies back only ``fetch``.
  virtual TensorMap call(const std::string& graph, Phase phase, const Feeds& inputs, const Links& links,
                         const std::vector<Fetch>& fetch);
  /// Call ``index`` of a run of calls of ``graph`` whose outputs stack along their first dimension (the vision calls
  /// of a prefill: one per image or temporal patch, in prompt order): call 0 starts the run, call i > 0 appends its
  /// rows after those of the calls before it. A link to an output of ``graph`` then reads the rows of every call of
  /// the run; nothing comes back to the host. This default stacks them on the host (over run()); the TensorRT
  /// executor writes each call's rows in place in one device buffer (fastv/device_executor.hpp).
  virtual void call_stacked(const std::string& graph, Phase phase, const Feeds& inputs, size_t index);

 private:
  std::map<std::string, TensorMap> latest_;   // the default call(): each graph's outputs of its latest call
};

/// TensorRT 10 engines of the bundle (built with FASTV_WITH_TENSORRT). Checks that need no GPU
/// (engines recorded, plugin library present, backend) run first and throw Error.
void check_tensorrt_bundle(const Bundle& b);
std::unique_ptr<Executor> make_tensorrt_executor(const Bundle& b);
bool tensorrt_available();

/// The real exported ONNX graphs in ONNX Runtime (CPUExecutionProvider), through the onnxruntime
/// Python package embedded in this process (built with FASTV_WITH_ORT_PYTHON).
std::unique_ptr<Executor> make_cpu_executor(const Bundle& b);
bool cpu_executor_available();

struct Generation {
  std::vector<std::vector<int64_t>> tokens;   // per row, generated ids (a finished row holds pad after EOS)
  Tensor kept;                                 // int64 [B, n'] kept prompt positions
  std::map<std::string, double> timings_ms;    // vision, embed, pre_k, post_k, prefill, decode_per_token
  int steps = 0;
};

/// How generate() chooses tokens and reports them (docs/design.md §8).
struct GenerateOptions {
  /// the next token of each row from the step's last-position logits [rows, vocab] (float32, row-major);
  /// empty: greedy (the lowest id among equal maxima)
  std::function<std::vector<int64_t>(const float* logits, int64_t rows, int64_t vocab)> choose;
  /// called once per chosen token (step 0, 1, ..., the [rows] tokens as returned, pads included) before the
  /// next decode step; returning true stops the generation after that token
  std::function<bool(int step, const std::vector<int64_t>& tokens)> on_token;
  /// a row that chose it is finished and gets the pad id after it (unset: source_model.eos_token_id)
  std::optional<int64_t> eos_token_id;
};

/// Generation of up to max_new_tokens tokens; a row stops at source_model.eos_token_id (greedy).
Generation generate(const Bundle& b, Executor& ex, const Inputs& in, int max_new_tokens);
/// The same with a token chooser, a per-token callback and the EOS id of ``options``.
Generation generate(const Bundle& b, Executor& ex, const Inputs& in, int max_new_tokens,
                    const GenerateOptions& options);

}  // namespace fastv
