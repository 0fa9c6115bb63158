// A small driver of the C API (fastv_ts_*) for compute-sanitizer: every ranking x dtype on a small batch with
// left padding, a past, GQA and one malformed row, plus N' = 0 and M = 0. Built and run by scripts/gpu_check.sh
// against libfastv_ts_kernels.so (nvcc c_api_driver.cpp -lfastv_ts_kernels). Exit status 0 = every call
// returned 0 and every well-formed row's kept indices ascend within [0, N).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

extern "C"
{
char const* fastv_ts_last_error();
int64_t fastv_ts_kept_length(int64_t n, int64_t m, int32_t ranking, int64_t num, int64_t den, int64_t keep);
uint64_t fastv_ts_workspace_size(int32_t ranking, int64_t num, int64_t den, int64_t keep, int64_t const* dims);
int32_t fastv_ts_run(int32_t ranking, int64_t num, int64_t den, int64_t keep, float scale, int64_t seed, int32_t dtype,
    int64_t const* dims, void const* hidden, void const* query, void const* key, int64_t const* mask,
    int64_t const* pos, int64_t const* cand, void* out_hidden, int64_t* out_pos, int64_t* kept, void* workspace,
    uint64_t workspace_bytes, void* stream);
}

namespace
{

#define CHECK(x)                                                                                                       \
    do                                                                                                                 \
    {                                                                                                                  \
        cudaError_t e_ = (x);                                                                                          \
        if (e_ != cudaSuccess)                                                                                         \
        {                                                                                                              \
            std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));                   \
            return false;                                                                                              \
        }                                                                                                              \
    } while (0)

std::vector<uint8_t> floats(size_t count, int dtype, std::mt19937& rng)
{
    std::normal_distribution<float> dist(0.0f, 1.0f);
    size_t const elem = dtype == 0 ? 4 : 2;
    std::vector<uint8_t> out(count * elem);
    for (size_t i = 0; i < count; ++i)
    {
        float const v = dist(rng);
        if (dtype == 0)
        {
            std::memcpy(&out[i * 4], &v, 4);
        }
        else if (dtype == 1)
        {
            __half const h = __float2half_rn(v);
            std::memcpy(&out[i * 2], &h, 2);
        }
        else
        {
            __nv_bfloat16 const h = __float2bfloat16_rn(v);
            std::memcpy(&out[i * 2], &h, 2);
        }
    }
    return out;
}

