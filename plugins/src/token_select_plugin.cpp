// fastv::TokenSelect TensorRT plugin: build-time half (types, shapes, formats, workspace, serialisation)
// and runtime half (enqueue -> the CUDA launcher in token_select_kernels.cu).
#include "token_select_plugin.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <exception>
#include <mutex>
#include <sstream>

#include "fastv/token_select_kernels.h"
#include "fastv/token_select_math.h"

using namespace nvinfer1;

namespace fastv
{
namespace plugin
{
namespace
{

std::mutex gLoggerMutex;
ILoggerFinder* gLoggerFinder{nullptr};

constexpr int32_t kNbInputs = 6;
constexpr int32_t kNbOutputs = 3;
char const* const kInputNames[kNbInputs]
    = {"hidden_states", "query", "key", "attention_mask", "position_ids", "candidate_positions"};

char const* type_name(DataType t)
{
    switch (t)
    {
    case DataType::kFLOAT: return "float32";
    case DataType::kHALF: return "float16";
    case DataType::kBF16: return "bfloat16";
    case DataType::kINT8: return "int8";
    case DataType::kINT32: return "int32";
    case DataType::kINT64: return "int64";
    case DataType::kBOOL: return "bool";
    case DataType::kUINT8: return "uint8";
    default: return "another type";
    }
}

bool is_float_type(DataType t)
{
    return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16;
}

bool reads_attention(ts::Attributes const& a)
{
    return a.ranking == ts::kRankLast || a.ranking == ts::kRankMean;
}

std::string prefix(char const* node = nullptr)
{
    std::string p = "fastv::TokenSelect plugin";
    if (node != nullptr && node[0] != '\0')
    {
        p += std::string(" (node '") + node + "')";
    }
    return p + ": ";
}

// "" or the problem with the input data types
std::string check_types(DataType const* types, int32_t nbInputs)
{
    std::ostringstream os;
    if (nbInputs != kNbInputs)
    {
        os << "expects " << kNbInputs << " inputs, got " << nbInputs;
        return os.str();
    }
    if (!is_float_type(types[0]))
    {
        os << "input 0 'hidden_states' must be float32, float16 or bfloat16, got " << type_name(types[0]);
        return os.str();
    }
    for (int i = 1; i < 3; ++i)
    {
        if (types[i] != types[0])
        {
            os << "input " << i << " '" << kInputNames[i] << "' must have the type of hidden_states ("
               << type_name(types[0]) << "), got " << type_name(types[i]);
            return os.str();
        }
    }
    for (int i = 3; i < kNbInputs; ++i)
    {
        if (types[i] != DataType::kINT64)
        {
            os << "input " << i << " '" << kInputNames[i] << "' must be int64, got " << type_name(types[i]);
            return os.str();
        }
    }
    return "";
}

ts::TensorDims to_tensor_dims(Dims const& d)
{
    ts::TensorDims t;
    t.rank = d.nbDims;
    for (int32_t i = 0; i < d.nbDims && i < 8; ++i)
    {
        t.d[i] = d.d[i];
    }
    return t;
}

ts::TensorDims to_tensor_dims(DimsExprs const& d)
{
    ts::TensorDims t;
    t.rank = d.nbDims;
    for (int32_t i = 0; i < d.nbDims && i < 8; ++i)
    {
        t.d[i] = (d.d[i] != nullptr && d.d[i]->isConstant()) ? d.d[i]->getConstantValue() : -1;
    }
    return t;
}

// the error paths of enqueue (kept out of it: building the message allocates)
void log_workspace_error(size_t needed, size_t given) noexcept
{
    try
    {
        log_error("fastv::TokenSelect plugin: enqueue needs " + std::to_string(needed)
            + " bytes of workspace for these shapes, but the engine reserved " + std::to_string(given)
            + "; rebuild the engine with this plugin library");
    }
    catch (...)
    {
    }
}

void log_enqueue_error(cudaError_t status) noexcept
{
    try
    {
        log_error(std::string("fastv::TokenSelect plugin: enqueue failed: ") + cudaGetErrorString(status));
    }
    catch (...)
    {
    }
}

ts::ElementType element_type(DataType t)
{
    return t == DataType::kHALF ? ts::kF16 : (t == DataType::kBF16 ? ts::kBF16 : ts::kF32);
}

// reading plugin fields -------------------------------------------------------------------------------
bool field_int(PluginField const& f, int64_t& v)
{
    if (f.data == nullptr || f.length < 1)
    {
        return false;
    }
    switch (f.type)
    {
    case PluginFieldType::kINT64: v = *static_cast<int64_t const*>(f.data); return true;
    case PluginFieldType::kINT32: v = *static_cast<int32_t const*>(f.data); return true;
    case PluginFieldType::kINT16: v = *static_cast<int16_t const*>(f.data); return true;
    case PluginFieldType::kINT8: v = *static_cast<int8_t const*>(f.data); return true;
    default: return false;
    }
}

bool field_float(PluginField const& f, float& v)
{
    if (f.data == nullptr || f.length < 1)
    {
        return false;
    }
    switch (f.type)
    {
    case PluginFieldType::kFLOAT32: v = *static_cast<float const*>(f.data); return true;
    case PluginFieldType::kFLOAT64: v = static_cast<float>(*static_cast<double const*>(f.data)); return true;
    default: return false;
    }
}

bool field_string(PluginField const& f, std::string& v)
{
    if (f.type != PluginFieldType::kCHAR || (f.data == nullptr && f.length > 0) || f.length < 0)
    {
        return false;
    }
    char const* s = static_cast<char const*>(f.data);
    v.assign(s, s == nullptr ? 0 : strnlen(s, static_cast<size_t>(f.length)));
    return true;
}

} // namespace

// logging ---------------------------------------------------------------------------------------------------
void set_logger_finder(ILoggerFinder* finder) noexcept
{
    std::lock_guard<std::mutex> lock(gLoggerMutex);
    gLoggerFinder = finder;
}

static char const* severity_name(ILogger::Severity severity)
{
    switch (severity)
    {
    case ILogger::Severity::kINTERNAL_ERROR: return "INTERNAL_ERROR";
    case ILogger::Severity::kERROR: return "ERROR";
    case ILogger::Severity::kWARNING: return "WARNING";
    case ILogger::Severity::kINFO: return "INFO";
    default: return "VERBOSE";
    }
}

void log(ILogger::Severity severity, std::string const& message) noexcept
{
    try
    {
        ILogger* logger = nullptr;
        {
            std::lock_guard<std::mutex> lock(gLoggerMutex);
            logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
        }
        if (logger != nullptr)
        {
            logger->log(severity, message.c_str());
        }
        else if (severity <= ILogger::Severity::kWARNING)
        {
            // No logger to hand (TensorRT-RTX 1.7's logger finder returns none): errors and warnings go to
            // stderr in a fixed format, "[fastv] SEVERITY: message", that fastv_export.trt_rtx captures.
            std::fprintf(stderr, "[fastv] %s: %s\n", severity_name(severity), message.c_str());
            std::fflush(stderr);
        }
    }
    catch (...)
    {
    }
}

void log_error(std::string const& message) noexcept
{
    log(ILogger::Severity::kERROR, message);
}

std::string parse_fields(PluginFieldCollection const* fc, ts::Attributes& out, int64_t* workspace_bytes)
{
    if (workspace_bytes != nullptr)
    {
        *workspace_bytes = -1;
    }
    bool have_ranking = false, have_num = false, have_den = false, have_keep = false, have_scale = false,
         have_seed = false;
    std::string ranking;
    if (fc != nullptr)
    {
        for (int32_t i = 0; i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            std::string const name = f.name != nullptr ? f.name : "";
            bool ok = true;
            if (name == "ranking")
            {
                ok = have_ranking = field_string(f, ranking);
            }
            else if (name == "ratio_num")
            {
                ok = have_num = field_int(f, out.ratio_num);
            }
            else if (name == "ratio_den")
            {
                ok = have_den = field_int(f, out.ratio_den);
            }
            else if (name == "keep")
            {
                ok = have_keep = field_int(f, out.keep);
            }
            else if (name == "seed")
            {
                ok = have_seed = field_int(f, out.seed);
            }
            else if (name == "scale")
            {
                ok = have_scale = field_float(f, out.scale);
            }
            else if (name == "workspace_bytes") // written by getFieldsToSerialize, not an ONNX attribute
            {
                int64_t v = -1;
                ok = field_int(f, v) && v >= 0;
                if (ok && workspace_bytes != nullptr)
                {
                    *workspace_bytes = v;
                }
            }
            else if (name != "plugin_namespace" && name != "plugin_version")
            {
                log(ILogger::Severity::kWARNING, prefix() + "ignoring unknown attribute '" + name + "'");
            }
            if (!ok)
            {
                return "attribute '" + name + "' has the wrong type or no value (ranking: string; ratio_num, "
                       "ratio_den, keep, seed: int; scale: float)";
            }
        }
    }
    if (!have_ranking)
    {
        return "missing attribute 'ranking' (last, mean or random)";
    }
    out.ranking = ts::ranking_from_name(ranking);
    if (out.ranking < 0)
    {
        return "attribute 'ranking' must be one of last, mean, random; got '" + ranking + "'";
    }
    char const* missing = !have_num ? "ratio_num"
        : !have_den                 ? "ratio_den"
        : !have_keep                ? "keep"
        : (!have_scale && out.ranking != ts::kRankRandom) ? "scale"
        : (!have_seed && out.ranking == ts::kRankRandom)  ? "seed"
                                                           : nullptr;
    if (missing != nullptr)
    {
        return std::string("missing attribute '") + missing + "'";
    }
    return ts::validate_attributes(out);
}

// plugin ----------------------------------------------------------------------------------------------------
TokenSelectPlugin::TokenSelectPlugin(ts::Attributes const& attributes, int64_t workspaceBytes)
    : mAttr(attributes)
    , mWorkspaceBytes(workspaceBytes)
    , mRanking(ts::ranking_name(attributes.ranking))
{
}

TokenSelectPlugin::TokenSelectPlugin(TokenSelectPlugin const& other)
    : IPluginV3(other)
    , IPluginV3OneCore(other)
    , IPluginV3OneBuild(other)
    , IPluginV3OneRuntime(other)
    , mAttr(other.mAttr)
    , mCachedShapes(other.mCachedShapes)
    , mCached(other.mCached)
    , mWorkspaceBytes(other.mWorkspaceBytes)
    , mRanking(other.mRanking)
{
    for (int i = 0; i < kNbInputs; ++i)
    {
        mCachedDims[i] = other.mCachedDims[i];
    }
}

IPluginCapability* TokenSelectPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* TokenSelectPlugin::clone() noexcept
{
    try
    {
        return new TokenSelectPlugin(*this);
    }
    catch (std::exception const& e)
    {
        log_error(prefix() + "clone failed: " + e.what());
    }
    return nullptr;
}

char const* TokenSelectPlugin::getPluginName() const noexcept
{
    return kPluginName;
}

char const* TokenSelectPlugin::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* TokenSelectPlugin::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

int32_t TokenSelectPlugin::getNbOutputs() const noexcept
{
    return kNbOutputs;
}

int32_t TokenSelectPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    try
    {
        std::string const err = check_types(inputTypes, nbInputs);
        if (!err.empty() || nbOutputs != kNbOutputs)
        {
            log_error(prefix() + (err.empty() ? "expects 3 outputs" : err));
            return -1;
        }
        outputTypes[0] = inputTypes[0];
        outputTypes[1] = DataType::kINT64;
        outputTypes[2] = DataType::kINT64;
        return 0;
    }
    catch (...)
    {
        return -1;
    }
}

int32_t TokenSelectPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& eb) noexcept
{
    try
    {
        if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
        {
            log_error(prefix() + "expects 6 inputs and 3 outputs");
            return -1;
        }
        ts::TensorDims dims[kNbInputs];
        for (int i = 0; i < kNbInputs; ++i)
        {
            dims[i] = to_tensor_dims(inputs[i]);
        }
        ts::Shapes shapes;
        std::string err = ts::collect_shapes(dims, reads_attention(mAttr), shapes);
        if (err.empty())
        {
            err = ts::validate_shapes(mAttr, shapes);
        }
        if (!err.empty())
        {
            log_error(prefix() + err);
            return -1;
        }
        // N' = N - M + keep(M), integer expressions of the input shapes only
        IDimensionExpr const* n = inputs[0].d[1];
        IDimensionExpr const* m = inputs[5].d[1];
        IDimensionExpr const* n_kept = nullptr;
        if (mAttr.keep >= 0)
        {
            IDimensionExpr const* keep_m = eb.operation(DimensionOperation::kMIN, *eb.constant(mAttr.keep), *m);
            n_kept = eb.operation(DimensionOperation::kSUM, *eb.operation(DimensionOperation::kSUB, *n, *m), *keep_m);
        }
        else if (mAttr.ratio_num == 0)
        {
            n_kept = n; // nothing dropped
        }
        else
        {
            // N - floor(M * num / den)
            IDimensionExpr const* dropped = eb.operation(DimensionOperation::kFLOOR_DIV,
                *eb.operation(DimensionOperation::kPROD, *m, *eb.constant(mAttr.ratio_num)),
                *eb.constant(mAttr.ratio_den));
            n_kept = eb.operation(DimensionOperation::kSUB, *n, *dropped);
        }
        outputs[0].nbDims = 3;
        outputs[0].d[0] = inputs[0].d[0];
        outputs[0].d[1] = n_kept;
        outputs[0].d[2] = inputs[0].d[2];
        DimsExprs const& pos = inputs[4];
        outputs[1].nbDims = pos.nbDims;
        for (int32_t i = 0; i + 1 < pos.nbDims; ++i)
        {
            outputs[1].d[i] = pos.d[i];
        }
        outputs[1].d[pos.nbDims - 1] = n_kept;
        outputs[2].nbDims = 2;
        outputs[2].d[0] = inputs[0].d[0];
        outputs[2].d[1] = n_kept;
        return 0;
    }
    catch (...)
    {
        return -1;
    }
}

