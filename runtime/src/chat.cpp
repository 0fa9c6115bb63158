// A request made into a prompt as fastv_export/frontend/processor.py makes it: the conversation rendered with the
// bundle's pre-rendered chat template (fastv_export.bundle.ChatForm.render; a final assistant message is
// continued, as apply_chat_template's continue_final_message), each media placeholder expanded to its medium's
// token count, the WHOLE text tokenized once, the BOS token added unless the text already starts with it.
#include "fastv/request.hpp"

#include "fastv/image.hpp"
#include "fastv/tokenizer.hpp"

#include <openssl/evp.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <set>

namespace fs = std::filesystem;
using nlohmann::json;

namespace fastv {

// ---------------------------------------------------------------------------------------------- chat form
namespace {

const json& member(const json& j, const char* key, const std::string& where) {
  if (!j.is_object() || !j.contains(key)) throw Error(where + ": field '" + key + "' is missing; re-export the bundle");
  return j[key];
}

std::string str(const json& j, const char* key, const std::string& where) {
  const json& v = member(j, key, where);
  if (!v.is_string()) throw Error(where + ": field '" + key + "' must be a string; re-export the bundle");
  return v.get<std::string>();
}

std::optional<std::string> opt_str(const json& j, const char* key, const std::string& where) {
  const json& v = member(j, key, where);
  if (v.is_null()) return std::nullopt;
  return str(j, key, where);
}

std::optional<RoleForm> role_form(const json& j, const char* key, const std::string& where) {
  const json& v = member(j, key, where);
  if (v.is_null()) return std::nullopt;
  return RoleForm{str(v, "prefix", where + "." + key), str(v, "suffix", where + "." + key)};
}

}  // namespace

ChatForm ChatForm::from_json(const json& j, const std::string& where) {
  ChatForm c;
  c.start = str(j, "start", where);
  const json& bos = member(j, "bos_in_template", where);
  const json& media_first = member(j, "media_first", where);
  if (!bos.is_boolean() || !media_first.is_boolean())
    throw Error(where + ": fields 'bos_in_template' and 'media_first' must be booleans; re-export the bundle");
  c.bos_in_template = bos.get<bool>();
  c.media_first = media_first.get<bool>();
  c.default_system = opt_str(j, "default_system", where);
  c.system = role_form(j, "system", where);
  auto user = role_form(j, "user", where), assistant = role_form(j, "assistant", where);
  if (!user || !assistant) throw Error(where + ": fields 'user' and 'assistant' must be objects; re-export the bundle");
  c.user = *user;
  c.assistant = *assistant;
  c.text_prefix = str(j, "text_prefix", where);
  c.text_suffix = str(j, "text_suffix", where);
  c.image = str(j, "image", where);
  c.video = opt_str(j, "video", where);
  c.generation_prompt = str(j, "generation_prompt", where);
  return c;
}

std::string ChatForm::render(const std::vector<Message>& messages, bool add_generation_prompt) const {
  auto role = [&](const std::string& name) -> const RoleForm& {
    if (name == "user") return user;
    if (name == "assistant") return assistant;
    if (name == "system" && system) return *system;
    throw Error(std::string("the model's chat template ") +
                (name == "system" ? "takes no system message" : "has no role '" + name + "'") +
                "; roles it takes: " + (system ? "system, " : "") + "user, assistant");
  };
  auto part = [&](const Part& p) -> std::string {
    if (p.kind == "text") return text_prefix + p.value + text_suffix;
    if (p.kind == "image") return image;
    if (!video) throw Error("the model's chat template writes no video parts; give images or text");
    return *video;
  };
  // a final assistant message is continued (apply_chat_template's continue_final_message): the text ends after
  // its last text part's text
  const bool continued = !messages.empty() && messages.back().role == "assistant";
  std::string out = start;
  if (default_system && (messages.empty() || messages[0].role != "system")) {
    const RoleForm& s = role("system");
    out += s.prefix + text_prefix + *default_system + text_suffix + s.suffix;
  }
  for (size_t m = 0; m < messages.size(); ++m) {
    const RoleForm& form = role(messages[m].role);
    std::vector<const Part*> parts;
    for (const auto& p : messages[m].parts) parts.push_back(&p);
    if (media_first) {
      std::vector<const Part*> ordered;
      for (const char* want : {"image", "video", "text"})
        for (const Part* p : parts)
          if (p->kind == want) ordered.push_back(p);
      parts = ordered;
    }
    out += form.prefix;
    if (continued && m + 1 == messages.size()) {
      size_t last = parts.size();
      for (size_t i = 0; i < parts.size(); ++i)
        if (parts[i]->kind == "text") last = i;
      if (last == parts.size())
        throw Error("the final assistant message holds no text to continue; end the conversation with a user "
                    "message, or give the assistant's message a text part");
      for (size_t i = 0; i < last; ++i) out += part(*parts[i]);
      return out + text_prefix + parts[last]->value;
    }
    for (const Part* p : parts) out += part(*p);
    out += form.suffix;
  }
  return out + (add_generation_prompt ? generation_prompt : "");
}

// ---------------------------------------------------------------------------------------------- families
namespace {

struct FamilyDefault {
  const char* name;
  const char* image_token;
  const char* video_token;   // nullptr: no videos
  const char* image_text;
  const char* video_text;
};

const std::map<std::string, FamilyDefault>& families() {
  static const std::map<std::string, FamilyDefault> f{
      {"LlavaForConditionalGeneration", {"llava", "<image>", nullptr, "<image>", nullptr}},
      {"Qwen2VLForConditionalGeneration",
       {"qwen2_vl", "<|image_pad|>", "<|video_pad|>", "<|vision_start|><|image_pad|><|vision_end|>",
        "<|vision_start|><|video_pad|><|vision_end|>"}},
      {"Qwen2_5_VLForConditionalGeneration",
       {"qwen2_vl", "<|image_pad|>", "<|video_pad|>", "<|vision_start|><|image_pad|><|vision_end|>",
        "<|vision_start|><|video_pad|><|vision_end|>"}},
      {"Qwen3VLForConditionalGeneration",
       {"qwen3_vl", "<|image_pad|>", nullptr, "<|vision_start|><|image_pad|><|vision_end|>", nullptr}},
      {"LlavaOnevisionForConditionalGeneration", {"llava_onevision", "<image>", "<video>", "<image>", "<video>"}},
      {"InternVLForConditionalGeneration", {"internvl", "<IMG_CONTEXT>", nullptr, "<IMG_CONTEXT>", nullptr}},
  };
  return f;
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  if (from.empty()) return s;
  for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size()))
    s.replace(at, from.size(), to);
  return s;
}

