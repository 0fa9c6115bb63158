// Host-only test library for the plugin class itself (src/token_select_plugin.cpp + token_select_host.cpp +
// this file, compiled with g++ against the TensorRT and CUDA headers; no CUDA code, no TensorRT library, no
// GPU). ts::enqueue is replaced by a stand-in that records the workspace size it is handed, so that
// tests/test_plugin_workspace.py can check what the plugin's enqueue passes on and when it refuses.
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "fastv/token_select_kernels.h"
#include "token_select_plugin.h"

using namespace nvinfer1;

namespace
{
size_t gPassedBytes = 0;
int32_t gEnqueueCalls = 0;
} // namespace

extern "C" char const* cudaGetErrorString(cudaError_t error)
{
    return error == cudaSuccess ? "no error" : "CUDA is not available in the host-only plugin test library";
}

namespace fastv
{
namespace ts
{
// the kernels' launcher, replaced: records the workspace size the plugin hands over
cudaError_t enqueue(Attributes const&, Shapes const&, ElementType, Buffers const&, void*, size_t workspace_bytes,
    cudaStream_t)
{
    gPassedBytes = workspace_bytes;
    ++gEnqueueCalls;
    return cudaSuccess;
}
} // namespace ts
} // namespace fastv

namespace
{
constexpr int kInputs = 6;
constexpr int kOutputs = 3;

Dims to_dims(int32_t rank, int64_t const* d)
{
    Dims out{};
    out.nbDims = rank;
    for (int32_t i = 0; i < rank; ++i)
    {
        out.d[i] = d[i];
    }
    return out;
}

DataType input_type(int i)
{
    return i < 3 ? DataType::kFLOAT : DataType::kINT64;
}

// a plugin made by the creator, as TensorRT makes it: "mean", R = 1/2, scale 0.25, and workspace_bytes when >= 0
IPluginV3* make_plugin(int64_t workspace_field, TensorRTPhase phase)
{
    static fastv::plugin::TokenSelectCreator creator;
    static char const ranking[] = "mean";
    static int64_t const num = 1, den = 2, keep = -1, seed = 0;
    static float const scale = 0.25f;
    std::vector<PluginField> fields = {{"ranking", ranking, PluginFieldType::kCHAR, 5},
        {"ratio_num", &num, PluginFieldType::kINT64, 1}, {"ratio_den", &den, PluginFieldType::kINT64, 1},
        {"keep", &keep, PluginFieldType::kINT64, 1}, {"scale", &scale, PluginFieldType::kFLOAT32, 1},
        {"seed", &seed, PluginFieldType::kINT64, 1}};
    if (workspace_field >= 0)
    {
        fields.push_back({"workspace_bytes", &workspace_field, PluginFieldType::kINT64, 1});
    }
    PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    return creator.createPlugin("token_select", &fc, phase);
}

template <typename T>
T* capability(IPluginV3* p, PluginCapabilityType type)
{
    return static_cast<T*>(p->getCapabilityInterface(type));
}

int64_t serialized_workspace(IPluginV3* p)
{
    PluginFieldCollection const* fc = capability<IPluginV3OneRuntime>(p, PluginCapabilityType::kRUNTIME)
                                          ->getFieldsToSerialize();
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
    {
        if (std::strcmp(fc->fields[i].name, "workspace_bytes") == 0)
        {
            return *static_cast<int64_t const*>(fc->fields[i].data);
        }
    }
    return -1;
}
} // namespace

extern "C"
{

// Build time: getWorkspaceSize for the maximum dims `max_dims` (6 x 8, ranks `ranks`) on a plugin made for the
// build, then a clone of it; `serialized` gets the "workspace_bytes" field of the clone's serialization (-1 when
// absent). Returns what getWorkspaceSize answered.
uint64_t fastv_plugin_host_build(int32_t const* ranks, int64_t const* max_dims, int64_t* serialized)
{
    IPluginV3* p = make_plugin(-1, TensorRTPhase::kBUILD);
    DynamicPluginTensorDesc in[kInputs]{};
    DynamicPluginTensorDesc out[kOutputs]{};
    for (int i = 0; i < kInputs; ++i)
    {
        in[i].max = in[i].opt = in[i].min = in[i].desc.dims = to_dims(ranks[i], max_dims + 8 * i);
        in[i].desc.type = input_type(i);
    }
    auto* build = capability<IPluginV3OneBuild>(p, PluginCapabilityType::kBUILD);
    size_t const bytes = build->getWorkspaceSize(in, kInputs, out, kOutputs);
    IPluginV3* copy = p->clone();
    *serialized = serialized_workspace(copy);
    delete copy;
    delete p;
    return bytes;
}

// Run time: a plugin made from serialized fields (workspace_bytes = `workspace_field`, -1: absent) runs with
// `dims`. Returns enqueue's result; `passed` gets the workspace size handed to the launcher, `calls` whether it
// was called (0 or 1).
int32_t fastv_plugin_host_run(int64_t workspace_field, int32_t const* ranks, int64_t const* dims, uint64_t* passed,
    int32_t* calls)
{
    IPluginV3* p = make_plugin(workspace_field, TensorRTPhase::kRUNTIME);
    if (p == nullptr)
    {
        return -2;
    }
    PluginTensorDesc in[kInputs]{};
    PluginTensorDesc out[kOutputs]{};
    for (int i = 0; i < kInputs; ++i)
    {
        in[i].dims = to_dims(ranks[i], dims + 8 * i);
        in[i].type = input_type(i);
        in[i].format = TensorFormat::kLINEAR;
    }
    auto* runtime = capability<IPluginV3OneRuntime>(p, PluginCapabilityType::kRUNTIME);
    int32_t rc = runtime->onShapeChange(in, kInputs, out, kOutputs);
    gPassedBytes = 0;
    gEnqueueCalls = 0;
    if (rc == 0)
    {
        static char buffer[64];
        void const* inputs[kInputs] = {buffer, buffer, buffer, buffer, buffer, buffer};
        void* outputs[kOutputs] = {buffer, buffer, buffer};
        rc = runtime->enqueue(in, out, inputs, outputs, buffer, nullptr);
    }
    *passed = gPassedBytes;
    *calls = gEnqueueCalls;
    delete p;
    return rc;
}

} // extern "C"
