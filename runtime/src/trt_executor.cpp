// The TensorRT executor (TensorRT 10 C++ API): one IExecutionContext per engine, device buffers
// preallocated at the profile maxima of the manifest's engines section and reused, one CUDA stream.
#include "fastv/runtime.hpp"

#ifdef FASTV_WITH_TENSORRT
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <fstream>
#include <iostream>

namespace fastv {

namespace {

void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string("CUDA: ") + what + " failed (" + cudaGetErrorString(e) + ")");
}

class Logger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kERROR) std::cerr << "TensorRT: " << msg << "\n";
  }
};

DType to_dtype(nvinfer1::DataType t, const std::string& name) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return DType::F32;
    case nvinfer1::DataType::kHALF: return DType::F16;
    case nvinfer1::DataType::kINT64: return DType::I64;
    default: throw Error("engine tensor '" + name + "' has a data type this runtime does not handle");
  }
}

nvinfer1::Dims to_dims(const std::vector<int64_t>& shape) {
  nvinfer1::Dims d{};
  d.nbDims = static_cast<int32_t>(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) d.d[i] = shape[i];
  return d;
}

std::vector<int64_t> from_dims(const nvinfer1::Dims& d) { return std::vector<int64_t>(d.d, d.d + d.nbDims); }

size_t volume(const std::vector<int64_t>& s) {
  size_t v = 1;
  for (auto x : s) v *= static_cast<size_t>(std::max<int64_t>(x, 0));
  return v;
}

struct Buffer {
  void* ptr = nullptr;
  size_t bytes = 0;
};

struct Profile {   // one optimization profile: input name -> (min, max)
  std::map<std::string, std::pair<std::vector<int64_t>, std::vector<int64_t>>> shapes;
};

struct Engine {
  std::unique_ptr<nvinfer1::ICudaEngine> engine;
  std::unique_ptr<nvinfer1::IExecutionContext> context;
  std::vector<Profile> profiles;
  int current_profile = -1;
  std::vector<std::string> inputs, outputs;
  std::map<std::string, DType> dtypes;
  std::map<std::string, Buffer> buffers;
};

class TrtExecutor final : public Executor {
 public:
  explicit TrtExecutor(const Bundle& b) {
    check_tensorrt_bundle(b);   // before any GPU work
    const auto& section = b.manifest["engines"];
    const std::string built = section.value("backend_version", "");
    const int v = getInferLibVersion();
    const std::string here = std::to_string(v / 10000) + "." + std::to_string((v / 100) % 100) + "." +
                             std::to_string(v % 100);
    if (built.rfind(here, 0) != 0 && here.rfind(built, 0) != 0)
      throw Error((b.dir / kManifest).string() + ": field 'engines.backend_version' is " + built +
                  ", this TensorRT is " + here + ": engines are not portable across versions; rebuild them here");
    runtime_.reset(nvinfer1::createInferRuntime(logger_));
    if (!runtime_) throw Error("TensorRT: createInferRuntime failed");
    if (section.contains("plugin") && !section["plugin"].is_null()) {
      const std::string lib = (b.dir / kPluginLibrary).string();
      if (!runtime_->getPluginRegistry().loadLibrary(lib.c_str()))
        throw Error(lib + ": TensorRT could not load the plugin library (built for another TensorRT or GPU?)");
    }
    cuda_check(cudaStreamCreate(&stream_), "cudaStreamCreate");
    for (const char* g : kGraphs) load(b, g, section["engines"][g]);
  }

  ~TrtExecutor() override {
    for (auto& [name, e] : engines_)
      for (auto& [t, buf] : e.buffers) cudaFree(buf.ptr);
    if (stream_) cudaStreamDestroy(stream_);
  }

  std::string name() const override { return "trt"; }

