// The TensorRT executor (TensorRT 10 C++ API): the device-resident executor (fastv/device_executor.hpp) over CUDA
// memory and one IExecutionContext per engine, on one CUDA stream. Every TensorRT and CUDA call's result is
// checked (one Error line naming the graph, the tensor and the call); feed dtypes are checked against the
// engine's by the device executor before any copy.
#include "fastv/device_executor.hpp"
#include "fastv/runtime.hpp"

#ifdef FASTV_WITH_TENSORRT
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <fstream>
#include <iostream>

namespace fastv {

namespace {

void cuda_check(cudaError_t e, const std::string& what) {
  if (e != cudaSuccess) throw Error("CUDA: " + what + " failed (" + cudaGetErrorString(e) + ")");
}

class Logger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kERROR) std::cerr << "TensorRT: " << msg << "\n";
  }
};

Logger& logger() {   // outlives every runtime and engine
  static Logger instance;
  return instance;
}

DType to_dtype(nvinfer1::DataType t, const std::string& where) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return DType::F32;
    case nvinfer1::DataType::kHALF: return DType::F16;
    case nvinfer1::DataType::kINT64: return DType::I64;
    default:
      throw Error(where + " has TensorRT data type " + std::to_string(static_cast<int>(t)) +
                  "; this runtime feeds float32, float16 and int64 (the graph spec's types): rebuild the engines "
                  "with fastv-export build");
  }
}

nvinfer1::Dims to_dims(const std::vector<int64_t>& shape, const std::string& where) {
  nvinfer1::Dims d{};
  if (shape.size() > static_cast<size_t>(nvinfer1::Dims::MAX_DIMS))
    throw Error(where + ": shape " + shape_str(shape) + " has more dimensions than TensorRT takes");
  d.nbDims = static_cast<int32_t>(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) d.d[i] = shape[i];
  return d;
}

std::vector<int64_t> from_dims(const nvinfer1::Dims& d, const std::string& where) {
  if (d.nbDims < 0) throw Error(where + ": TensorRT gives no shape (its shape could not be inferred)");
  return std::vector<int64_t>(d.d, d.d + d.nbDims);
}

/// CUDA device memory; copies and graph calls in order on one stream.
class CudaMemory final : public DeviceMemory {
 public:
  CudaMemory() { cuda_check(cudaStreamCreate(&stream_), "cudaStreamCreate"); }
  ~CudaMemory() override {
    if (stream_) cudaStreamDestroy(stream_);
  }
  cudaStream_t stream() const { return stream_; }
  void synchronize() override { cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }

 protected:
  void* do_allocate(size_t bytes) override {
    void* p = nullptr;
    cuda_check(cudaMalloc(&p, bytes), "cudaMalloc of " + std::to_string(bytes) + " bytes");
    return p;
  }
  void do_free(void* ptr) noexcept override { cudaFree(ptr); }
  void do_copy(void* dst, const void* src, size_t bytes, Copy kind) override {
    cuda_check(cudaMemcpyAsync(dst, src, bytes, to_kind(kind), stream_), "cudaMemcpyAsync");
  }
  void do_copy_strided(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width, size_t rows,
                       Copy kind) override {
    cuda_check(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows, to_kind(kind), stream_),
               "cudaMemcpy2DAsync");
  }

 private:
  static cudaMemcpyKind to_kind(Copy kind) {
    return kind == Copy::HostToDevice   ? cudaMemcpyHostToDevice
           : kind == Copy::DeviceToHost ? cudaMemcpyDeviceToHost
                                        : cudaMemcpyDeviceToDevice;
  }
  cudaStream_t stream_ = nullptr;
};

