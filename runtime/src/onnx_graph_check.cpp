// A bundle's ONNX graph files against its manifest, as fastv_export/bundle/verify.py checks them with the onnx
// package (_check_graph_files): each file parses as an ONNX model (weights not read: they are skipped), its
// inputs and outputs (name, numpy dtype name, dims) are the manifest's graphs.<graph>.inputs/outputs, pre_k holds
// one fastv::TokenSelect node whose attributes are the manifest's fastv section, and no initializer's external
// data lies outside the bundle directory. The protobuf wire format is read directly (the fields below, from
// onnx/onnx.proto); any other field is skipped without being read into memory.
#include "fastv/runtime.hpp"

#include <fstream>

namespace fs = std::filesystem;
using nlohmann::json;

namespace fastv {

fs::path bundle_file(const fs::path& dir, const std::string& name, const std::string& field);

namespace {

struct Malformed : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr uint64_t kMaxString = 1 << 20;   // names, dim params, attribute strings

// One message of the protobuf wire format: the bytes [pos, end) of a file.
class Wire {
 public:
  Wire(std::istream& in, uint64_t pos, uint64_t end) : in_(in), pos_(pos), end_(end) {}
  bool more() const { return pos_ < end_; }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      const int c = byte();
      v |= static_cast<uint64_t>(c & 0x7f) << shift;
      if (!(c & 0x80)) return v;
    }
    throw Malformed("a varint longer than 10 bytes");
  }
  /// the next field's (number, wire type)
  std::pair<uint64_t, int> tag() {
    const uint64_t t = varint();
    return {t >> 3, static_cast<int>(t & 7)};
  }
  /// a length-delimited field as its own message (this one moves past it)
  Wire sub() {
    const uint64_t n = varint();
    if (n > end_ - pos_) throw Malformed("a field runs past the end of its message");
    Wire w(in_, pos_, pos_ + n);
    pos_ += n;
    return w;
  }
  std::string bytes() {
    Wire w = sub();
    if (w.end_ - w.pos_ > kMaxString) throw Malformed("a string field of more than 1 MiB");
    std::string s(static_cast<size_t>(w.end_ - w.pos_), '\0');
    in_.seekg(static_cast<std::streamoff>(w.pos_));
    if (!s.empty() && !in_.read(&s[0], static_cast<std::streamsize>(s.size()))) throw Malformed("the file ends early");
    return s;
  }
  void skip(int wire) {
    if (wire == 0) varint();
    else if (wire == 1) advance(8);
    else if (wire == 5) advance(4);
    else if (wire == 2) sub();
    else throw Malformed("wire type " + std::to_string(wire) + " (groups are not used by ONNX)");
  }
  uint64_t end() const { return end_; }

 private:
  int byte() {
    if (pos_ >= end_) throw Malformed("a field runs past the end of its message");
    in_.seekg(static_cast<std::streamoff>(pos_++));
    const int c = in_.get();
    if (c == EOF) throw Malformed("the file ends early");
    return c;
  }
  void advance(uint64_t n) {
    if (n > end_ - pos_) throw Malformed("a field runs past the end of its message");
    pos_ += n;
  }
  std::istream& in_;
  uint64_t pos_, end_;
};

std::string numpy_name(uint64_t elem) {   // onnx.helper.tensor_dtype_to_np_dtype(elem).name
  static const char* names[] = {nullptr,  "float32", "uint8",  "int8",    "uint16",    "int16",      "int32",
                                "int64",  "object",  "bool",   "float16", "float64",   "uint32",     "uint64",
                                "complex64", "complex128", "bfloat16"};
  if (elem == 0 || elem >= sizeof(names) / sizeof(names[0]))
    throw Malformed("tensor element type " + std::to_string(elem));
  return names[elem];
}

// ValueInfoProto {1 name, 2 type: TypeProto {1 tensor_type: {1 elem_type, 2 shape: {1 dim: {1 value, 2 param}}}}}
json value_info(Wire w) {
  std::string name;
  uint64_t elem = 0;
  json shape = json::array();
  while (w.more()) {
    auto [field, wire] = w.tag();
    if (field == 1 && wire == 2) {
      name = w.bytes();
    } else if (field == 2 && wire == 2) {
      Wire type = w.sub();
      while (type.more()) {
        auto [tf, tw] = type.tag();
        if (tf != 1 || tw != 2) {
          type.skip(tw);
          continue;
        }
        Wire tensor = type.sub();
        while (tensor.more()) {
          auto [ef, ew] = tensor.tag();
          if (ef == 1 && ew == 0) {
            elem = tensor.varint();
          } else if (ef == 2 && ew == 2) {
            Wire sh = tensor.sub();
            shape = json::array();
            while (sh.more()) {
              auto [sf, sw] = sh.tag();
              if (sf != 1 || sw != 2) {
                sh.skip(sw);
                continue;
              }
              Wire dim = sh.sub();
              bool has_value = false;
              int64_t value = 0;
              std::string param;
              while (dim.more()) {   // a oneof: the last one written wins
                auto [df, dw] = dim.tag();
                if (df == 1 && dw == 0) {
                  value = static_cast<int64_t>(dim.varint());
                  has_value = true;
                  param.clear();
                } else if (df == 2 && dw == 2) {
                  param = dim.bytes();
                  has_value = false;
                } else {
                  dim.skip(dw);
                }
              }
              shape.push_back(!param.empty() ? json(param) : has_value ? json(value) : json("?"));
            }
          } else {
            tensor.skip(ew);
          }
        }
      }
    } else {
      w.skip(wire);
    }
  }
  return {{"name", name}, {"dtype", numpy_name(elem)}, {"shape", shape}};
}