size_t count_of(const std::string& s, const std::string& needle) {
  size_t n = 0;
  for (size_t at = s.find(needle); at != std::string::npos; at = s.find(needle, at + needle.size())) ++n;
  return n;
}

json read_json_file(const fs::path& p) {
  std::ifstream f(p);
  if (!f) throw Error(p.string() + " cannot be read; restore the file");
  try {
    return json::parse(f);
  } catch (const json::parse_error&) {
    throw Error(p.string() + " cannot be read as JSON; restore the file");
  }
}

// a special token as tokenizer_config.json writes it: "text" or {"content": "text", ...}
std::optional<std::string> token_text(const json& cfg, const std::string& key) {
  if (!cfg.is_object() || !cfg.contains(key)) return std::nullopt;
  const json& v = cfg[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  return std::nullopt;
}

// the tokenizer attribute ``key`` (image_token, video_token, ...) as transformers sets it from the config
std::optional<std::string> tokenizer_attr(const json& cfg, const std::string& key) {
  if (auto t = token_text(cfg, key)) return t;
  for (const char* section : {"extra_special_tokens", "model_specific_special_tokens"})
    if (cfg.is_object() && cfg.contains(section) && cfg[section].is_object())
      if (auto t = token_text(cfg[section], key)) return t;
  return std::nullopt;
}

std::optional<std::string> serving_file(const json& serving, const char* role) {
  if (!serving.is_object() || !serving.contains(role) || !serving[role].is_string()) return std::nullopt;
  return serving[role].get<std::string>();
}

}  // namespace

// ---------------------------------------------------------------------------------------------- front end
Frontend::Frontend() = default;
Frontend::Frontend(Frontend&&) noexcept = default;
Frontend& Frontend::operator=(Frontend&&) noexcept = default;
Frontend::~Frontend() = default;