  TensorMap run(const std::string& graph, const Feeds& inputs) override {
    auto it = engines_.find(graph);
    if (it == engines_.end()) throw Error("no engine for graph '" + graph + "'");
    Engine& e = it->second;
    // the first profile whose [min, max] holds every input shape
    int chosen = e.profiles.empty() ? 0 : -1;
    for (size_t p = 0; p < e.profiles.size() && chosen < 0; ++p) {
      bool fits = true;
      for (const auto& [name, range] : e.profiles[p].shapes) {
        auto in = inputs.find(name);
        if (in == inputs.end() || in->second->shape.size() != range.first.size()) { fits = false; break; }
        for (size_t d = 0; d < range.first.size(); ++d)
          fits = fits && in->second->shape[d] >= range.first[d] && in->second->shape[d] <= range.second[d];
      }
      if (fits) chosen = static_cast<int>(p);
    }
    if (chosen < 0)
      throw Error("graph '" + graph + "': the input shapes lie outside every profile of its engine (manifest field "
                  "'engines.engines." + graph + ".profiles'); rebuild with larger --max-prompt/--max-batch/--max-new-tokens");
    if (chosen != e.current_profile) {
      if (!e.context->setOptimizationProfileAsync(chosen, stream_)) throw Error("TensorRT: cannot select profile");
      e.current_profile = chosen;
    }
    for (const auto& name : e.inputs) {
      auto in = inputs.find(name);
      if (in == inputs.end()) throw Error("graph '" + graph + "': input '" + name + "' was not given");
      const Tensor& t = *in->second;
      Buffer& buf = e.buffers.at(name);
      if (t.nbytes() > buf.bytes) throw Error("graph '" + graph + "': input '" + name + "' exceeds its buffer");
      if (!e.context->setInputShape(name.c_str(), to_dims(t.shape)))
        throw Error("graph '" + graph + "': TensorRT refused the shape " + shape_str(t.shape) + " of '" + name + "'");
      if (t.nbytes())
        cuda_check(cudaMemcpyAsync(buf.ptr, t.data.data(), t.nbytes(), cudaMemcpyHostToDevice, stream_), "copy in");
      e.context->setTensorAddress(name.c_str(), buf.ptr);
    }
    TensorMap out;
    for (const auto& name : e.outputs) {
      Tensor t;
      t.dtype = e.dtypes.at(name);
      t.shape = from_dims(e.context->getTensorShape(name.c_str()));
      for (auto d : t.shape)
        if (d < 0) throw Error("graph '" + graph + "': output '" + name + "' has no shape (data-dependent)");
      if (t.nbytes() > e.buffers.at(name).bytes) throw Error("graph '" + graph + "': output '" + name + "' exceeds its buffer");
      e.context->setTensorAddress(name.c_str(), e.buffers.at(name).ptr);
      out[name] = std::move(t);
    }
    if (!e.context->enqueueV3(stream_)) throw Error("TensorRT: enqueueV3 failed on graph '" + graph + "'");
    for (auto& [name, t] : out) {
      t.data.resize(t.nbytes());
      if (t.nbytes())
        cuda_check(cudaMemcpyAsync(t.data.data(), e.buffers.at(name).ptr, t.nbytes(), cudaMemcpyDeviceToHost, stream_),
                   "copy out");
    }
    cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    return out;
  }

 private:
  void load(const Bundle& b, const std::string& graph, const nlohmann::json& rec) {
    const auto file = b.dir / rec["file"].get<std::string>();
    std::ifstream f(file, std::ios::binary);
    std::vector<char> blob((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    Engine e;
    e.engine.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
    if (!e.engine) throw Error(file.string() + ": TensorRT could not deserialize the engine (another TensorRT or GPU?)");
    e.context.reset(e.engine->createExecutionContext());
    if (!e.context) throw Error(file.string() + ": TensorRT could not create an execution context");
    for (int32_t i = 0; i < e.engine->getNbIOTensors(); ++i) {
      const std::string name = e.engine->getIOTensorName(i);
      e.dtypes[name] = to_dtype(e.engine->getTensorDataType(name.c_str()), name);
      (e.engine->getTensorIOMode(name.c_str()) == nvinfer1::TensorIOMode::kINPUT ? e.inputs : e.outputs).push_back(name);
    }
    for (const auto& p : rec.value("profiles", nlohmann::json::array())) {
      Profile prof;
      for (auto s = p["shapes"].begin(); s != p["shapes"].end(); ++s)
        prof.shapes[s.key()] = {s.value()["min"].get<std::vector<int64_t>>(), s.value()["max"].get<std::vector<int64_t>>()};
      e.profiles.push_back(std::move(prof));
    }
    // buffer sizes: every input at each profile's maxima; outputs as the engine infers them there
    std::map<std::string, size_t> need;
    const size_t n_prof = std::max<size_t>(1, e.profiles.size());
    for (size_t p = 0; p < n_prof; ++p) {
      if (!e.profiles.empty()) e.context->setOptimizationProfileAsync(static_cast<int32_t>(p), stream_);
      for (const auto& name : e.inputs) {
        std::vector<int64_t> shape = from_dims(e.engine->getTensorShape(name.c_str()));
        if (!e.profiles.empty() && e.profiles[p].shapes.count(name)) shape = e.profiles[p].shapes[name].second;
        e.context->setInputShape(name.c_str(), to_dims(shape));
        need[name] = std::max(need[name], volume(shape) * dtype_size(e.dtypes[name]));
      }
      for (const auto& name : e.outputs) {
        const auto shape = from_dims(e.context->getTensorShape(name.c_str()));
        need[name] = std::max(need[name], volume(shape) * dtype_size(e.dtypes[name]));
      }
    }
    cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    for (const auto& [name, bytes] : need) {
      Buffer buf;
      buf.bytes = std::max<size_t>(bytes, 16);
      cuda_check(cudaMalloc(&buf.ptr, buf.bytes), "cudaMalloc");
      e.buffers[name] = buf;
    }
    engines_[graph] = std::move(e);
  }

  Logger logger_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  cudaStream_t stream_ = nullptr;
  std::map<std::string, Engine> engines_;
};

}  // namespace

std::unique_ptr<Executor> make_tensorrt_executor(const Bundle& b) { return std::make_unique<TrtExecutor>(b); }
bool tensorrt_available() { return true; }

}  // namespace fastv

#else

namespace fastv {
std::unique_ptr<Executor> make_tensorrt_executor(const Bundle& b) {
  check_tensorrt_bundle(b);
  throw Error("this fastv-run was built without TensorRT (configure with -DFASTV_WITH_TENSORRT=ON where libnvinfer "
              "and the CUDA runtime are installed)");
}
bool tensorrt_available() { return false; }
}  // namespace fastv

#endif
