// libfastv_plugins_autoload.so: for tools that load plugin libraries with a bare dlopen / ctypes.CDLL
// (polygraphy --plugins) instead of IPluginRegistry::loadLibrary. When this library is loaded, it asks the
// TensorRT 10 library of the process (libnvinfer.so.10: already loaded, else found by the dynamic loader;
// nothing is linked) to loadLibrary() libfastv_plugins.so from the same folder, which registers TokenSelect.
// Load either this library or libfastv_plugins.so through the registry in one process, not both.
#include <cstdio>
#include <cstdlib>
#include <dlfcn.h>
#include <string>

#include <NvInferRuntime.h>

namespace
{

using GetPluginRegistry = nvinfer1::IPluginRegistry* (*) ();

std::string own_folder()
{
    Dl_info info{};
    if (dladdr(reinterpret_cast<void*>(&own_folder), &info) == 0 || info.dli_fname == nullptr)
    {
        return ".";
    }
    std::string const path = info.dli_fname;
    std::string::size_type const slash = path.rfind('/');
    return slash == std::string::npos ? "." : path.substr(0, slash);
}

__attribute__((constructor)) void fastv_autoload()
{
    if (std::getenv("FASTV_PLUGINS_NO_AUTOLOAD") != nullptr)
    {
        return;
    }
    std::string const target = own_folder() + "/libfastv_plugins.so";
    // TensorRT 10 only: TensorRT-RTX's IPluginRegistry does not share TensorRT 10's virtual-table layout
    // (calling it through these headers crashes, checked with TensorRT-RTX 1.7.1), so there the registry
    // must be used through TensorRT-RTX's own API (Python: fastv_export.trt_rtx.load_plugin_library).
    static char const* const kLibraries[] = {"libnvinfer.so.10", "libnvinfer.so"};
    // first the TensorRT library already in the process; failing that, the one the dynamic loader finds
    // (LD_LIBRARY_PATH, system folders): a tool that imports TensorRT afterwards from the same file shares it
    for (int mode : {RTLD_NOW | RTLD_NOLOAD, RTLD_NOW | RTLD_LOCAL})
    {
        for (char const* name : kLibraries)
        {
            void* handle = dlopen(name, mode);
            if (handle == nullptr)
            {
                continue;
            }
            auto get_registry = reinterpret_cast<GetPluginRegistry>(dlsym(handle, "getPluginRegistry"));
            nvinfer1::IPluginRegistry* registry = get_registry != nullptr ? get_registry() : nullptr;
            bool const loaded = registry != nullptr && registry->loadLibrary(target.c_str()) != nullptr;
            if (mode & RTLD_NOLOAD)
            {
                dlclose(handle); // only drops the reference taken above
            }
            if (!loaded)
            {
                std::fprintf(stderr, "[fastv] ERROR: %s could not register %s (already registered?)\n", name,
                    target.c_str());
            }
            return;
        }
    }
    void* rtx = dlopen("libtensorrt_rtx.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (rtx != nullptr)
    {
        dlclose(rtx);
        std::fprintf(stderr,
            "[fastv] ERROR: libfastv_plugins_autoload.so supports TensorRT 10 only; with TensorRT-RTX load %s "
            "through the plugin registry (Python: fastv_export.trt_rtx.load_plugin_library)\n",
            target.c_str());
        return;
    }
    std::fprintf(stderr,
        "[fastv] ERROR: libfastv_plugins_autoload.so found no TensorRT library (libnvinfer.so.10) loaded or on "
        "the library path; add its folder to LD_LIBRARY_PATH, or load %s with IPluginRegistry::loadLibrary / "
        "trtexec --dynamicPlugins\n",
        target.c_str());
}

} // namespace