Frontend Frontend::load(const Bundle& b) {
  const std::string where = (b.dir / kManifest).string();
  const json& m = b.manifest;
  if (!m.contains("serving") || !m["serving"].is_object())
    throw Error(where + ": field 'serving' must be an object; re-export the bundle");
  const json& serving = m["serving"];
  Frontend f;
  f.bundle_ = &b;
  const std::string arch = m["source_model"].value("architecture", "");
  const auto fam = families().find(arch);
  if (fam == families().end())
    throw Error("fastv-run does not know " + arch + " yet; feed token ids and pixels with --inputs DIR "
                "(fastv-export run ... --dump-inputs DIR)");
  const FamilyDefault& d = fam->second;
  if (std::string(d.name) == "internvl" || std::string(d.name) == "llava_onevision")
    throw Error(arch + " bundles: fastv-run does not make their image tiles; run them with fastv-export run, or feed "
                "the inputs with --inputs DIR (fastv-export run ... --dump-inputs DIR)");
  const auto tok_file = serving_file(serving, "tokenizer");
  if (!tok_file)
    throw Error(where + ": field 'serving.tokenizer' is null: the bundle holds no tokenizer.json; feed token ids "
                "with --inputs DIR (fastv-export run ... --dump-inputs DIR)");
  if (fs::path(*tok_file).filename() != "tokenizer.json")
    throw Error(where + ": field 'serving.tokenizer' names " + *tok_file + "; fastv-run reads tokenizer.json only");
  f.tokenizer_ = std::make_unique<Tokenizer>(Tokenizer::load(b.dir / *tok_file));
  json tcfg = json::object(), pcfg = json::object();
  if (auto t = serving_file(serving, "tokenizer_config")) tcfg = read_json_file(b.dir / *t);
  if (auto t = serving_file(serving, "special_tokens_map")) {
    const json smap = read_json_file(b.dir / *t);
    for (const char* key : {"bos_token", "eos_token", "pad_token"})
      if (!tcfg.contains(key) && smap.is_object() && smap.contains(key)) tcfg[key] = smap[key];
  }
  if (auto t = serving_file(serving, "processor")) pcfg = read_json_file(b.dir / *t);
  // the family's placeholders as the checkpoint names them (tokenizer attributes, processor config)
  Family fm{d.name, d.image_token, d.video_token ? std::optional<std::string>(d.video_token) : std::nullopt,
            d.image_text, d.video_text ? std::optional<std::string>(d.video_text) : std::nullopt};
  std::string image = d.image_token;
  if (auto t = tokenizer_attr(tcfg, "image_token")) image = *t;
  else if (pcfg.is_object() && pcfg.contains("image_token") && pcfg["image_token"].is_string())
    image = pcfg["image_token"].get<std::string>();
  fm.image_text = replace_all(fm.image_text, fm.image_token, image);
  fm.image_token = image;
  if (fm.video_token) {
    std::string video = *fm.video_token;
    if (auto t = tokenizer_attr(tcfg, "video_token")) video = *t;
    else if (pcfg.is_object() && pcfg.contains("video_token") && pcfg["video_token"].is_string())
      video = pcfg["video_token"].get<std::string>();
    fm.video_text = replace_all(*fm.video_text, *fm.video_token, video);
    fm.video_token = video;
  }
  f.family_ = fm;
  f.bos_ = token_text(tcfg, "bos_token");
  // the chat form: null with a template present is a template this runtime cannot reproduce
  const json& chat = serving.contains("chat") ? serving["chat"] : json();
  if (!chat.is_null()) f.chat_ = ChatForm::from_json(chat, where + " field 'serving.chat'");
  if (serving_file(serving, "image_processor") || serving_file(serving, "processor"))
    f.images_ = std::make_unique<ImageProcessor>(ImageProcessor::load(b.dir));
  if (f.images_ && f.images_->kind() == ImageProcessor::Kind::Qwen2VL && f.family_.video_token) {
    // what the Python front end reads for videos: {**image_processor.to_dict(), **video config}: of the image
    // processor's settings as it resolves them, those the video path reads (size, temporal_patch_size, resample);
    // the video processor's file (else processor_config.json's section)
    json image_cfg = json::object(), video_cfg = json::object();
    if (auto t = serving_file(serving, "video_processor")) video_cfg = read_json_file(b.dir / *t);
    else if (pcfg.is_object() && pcfg.contains("video_processor")) video_cfg = pcfg["video_processor"];
    if (!video_cfg.is_object())
      throw Error(where + ": the video processor config must be a JSON object; restore the checkpoint's");
    image_cfg["size"] = {{"shortest_edge", f.images_->min_pixels()}, {"longest_edge", f.images_->max_pixels()}};
    image_cfg["temporal_patch_size"] = f.images_->temporal_patch_size();
    image_cfg["resample"] = static_cast<int>(f.images_->resample());
    for (auto it = video_cfg.begin(); it != video_cfg.end(); ++it) image_cfg[it.key()] = it.value();
    f.video_config_ = std::move(image_cfg);
  }
  // EOS: serving.generation.eos_token_ids (else source_model.eos_token_id); pad: the tokenizer's, else the model's
  if (serving.contains("generation") && serving["generation"].is_object() &&
      serving["generation"].contains("eos_token_ids") && serving["generation"]["eos_token_ids"].is_array())
    for (const auto& e : serving["generation"]["eos_token_ids"])
      if (e.is_number_integer()) f.eos_.push_back(e.get<int64_t>());
  if (f.eos_.empty() && b.eos_token_id) f.eos_.push_back(*b.eos_token_id);
  f.pad_ = b.pad_token_id;
  if (auto pad = token_text(tcfg, "pad_token"))
    if (auto id = f.tokenizer_->token_id(*pad)) f.pad_ = *id;
  return f;
}