bool TokenSelectPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0 || pos >= kNbInputs + kNbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case 0: return is_float_type(d.type);
    case 1:
    case 2:
    case kNbInputs: return d.type == inOut[0].desc.type; // query, key, selected_hidden_states
    default: return d.type == DataType::kINT64;
    }
}

std::string TokenSelectPlugin::check_dims(Dims const* dims, int32_t nbInputs, ts::Shapes& shapes) const
{
    if (nbInputs != kNbInputs)
    {
        return "expects 6 inputs";
    }
    ts::TensorDims t[kNbInputs];
    for (int i = 0; i < kNbInputs; ++i)
    {
        t[i] = to_tensor_dims(dims[i]);
    }
    std::string err = ts::collect_shapes(t, reads_attention(mAttr), shapes);
    return err.empty() ? ts::validate_shapes(mAttr, shapes) : err;
}

int32_t TokenSelectPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    try
    {
        if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
        {
            log_error(prefix() + "expects 6 inputs and 3 outputs");
            return -1;
        }
        DataType types[kNbInputs];
        Dims dims[kNbInputs];
        Dims max_dims[kNbInputs];
        for (int i = 0; i < kNbInputs; ++i)
        {
            types[i] = in[i].desc.type;
            dims[i] = in[i].desc.dims;
            max_dims[i] = in[i].max;
        }
        std::string err = check_types(types, nbInputs);
        ts::Shapes shapes;
        if (err.empty())
        {
            err = check_dims(dims, nbInputs, shapes);
        }
        if (err.empty() && max_dims[0].nbDims == dims[0].nbDims)
        {
            err = check_dims(max_dims, nbInputs, shapes); // the profile's largest shapes
        }
        if (!err.empty())
        {
            log_error(prefix() + err);
            return -1;
        }
        (void) out;
        return 0;
    }
    catch (...)
    {
        return -1;
    }
}

