// The plugin-library entry points that TensorRT's plugin registry (IPluginRegistry::loadLibrary, trtexec
// --dynamicPlugins / --staticPlugins, polygraphy --plugins) looks up with dlsym.
#include <cstdint>

#include <NvInferRuntime.h>

#include "token_select_plugin.h"

#define FASTV_EXPORT __attribute__((visibility("default")))

extern "C"
{

// TensorRT hands over the logger finder before asking for the creators.
FASTV_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    fastv::plugin::set_logger_finder(finder);
}

// The IPluginV3 creators of this library: TokenSelect (version "1", namespace "fastv").
FASTV_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static fastv::plugin::TokenSelectCreator tokenSelectCreator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&tokenSelectCreator};
    nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
    return creators;
}

} // extern "C"