std::string Frontend::marks_to_own(const std::string& text) const {
  std::string out = text;
  if (family_.image_text != "<image>") out = replace_all(out, "<image>", family_.image_text);
  if (family_.video_text && *family_.video_text != "<video>") out = replace_all(out, "<video>", *family_.video_text);
  return out;
}

std::string Frontend::render(const Request& request, bool raw) const {
  const auto media = request.media();
  const bool has_template = serving_file(bundle_->manifest["serving"], "chat_template").has_value();
  if (!raw && !chat_) {
    if (has_template)
      throw Error("this bundle's chat template has no pre-rendered form (manifest field 'serving.chat' is null), "
                  "which fastv-run needs; give --raw with the prompt in the model's own format");
    raw = true;   // no template at all: the prompt as written, as the Python front end does
  }
  if (raw) {
    std::string text;
    for (const auto& m : request.messages)
      for (const auto& p : m.parts)
        if (p.kind == "text") text += marks_to_own(p.value);
    const bool marked = count_of(text, family_.image_token) ||
                        (family_.video_token && count_of(text, *family_.video_token));
    if (!media.empty() && !marked) {
      std::string head;
      for (const auto& p : media) {
        if (p.kind == "video" && !family_.video_text)
          throw Error(bundle_->manifest["source_model"].value("architecture", "") +
                      " bundles take images only; give images (or frames as images)");
        head += p.kind == "video" ? *family_.video_text : family_.image_text;
      }
      text = head + text;
    }
    return text;
  }
  std::vector<Message> messages = request.messages;
  for (auto& m : messages)
    for (auto& p : m.parts)
      if (p.kind == "text") p.value = marks_to_own(p.value);
  return chat_->render(messages, messages.back().role != "assistant");
}

std::vector<Tensor> Frontend::process_image(const std::string& path, int64_t& tokens,
                                            std::vector<std::vector<int64_t>>& grids) const {
  if (!fs::is_regular_file(path)) throw Error("image " + path + " does not exist");
  if (!images_)
    throw Error((bundle_->dir / kManifest).string() + ": field 'serving.image_processor' is null: the bundle holds no "
                "preprocessor_config.json for fastv-run to process images with; re-export with the checkpoint's");
  const Image im = read_image(path);
  Pixels px = images_->process(im);
  const Bundle& b = *bundle_;
  if (family_.name == "qwen2_vl" || family_.name == "qwen3_vl") {
    // a fixed layout takes its exported grid only (the Python front end's rule); patch_grid: see Session::generate
    const bool same = px.grid_thw.size() == 3 && b.grid_thw.size() == 3 && px.grid_thw[1] == b.grid_thw[1] &&
                      px.grid_thw[2] == b.grid_thw[2];
    if (b.vision_layout == "fixed" && !same) {
      const int64_t patch = images_->patch_size();
      const int64_t gh = px.grid_thw.size() == 3 ? px.grid_thw[1] : 0, gw = px.grid_thw.size() == 3 ? px.grid_thw[2] : 0;
      throw Error("image " + path + " (" + std::to_string(im.width) + "x" + std::to_string(im.height) +
                  " px): the checkpoint's processor makes it " + std::to_string(gw * patch) + "x" +
                  std::to_string(gh * patch) + " px (" + std::to_string(gh) + "x" + std::to_string(gw) +
                  " patches); this bundle's vision graph takes only " + std::to_string(b.grid_thw[2] * patch) + "x" +
                  std::to_string(b.grid_thw[1] * patch) + " px (fixed layout): give an image that resizes to that, "
                  "or export the model with a dynamic vision layout");
    }
    tokens = px.tokens;
    grids.push_back(px.grid_thw);
    std::vector<Tensor> out;
    out.push_back(std::move(px.pixel_values));
    return out;
  }
  if (px.pixel_values.shape != b.vision_input_shape)
    throw Error("image " + path + " (" + std::to_string(im.width) + "x" + std::to_string(im.height) +
                " px): the checkpoint's image processor makes pixel values " + shape_str(px.pixel_values.shape) +
                "; this bundle's vision graph takes " + shape_str(b.vision_input_shape) +
                " (the exported size): re-export with the processor's size, or use the image processor config the "
                "bundle was exported for");
  tokens = b.tokens_per_image;
  std::vector<Tensor> out;
  out.push_back(std::move(px.pixel_values));
  return out;
}

