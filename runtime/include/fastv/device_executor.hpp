// The device-resident executor: the bundle's compiled graphs run where their memory lives (TensorRT: the GPU),
// and the generation loop's tensors stay there: the vision calls' features (stacked in place, call after call), the
// tensors passed from graph to graph, the KV caches. Only what generate() fetches (the kept indices once, the last
// position's logits of the prefill, the logits of every decode step) is copied back to the host; the host copies up
// only the pixel values and the steps' small inputs (token ids, masks, position ids). Each KV cache has two device
// buffers, sized once at load for the longest sequence the engines take (prompt + new tokens, the decode profile's
// maxima from the manifest's engines section): a call writes its present into the buffer that does not hold its
// past, and the next decode step reads it as its past.
//
// Device memory and the compiled graphs sit behind two small interfaces (DeviceMemory, DeviceGraph), so that the
// buffer logic here is tested on the CPU with host memory (runtime/tests/device_tests.cpp); the TensorRT executor
// (src/trt_executor.cpp) supplies CUDA memory and TensorRT execution contexts.
#pragma once

#include "fastv/runtime.hpp"

#include <cstddef>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace fastv {

/// What crossed between host and device, and what was allocated, since the memory was created.
struct DeviceCounters {
  size_t allocations = 0, frees = 0;
  size_t bytes_live = 0;   // allocated and not freed
  size_t host_to_device_bytes = 0, device_to_host_bytes = 0, device_to_device_bytes = 0;
  size_t host_to_device_copies = 0, device_to_host_copies = 0, device_to_device_copies = 0;
};

/// Device memory: allocation and copies, counted. Copies may be asynchronous (one stream, in order) until
/// synchronize().
class DeviceMemory {
 public:
  virtual ~DeviceMemory() = default;
  /// ``bytes`` (> 0) of device memory; throws Error when none is left.
  void* allocate(size_t bytes);
  void free(void* ptr, size_t bytes) noexcept;
  void to_device(void* dst, const void* src, size_t bytes);
  void to_host(void* dst, const void* src, size_t bytes);
  void on_device(void* dst, const void* src, size_t bytes);
  /// ``rows`` blocks of ``width`` bytes, ``src_pitch`` bytes apart on the device, packed on the host (one copy)
  void to_host_strided(void* dst, const void* src, size_t width, size_t rows, size_t src_pitch);
  /// Waits for every copy and every graph call issued so far; throws Error when one failed.
  virtual void synchronize() = 0;
  const DeviceCounters& counters() const { return counters_; }

 protected:
  enum class Copy { HostToDevice, DeviceToHost, DeviceToDevice };
  virtual void* do_allocate(size_t bytes) = 0;
  virtual void do_free(void* ptr) noexcept = 0;
  virtual void do_copy(void* dst, const void* src, size_t bytes, Copy kind) = 0;
  /// ``rows`` blocks of ``width`` bytes from ``src`` (``src_pitch`` apart) to ``dst`` (``dst_pitch`` apart)
  virtual void do_copy_strided(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width,
                               size_t rows, Copy kind) = 0;

 private:
  DeviceCounters counters_;
};

/// Host memory behind the DeviceMemory interface (the CPU tests of the buffer logic).
std::unique_ptr<DeviceMemory> make_host_memory();

/// One I/O tensor of a compiled graph.
struct DeviceTensorInfo {
  std::string name;
  DType dtype = DType::F32;
  bool input = true;
};

/// One compiled graph as the device executor drives it (TensorRT: an ICudaEngine and its IExecutionContext).
/// Every method throws Error when the engine refuses.
class DeviceGraph {
 public:
  virtual ~DeviceGraph() = default;
  /// inputs and outputs, in the engine's order
  virtual std::vector<DeviceTensorInfo> tensors() const = 0;
  /// optimization profiles (>= 1)
  virtual int num_profiles() const = 0;
  virtual void select_profile(int index) = 0;
  virtual void set_input_shape(const std::string& name, const std::vector<int64_t>& shape) = 0;
  /// an input's shape as the engine declares it (-1: dynamic); an output's once every input shape is set
  /// (-1: not known)
  virtual std::vector<int64_t> shape(const std::string& name) const = 0;
  virtual void set_address(const std::string& name, void* ptr) = 0;
  /// runs the graph (asynchronously, in the memory's stream order)
  virtual void enqueue() = 0;
};

/// Elements of ``shape``; Error naming ``what`` when a dimension is negative (unknown), never 0 for it.
size_t checked_volume(const std::vector<int64_t>& shape, const std::string& what);

