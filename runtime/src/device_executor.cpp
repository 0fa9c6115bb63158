// Executor::call and call_stacked (the defaults: outputs kept on the host) and the device-resident executor over
// DeviceGraph and DeviceMemory (fastv/device_executor.hpp): which buffers exist, how a call binds them, the two
// buffers of each KV cache, the stacked vision rows, and what crosses between host and device.
#include "fastv/device_executor.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

namespace fastv {

// ------------------------------------------------------------------------------ Executor::call (host)
namespace {

// [rows, seq, ...] -> [rows, 1, ...]: the last position of each row
Tensor last_position(const Tensor& t, const std::string& what) {
  if (t.shape.size() < 2 || t.shape[1] < 1)
    throw Error(what + " has the shape " + shape_str(t.shape) + ", which has no last position to fetch");
  std::vector<int64_t> shape = t.shape;
  shape[1] = 1;
  Tensor out = Tensor::zeros(t.dtype, shape);
  if (t.shape[0] == 0) return out;
  const size_t row = out.nbytes() / static_cast<size_t>(t.shape[0]);   // one position's bytes
  for (int64_t r = 0; r < t.shape[0]; ++r)
    std::memcpy(out.data.data() + r * row, t.data.data() + (r * t.shape[1] + t.shape[1] - 1) * row, row);
  return out;
}

}  // namespace

TensorMap Executor::call(const std::string& graph, Phase, const Feeds& inputs, const Links& links,
                         const std::vector<Fetch>& fetch) {
  Feeds feeds = inputs;
  for (const auto& [name, link] : links) {
    auto g = latest_.find(link.graph);
    if (g == latest_.end())
      throw Error("graph '" + graph + "': input '" + name + "' is linked to graph '" + link.graph +
                  "', which has not run");
    auto t = g->second.find(link.output);
    if (t == g->second.end()) throw Error("graph '" + link.graph + "' returned no output '" + link.output + "'");
    feeds[name] = &t->second;
  }
  TensorMap out = run(graph, feeds);
  TensorMap fetched;
  for (const auto& f : fetch) {
    auto t = out.find(f.name);
    if (t == out.end()) throw Error("graph '" + graph + "' returned no output '" + f.name + "'");
    fetched[f.name] =
        f.last_position ? last_position(t->second, "graph '" + graph + "' output '" + f.name + "'") : t->second;
  }
  latest_[graph] = std::move(out);   // after run(): the feeds may point into the previous outputs
  return fetched;
}

void Executor::call_stacked(const std::string& graph, Phase, const Feeds& inputs, size_t index) {
  TensorMap out = run(graph, inputs);
  auto g = latest_.find(graph);
  if (index == 0 || g == latest_.end()) {
    if (index != 0) throw std::logic_error("call_stacked: call " + std::to_string(index) + " of graph '" + graph +
                                           "' without its call 0");
    latest_[graph] = std::move(out);
    return;
  }
  for (auto& [name, t] : out) {
    const std::string where = "graph '" + graph + "' output '" + name + "'";
    auto acc = g->second.find(name);
    if (acc == g->second.end()) throw Error(where + ": returned by call " + std::to_string(index) + " only");
    Tensor& a = acc->second;
    if (t.shape.empty() || a.shape.empty() || a.dtype != t.dtype ||
        !std::equal(t.shape.begin() + 1, t.shape.end(), a.shape.begin() + 1, a.shape.end()))
      throw Error(where + ": call " + std::to_string(index) + " returned " + dtype_name(t.dtype) + " " +
                  shape_str(t.shape) + ", which does not stack under " + dtype_name(a.dtype) + " " +
                  shape_str(a.shape));
    a.shape[0] += t.shape[0];
    a.data.insert(a.data.end(), t.data.begin(), t.data.end());
  }
}

// ------------------------------------------------------------------------------------ DeviceMemory
void* DeviceMemory::allocate(size_t bytes) {
  void* p = do_allocate(bytes);
  ++counters_.allocations;
  counters_.bytes_live += bytes;
  return p;
}

void DeviceMemory::free(void* ptr, size_t bytes) noexcept {
  if (!ptr) return;
  do_free(ptr);
  ++counters_.frees;
  counters_.bytes_live -= bytes;
}

void DeviceMemory::to_device(void* dst, const void* src, size_t bytes) {
  do_copy(dst, src, bytes, Copy::HostToDevice);
  ++counters_.host_to_device_copies;
  counters_.host_to_device_bytes += bytes;
}

void DeviceMemory::to_host(void* dst, const void* src, size_t bytes) {
  do_copy(dst, src, bytes, Copy::DeviceToHost);
  ++counters_.device_to_host_copies;
  counters_.device_to_host_bytes += bytes;
}

void DeviceMemory::on_device(void* dst, const void* src, size_t bytes) {
  do_copy(dst, src, bytes, Copy::DeviceToDevice);
  ++counters_.device_to_device_copies;
  counters_.device_to_device_bytes += bytes;
}

void DeviceMemory::to_host_strided(void* dst, const void* src, size_t width, size_t rows, size_t src_pitch) {
  do_copy_strided(dst, width, src, src_pitch, width, rows, Copy::DeviceToHost);
  ++counters_.device_to_host_copies;
  counters_.device_to_host_bytes += width * rows;
}

namespace {

constexpr size_t kAddressAlignment = 256;   // cudaMalloc's alignment; TensorRT's setTensorAddress takes no less
constexpr std::align_val_t kHostAlignment{kAddressAlignment};

class HostMemory final : public DeviceMemory {
 public:
  void synchronize() override {}