// NodeProto {4 op_type, 7 domain, 5 attribute: AttributeProto {1 name, 3 i, 4 s}}: (domain, op_type, attrs)
struct Node {
  std::string domain, op_type;
  json attrs = json::object();
};

Node node(Wire w) {
  Node n;
  while (w.more()) {
    auto [field, wire] = w.tag();
    if (field == 4 && wire == 2) {
      n.op_type = w.bytes();
    } else if (field == 7 && wire == 2) {
      n.domain = w.bytes();
    } else if (field == 5 && wire == 2) {
      Wire a = w.sub();
      std::string name;
      json value;
      while (a.more()) {
        auto [af, aw] = a.tag();
        if (af == 1 && aw == 2) name = a.bytes();
        else if (af == 3 && aw == 0) value = static_cast<int64_t>(a.varint());
        else if (af == 4 && aw == 2) value = a.bytes();
        else a.skip(aw);
      }
      n.attrs[name] = value;
    } else {
      w.skip(wire);
    }
  }
  return n;
}

// TensorProto {8 name, 13 external_data: {1 key, 2 value}, 14 data_location}: the external data file, if any
std::pair<std::string, std::string> external_location(Wire w) {
  std::string name, location;
  while (w.more()) {
    auto [field, wire] = w.tag();
    if (field == 8 && wire == 2) {
      name = w.bytes();
    } else if (field == 13 && wire == 2) {
      Wire e = w.sub();
      std::string key, value;
      while (e.more()) {
        auto [ef, ew] = e.tag();
        if (ef == 1 && ew == 2) key = e.bytes();
        else if (ef == 2 && ew == 2) value = e.bytes();
        else e.skip(ew);
      }
      if (key == "location") location = value;
    } else {
      w.skip(wire);
    }
  }
  return {name, location};
}

struct Graph {
  json inputs = json::array(), outputs = json::array();
  std::vector<Node> token_select;
  std::vector<std::pair<std::string, std::string>> external;   // (initializer, location)
};

Graph read_graph(std::istream& in, uint64_t size) {
  Wire model(in, 0, size);
  Graph g;
  bool seen = false;
  while (model.more()) {
    auto [field, wire] = model.tag();
    if (field != 7 || wire != 2) {   // ModelProto.graph
      model.skip(wire);
      continue;
    }
    seen = true;   // a message field given twice is merged (protobuf): the export writes the weights in a second one
    Wire graph = model.sub();
    while (graph.more()) {
      auto [gf, gw] = graph.tag();
      if (gf == 11 && gw == 2) g.inputs.push_back(value_info(graph.sub()));
      else if (gf == 12 && gw == 2) g.outputs.push_back(value_info(graph.sub()));
      else if (gf == 1 && gw == 2) {
        Node n = node(graph.sub());
        if (n.domain == "fastv" && n.op_type == "TokenSelect") g.token_select.push_back(std::move(n));   // graphs/op.py
      } else if (gf == 5 && gw == 2) {
        auto ext = external_location(graph.sub());
        if (!ext.second.empty()) g.external.push_back(ext);
      } else {
        graph.skip(gw);
      }
    }
  }
  if (!seen) throw Malformed("no graph");
  return g;
}

std::string names_of(const json& tensors) {
  json names = json::array();
  for (const auto& t : tensors) names.push_back(t["name"]);
  std::string text = names.dump(-1, ' ', true, json::error_handler_t::replace);
  return text.size() <= 60 ? text : text.substr(0, 57) + "...";
}

}  // namespace

void check_graph_files(const fs::path& dir, const json& m) {
  for (const char* graph : kGraphs) {
    const json& entry = m["graphs"][graph];
    const fs::path f = dir / entry["file"].get<std::string>();
    Graph g;
    try {
      std::ifstream in(f, std::ios::binary);
      if (!in) throw Malformed("cannot be opened");
      g = read_graph(in, static_cast<uint64_t>(fs::file_size(f)));
    } catch (const Malformed& e) {
      throw Error(f.string() + " is not a readable ONNX file (" + e.what() + "); re-export");
    }
    for (const char* io : {"inputs", "outputs"}) {
      const json& found = std::string(io) == "inputs" ? g.inputs : g.outputs;
      if (found != entry[io])
        throw Error(f.string() + ": its " + io + " " + names_of(found) + " are not those of " + kManifest +
                    " field 'graphs." + graph + "." + io + "': the file was swapped or replaced; re-export the bundle");
    }
    for (const auto& [tensor, location] : g.external)
      bundle_file(dir, location, "graphs." + std::string(graph) + ".file: " + f.filename().string() + " initializer '" +
                                     tensor + "' external data");
    if (std::string(graph) != "pre_k") continue;
    if (g.token_select.size() != 1)
      throw Error(f.string() + " has " + std::to_string(g.token_select.size()) +
                  " fastv::TokenSelect nodes, expected 1 (field 'graphs.pre_k' of " + kManifest +
                  "); re-export the bundle");
    const json& fv = m["fastv"];
    const json want = {{"ranking", fv["ranking"]}, {"ratio_num", fv["ratio_num"]}, {"ratio_den", fv["ratio_den"]},
                       {"keep", fv["keep"].is_null() ? json(-1) : fv["keep"]}, {"seed", fv["seed"]}};
    const json& attrs = g.token_select[0].attrs;
    for (auto it = want.begin(); it != want.end(); ++it) {
      const json got = attrs.contains(it.key()) ? attrs[it.key()] : json();
      if (got != it.value())
        throw Error(f.string() + ": its TokenSelect node has " + it.key() + "=" + got.dump(-1, ' ', true,
                    json::error_handler_t::replace) + ", " + kManifest + " field 'fastv." + it.key() + "' says " +
                    fv[it.key()].dump() + "; re-export the bundle");
    }
  }
}

}  // namespace fastv
