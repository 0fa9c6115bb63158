// Requests in the OpenAI chat format, as fastv_export/frontend/request.py reads them (the same fields, the
// same checks, one error line naming the request, the message and the field).
#include "fastv/request.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>

namespace fs = std::filesystem;
using nlohmann::json;

namespace fastv {

std::vector<Part> Request::media() const {
  std::vector<Part> out;
  for (const auto& m : messages)
    for (const auto& p : m.parts)
      if (p.kind != "text") out.push_back(p);
  return out;
}

Request request_from_cli(const std::string& prompt, const std::vector<std::string>& images,
                         const std::vector<std::string>& videos, const std::string* system) {
  Request r;
  if (system && !system->empty()) r.messages.push_back({"system", {{"text", *system}}});
  Message user{"user", {}};
  for (const auto& p : images) user.parts.push_back({"image", p});
  for (const auto& p : videos) user.parts.push_back({"video", p});
  if (!prompt.empty()) user.parts.push_back({"text", prompt});
  r.messages.push_back(std::move(user));
  return r;
}

namespace {

const char* kRoles = "system, user, assistant";
const char* kPartTypes = "text, image, image_url, video";

std::string kind_of(const json& v) {
  switch (v.type()) {
    case json::value_t::object: return "an object";
    case json::value_t::array: return "a list";
    case json::value_t::string: return "a string";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::null: return "null";
    default: return v.is_number() ? "a number" : "a value";
  }
}

// Python's repr of a float (shortest round-trip digits, ".0" on integral values) or of an int
std::string py_float(double v) {
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[40];
  for (int prec = 1; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*g", prec, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::string s = buf;
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
  return s;
}

std::string quote(const std::string& s) {   // Python's repr of a short string, near enough
  return "'" + s + "'";
}

const std::string& string_field(const json& d, const std::string& key, const std::string& where) {
  if (!d.contains(key)) throw Error(where + ": missing field '" + key + "'");
  if (!d[key].is_string()) throw Error(where + "." + key + ": expected a string, got " + kind_of(d[key]));
  return d[key].get_ref<const std::string&>();
}

// scheme of a URL as urllib.parse.urlsplit finds it (lower case), or "" when the value has none
std::string url_scheme(const std::string& v) {
  const size_t i = v.find(':');
  if (i == std::string::npos || i == 0 || !std::isalpha(static_cast<unsigned char>(v[0]))) return "";
  std::string s;
  for (size_t k = 0; k < i; ++k) {
    const char c = v[k];
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '+' || c == '-' || c == '.')) return "";
    s += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  return s;
}

std::string percent_decode(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size() && std::isxdigit(static_cast<unsigned char>(s[i + 1])) &&
        std::isxdigit(static_cast<unsigned char>(s[i + 2]))) {
      out += static_cast<char>(std::stoi(s.substr(i + 1, 2), nullptr, 16));
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

std::string local_path(std::string value, const std::string& where, const fs::path& base) {
  const std::string scheme = url_scheme(value);
  if (scheme == "file") {
    std::string rest = value.substr(5);
    if (rest.rfind("//", 0) == 0) {   // file://host/path: the path
      const size_t slash = rest.find_first_of("/?#", 2);
      rest = slash == std::string::npos ? "" : rest.substr(slash);
    }
    const size_t cut = rest.find_first_of("?#");
    if (cut != std::string::npos) rest = rest.substr(0, cut);
    value = percent_decode(rest);
  } else if (scheme == "http" || scheme == "https" || scheme == "data" ||
             (scheme.size() > 1 && value.find("://") != std::string::npos)) {
    throw Error(where + ": " + quote(value.substr(0, 60)) +
                " is not a local file; give a path or a file:// URL (nothing is downloaded)");
  }
  if (value == "~" || value.rfind("~/", 0) == 0) {
    const char* home = std::getenv("HOME");
    if (home) value = std::string(home) + value.substr(1);
  }
  fs::path p(value);
  if (!p.is_absolute() && !base.empty()) p = base / p;
  return p.string();
}

Part part(const json& p, const std::string& where, const fs::path& base) {
  if (!p.is_object()) throw Error(where + ": expected an object with 'type', got " + kind_of(p));
  if (!p.contains("type")) throw Error(where + ": missing field 'type' (" + kPartTypes + ")");
  const json& kind = p["type"];
  static const std::set<std::string> types{"text", "image", "image_url", "video"};
  if (!kind.is_string() || !types.count(kind.get<std::string>()))
    throw Error(where + ": unknown content type " + (kind.is_string() ? quote(kind.get<std::string>()) : kind.dump()) +
                "; use one of " + kPartTypes);
  const std::string k = kind.get<std::string>();
  if (k == "text") return {"text", string_field(p, "text", where)};
  if (k == "image_url") {
    const json inner = p.contains("image_url") ? p["image_url"] : json();
    std::string url;
    if (inner.is_string()) url = inner.get<std::string>();
    else if (inner.is_object() && inner.contains("url")) url = string_field(inner, "url", where + ".image_url");
    else throw Error(where + ": missing field 'image_url.url' (a local path or a file:// URL)");
    return {"image", local_path(url, where + ".image_url.url", base)};
  }
  return {k, local_path(string_field(p, k, where), where + "." + k, base)};
}

Message message(const json& m, const std::string& where, const fs::path& base) {
  if (!m.is_object()) throw Error(where + ": expected an object with 'role' and 'content', got " + kind_of(m));
  if (!m.contains("role")) throw Error(where + ": missing field 'role' (" + kRoles + ")");
  const json& role = m["role"];
  if (!role.is_string() || (role != "system" && role != "user" && role != "assistant"))
    throw Error(where + ": unknown role " + (role.is_string() ? quote(role.get<std::string>()) : role.dump()) +
                "; use one of " + kRoles);
  if (!m.contains("content")) throw Error(where + ": missing field 'content' (a string or a list of parts)");
  const json& content = m["content"];
  Message out{role.get<std::string>(), {}};
  if (content.is_string()) {
    out.parts.push_back({"text", content.get<std::string>()});
    return out;
  }
  if (!content.is_array())
    throw Error(where + ".content: expected a string or a list of parts, got " + kind_of(content));
  for (size_t k = 0; k < content.size(); ++k)
    out.parts.push_back(part(content[k], where + ".content[" + std::to_string(k) + "]", base));
  return out;
}

// the largest max_tokens and top_k a request may ask for (fastv_export/frontend/request.py INT32_MAX)
constexpr double kInt32Max = 2147483647.0;

// an integral double's exact decimal digits, as Python's int(x) prints them (no int64 overflow)
std::string whole(double x) {
  if (x == 0) return "0";
  char buf[400];
  std::snprintf(buf, sizeof buf, "%.0f", x);
  return buf;
}

// a number field: null or absent -> nothing; integers must be integral; [low, high] with an open low end
template <class T>
std::optional<T> number(const json& d, const std::string& key, const std::string& where, bool integer,
                        std::optional<double> low, std::optional<double> high = {}, bool open_low = false) {
  if (!d.contains(key) || d[key].is_null()) return std::nullopt;
  const json& v = d[key];
  const bool numeric = v.is_number();
  const double x = numeric ? v.get<double>() : 0.0;
  if (!numeric || (integer && !(std::isfinite(x) && std::floor(x) == x)))
    throw Error(where + "." + key + ": expected " + (integer ? "an integer" : "a number") + ", got " + kind_of(v));
  const bool below = low && (x < *low || (open_low && x == *low));
  if (below || (high && x > *high)) {
    auto bound = [&](double b) { return integer ? std::to_string(static_cast<int64_t>(b)) : py_float(b); };
    const std::string value = integer ? (v.is_number_float() ? whole(x) : v.dump()) : py_float(x);
    throw Error(where + "." + key + ": " + value + " is out of range " + (open_low ? "(" : "[") + bound(*low) + ", " +
                (high ? bound(*high) + "]" : std::string("inf)")));
  }
  if constexpr (std::is_same_v<T, uint64_t>) {
    if (v.is_number_unsigned()) return v.get<uint64_t>();
    if (x >= 18446744073709551616.0)
      throw Error(where + "." + key + ": " + whole(x) + " is out of range [0, 2^64)");
    return static_cast<uint64_t>(x);
  } else if constexpr (std::is_integral_v<T>) {
    if (v.is_number_integer()) return v.get<T>();
    return static_cast<T>(x);
  } else {
    return static_cast<T>(x);
  }
}

std::vector<std::string> stops(const json& item, const std::string& where) {
  if (!item.contains("stop") || item["stop"].is_null()) return {};
  json v = item["stop"];
  if (v.is_string()) v = json::array({v});
  bool ok = v.is_array();
  if (ok)
    for (const auto& s : v) ok = ok && s.is_string() && !s.get<std::string>().empty();
  if (!ok)
    throw Error(where + ".stop: expected a non-empty string or a list of them, got " + kind_of(item["stop"]));
  return v.get<std::vector<std::string>>();
}

Request request(const json& item, size_t index, const fs::path& base) {
  const std::string where = "request " + std::to_string(index);
  if (!item.is_object()) throw Error(where + ": expected a JSON object with 'messages', got " + kind_of(item));
  if (!item.contains("messages"))
    throw Error(where + ": missing field 'messages' (a list of {\"role\", \"content\"} objects)");
  const json& messages = item["messages"];
  if (!messages.is_array() || messages.empty())
    throw Error(where + ": 'messages' must be a non-empty list, got " + kind_of(messages));
  Request r;
  for (size_t j = 0; j < messages.size(); ++j)
    r.messages.push_back(message(messages[j], where + ": messages[" + std::to_string(j) + "]", base));
  const bool has_max = item.contains("max_tokens") && !item["max_tokens"].is_null();
  const bool has_completion = item.contains("max_completion_tokens") && !item["max_completion_tokens"].is_null();
  if (has_max || (!item.contains("max_tokens") && has_completion))
    r.max_tokens = number<int64_t>(item, item.contains("max_tokens") ? "max_tokens" : "max_completion_tokens", where,
                                   true, 1.0, kInt32Max);
  r.temperature = number<double>(item, "temperature", where, false, 0.0);
  r.top_k = number<int64_t>(item, "top_k", where, true, 0.0, kInt32Max);
  r.top_p = number<double>(item, "top_p", where, false, 0.0, 1.0, true);
  r.seed = number<uint64_t>(item, "seed", where, true, 0.0);
  r.stop = stops(item, where);
  return r;
}

}  // namespace

std::vector<Request> parse_requests(const json& data, const fs::path& base) {
  const json items = data.is_array() ? data : json::array({data});
  if (items.empty()) throw Error("the request list is empty; give at least one request object");
  std::vector<Request> out;
  for (size_t i = 0; i < items.size(); ++i) out.push_back(request(items[i], i, base));
  return out;
}

std::vector<Request> load_requests(const fs::path& path) {
  if (!fs::is_regular_file(path))
    throw Error("request file " + path.string() + " does not exist; give a JSON file in the OpenAI chat format");
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string text = ss.str();
  json data;
  try {
    data = json::parse(text);
  } catch (const json::parse_error& e) {
    // line and column of the byte where parsing stopped
    size_t line = 1, col = 1;
    for (size_t i = 0; i + 1 < e.byte && i < text.size(); ++i) {
      if (text[i] == '\n') {
        ++line;
        col = 1;
      } else {
        ++col;
      }
    }
    const bool utf8 = std::string(e.what()).find("UTF-8") != std::string::npos ||
                      std::string(e.what()).find("invalid string") != std::string::npos;
    if (utf8 && std::string(e.what()).find("UTF") != std::string::npos)
      throw Error("request file " + path.string() + " is not UTF-8 text; write it as UTF-8 JSON");
    std::string msg = e.what();
    const size_t colon = msg.rfind(": ");
    if (colon != std::string::npos) msg = msg.substr(colon + 2);
    throw Error("request file " + path.string() + " is not valid JSON (line " + std::to_string(line) + ", column " +
                std::to_string(col) + ": " + msg + "); write one request object or a list of them");
  }
  return parse_requests(data, path.parent_path());
}

}  // namespace fastv
