// The request path of fastv-run: requests in the OpenAI chat format (fastv_export/frontend/request.py), the
// bundle's pre-rendered chat template (the manifest's serving.chat, fastv_export/bundle/chat.py) and a prompt's
// token ids and pixel values as the Python front end makes them (fastv_export/frontend/processor.py):
// the conversation rendered, each media placeholder expanded to its medium's token count, the WHOLE text
// tokenized once, the BOS token added unless the text starts with it.
#pragma once

#include "fastv/runtime.hpp"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace fastv {

class Tokenizer;
class ImageProcessor;

// ---- requests -----------------------------------------------------------------------------------
/// One piece of a message: kind "text" (value the text), "image" or "video" (value a path).
struct Part {
  std::string kind;
  std::string value;
};

struct Message {
  std::string role;   // system, user, assistant
  std::vector<Part> parts;
};

/// One conversation to answer and how to sample its answer (unset: the command's or the default).
struct Request {
  std::vector<Message> messages;
  std::optional<int64_t> max_tokens;
  std::optional<double> temperature;
  std::optional<int64_t> top_k;
  std::optional<double> top_p;
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  /// the images and videos of every message, in conversation order
  std::vector<Part> media() const;
};

/// The requests of a JSON file (one object or a non-empty list of them; relative paths from its folder).
/// Every error: Error, one line naming the request, the message and the field.
std::vector<Request> load_requests(const std::filesystem::path& path);
/// Requests from parsed JSON (``base``: the folder relative media paths start from; empty: as given).
std::vector<Request> parse_requests(const nlohmann::json& data, const std::filesystem::path& base = {});
/// The short form: one user turn with the images, then the videos, then the text (after a system turn).
Request request_from_cli(const std::string& prompt, const std::vector<std::string>& images,
                         const std::vector<std::string>& videos = {}, const std::string* system = nullptr);

// ---- the pre-rendered chat template (manifest serving.chat) -------------------------------------
struct RoleForm {
  std::string prefix, suffix;
};

struct ChatForm {
  std::string start;
  bool bos_in_template = false;
  std::optional<std::string> default_system;
  std::optional<RoleForm> system;   // unset: the template refuses system messages
  RoleForm user, assistant;
  std::string text_prefix, text_suffix, image;
  std::optional<std::string> video;
  bool media_first = false;
  std::string generation_prompt;

  /// ``where`` names the manifest field in errors.
  static ChatForm from_json(const nlohmann::json& j, const std::string& where);
  /// The prompt text of ``messages`` as fastv_export.bundle.ChatForm.render writes it.
  std::string render(const std::vector<Message>& messages, bool add_generation_prompt) const;
};

// ---- prompts ------------------------------------------------------------------------------------
/// How a model family writes media into a prompt (the Python front end's Family, with the checkpoint's own
/// placeholder names).
struct Family {
  std::string name;                       // llava, qwen2_vl, qwen3_vl, llava_onevision, internvl
  std::string image_token;                // the placeholder the processor expands
  std::optional<std::string> video_token;
  std::string image_text;                 // what a chat template writes for one image
  std::optional<std::string> video_text;
};

/// One request made into a prompt: its token ids, each vision call's pixel values (prompt order).
struct Prompt {
  std::string text;                       // the rendered text, before the placeholders' expansion
  std::vector<int64_t> ids;
  std::vector<Tensor> pixels;             // float32, the bundle's vision input shape
  int64_t media_tokens = 0;
  std::vector<std::vector<int64_t>> grids;   // Qwen family: each image's and video's (t, h, w) patch grid
  /// seconds per temporal patch of each video (bundles whose video positions follow time:
  /// positions.video_tokens_per_second), in prompt order
  std::vector<float> video_seconds;
};

// ---- videos -------------------------------------------------------------------------------------
/// What a video processor config says about frame sampling (fastv_export/frontend/video.py Sampling, the
/// Qwen2-VL family's rule: Qwen2VLVideoProcessor.sample_frames).
struct VideoSampling {
  bool do_sample_frames = false;
  std::optional<double> fps;
  std::optional<double> num_frames;
  std::optional<double> min_frames, max_frames;   // unset (or 0): 4 and 768
  int64_t temporal_patch_size = 2;
  /// From the merged image + video processor config (``where`` names it in errors).
  static VideoSampling from_config(const nlohmann::json& config, const std::string& where);
};
/// The indices of the frames the video processor keeps of ``total`` frames at ``video_fps`` (Error: too few).
std::vector<int64_t> sample_frame_indices(int64_t total, double video_fps, const VideoSampling& sampling);
/// The frame files of a folder as the Python front end lists them: image suffixes (any case), sorted by name.
std::vector<std::filesystem::path> frame_files(const std::filesystem::path& dir);

/// The request path's view of a bundle: its chat form, family, tokenizer and image processor.
class Frontend {
 public:
  /// Reads the bundle's serving section and files (tokenizer.json, tokenizer_config.json,
  /// preprocessor_config.json). Error for what fastv-run does not serve.
  static Frontend load(const Bundle& bundle);
  Frontend(Frontend&&) noexcept;
  Frontend& operator=(Frontend&&) noexcept;
  ~Frontend();

  /// The prompt text of ``request`` (``raw``: its text parts as written, the media text first when the text
  /// marks no media).
  std::string render(const Request& request, bool raw) const;
  /// Token ids and pixels of ``request``; ``where`` prefixes errors (a batch's "request i: ").
  Prompt prepare(const Request& request, bool raw, const std::string& where = "") const;
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const Family& family() const { return family_; }
  const std::vector<int64_t>& eos_token_ids() const { return eos_; }
  int64_t pad_token_id() const { return pad_; }
  const std::optional<ChatForm>& chat() const { return chat_; }

 private:
  Frontend();
  const Bundle* bundle_ = nullptr;
  std::optional<ChatForm> chat_;
  Family family_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<ImageProcessor> images_;
  std::optional<std::string> bos_;        // the tokenizer's BOS token text
  std::string img_start_, img_end_;       // InternVL: around an image's tokens
  std::vector<int64_t> eos_;
  int64_t pad_ = 0;

  std::string marks_to_own(const std::string& text) const;
  nlohmann::json video_config_;          // the image processor's settings overlaid with the video processor's
  std::vector<Tensor> process_image(const std::string& path, int64_t& tokens,
                                    std::vector<std::vector<int64_t>>& grids) const;
  std::vector<Tensor> process_video(const std::string& path, int64_t& tokens, Prompt& prompt) const;
};

/// sha256 (hex) of the pixel values' float32 bytes, vision calls in order (fastv-run --dry-run).
std::string pixel_checksum(const std::vector<Tensor>& pixels);

}  // namespace fastv