/// The Executor over DeviceGraphs and DeviceMemory. Buffers are allocated in the constructor, never later.
class DeviceExecutor final : public Executor {
 public:
  /// ``graphs``: one per graph of the bundle (kGraphs); profiles from the manifest's
  /// engines.engines.<graph>.profiles (their order is the engine's).
  DeviceExecutor(const Bundle& b, std::string name, std::unique_ptr<DeviceMemory> memory,
                 std::map<std::string, std::unique_ptr<DeviceGraph>> graphs);
  ~DeviceExecutor() override;
  DeviceExecutor(const DeviceExecutor&) = delete;
  DeviceExecutor& operator=(const DeviceExecutor&) = delete;

  std::string name() const override { return name_; }
  /// host inputs, every output back to the host; the first profile that holds the input shapes
  TensorMap run(const std::string& graph, const Feeds& inputs) override;
  /// the phase's profile ("prefill", "decode"; the first that fits when the engine has none of that name);
  /// linked inputs bound where their outputs lie; only ``fetch`` copied back (a last_position fetch: one strided
  /// copy of each row's last position)
  TensorMap call(const std::string& graph, Phase phase, const Feeds& inputs, const Links& links,
                 const std::vector<Fetch>& fetch) override;
  /// call i > 0 writes each output in place after the rows of calls 0..i-1, in the output's buffer (sized for the
  /// most rows an input of the same name takes in any engine); where that address is not 256-byte aligned (TensorRT
  /// takes no other) the call writes into its own buffer and one device-to-device copy moves the rows into place.
  /// Nothing comes back to the host.
  void call_stacked(const std::string& graph, Phase phase, const Feeds& inputs, size_t index) override;

  const DeviceCounters& counters() const { return memory_->counters(); }
  /// the device bytes of one graph I/O tensor's buffers (a KV cache: its two buffers together); 0 if none
  size_t buffer_bytes(const std::string& graph, const std::string& tensor) const;
  /// the profile the latest call of ``graph`` ran on (its manifest name, or "" for an engine without profiles)
  std::string profile_of_latest_call(const std::string& graph) const;

 private:
  void free_all();   // every buffer this executor allocated (load failed, or destruction)
  struct Profile {
    std::string name;
    std::map<std::string, std::pair<std::vector<int64_t>, std::vector<int64_t>>> shapes;   // input -> (min, max)
  };
  struct Buffer {
    void* ptr = nullptr;
    size_t bytes = 0;
  };
  /// a KV cache: present.{i}.{kind} and past_key_values.{i}.{kind} share two buffers; a call writes its present
  /// into the one that does not hold the latest present, which its past (linked to it) reads
  struct KvPair {
    Buffer slot[2];
    int latest = -1;
  };
  struct Graph {
    std::unique_ptr<DeviceGraph> graph;
    std::vector<Profile> profiles;
    int current_profile = -1;
    std::vector<std::string> inputs, outputs;
    std::map<std::string, DType> dtypes;
    std::map<std::string, Buffer> buffers;   // every input and output that is not a KV cache
    /// outputs whose buffer was enlarged to an input of the same name of another engine (a stacked run of calls
    /// fills it): a buffer of the engine's own size, which a call whose rows cannot be written in place writes
    std::map<std::string, Buffer> own_size;
    std::map<std::string, size_t> need;      // bytes of each buffer (KV caches: by present name), until allocated
    std::map<std::string, KvPair> kv;        // by present name
    std::map<std::string, std::string> past_of;   // past input -> its present output
    std::map<std::string, std::vector<int64_t>> latest_shapes;   // outputs of the latest call
    bool called = false;
  };

  void load(const std::string& graph_name, const nlohmann::json& record, std::unique_ptr<DeviceGraph> graph);
  void allocate_buffers();
  /// stack_index: call_stacked's index (none: the call's outputs replace the graph's earlier ones)
  TensorMap invoke(const std::string& graph, std::optional<Phase> phase, const Feeds& inputs, const Links& links,
                   const std::vector<Fetch>* fetch, std::optional<size_t> stack_index = std::nullopt);
  Buffer allocate(size_t bytes);
  /// where the latest call of ``graph`` left ``output``
  const Buffer& output_buffer(const Graph& g, const std::string& output) const;

  std::string name_;
  std::unique_ptr<DeviceMemory> memory_;
  std::map<std::string, Graph> graphs_;
};

}  // namespace fastv
