// fastv::TokenSelect: the CUDA launch interface (no TensorRT types), used by the TensorRT plugin and by
// the library's extern "C" test entry points.
#ifndef FASTV_TOKEN_SELECT_KERNELS_H
#define FASTV_TOKEN_SELECT_KERNELS_H

#include <cuda_runtime_api.h>

#include "fastv/token_select_host.h"

namespace fastv
{
namespace ts
{

// Launches the whole op on `stream`. No allocation, no synchronisation. Returns cudaSuccess or the
// launch error. Rows whose candidate positions are not strictly ascending within [0, N) get
// kept_indices = -1, position ids = -1 and NaN hidden states (a loud, never out-of-bounds result).
cudaError_t enqueue(Attributes const& a, Shapes const& s, ElementType type, Buffers const& io, void* workspace,
    size_t workspace_bytes, cudaStream_t stream);

} // namespace ts
} // namespace fastv

#endif // FASTV_TOKEN_SELECT_KERNELS_H