 protected:
  void* do_allocate(size_t bytes) override {
    void* p = ::operator new(bytes, kHostAlignment);
    std::memset(p, 0xA5, bytes);   // never zeros: a graph reading a buffer nobody wrote reads garbage
    return p;
  }
  void do_free(void* ptr) noexcept override { ::operator delete(ptr, kHostAlignment); }
  void do_copy(void* dst, const void* src, size_t bytes, Copy) override { std::memcpy(dst, src, bytes); }
  void do_copy_strided(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width, size_t rows,
                       Copy) override {
    for (size_t r = 0; r < rows; ++r)
      std::memcpy(static_cast<char*>(dst) + r * dst_pitch, static_cast<const char*>(src) + r * src_pitch, width);
  }
};

std::string past_to_present(const std::string& past) {
  return std::string(kPresentPrefix) + past.substr(std::string(kPastPrefix).size());
}

const char* profile_name(Phase p) { return p == Phase::Prefill ? "prefill" : "decode"; }

bool overlaps(const void* a, size_t na, const void* b, size_t nb) {
  const auto* x = static_cast<const char*>(a);
  const auto* y = static_cast<const char*>(b);
  return na && nb && x < y + nb && y < x + na;
}

}  // namespace

std::unique_ptr<DeviceMemory> make_host_memory() { return std::make_unique<HostMemory>(); }

size_t checked_volume(const std::vector<int64_t>& shape, const std::string& what) {
  size_t v = 1;
  for (auto d : shape) {
    if (d < 0) throw Error(what + " has the shape " + shape_str(shape) + ", whose dimension -1 is not known");
    v *= static_cast<size_t>(d);
  }
  return v;
}

// ---------------------------------------------------------------------------------- DeviceExecutor
DeviceExecutor::DeviceExecutor(const Bundle& b, std::string name, std::unique_ptr<DeviceMemory> memory,
                               std::map<std::string, std::unique_ptr<DeviceGraph>> graphs)
    : name_(std::move(name)), memory_(std::move(memory)) {
  try {
    const auto& records = b.manifest.at("engines").at("engines");
    for (const char* g : kGraphs) {
      auto it = graphs.find(g);
      if (it == graphs.end() || !it->second) throw Error(std::string("no engine for graph '") + g + "'");
      load(g, records.at(g), std::move(it->second));
    }
    allocate_buffers();
    memory_->synchronize();
  } catch (...) {
    free_all();
    throw;
  }
}

DeviceExecutor::~DeviceExecutor() {
  try {
    memory_->synchronize();
  } catch (...) {
  }
  free_all();
}

void DeviceExecutor::free_all() {
  for (auto& [n, g] : graphs_) {
    for (auto& [t, buf] : g.buffers) memory_->free(buf.ptr, buf.bytes);
    for (auto& [t, buf] : g.own_size) memory_->free(buf.ptr, buf.bytes);
    for (auto& [t, kv] : g.kv)
      for (auto& slot : kv.slot) memory_->free(slot.ptr, slot.bytes);
  }
}

DeviceExecutor::Buffer DeviceExecutor::allocate(size_t bytes) {
  Buffer buf;
  buf.bytes = std::max<size_t>(bytes, 16);   // a tensor of no elements still gets an address
  buf.ptr = memory_->allocate(buf.bytes);
  return buf;
}

void DeviceExecutor::load(const std::string& graph_name, const nlohmann::json& record,
                          std::unique_ptr<DeviceGraph> graph) {
  const std::string where = "graph '" + graph_name + "'";
  Graph& g = graphs_[graph_name];
  g.graph = std::move(graph);
  for (const auto& t : g.graph->tensors()) {
    g.dtypes[t.name] = t.dtype;
    (t.input ? g.inputs : g.outputs).push_back(t.name);
  }
  for (const auto& p : record.value("profiles", nlohmann::json::array())) {
    Profile prof;
    prof.name = p.value("name", "");
    for (auto s = p.at("shapes").begin(); s != p.at("shapes").end(); ++s)
      prof.shapes[s.key()] = {s.value().at("min").get<std::vector<int64_t>>(),
                              s.value().at("max").get<std::vector<int64_t>>()};
    g.profiles.push_back(std::move(prof));
  }
  const int engine_profiles = g.graph->num_profiles();
  if (!g.profiles.empty() && engine_profiles != static_cast<int>(g.profiles.size()))
    throw Error(where + ": the engine has " + std::to_string(engine_profiles) + " optimization profiles, the " +
                "manifest field 'engines.engines." + graph_name + ".profiles' lists " +
                std::to_string(g.profiles.size()) + "; rebuild the engines with fastv-export build");
  // KV caches: present.{i}.{kind} paired with past_key_values.{i}.{kind}
  for (const auto& in : g.inputs)
    if (is_level(in, kPastPrefix) &&
        std::find(g.outputs.begin(), g.outputs.end(), past_to_present(in)) != g.outputs.end())
      g.past_of[in] = past_to_present(in);
  // sizes: every input at each profile's maxima (static dims from the engine), outputs as the engine infers them
  std::map<std::string, size_t> need;
  const int n_prof = std::max(1, static_cast<int>(g.profiles.size()));
  for (int p = 0; p < n_prof; ++p) {
    g.graph->select_profile(p);
    for (const auto& name : g.inputs) {
      std::vector<int64_t> shape = g.graph->shape(name);
      if (!g.profiles.empty() && g.profiles[p].shapes.count(name)) shape = g.profiles[p].shapes[name].second;
      const size_t bytes =
          checked_volume(shape, where + " input '" + name + "' (no maximum in the manifest's profiles)") *
          dtype_size(g.dtypes[name]);
      g.graph->set_input_shape(name, shape);
      const auto pair = g.past_of.find(name);
      const std::string& key = pair == g.past_of.end() ? name : pair->second;
      need[key] = std::max(need[key], bytes);
    }
    for (const auto& name : g.outputs) {
      const size_t bytes = checked_volume(g.graph->shape(name), where + " output '" + name + "' at the profile " +
                                                                    "maxima") *
                           dtype_size(g.dtypes[name]);
      need[name] = std::max(need[name], bytes);
    }
  }
  g.current_profile = n_prof - 1;
  g.need = std::move(need);
}

void DeviceExecutor::allocate_buffers() {
  // an output that an input of the same name of another engine reads (a link) is sized for that input's maxima
  // too: a stacked run of calls (the vision calls of a prefill) fills it with the rows of every call
  std::map<std::string, size_t> input_need;
  for (const auto& [name, g] : graphs_)
    for (const auto& in : g.inputs)
      if (!g.past_of.count(in)) input_need[in] = std::max(input_need[in], g.need.at(in));
  for (auto& [graph_name, g] : graphs_) {
    std::map<std::string, bool> paired_present;
    for (const auto& [past, present] : g.past_of) paired_present[present] = true;
    for (const auto& [name, bytes] : g.need) {
      if (paired_present.count(name)) {
        KvPair& kv = g.kv[name];
        for (auto& s : kv.slot) s = allocate(bytes);
        continue;
      }
      const bool output = std::find(g.outputs.begin(), g.outputs.end(), name) != g.outputs.end();
      auto in = input_need.find(name);
      if (output && in != input_need.end() && in->second > bytes) {
        g.buffers[name] = allocate(in->second);
        g.own_size[name] = allocate(bytes);
      } else {
        g.buffers[name] = allocate(bytes);
      }
    }
    g.need.clear();
  }
}

const DeviceExecutor::Buffer& DeviceExecutor::output_buffer(const Graph& g, const std::string& output) const {
  auto kv = g.kv.find(output);
  if (kv != g.kv.end()) return kv->second.slot[kv->second.latest];
  return g.buffers.at(output);
}

size_t DeviceExecutor::buffer_bytes(const std::string& graph, const std::string& tensor) const {
  auto it = graphs_.find(graph);
  if (it == graphs_.end()) return 0;
  const Graph& g = it->second;
  auto past = g.past_of.find(tensor);
  auto kv = g.kv.find(past == g.past_of.end() ? tensor : past->second);
  if (kv != g.kv.end()) return kv->second.slot[0].bytes + kv->second.slot[1].bytes;
  auto buf = g.buffers.find(tensor);
  return buf == g.buffers.end() ? 0 : buf->second.bytes;
}

std::string DeviceExecutor::profile_of_latest_call(const std::string& graph) const {
  const Graph& g = graphs_.at(graph);
  if (g.profiles.empty() || g.current_profile < 0) return "";
  return g.profiles[g.current_profile].name;
}

TensorMap DeviceExecutor::run(const std::string& graph, const Feeds& inputs) {
  return invoke(graph, std::nullopt, inputs, {}, nullptr);
}

TensorMap DeviceExecutor::call(const std::string& graph, Phase phase, const Feeds& inputs, const Links& links,
                               const std::vector<Fetch>& fetch) {
  return invoke(graph, phase, inputs, links, &fetch);
}

void DeviceExecutor::call_stacked(const std::string& graph, Phase phase, const Feeds& inputs, size_t index) {
  const std::vector<Fetch> none;
  invoke(graph, phase, inputs, {}, &none, index);
}

TensorMap DeviceExecutor::invoke(const std::string& graph_name, std::optional<Phase> phase, const Feeds& inputs,
                                 const Links& links, const std::vector<Fetch>* fetch,
                                 std::optional<size_t> stack_index) {
  auto it = graphs_.find(graph_name);
  if (it == graphs_.end()) throw Error("no engine for graph '" + graph_name + "'");
  Graph& g = it->second;
  const std::string where = "graph '" + graph_name + "'";

  // every input: a host tensor or an output of an earlier call, of the engine's data type
  struct Bound {
    std::vector<int64_t> shape;
    const Tensor* host = nullptr;
    const Buffer* device = nullptr;
  };
  std::map<std::string, Bound> bound;
  for (const auto& [name, link] : links)
    if (std::find(g.inputs.begin(), g.inputs.end(), name) == g.inputs.end())
      throw Error(where + ": its engine has no input '" + name + "' (linked to graph '" + link.graph + "' output '" +
                  link.output + "')");
  for (const auto& name : g.inputs) {
    const DType want = g.dtypes.at(name);
    auto l = links.find(name);
    if (l != links.end()) {
      auto src = graphs_.find(l->second.graph);
      if (src == graphs_.end() || !src->second.called)
        throw Error(where + ": input '" + name + "' is linked to graph '" + l->second.graph + "', which has not run");
      const Graph& s = src->second;
      if (!s.latest_shapes.count(l->second.output))
        throw Error("graph '" + l->second.graph + "' has no output '" + l->second.output + "'");
      const DType have = s.dtypes.at(l->second.output);
      if (have != want)
        throw Error(where + ": input '" + name + "' is " + dtype_name(want) + " in its engine, but graph '" +
                    l->second.graph + "' output '" + l->second.output + "' is " + dtype_name(have) +
                    "; rebuild the engines from one bundle with fastv-export build");
      bound[name] = {s.latest_shapes.at(l->second.output), nullptr, &output_buffer(s, l->second.output)};
      continue;
    }
    auto h = inputs.find(name);
    if (h == inputs.end()) throw Error(where + ": input '" + name + "' was not given");
    if (h->second->dtype != want)
      throw Error(where + ": input '" + name + "' is " + dtype_name(h->second->dtype) + ", its engine takes " +
                  dtype_name(want) + " (engines built for another precision? rebuild them from this bundle)");
    bound[name] = {h->second->shape, h->second, nullptr};
  }

  // the profile: the phase's by name; otherwise (or for engines without one of that name) the first that fits
  auto misfit = [&](const Profile& p) -> std::string {   // "" when every input shape lies in [min, max]
    for (const auto& [name, range] : p.shapes) {
      auto b = bound.find(name);
      if (b == bound.end()) continue;
      bool ok = b->second.shape.size() == range.first.size();
      for (size_t d = 0; ok && d < range.first.size(); ++d)
        ok = b->second.shape[d] >= range.first[d] && b->second.shape[d] <= range.second[d];
      if (!ok)
        return "input '" + name + "' " + shape_str(b->second.shape) + " lies outside [" + shape_str(range.first) +
               ", " + shape_str(range.second) + "]";
    }
    return "";
  };
  const std::string advice = " (manifest field 'engines.engines." + graph_name + ".profiles'); rebuild with " +
                             "larger --max-prompt/--max-batch/--max-new-tokens";
  int chosen = g.profiles.empty() ? 0 : -1;
  if (phase && !g.profiles.empty()) {
    for (size_t p = 0; p < g.profiles.size(); ++p)
      if (g.profiles[p].name == profile_name(*phase)) {
        const std::string why = misfit(g.profiles[p]);
        if (!why.empty()) throw Error(where + ": " + why + " of its '" + profile_name(*phase) + "' profile" + advice);
        chosen = static_cast<int>(p);
      }
  }
  for (size_t p = 0; p < g.profiles.size() && chosen < 0; ++p)
    if (misfit(g.profiles[p]).empty()) chosen = static_cast<int>(p);
  if (chosen < 0) throw Error(where + ": the input shapes lie outside every profile of its engine" + advice);
  if (chosen != g.current_profile) {
    g.graph->select_profile(chosen);
    g.current_profile = chosen;
  }

  // KV caches: this call writes each present into the buffer that does not hold the latest one
  std::map<std::string, int> write;
  for (auto& [present, kv] : g.kv) write[present] = kv.latest == 0 ? 1 : 0;

  struct Span {
    const void* ptr;
    size_t bytes;
    std::string name;
  };
  std::vector<Span> in_spans;
  for (const auto& name : g.inputs) {
    const Bound& b = bound.at(name);
    const size_t bytes = checked_volume(b.shape, where + " input '" + name + "'") * dtype_size(g.dtypes.at(name));
    g.graph->set_input_shape(name, b.shape);
    void* ptr = nullptr;
    if (b.device) {
      if (bytes > b.device->bytes) throw Error(where + ": input '" + name + "' exceeds the buffer it is linked to");
      ptr = b.device->ptr;
    } else {
      auto pair = g.past_of.find(name);
      const Buffer& buf = pair != g.past_of.end() ? g.kv.at(pair->second).slot[1 - write.at(pair->second)]
                                                  : g.buffers.at(name);
      if (bytes > buf.bytes)
        throw Error(where + ": input '" + name + "' " + shape_str(b.shape) + " exceeds its buffer (the profile " +
                    "maxima of the manifest's engines section)");
      if (bytes) memory_->to_device(buf.ptr, b.host->data.data(), bytes);
      ptr = buf.ptr;
    }
    g.graph->set_address(name, ptr);
    in_spans.push_back({ptr, bytes, name});
  }

  std::map<std::string, std::vector<int64_t>> shapes;
  std::map<std::string, const char*> out_ptrs;   // where each output's rows of this call lie
  struct Move {   // a stacked call's rows written into the output's own-size buffer, then moved into place
    void* dst;
    const void* src;
    size_t bytes;
  };
  std::vector<Move> moves;
  const bool appending = stack_index && *stack_index > 0;
  if (appending && (!g.called || !g.kv.empty()))
    throw std::logic_error(where + ": call_stacked call " + std::to_string(*stack_index) + " without its call 0");
  for (const auto& name : g.outputs) {
    std::vector<int64_t> shape = g.graph->shape(name);
    const size_t bytes = checked_volume(shape, where + " output '" + name + "'") * dtype_size(g.dtypes.at(name));
    auto kv = g.kv.find(name);
    const Buffer& buf = kv != g.kv.end() ? kv->second.slot[write.at(name)] : g.buffers.at(name);
    size_t offset = 0;
    std::vector<int64_t> total = shape;   // the output's shape after this call (a stacked run: every call's rows)
    if (appending) {
      const std::vector<int64_t>& before = g.latest_shapes.at(name);
      if (shape.empty() || before.size() != shape.size() ||
          !std::equal(shape.begin() + 1, shape.end(), before.begin() + 1))
        throw Error(where + ": output '" + name + "' " + shape_str(shape) + " of call " +
                    std::to_string(*stack_index) + " does not stack under the rows " + shape_str(before) +
                    " of the calls before it");
      offset = checked_volume(before, where + " output '" + name + "'") * dtype_size(g.dtypes.at(name));
      total[0] += before[0];
    }
    if (offset + bytes > buf.bytes)
      throw Error(where + ": output '" + name + "' " + shape_str(total) + " exceeds its buffer (the profile maxima " +
                  "of the manifest's engines section" + (appending ? ", of every engine input of that name" : "") +
                  ")");
    char* at = static_cast<char*>(buf.ptr) + offset;
    const bool in_place = bytes == 0 || reinterpret_cast<uintptr_t>(at) % kAddressAlignment == 0;
    if (!in_place && !g.own_size.count(name))
      throw std::logic_error(where + ": output '" + name + "' has no buffer of its own size to stack through");
    char* bind = in_place ? at : static_cast<char*>(g.own_size.at(name).ptr);
    if (!in_place) {
      if (bytes > g.own_size.at(name).bytes)
        throw Error(where + ": output '" + name + "' " + shape_str(shape) + " exceeds its buffer (the profile " +
                    "maxima of the manifest's engines section)");
      moves.push_back({at, bind, bytes});
    }
    for (const auto& in : in_spans)
      if (overlaps(bind, bytes, in.ptr, in.bytes))
        throw std::logic_error(where + ": output '" + name + "' would overwrite input '" + in.name + "'");
    g.graph->set_address(name, bind);
    shapes[name] = std::move(total);
    out_ptrs[name] = at;
  }
  g.graph->enqueue();
  for (const auto& m : moves)
    if (m.bytes) memory_->on_device(m.dst, m.src, m.bytes);
  for (auto& [present, kv] : g.kv) kv.latest = write.at(present);
  g.latest_shapes = shapes;
  g.called = true;

  TensorMap out;
  std::vector<Fetch> all;
  if (!fetch)
    for (const auto& name : g.outputs) all.emplace_back(name);
  for (const auto& f : fetch ? *fetch : all) {
    auto s = shapes.find(f.name);
    if (s == shapes.end()) throw Error(where + ": its engine has no output '" + f.name + "'");
    Tensor t;
    t.dtype = g.dtypes.at(f.name);
    t.shape = s->second;
    const char* src = out_ptrs.at(f.name);
    if (!f.last_position) {
      t.data.resize(t.nbytes());
      if (t.nbytes()) memory_->to_host(t.data.data(), src, t.nbytes());
    } else {   // [rows, seq, ...]: each row's position seq - 1, one strided copy
      if (t.shape.size() < 2 || t.shape[1] < 1)
        throw Error(where + ": output '" + f.name + "' has the shape " + shape_str(t.shape) + ", which has no last " +
                    "position to fetch");
      const int64_t rows = t.shape[0], seq = t.shape[1];
      t.shape[1] = 1;
      const size_t width = t.nbytes() / static_cast<size_t>(std::max<int64_t>(rows, 1));
      t.data.resize(t.nbytes());
      if (t.nbytes())
        memory_->to_host_strided(t.data.data(), src + static_cast<size_t>(seq - 1) * width, width,
                                 static_cast<size_t>(rows), static_cast<size_t>(seq) * width);
    }
    out[f.name] = std::move(t);
  }
  memory_->synchronize();
  return out;
}

}  // namespace fastv
