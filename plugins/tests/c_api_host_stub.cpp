// Host-only stand-ins for the two CUDA symbols that src/c_api.cpp uses, so that tests can compile the C API
// (c_api.cpp + token_select_host.cpp + this file) with g++ alone and check its argument validation through
// ctypes on a machine without nvcc or a GPU (tests/test_edge_cases.py). Never linked into a real library.
#include "fastv/token_select_kernels.h"

extern "C" char const* cudaGetErrorString(cudaError_t error)
{
    return error == cudaSuccess ? "no error" : "CUDA is not available in the host-only C API test library";
}

namespace fastv
{
namespace ts
{

cudaError_t enqueue(Attributes const&, Shapes const&, ElementType, Buffers const&, void*, size_t, cudaStream_t)
{
    return cudaErrorNoDevice;
}

} // namespace ts
} // namespace fastv
