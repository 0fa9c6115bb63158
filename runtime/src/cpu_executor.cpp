// The CPU executor: the bundle's real ONNX graphs in ONNX Runtime (CPUExecutionProvider).
//
// ONNX Runtime's C/C++ headers are not published on the package registries this project builds
// from (PyPI, Debian 12), so this executor drives the onnxruntime Python package's sessions from
// C++: the interpreter is embedded (pybind11), one InferenceSession per graph, tensors are copied
// to numpy arrays and back. Everything else (manifest, positions, the generation loop) is the same
// C++ that the TensorRT executor runs.
#include "fastv/runtime.hpp"

#ifdef FASTV_WITH_ORT_PYTHON
#include <pybind11/embed.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <cstring>

namespace py = pybind11;

namespace fastv {

namespace {

const char* kSessionCode = R"PY(
import onnxruntime as ort

def open_sessions(paths):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # quantized bundles: fused DequantizeLinear -> MatMul keeps float activations (fastv_export/runtime/ort.py)
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return {g: ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]) for g, p in paths.items()}

def run(session, feeds):
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))
)PY";

py::dtype np_dtype(DType d) {
  return py::dtype(d == DType::F32 ? "float32" : d == DType::F16 ? "float16" : "int64");
}

class CpuExecutor final : public Executor {
 public:
  explicit CpuExecutor(const Bundle& b) {
    if (!Py_IsInitialized()) {
      interpreter_ = std::make_unique<py::scoped_interpreter>();
    }
    try {
      py::module_ site = py::module_::import("site");
      const char* env = std::getenv("FASTV_PYTHON_SITE");
      const std::string dir = env && *env ? env : FASTV_PYTHON_SITE;
      if (!dir.empty()) site.attr("addsitedir")(dir);
      py::dict scope;
      scope["__builtins__"] = py::module_::import("builtins");
      py::exec(kSessionCode, scope);
      py::dict paths;
      for (const char* g : kGraphs) paths[g] = b.graph_file(g).string();
      sessions_ = scope["open_sessions"](paths);
      run_ = scope["run"];
    } catch (const py::error_already_set& e) {
      throw Error(std::string("cpu executor: cannot open the graphs in ONNX Runtime (") + e.what() +
                  "); install the onnxruntime Python package or set FASTV_PYTHON_SITE to its site-packages");
    }
  }
  ~CpuExecutor() override {
    sessions_ = py::object();
    run_ = py::object();
  }

  std::string name() const override { return "cpu"; }

  TensorMap run(const std::string& graph, const Feeds& inputs) override {
    try {
      py::dict feeds;
      for (const auto& [name, t] : inputs) {
        std::vector<py::ssize_t> shape(t->shape.begin(), t->shape.end());
        py::array a(np_dtype(t->dtype), shape);
        if (t->nbytes()) std::memcpy(a.mutable_data(), t->data.data(), t->nbytes());
        feeds[py::str(name)] = a;
      }
      py::dict out = run_(sessions_[py::str(graph)], feeds);
      TensorMap result;
      for (auto item : out) {
        py::array a = py::array::ensure(item.second, py::array::c_style);
        Tensor t;
        const char kind = a.dtype().kind();
        const auto size = a.dtype().itemsize();
        if (kind == 'f' && size == 4) t.dtype = DType::F32;
        else if (kind == 'f' && size == 2) t.dtype = DType::F16;
        else if (kind == 'i' && size == 8) t.dtype = DType::I64;
        else throw Error("graph '" + graph + "' output '" + item.first.cast<std::string>() + "' has an unsupported dtype");
        for (py::ssize_t i = 0; i < a.ndim(); ++i) t.shape.push_back(a.shape(i));
        t.data.resize(t.nbytes());
        if (t.nbytes()) std::memcpy(t.data.data(), a.data(), t.nbytes());
        result[item.first.cast<std::string>()] = std::move(t);
      }
      return result;
    } catch (const py::error_already_set& e) {
      std::string what = e.what();
      what = what.substr(0, what.find('\n'));
      throw Error("ONNX Runtime failed on graph '" + graph + "': " + what);
    }
  }

 private:
  std::unique_ptr<py::scoped_interpreter> interpreter_;   // destroyed last (declared first)
  py::object sessions_, run_;
};

}  // namespace

std::unique_ptr<Executor> make_cpu_executor(const Bundle& b) { return std::make_unique<CpuExecutor>(b); }
bool cpu_executor_available() { return true; }

}  // namespace fastv

#else

namespace fastv {
std::unique_ptr<Executor> make_cpu_executor(const Bundle&) {
  throw Error("this fastv-run was built without the cpu executor (FASTV_WITH_ORT_PYTHON=OFF: needs Python 3 "
              "development files, pybind11 and the onnxruntime Python package); rebuild with scripts/build_runtime.sh");
}
bool cpu_executor_available() { return false; }
}  // namespace fastv

#endif