// ---------------------------------------------------------------------------------------------- videos
namespace {

std::optional<double> opt_number(const json& c, const char* key, const std::string& where) {
  if (!c.contains(key) || c[key].is_null()) return std::nullopt;
  if (!c[key].is_number()) throw Error(where + ": '" + key + "' must be a number, got " + c[key].dump());
  return c[key].get<double>();
}

// a path as Python's pathlib prints it (no trailing slash, "//" collapsed, "." parts dropped)
std::string py_path(const std::string& s) {
  fs::path out;
  for (const auto& part : fs::path(s)) {
    const std::string name = part.string();
    if (name.empty() || name == ".") continue;
    out /= part;
  }
  std::string r = out.string();
  if (r.empty()) return ".";
  return r;
}

// Python's round(): half to even
double py_round(double x) { return std::nearbyint(x); }

}  // namespace

VideoSampling VideoSampling::from_config(const json& c, const std::string& where) {
  VideoSampling s;
  if (!c.is_object()) throw Error(where + ": the video processor config must be a JSON object");
  if (c.contains("do_sample_frames") && !c["do_sample_frames"].is_null()) {
    const json& v = c["do_sample_frames"];
    if (!v.is_boolean() && !v.is_number()) throw Error(where + ": 'do_sample_frames' must be a boolean");
    s.do_sample_frames = v.is_boolean() ? v.get<bool>() : v.get<double>() != 0;
  }
  s.fps = opt_number(c, "fps", where);
  s.num_frames = opt_number(c, "num_frames", where);
  s.min_frames = opt_number(c, "min_frames", where);
  s.max_frames = opt_number(c, "max_frames", where);
  if (auto tp = opt_number(c, "temporal_patch_size", where); tp && *tp != 0) {
    if (*tp != std::floor(*tp) || *tp < 1 || *tp > 64)
      throw Error(where + ": 'temporal_patch_size' must be an integer between 1 and 64");
    s.temporal_patch_size = static_cast<int64_t>(*tp);
  }
  for (const auto& v : {s.fps, s.num_frames, s.min_frames, s.max_frames})
    if (v && !(std::fabs(*v) < 1e12)) throw Error(where + ": the video frame settings must be finite numbers");
  return s;
}