template <typename T>
bool upload(std::vector<T> const& host, void** dev)
{
    CHECK(cudaMalloc(dev, host.empty() ? 1 : host.size() * sizeof(T)));
    if (!host.empty())
    {
        CHECK(cudaMemcpy(*dev, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
    }
    return true;
}

// one call; false on any failure
bool run_case(int32_t ranking, int32_t dtype, int64_t b, int64_t n, int64_t m, int64_t past, int64_t keep,
    bool malformed_row, cudaStream_t stream)
{
    std::mt19937 rng(static_cast<uint32_t>(ranking * 100 + dtype * 10 + n));
    int64_t const h = 4, hkv = 2, d = 64, d_model = 16, s = past + n;
    int64_t const nq = ranking == 1 ? n : 1;
    int64_t const dims[10] = {b, n, d_model, h, nq, d, hkv, s, m, 1};
    int64_t const n_kept = fastv_ts_kept_length(n, m, ranking, 1, 2, keep);
    uint64_t const ws_bytes = fastv_ts_workspace_size(ranking, 1, 2, keep, dims);
    if (n_kept < 0 || ws_bytes == 0)
    {
        std::fprintf(stderr, "invalid case: %s\n", fastv_ts_last_error());
        return false;
    }
    std::vector<uint8_t> const hidden = floats(static_cast<size_t>(b * n * d_model), dtype, rng);
    std::vector<uint8_t> const query = floats(static_cast<size_t>(b * h * nq * d), dtype, rng);
    std::vector<uint8_t> const key = floats(static_cast<size_t>(b * hkv * s * d), dtype, rng);
    std::vector<int64_t> mask(static_cast<size_t>(b * s), 1), pos(static_cast<size_t>(b * n)),
        cand(static_cast<size_t>(b * m));
    for (int64_t r = 0; r < b; ++r)
    {
        int64_t const pad = r % 2 == 1 ? 4 : 0;
        for (int64_t j = 0; j < pad; ++j)
        {
            mask[static_cast<size_t>(r * s + j)] = 0;
        }
        for (int64_t t = 0; t < n; ++t)
        {
            pos[static_cast<size_t>(r * n + t)] = 1000 * r + t;
        }
        for (int64_t i = 0; i < m; ++i) // m ascending positions out of n, spread evenly
        {
            cand[static_cast<size_t>(r * m + i)] = (i * n) / m;
        }
    }
    if (malformed_row && b > 1 && m > 1)
    {
        cand[static_cast<size_t>(m + 1)] = cand[static_cast<size_t>(m)]; // row 1: a duplicate
    }
    void *dh, *dq, *dk, *dm, *dp, *dc, *oh, *op, *ok, *ws;
    if (!upload(hidden, &dh) || !upload(query, &dq) || !upload(key, &dk) || !upload(mask, &dm) || !upload(pos, &dp)
        || !upload(cand, &dc))
    {
        return false;
    }
    size_t const elem = dtype == 0 ? 4 : 2;
    CHECK(cudaMalloc(&oh, static_cast<size_t>(b * (n_kept > 0 ? n_kept : 1) * d_model) * elem));
    CHECK(cudaMalloc(&op, static_cast<size_t>(b * (n_kept > 0 ? n_kept : 1)) * 8));
    CHECK(cudaMalloc(&ok, static_cast<size_t>(b * (n_kept > 0 ? n_kept : 1)) * 8));
    CHECK(cudaMalloc(&ws, ws_bytes));
    int32_t const rc = fastv_ts_run(ranking, 1, 2, keep, 0.125f, 7, dtype, dims, dh, dq, dk,
        static_cast<int64_t const*>(dm), static_cast<int64_t const*>(dp), static_cast<int64_t const*>(dc), oh,
        static_cast<int64_t*>(op), static_cast<int64_t*>(ok), ws, ws_bytes, stream);
    CHECK(cudaStreamSynchronize(stream));
    bool good = rc == 0;
    if (!good)
    {
        std::fprintf(stderr, "fastv_ts_run returned %d: %s\n", rc, fastv_ts_last_error());
    }
    if (good && n_kept > 0)
    {
        std::vector<int64_t> kept(static_cast<size_t>(b * n_kept));
        CHECK(cudaMemcpy(kept.data(), ok, kept.size() * 8, cudaMemcpyDeviceToHost));
        for (int64_t r = 0; r < b; ++r)
        {
            bool const poisoned = malformed_row && r == 1 && m > 1;
            for (int64_t o = 0; o < n_kept; ++o)
            {
                int64_t const v = kept[static_cast<size_t>(r * n_kept + o)];
                bool const ok_value = poisoned ? v == -1
                                               : (v >= 0 && v < n && (o == 0 || v > kept[static_cast<size_t>(r * n_kept + o - 1)]));
                if (!ok_value)
                {
                    std::fprintf(stderr, "row %lld: kept[%lld] = %lld\n", static_cast<long long>(r),
                        static_cast<long long>(o), static_cast<long long>(v));
                    good = false;
                    break;
                }
            }
        }
    }
    for (void* p : {dh, dq, dk, dm, dp, dc, oh, op, ok, ws})
    {
        CHECK(cudaFree(p));
    }
    return good;
}

} // namespace

int main()
{
    cudaStream_t stream;
    if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess)
    {
        std::fprintf(stderr, "no CUDA device\n");
        return 2;
    }
    int failures = 0;
    int cases = 0;
    for (int32_t ranking = 0; ranking < 3; ++ranking)
    {
        for (int32_t dtype = 0; dtype < 3; ++dtype)
        {
            failures += run_case(ranking, dtype, 3, 70, 33, 5, -1, true, stream) ? 0 : 1;
            ++cases;
        }
        failures += run_case(ranking, 0, 2, 300, 140, 0, -1, false, stream) ? 0 : 1; // several tiles
        failures += run_case(ranking, 0, 2, 16, 16, 0, 0, false, stream) ? 0 : 1;    // N' = 0
        failures += run_case(ranking, 0, 2, 16, 0, 0, -1, false, stream) ? 0 : 1;    // M = 0
        cases += 3;
    }
    cudaStreamDestroy(stream);
    std::printf("c_api_driver: %d of %d cases passed\n", cases - failures, cases);
    return failures == 0 ? 0 : 1;
}
