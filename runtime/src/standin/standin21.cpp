// TEMPORARY stand-ins (see standin21.hpp): they refuse every call.
#include "standin21.hpp"

namespace fastv {

#if !__has_include("fastv/image.hpp")
Image read_image(const std::filesystem::path&) { throw Error("the C++ image reader is not built in yet"); }
ImageProcessor ImageProcessor::load(const std::filesystem::path&) { return {}; }
Pixels ImageProcessor::process(const Image&) const { throw Error("the C++ image processor is not built in yet"); }
#endif

}  // namespace fastv