size_t TokenSelectPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    try
    {
        if (nbInputs != kNbInputs)
        {
            return 0;
        }
        Dims max_dims[kNbInputs];
        for (int i = 0; i < kNbInputs; ++i)
        {
            max_dims[i] = inputs[i].max;
        }
        ts::Shapes shapes;
        if (!check_dims(max_dims, nbInputs, shapes).empty())
        {
            return 0;
        }
        size_t const bytes = ts::workspace_size(mAttr, shapes);
        // what TensorRT reserves for this layer: serialized, so that enqueue can check against it at runtime
        mWorkspaceBytes = std::max(mWorkspaceBytes, static_cast<int64_t>(bytes));
        return bytes;
    }
    catch (...)
    {
        return 0;
    }
}

char const* TokenSelectPlugin::getMetadataString() noexcept
{
    try
    {
        std::ostringstream os;
        os << "ranking=" << mRanking << " ratio=" << mAttr.ratio_num << "/" << mAttr.ratio_den << " keep=" << mAttr.keep
           << " scale=" << mAttr.scale << " seed=" << mAttr.seed;
        mMetadata = os.str();
        return mMetadata.c_str();
    }
    catch (...)
    {
        return nullptr;
    }
}

bool TokenSelectPlugin::check_and_cache(PluginTensorDesc const* in) noexcept
{
    try
    {
        mCached = false;
        Dims dims[kNbInputs];
        for (int i = 0; i < kNbInputs; ++i)
        {
            dims[i] = in[i].dims;
        }
        ts::Shapes shapes;
        std::string const err = check_dims(dims, kNbInputs, shapes);
        if (!err.empty())
        {
            log_error(prefix() + err);
            return false;
        }
        for (int i = 0; i < kNbInputs; ++i)
        {
            mCachedDims[i] = dims[i];
        }
        mCachedShapes = shapes;
        mCached = true;
        return true;
    }
    catch (...)
    {
        return false;
    }
}

