// Checks of a bundle's TensorRT engines that need no GPU and no TensorRT: they run before any
// GPU work, so a bad bundle is refused with one line on any machine.
#include "fastv/runtime.hpp"

namespace fastv {

void check_tensorrt_bundle(const Bundle& b) {
  const std::string where = (b.dir / kManifest).string();
  if (!b.has_engines())
    throw Error(where + " records no engines (field 'engines' is null): build them with `fastv-export build " +
                b.dir.string() + "`");
  const auto& section = b.manifest["engines"];
  for (const char* g : kGraphs) {
    if (!section["engines"].contains(g))
      throw Error(where + ": field 'engines.engines." + g + "' is missing: rebuild with fastv-export build");
    const auto file = b.dir / section["engines"][g].value("file", std::string(g) + ".engine");
    if (!std::filesystem::is_regular_file(file))
      throw Error(file.string() + " is missing (manifest field 'engines.engines." + g + ".file'); rebuild with "
                  "fastv-export build");
  }
  if (section.contains("plugin") && !section["plugin"].is_null()) {
    const auto lib = b.dir / kPluginLibrary;
    if (!std::filesystem::is_regular_file(lib))
      throw Error(lib.string() + " is missing: the pre_k engine uses the fastv::TokenSelect plugin (manifest field "
                  "'engines.plugin'); copy the libfastv_plugins.so the engines were built with into the bundle");
  }
  const std::string backend = section.value("backend", "");
  if (backend != "tensorrt")
    throw Error(where + ": field 'engines.backend' is '" + backend + "' (" + section.value("backend_version", "?") +
                "); this runtime runs TensorRT 10 engines: build them on the GPU with `fastv-export build " +
                b.dir.string() + " --backend tensorrt`");
}

}  // namespace fastv
