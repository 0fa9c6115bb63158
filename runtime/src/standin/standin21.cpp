// TEMPORARY stand-ins (see standin21.hpp): they refuse every call.
#include "standin21.hpp"

namespace fastv {

#if !__has_include("fastv/tokenizer.hpp")
Tokenizer Tokenizer::load(const std::filesystem::path&) { throw Error("the C++ tokenizer is not built in yet"); }
std::vector<int64_t> Tokenizer::encode(const std::string&, bool) const { return {}; }
std::string Tokenizer::decode(const std::vector<int64_t>&, bool) const { return ""; }
std::optional<int64_t> Tokenizer::token_id(const std::string&) const { return std::nullopt; }
std::string StreamDecoder::push(int64_t) { return ""; }
std::string StreamDecoder::finish() { return ""; }
#endif

#if !__has_include("fastv/image.hpp")
Image read_image(const std::filesystem::path&) { throw Error("the C++ image reader is not built in yet"); }
ImageProcessor ImageProcessor::load(const std::filesystem::path&) { return {}; }
Pixels ImageProcessor::process(const Image&) const { throw Error("the C++ image processor is not built in yet"); }
#endif

}  // namespace fastv
