// manifest.json against fastv_export/bundle/manifest.schema.json, the file the Python loader reads: its text is
// compiled into the library (CMake embeds it at configure time, runtime/README.md), checked with valijson
// (Debian libvalijson-dev, header-only, over nlohmann-json). Also the strict parse both loaders share: UTF-8,
// no NaN/Infinity, no repeated keys.
//
// valijson reads drafts 4 and 7; the schema is draft 2020-12. The one 2020-12 keyword it uses that draft 7
// spells differently is `prefixItems` (draft 7: `items` as an array, and `items` beside it: `additionalItems`),
// rewritten here before parsing; `$defs` is reached through JSON pointers (`#/$defs/x`), which both read alike.
// Any keyword outside the list valijson reads is refused when the schema is loaded (the unit tests load it),
// so a schema edit cannot silently make the C++ check weaker than the Python one.
#include "fastv/runtime.hpp"

#include <valijson/adapters/nlohmann_json_adapter.hpp>
#include <valijson/schema.hpp>
#include <valijson/schema_parser.hpp>
#include <valijson/validation_results.hpp>
#include <valijson/validator.hpp>

#include <fstream>
#include <iterator>
#include <set>
#include <sstream>
#include <vector>

namespace fastv {

extern const char* const kManifestSchemaText;   // generated: manifest_schema_text.cpp

namespace {

using nlohmann::json;

// keywords whose value is one schema, an array of schemas, or an object of schemas by name
const std::set<std::string> kOneSchema = {"additionalProperties", "additionalItems", "propertyNames", "not", "if",
                                          "then", "else", "contains", "items"};
const std::set<std::string> kSchemaLists = {"allOf", "anyOf", "oneOf", "prefixItems"};
const std::set<std::string> kSchemaMaps = {"properties", "$defs", "definitions", "patternProperties"};
// keywords valijson's draft-7 parser reads (or that only annotate)
const std::set<std::string> kLeaves = {"type", "enum", "const", "minimum", "maximum", "exclusiveMinimum",
                                       "exclusiveMaximum", "multipleOf", "minLength", "maxLength", "pattern",
                                       "minItems", "maxItems", "uniqueItems", "minProperties", "maxProperties",
                                       "required", "$ref", "$schema", "$id", "title", "description", "default",
                                       "examples", "$comment"};

// the 2020-12 schema in the draft-7 spelling valijson reads (see the top of the file)
json to_draft7(const json& s, const std::string& at) {
  if (s.is_boolean()) return s;
  if (!s.is_object()) throw Error("manifest schema: " + at + " is not a schema");
  json out = json::object();
  for (auto it = s.begin(); it != s.end(); ++it) {
    const std::string& key = it.key();
    const json& v = it.value();
    const std::string sub = at + "/" + key;
    if (key == "$schema" || key == "$id") continue;   // the draft is fixed below; refs are local pointers
    if (kSchemaMaps.count(key)) {
      json m = json::object();
      for (auto p = v.begin(); p != v.end(); ++p) m[p.key()] = to_draft7(p.value(), sub + "/" + p.key());
      out[key] = m;
    } else if (kSchemaLists.count(key)) {
      json l = json::array();
      for (size_t i = 0; i < v.size(); ++i) l.push_back(to_draft7(v[i], sub + "/" + std::to_string(i)));
      out[key == "prefixItems" ? "items" : key] = l;
    } else if (kOneSchema.count(key)) {
      if (key == "items" && v.is_array())
        throw Error("manifest schema: " + sub + " is an array (draft 2020-12 spells it prefixItems)");
      const bool after_prefix = key == "items" && s.contains("prefixItems");
      out[after_prefix ? "additionalItems" : key] = to_draft7(v, sub);
    } else if (!kLeaves.count(key)) {
      throw Error("manifest schema: keyword '" + key + "' at " + sub + " is not one the C++ validator reads");
    } else {
      out[key] = v;
    }
  }
  return out;
}

struct CompiledSchema {
  valijson::Schema schema;
  CompiledSchema() {
    const json draft7 = to_draft7(json::parse(kManifestSchemaText), "#");
    valijson::SchemaParser parser(valijson::SchemaParser::kDraft7);
    valijson::adapters::NlohmannJsonAdapter adapter(draft7);
    parser.populateSchema(adapter, schema);
  }
};

const valijson::Schema& compiled_schema() {
  static const CompiledSchema compiled;   // thread-safe once
  return compiled.schema;
}

std::string short_value(const json& v, size_t limit = 60) {
  std::string text = v.dump(-1, ' ', true, json::error_handler_t::replace);
  return text.size() <= limit ? text : text.substr(0, limit - 3) + "...";
}

// valijson's context ["<root>", "[graphs]", "[embed]", "[file]"] as (keys, dotted path); indices stay numbers
struct Located {
  std::string path;
  const json* value = nullptr;
};

Located locate(const json& m, const std::vector<std::string>& context) {
  Located out{"", &m};
  for (size_t i = 1; i < context.size(); ++i) {
    const std::string& c = context[i];
    const std::string part = c.size() >= 2 && c.front() == '[' && c.back() == ']' ? c.substr(1, c.size() - 2) : c;
    const json* cur = out.value;
    if (cur && cur->is_array()) {
      out.path += "[" + part + "]";
      size_t idx = 0;
      try {
        idx = std::stoul(part);
      } catch (const std::exception&) {
        idx = cur->size();
      }
      out.value = idx < cur->size() ? &(*cur)[idx] : nullptr;
    } else {
      out.path += (out.path.empty() ? "" : ".") + part;
      out.value = cur && cur->is_object() && cur->contains(part) ? &(*cur)[part] : nullptr;
    }
  }
  return out;
}

// bounds no manifest comes near (the deepest field is 8 levels down; the longest string a chat template's system
// text): the regular expressions of the schema and the deep comparisons of uniqueItems stay shallow
constexpr int kMaxDepth = 64;
constexpr size_t kMaxString = 1 << 20;

std::string fix_for(const std::string& path) {
  return path.rfind("engines", 0) == 0 ? "rebuild the engines with `fastv-export build`" : "re-export the bundle";
}

// std::regex (valijson's pattern engine) recurses once per character: a long string under a pattern would run
// out of stack. No field but the chat template's text (serving.chat, no patterns) holds more than this.
constexpr size_t kMaxField = 1024;

void check_lengths(const json& v, const std::string& path, const std::string& where) {
  auto refuse = [&](const std::string& at, const std::string& what, size_t n) {
    throw Error(where + " field '" + (at.empty() ? "(top level)" : at) + "': " + what + " of " + std::to_string(n) +
                " bytes, longer than any field of this schema (" + std::to_string(kMaxField) + "); " + fix_for(at));
  };
  if (path == "serving.chat") return;
  if (v.is_string() && v.get_ref<const std::string&>().size() > kMaxField)
    refuse(path, "a string", v.get_ref<const std::string&>().size());
  if (v.is_object()) {
    for (auto it = v.begin(); it != v.end(); ++it) {
      if (it.key().size() > kMaxField) refuse(path, "a field name", it.key().size());
      check_lengths(it.value(), path.empty() ? it.key() : path + "." + it.key(), where);
    }
  } else if (v.is_array()) {
    for (size_t i = 0; i < v.size(); ++i) check_lengths(v[i], path + "[" + std::to_string(i) + "]", where);
  }
}

}  // namespace

void check_manifest_schema(const json& m, const std::string& where) {
  check_lengths(m, "", where);
  valijson::Validator validator(valijson::Validator::kStrongTypes);   // 64.0 is not an integer
  valijson::ValidationResults results;
  valijson::adapters::NlohmannJsonAdapter target(m);
  if (validator.validate(compiled_schema(), target, &results)) return;
  // the deepest failure (a combinator's summary sits above its children), the first of those
  valijson::ValidationResults::Error first, e;
  while (results.popError(e))
    if (first.context.empty() || e.context.size() > first.context.size()) first = e;
  const Located at = locate(m, first.context);
  std::string what = first.description;
  while (!what.empty() && (what.back() == '.' || what.back() == ' ')) what.pop_back();
  if (what.size() > 160) what = what.substr(0, 157) + "...";
  const std::string missing = "Missing required property '";
  if (what.rfind(missing, 0) == 0) {
    const std::string key = what.substr(missing.size(), what.size() - missing.size() - 1);
    throw Error(where + ": required field '" + (at.path.empty() ? key : at.path + "." + key) + "' is missing; " +
                fix_for(at.path));
  }
  const std::string named = "Failed to validate against schema associated with property name '";
  if (what.rfind(named, 0) == 0) {   // the deepest error: nothing was recorded below it
    // valijson records nothing below a failed propertyNames rule: name the object whose entry names fail it
    const std::string key = what.substr(named.size(), what.find('\'', named.size()) - named.size());
    const std::string path = at.path.empty() ? key : at.path + "." + key;
    throw Error(where + " field '" + path + "': an entry's name fails the schema (for 'files': a plain file name "
                "inside the bundle, at most 255 bytes, not manifest.json) or its value does (manifest.schema.json); " +
                fix_for(path));
  }
  const std::string path = at.path.empty() ? "(top level)" : at.path;
  const std::string value = at.value && !at.path.empty() ? short_value(*at.value) + ": " : std::string();
  throw Error(where + " field '" + path + "': " + value + what + " (manifest.schema.json); " + fix_for(at.path));
}

void check_manifest_schema_loads() { (void)compiled_schema(); }

json read_manifest(const std::filesystem::path& mpath) {
  const std::string where = mpath.string();
  std::ifstream f(mpath, std::ios::binary);
  if (!f) throw Error(where + " cannot be read");
  const std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  // repeated keys: a set of the keys seen in each open object, innermost last
  std::vector<std::set<std::string>> open;
  std::string repeated, limit;
  const json::parser_callback_t cb = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth > kMaxDepth && limit.empty()) limit = "nested deeper than " + std::to_string(kMaxDepth) + " levels";
    if (event == json::parse_event_t::value && parsed.is_string() && limit.empty() &&
        parsed.get_ref<const std::string&>().size() > kMaxString)
      limit = "a string of " + std::to_string(parsed.get_ref<const std::string&>().size()) + " bytes (at most " +
              std::to_string(kMaxString) + ")";
    if (event == json::parse_event_t::object_start) {
      open.emplace_back();
    } else if (event == json::parse_event_t::object_end) {
      if (!open.empty()) open.pop_back();
    } else if (event == json::parse_event_t::key && !open.empty() && repeated.empty()) {
      if (!open.back().insert(parsed.get<std::string>()).second) repeated = parsed.get<std::string>();
    }
    return true;
  };
  json m;
  try {
    m = json::parse(text, cb);   // nlohmann: strict JSON (no NaN/Infinity, no comments), UTF-8 checked
  } catch (const json::exception& e) {
    std::string what = e.what();
    for (auto& c : what)
      if (c == '\n' || c == '\r') c = ' ';
    if (what.size() > 160) what = what.substr(0, 157) + "...";
    throw Error(where + " is not valid JSON (" + what + "); re-export the bundle");
  }
  if (!limit.empty())
    throw Error(where + " holds " + limit + ": not a manifest fastv-export writes; re-export the bundle");
  if (!repeated.empty())
    throw Error(where + " is not valid JSON (field " + short_value(json(repeated)) +
                " appears twice in one object); re-export the bundle");
  if (!m.is_object()) throw Error(where + ": top level must be an object");
  return m;
}

}  // namespace fastv
