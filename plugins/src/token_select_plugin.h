// fastv::TokenSelect as a TensorRT IPluginV3 (name "TokenSelect", version "1", namespace "fastv") and its
// creator. The op's contract is docs/token_select.md.
#ifndef FASTV_TOKEN_SELECT_PLUGIN_H
#define FASTV_TOKEN_SELECT_PLUGIN_H

#include <string>
#include <vector>

#include <NvInferRuntime.h>

#include "fastv/token_select_host.h"

namespace fastv
{
namespace plugin
{

constexpr char const* kPluginName = "TokenSelect";
constexpr char const* kPluginVersion = "1";
constexpr char const* kPluginNamespace = "fastv";

// Messages go to the logger that TensorRT hands over through setLoggerFinder (stderr without one).
void set_logger_finder(nvinfer1::ILoggerFinder* finder) noexcept;
void log(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept;
void log_error(std::string const& message) noexcept;

class TokenSelectPlugin final : public nvinfer1::IPluginV3,
                                public nvinfer1::IPluginV3OneCore,
                                public nvinfer1::IPluginV3OneBuild,
                                public nvinfer1::IPluginV3OneRuntime
{
public:
    // workspaceBytes: the workspace TensorRT reserved for this layer (the serialized field "workspace_bytes"),
    // -1 when unknown (at build time before getWorkspaceSize, or an engine serialized without the field)
    explicit TokenSelectPlugin(ts::Attributes const& attributes, int64_t workspaceBytes = -1);
    TokenSelectPlugin(TokenSelectPlugin const& other);
    TokenSelectPlugin& operator=(TokenSelectPlugin const&) = delete;
    ~TokenSelectPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
        nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs,
        int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    char const* getMetadataString() noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    // "" or the problem with these runtime (all known) or build-time (-1 = dynamic) dims
    std::string check_dims(nvinfer1::Dims const* dims, int32_t nbInputs, ts::Shapes& shapes) const;
    // validates the dims of `in` and caches them and their shapes for enqueue; false (logged) when invalid
    bool check_and_cache(nvinfer1::PluginTensorDesc const* in) noexcept;
    // true when `in` has exactly the dims cached by the last successful check_and_cache
    bool cached_dims_match(nvinfer1::PluginTensorDesc const* in) const noexcept;

    ts::Attributes mAttr;
    // the input dims validated by onShapeChange (or enqueue's slow path) and their shapes: enqueue, on the hot
    // path, only compares dims and reuses these (no validation, no allocation)
    nvinfer1::Dims mCachedDims[6]{};
    ts::Shapes mCachedShapes{};
    bool mCached{false};
    // The workspace TensorRT reserves for this layer: the largest size getWorkspaceSize() answered while the
    // engine was built (for the profiles' maximum shapes), serialized as "workspace_bytes" and read back at
    // runtime, where enqueue compares what these shapes need with it. -1: unknown (no check possible).
    mutable int64_t mWorkspaceBytes{-1};
    std::string mRanking;
    std::string mMetadata;
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

class TokenSelectCreator final : public nvinfer1::IPluginCreatorV3One
{
public:
    TokenSelectCreator();
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

// Parses the creator's fields into attributes; "" or a message naming the missing / malformed field.
// workspace_bytes (optional): the serialized field "workspace_bytes", -1 when absent.
std::string parse_fields(
    nvinfer1::PluginFieldCollection const* fc, ts::Attributes& out, int64_t* workspace_bytes = nullptr);

} // namespace plugin
} // namespace fastv

#endif // FASTV_TOKEN_SELECT_PLUGIN_H