std::vector<int64_t> sample_frame_indices(int64_t total, double video_fps, const VideoSampling& s) {
  // fastv_export/frontend/video.py sample_indices / qwen_sample_indices
  if (total < 1) throw Error("the video holds no frames");
  std::vector<int64_t> all(static_cast<size_t>(total));
  for (int64_t i = 0; i < total; ++i) all[static_cast<size_t>(i)] = i;
  if (!s.do_sample_frames) return all;
  const double tp = static_cast<double>(s.temporal_patch_size);
  const double min_frames = s.min_frames && *s.min_frames != 0 ? *s.min_frames : 4;
  const double max_frames_cfg = s.max_frames && *s.max_frames != 0 ? *s.max_frames : 768;
  std::optional<double> n;
  if (s.num_frames) {
    n = py_round(*s.num_frames / tp) * tp;
  } else if (s.fps) {
    const double max_frames = std::floor(std::min(max_frames_cfg, static_cast<double>(total)) / tp) * tp;
    double v = static_cast<double>(total) / video_fps * *s.fps;
    v = std::min({std::max(v, min_frames), max_frames, static_cast<double>(total)});
    n = std::floor(v / tp) * tp;
  }
  if (!n) return all;
  auto num = [](double x) {   // Python's str() of an int-valued number
    return x == std::floor(x) && std::fabs(x) < 1e15 ? std::to_string(static_cast<int64_t>(x)) : std::to_string(x);
  };
  if (*n > static_cast<double>(total))
    throw Error("the video has " + std::to_string(total) + " frames, fewer than the " + num(*n) +
                " the video processor samples; give a longer video or lower num_frames / fps in "
                "video_preprocessor_config.json");
  if (*n < 1)
    throw Error("the video has " + std::to_string(total) + " frames: too few to sample whole temporal patches of " +
                std::to_string(s.temporal_patch_size) + " frames; give a longer video");
  const double step = static_cast<double>(total) / *n;   // torch.arange(0, total, step): values in float32
  const auto count = static_cast<int64_t>(std::ceil(static_cast<double>(total) / step));
  std::vector<int64_t> out;
  for (int64_t i = 0; i < count; ++i)
    out.push_back(static_cast<int64_t>(static_cast<float>(static_cast<double>(i) * step)));
  return out;
}

std::vector<fs::path> frame_files(const fs::path& dir) {
  static const std::set<std::string> suffixes{".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"};
  std::vector<std::string> names;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::string ext = it->path().extension().string();
    for (auto& ch : ext) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    if (suffixes.count(ext)) names.push_back(it->path().filename().string());
  }
  if (ec) throw Error("video folder " + py_path(dir.string()) + " cannot be listed (" + ec.message() + ")");
  std::sort(names.begin(), names.end());   // UTF-8 bytes sort as Python's str (code points)
  std::vector<fs::path> out;
  for (const auto& n : names) out.push_back(dir / n);
  return out;
}