/// One deserialized engine and its execution context.
class TrtGraph final : public DeviceGraph {
 public:
  TrtGraph(std::shared_ptr<nvinfer1::IRuntime> runtime, const std::filesystem::path& file, std::string graph,
           cudaStream_t stream)
      : runtime_(std::move(runtime)), where_("graph '" + graph + "'"), stream_(stream) {
    std::ifstream f(file, std::ios::binary);
    if (!f) throw Error(file.string() + ": cannot read the engine file");
    std::vector<char> blob((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    engine_.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
    if (!engine_) throw Error(file.string() + ": TensorRT could not deserialize the engine (another TensorRT or GPU?)");
    context_.reset(engine_->createExecutionContext());
    if (!context_) throw Error(file.string() + ": TensorRT could not create an execution context");
    for (int32_t i = 0; i < engine_->getNbIOTensors(); ++i) {
      const char* name = engine_->getIOTensorName(i);
      if (!name) throw Error(file.string() + ": TensorRT gives no name for I/O tensor " + std::to_string(i));
      DeviceTensorInfo t;
      t.name = name;
      t.input = engine_->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT;
      t.dtype = to_dtype(engine_->getTensorDataType(name), where_ + " tensor '" + t.name + "'");
      tensors_.push_back(std::move(t));
    }
  }

  std::vector<DeviceTensorInfo> tensors() const override { return tensors_; }
  int num_profiles() const override { return engine_->getNbOptimizationProfiles(); }

  void select_profile(int index) override {
    if (!context_->setOptimizationProfileAsync(index, stream_))
      throw Error(where_ + ": TensorRT refused optimization profile " + std::to_string(index) +
                  " (setOptimizationProfileAsync)");
  }

  void set_input_shape(const std::string& name, const std::vector<int64_t>& shape) override {
    const std::string what = where_ + " input '" + name + "'";
    if (!context_->setInputShape(name.c_str(), to_dims(shape, what)))
      throw Error(what + ": TensorRT refused the shape " + shape_str(shape) + " (setInputShape)");
  }

  std::vector<int64_t> shape(const std::string& name) const override {
    const std::string what = where_ + " tensor '" + name + "'";
    const bool input = engine_->getTensorIOMode(name.c_str()) == nvinfer1::TensorIOMode::kINPUT;
    return from_dims(input ? engine_->getTensorShape(name.c_str()) : context_->getTensorShape(name.c_str()), what);
  }

  void set_address(const std::string& name, void* ptr) override {
    if (!context_->setTensorAddress(name.c_str(), ptr))
      throw Error(where_ + " tensor '" + name + "': TensorRT refused its address (setTensorAddress)");
  }

  void enqueue() override {
    if (!context_->allInputDimensionsSpecified())
      throw Error(where_ + ": TensorRT reports input shapes not specified (allInputDimensionsSpecified)");
    if (!context_->enqueueV3(stream_)) throw Error(where_ + ": TensorRT could not run the engine (enqueueV3)");
    cuda_check(cudaGetLastError(), where_ + " enqueueV3");
  }

 private:
  std::shared_ptr<nvinfer1::IRuntime> runtime_;   // destroyed after the engine and the context
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext> context_;
  std::string where_;
  cudaStream_t stream_;
  std::vector<DeviceTensorInfo> tensors_;
};

}  // namespace

std::unique_ptr<Executor> make_tensorrt_executor(const Bundle& b) {
  check_tensorrt_bundle(b);   // before any GPU work
  const auto& section = b.manifest["engines"];
  const std::string built = section.value("backend_version", "");
  const int v = getInferLibVersion();
  const std::string here =
      std::to_string(v / 10000) + "." + std::to_string((v / 100) % 100) + "." + std::to_string(v % 100);
  if (built.rfind(here, 0) != 0 && here.rfind(built, 0) != 0)
    throw Error((b.dir / kManifest).string() + ": field 'engines.backend_version' is " + built +
                ", this TensorRT is " + here + ": engines are not portable across versions; rebuild them here");
  std::shared_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger()));
  if (!runtime) throw Error("TensorRT: createInferRuntime failed");
  if (section.contains("plugin") && !section["plugin"].is_null()) {
    const std::string lib = (b.dir / kPluginLibrary).string();
    if (!runtime->getPluginRegistry().loadLibrary(lib.c_str()))
      throw Error(lib + ": TensorRT could not load the plugin library (built for another TensorRT or GPU?)");
  }
  auto memory = std::make_unique<CudaMemory>();
  std::map<std::string, std::unique_ptr<DeviceGraph>> graphs;
  for (const char* g : kGraphs) {
    const auto file = b.dir / section["engines"][g]["file"].get<std::string>();
    graphs[g] = std::make_unique<TrtGraph>(runtime, file, g, memory->stream());
  }
  return std::make_unique<DeviceExecutor>(b, "trt", std::move(memory), std::move(graphs));
}
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