bool TokenSelectPlugin::cached_dims_match(PluginTensorDesc const* in) const noexcept
{
    if (!mCached)
    {
        return false;
    }
    for (int i = 0; i < kNbInputs; ++i)
    {
        Dims const& a = in[i].dims;
        Dims const& b = mCachedDims[i];
        if (a.nbDims != b.nbDims)
        {
            return false;
        }
        for (int32_t j = 0; j < a.nbDims; ++j)
        {
            if (a.d[j] != b.d[j])
            {
                return false;
            }
        }
    }
    return true;
}

int32_t TokenSelectPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
    {
        log_error("fastv::TokenSelect plugin: expects 6 inputs and 3 outputs");
        mCached = false;
        return -1;
    }
    // validated here, once per shape change: enqueue only compares dims
    return check_and_cache(in) ? 0 : -1;
}

int32_t TokenSelectPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    // Hot path: no validation and no allocation. The dims were validated by onShapeChange; TensorRT calls it
    // before enqueue whenever they change, so a mismatch (re-checked once, logged if invalid) is unexpected.
    if (!cached_dims_match(inputDesc) && !check_and_cache(inputDesc))
    {
        return -1;
    }
    ts::Shapes const& shapes = mCachedShapes;
    ts::Buffers io;
    io.hidden_states = inputs[0];
    io.query = inputs[1];
    io.key = inputs[2];
    io.attention_mask = static_cast<int64_t const*>(inputs[3]);
    io.position_ids = static_cast<int64_t const*>(inputs[4]);
    io.candidate_positions = static_cast<int64_t const*>(inputs[5]);
    io.selected_hidden_states = outputs[0];
    io.selected_position_ids = static_cast<int64_t*>(outputs[1]);
    io.kept_indices = static_cast<int64_t*>(outputs[2]);
    // TensorRT hands over the workspace it reserved for this layer, what getWorkspaceSize() answered at build
    // time (serialized as "workspace_bytes"); these shapes must not need more (a library whose workspace
    // layout grew since the engine was built would). Unknown (an engine without the field): assumed to fit.
    size_t const needed = ts::workspace_size(mAttr, shapes);
    size_t const given = mWorkspaceBytes >= 0 ? static_cast<size_t>(mWorkspaceBytes) : needed;
    if (needed > given)
    {
        log_workspace_error(needed, given);
        return -1;
    }
    cudaError_t const status
        = ts::enqueue(mAttr, shapes, element_type(inputDesc[0].type), io, workspace, given, stream);
    if (status != cudaSuccess)
    {
        log_enqueue_error(status);
        return -1;
    }
    return 0;
}