std::vector<Tensor> Frontend::process_video(const std::string& path, int64_t& tokens, Prompt& prompt) const {
  const std::string arch = bundle_->manifest["source_model"].value("architecture", "");
  if (!family_.video_token)
    throw Error(arch + " bundles take images only; give images (or frames as images)");
  if (!images_)
    throw Error((bundle_->dir / kManifest).string() + ": field 'serving.image_processor' is null: the bundle holds no "
                "preprocessor_config.json for fastv-run to process videos with; re-export with the checkpoint's");
  if (images_->kind() != ImageProcessor::Kind::Qwen2VL || video_config_.is_null())
    throw Error("video " + path + ": fastv-run serves videos for the Qwen2-VL / Qwen2.5-VL families only; run " + arch +
                " videos with fastv-export run");
  const std::string shown = py_path(path);
  std::error_code ec;
  if (!fs::is_directory(path, ec)) {
    if (!fs::exists(path, ec))
      throw Error("video " + shown + " does not exist; give a video file or a folder of frames");
    throw Error("video " + shown + ": fastv-run reads videos given as a folder of frames (PNG / JPEG files); extract "
                "its frames into a folder, or run video files with fastv-export run");
  }
  const VideoSampling sampling = VideoSampling::from_config(video_config_, "the video processor config");
  const auto files = frame_files(path);
  if (files.empty())
    throw Error("video folder " + shown + " holds no image files (.png, .jpg, .jpeg, .bmp, .webp, .gif, .tif, .tiff)");
  const double fps = sampling.fps && *sampling.fps != 0 ? *sampling.fps : 2.0;   // a folder: the processor's fps
  const auto kept = sample_frame_indices(static_cast<int64_t>(files.size()), fps, sampling);
  const double sampled_fps = fps * static_cast<double>(kept.size()) / static_cast<double>(files.size());
  // the target size: the smart resize of the first kept frame with the video processor's pixel bounds
  const json& c = video_config_;
  const json size = c.contains("size") && c["size"].is_object() ? c["size"] : json::object();
  auto bound = [&](const char* size_key, const char* key, int64_t fallback) -> int64_t {
    for (const json* j : {&size, &c}) {
      const char* k = j == &size ? size_key : key;
      if (j->contains(k) && !(*j)[k].is_null()) {
        const json& v = (*j)[k];
        if (!v.is_number() || v.get<double>() < 0 || v.get<double>() > 1e12)
          throw Error("the video processor config: '" + std::string(k) + "' must be a non-negative number");
        if (v.get<double>() != 0) return static_cast<int64_t>(v.get<double>());
      }
    }
    return fallback;
  };
  const int64_t lo = bound("shortest_edge", "min_pixels", 56 * 56), hi = bound("longest_edge", "max_pixels",
                                                                                 28 * 28 * 1280);
  Resample filter = Resample::Bicubic;
  if (c.contains("resample") && !c["resample"].is_null()) {
    if (!c["resample"].is_number_integer()) throw Error("the video processor config: 'resample' must be an integer");
    filter = resample_from_int(c["resample"].get<int>(), "the video processor config");
  }
  std::vector<Image> frames;
  for (int64_t i : kept) {
    const fs::path& file = files[static_cast<size_t>(i)];
    try {
      frames.push_back(read_image(file));
    } catch (const Error& e) {
      std::string why = e.what();
      const std::string prefix = "image " + file.string() + ": ";
      if (why.rfind(prefix, 0) == 0) why = why.substr(prefix.size());
      throw Error("frame " + py_path(file.string()) + " cannot be read as an image (" + why + ")");
    }
  }
  const int w = frames[0].width, h = frames[0].height;
  if (std::max(h, w) > 200 * std::min(h, w))
    throw Error("a " + std::to_string(w) + "x" + std::to_string(h) +
                " px image or frame is too elongated (aspect ratio over 200)");
  const auto [rh, rw] = images_->smart_resize(h, w, lo, hi);
  Pixels px = images_->process_frames(frames, rw, rh, filter, static_cast<int>(sampling.temporal_patch_size));
  const Bundle& b = *bundle_;
  const int64_t t = px.grid_thw[0], gh = px.grid_thw[1], gw = px.grid_thw[2];
  const int64_t patch = images_->patch_size();
  if (b.vision_layout == "fixed" && (b.grid_thw.size() != 3 || gh != b.grid_thw[1] || gw != b.grid_thw[2]))
    throw Error("video " + path + " (" + std::to_string(w) + "x" + std::to_string(h) +
                " px): the checkpoint's processor makes it " + std::to_string(gw * patch) + "x" +
                std::to_string(gh * patch) + " px (" + std::to_string(gh) + "x" + std::to_string(gw) +
                " patches); this bundle's vision graph takes only " + std::to_string(b.grid_thw.at(2) * patch) + "x" +
                std::to_string(b.grid_thw.at(1) * patch) + " px (fixed layout): give an image that resizes to that, "
                "or export the model with a dynamic vision layout");
  // one vision call per temporal patch
  const int64_t rows = gh * gw, dim = px.pixel_values.shape[1];
  const size_t bytes = static_cast<size_t>(rows * dim) * sizeof(float);
  std::vector<Tensor> out;
  for (int64_t i = 0; i < t; ++i) {
    Tensor unit = Tensor::zeros(DType::F32, {rows, dim});
    std::memcpy(unit.data.data(), px.pixel_values.data.data() + static_cast<size_t>(i) * bytes, bytes);
    out.push_back(std::move(unit));
  }
  tokens = px.tokens;
  prompt.grids.push_back(px.grid_thw);
  if (b.video_tokens_per_second)
    prompt.video_seconds.push_back(static_cast<float>(static_cast<double>(sampling.temporal_patch_size) / sampled_fps));
  return out;
}

Prompt Frontend::prepare(const Request& request, bool raw, const std::string& where) const {
  Prompt p;
  p.text = render(request, raw);
  const auto media = request.media();
  // one placeholder per image and per video given, as the HF processor requires
  std::map<std::string, std::string> placeholder{{"image", family_.image_token}};
  if (family_.video_token) placeholder["video"] = *family_.video_token;
  for (const char* kind : {"image", "video"}) {
    size_t given = 0;
    for (const auto& m : media) given += m.kind == kind;
    if (std::string(kind) == "video" && given && !family_.video_token)
      throw Error(where + bundle_->manifest["source_model"].value("architecture", "") +
                  " bundles take images only; give images (or frames as images)");
    const size_t marks = placeholder.count(kind) ? count_of(p.text, placeholder[kind]) : 0;
    if (marks != given) {
      const std::string token = placeholder.count(kind) ? placeholder[kind] : std::string("<") + kind + ">";
      throw Error(where + "the prompt holds " + std::to_string(marks) + " " + kind + " placeholder(s) (" + token +
                  ") but " + std::to_string(given) + " " + kind + "(s) were given; give one placeholder per " + kind +
                  " (or none with --raw: the media then come first)");
    }
  }
  // each medium processed (media in conversation order), its pixels and grid kept for its place in the text
  struct Done {
    int64_t tokens = 0;
    std::vector<Tensor> pixels;
    std::vector<std::vector<int64_t>> grids;
    std::vector<float> seconds;
  };
  std::map<std::string, std::vector<Done>> done{{"image", {}}, {"video", {}}};
  for (const auto& m : media) {
    Done d;
    if (m.kind == "video") {
      Prompt one;
      d.pixels = process_video(m.value, d.tokens, one);
      d.grids = std::move(one.grids);
      d.seconds = std::move(one.video_seconds);
    } else {
      d.pixels = process_image(m.value, d.tokens, d.grids);
    }
    done[m.kind].push_back(std::move(d));
  }
  // expand the placeholders in text order (each kind's media in order; the pixels follow the text order, as the
  // Python front end's), then tokenize the whole text
  std::string expanded;
  size_t at = 0;
  std::map<std::string, size_t> next{{"image", 0}, {"video", 0}};
  std::vector<int64_t> counts;
  const std::string& token = family_.image_token;
  for (;;) {
    size_t hit = p.text.find(token, at);
    std::string kind = "image";
    if (family_.video_token) {
      const size_t v = p.text.find(*family_.video_token, at);
      if (v < hit) hit = v, kind = "video";
    }
    if (hit == std::string::npos) break;
    const std::string& mark = kind == "video" ? *family_.video_token : token;
    Done& d = done[kind].at(next[kind]++);
    expanded += p.text.substr(at, hit - at);
    std::string block;
    block.reserve(mark.size() * static_cast<size_t>(d.tokens));
    for (int64_t i = 0; i < d.tokens; ++i) block += mark;
    if (family_.name == "internvl") block = img_start_ + block + img_end_;
    expanded += block;
    counts.push_back(d.tokens);
    for (auto& t : d.pixels) p.pixels.push_back(std::move(t));
    for (auto& g : d.grids) p.grids.push_back(std::move(g));
    for (float sec : d.seconds) p.video_seconds.push_back(sec);
    at = hit + mark.size();
  }
  expanded += p.text.substr(at);
  const bool starts_with_bos = bos_ && !bos_->empty() && expanded.rfind(*bos_, 0) == 0;
  p.ids = tokenizer_->encode(expanded, !starts_with_bos);
  const std::set<int64_t> image_ids(bundle_->image_token_ids.begin(), bundle_->image_token_ids.end());
  int64_t got = 0, want = 0;
  for (auto id : p.ids) got += image_ids.count(id);
  for (auto c : counts) want += c;
  if (got != want) {
    std::string ids;
    for (auto id : bundle_->image_token_ids) ids += (ids.empty() ? "" : ", ") + std::to_string(id);
    throw Error(where + "the tokenized prompt holds " + std::to_string(got) + " image/video tokens where its media make " +
                std::to_string(want) + ": the tokenizer does not keep the placeholder " + token +
                " as one token (id [" + ids + "]), or the text holds placeholder ids of its own");
  }
  p.media_tokens = want;
  return p;
}

std::string pixel_checksum(const std::vector<Tensor>& pixels) {
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  if (!ctx || EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr) != 1) throw Error("OpenSSL: SHA-256 is unavailable");
  for (const Tensor& t : pixels) {
    if (t.dtype == DType::F32) {
      EVP_DigestUpdate(ctx, t.data.data(), t.data.size());
    } else {
      std::vector<float> f(t.numel());
      for (size_t i = 0; i < f.size(); ++i) f[i] = t.float_at(i);
      EVP_DigestUpdate(ctx, f.data(), f.size() * sizeof(float));
    }
  }
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned n = 0;
  EVP_DigestFinal_ex(ctx, md, &n);
  EVP_MD_CTX_free(ctx);
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (unsigned i = 0; i < n; ++i) {
    s += digits[md[i] >> 4];
    s += digits[md[i] & 15];
  }
  return s;
}

}  // namespace fastv