IPluginV3* TokenSelectPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

PluginFieldCollection const* TokenSelectPlugin::getFieldsToSerialize() noexcept
{
    try
    {
        mFields.clear();
        mFields.emplace_back("ranking", mRanking.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(mRanking.size() + 1));
        mFields.emplace_back("ratio_num", &mAttr.ratio_num, PluginFieldType::kINT64, 1);
        mFields.emplace_back("ratio_den", &mAttr.ratio_den, PluginFieldType::kINT64, 1);
        mFields.emplace_back("keep", &mAttr.keep, PluginFieldType::kINT64, 1);
        mFields.emplace_back("scale", &mAttr.scale, PluginFieldType::kFLOAT32, 1);
        mFields.emplace_back("seed", &mAttr.seed, PluginFieldType::kINT64, 1);
        if (mWorkspaceBytes >= 0)
        {
            mFields.emplace_back("workspace_bytes", &mWorkspaceBytes, PluginFieldType::kINT64, 1);
        }
        mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
        mFieldCollection.fields = mFields.data();
        return &mFieldCollection;
    }
    catch (...)
    {
        return nullptr;
    }
}

// creator ---------------------------------------------------------------------------------------------------
TokenSelectCreator::TokenSelectCreator()
{
    mFieldNames.emplace_back("ranking", nullptr, PluginFieldType::kCHAR, 0);
    mFieldNames.emplace_back("ratio_num", nullptr, PluginFieldType::kINT64, 1);
    mFieldNames.emplace_back("ratio_den", nullptr, PluginFieldType::kINT64, 1);
    mFieldNames.emplace_back("keep", nullptr, PluginFieldType::kINT64, 1);
    mFieldNames.emplace_back("scale", nullptr, PluginFieldType::kFLOAT32, 1);
    mFieldNames.emplace_back("seed", nullptr, PluginFieldType::kINT64, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

IPluginV3* TokenSelectCreator::createPlugin(char const* name, PluginFieldCollection const* fc, TensorRTPhase) noexcept
{
    try
    {
        ts::Attributes attributes;
        int64_t workspace_bytes = -1;
        std::string const err = parse_fields(fc, attributes, &workspace_bytes);
        if (!err.empty())
        {
            log_error(prefix(name) + err);
            return nullptr;
        }
        return new TokenSelectPlugin(attributes, workspace_bytes);
    }
    catch (std::exception const& e)
    {
        log_error(prefix(name) + "createPlugin failed: " + e.what());
    }
    catch (...)
    {
    }
    return nullptr;
}

PluginFieldCollection const* TokenSelectCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

char const* TokenSelectCreator::getPluginName() const noexcept
{
    return kPluginName;
}

char const* TokenSelectCreator::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* TokenSelectCreator::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

} // namespace plugin
} // namespace fastv
