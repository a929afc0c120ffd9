// Causal GQA attention over the f32 KV cache, flash style: a block takes 16
// queries of one head and walks the keys in tiles of 32 held in shared memory,
// keeping a running max, sum and unnormalised output per query (softmax in
// f32 with expf). Lane j of a warp scores key j of the tile; the output
// accumulates over the tile with the probabilities broadcast by shuffles.
//
// Shaped (a template flag, so the plain kernel is unchanged): a sliding window
// (keys before a query's window are masked, and tiles before the first query's
// window are skipped), the ALiBi term and soft-capping applied to each score.
//
// Decode splits the keys across blocks (n_splits pieces of split_len keys);
// each piece writes its max, sum and unnormalised output, and a second kernel
// merges them. The split is fixed by the cache length, not the position, so one
// captured decode graph serves every step; pieces past the last key exit early.
#include <algorithm>
#include <cmath>

#include "kernels.h"

namespace pyllm {
namespace cuda {

namespace {

constexpr int kQueriesPerWarp = 4;
constexpr int kWarps = 4;
constexpr int kQueryTile = kQueriesPerWarp * kWarps;  // 16
constexpr int kKeyTile = 32;

size_t attention_smem_bytes(int64_t D) {
    // queries [16][D], keys [32][D + 4] (padded: conflict-free 16-byte reads by row), values [32][D]
    return sizeof(float) * (size_t)(kQueryTile * D + kKeyTile * (D + 4) + kKeyTile * D);
}

// DPL: head values per lane (D <= 32 * DPL). Shaped: apply `shaping` (else it is ignored).
template <int DPL, bool Shaped>
__global__ void __launch_bounds__(kWarps * 32)
    attention_kernel(const float* __restrict__ q, int64_t ldq, const float* __restrict__ k_cache,
                     const float* __restrict__ v_cache, int M, int n_heads, int n_kv_heads, int D, int64_t cache_len,
                     const int32_t* __restrict__ positions, float scale, float* __restrict__ out, int64_t ldo,
                     int n_splits, int split_len, float* __restrict__ partial_stats, float* __restrict__ partial_out,
                     AttentionShaping shaping) {
    extern __shared__ float4 smem4[];
    float* q_tile = reinterpret_cast<float*>(smem4);
    const int ldk = D + 4;
    float* k_tile = q_tile + kQueryTile * D;
    float* v_tile = k_tile + kKeyTile * ldk;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int m0 = blockIdx.x * kQueryTile, h = blockIdx.y, split = blockIdx.z;
    const int m_last = min(m0 + kQueryTile, M) - 1;
    const int kv = h / (n_heads / n_kv_heads);
    const float* keys = k_cache + (int64_t)kv * cache_len * D;
    const float* values = v_cache + (int64_t)kv * cache_len * D;
    const int64_t n_keys = (int64_t)positions[m_last] + 1;  // keys the tile's last query sees
    const int64_t key_begin = (int64_t)split * split_len;
    const int64_t key_end = n_splits == 1 ? n_keys : min(n_keys, key_begin + split_len);
    int64_t key_first = key_begin;  // the first key any query of the tile may see
    if (Shaped && shaping.window > 0)  // the tile's first query has the lowest position
        key_first = max(key_begin, (int64_t)positions[m0] - shaping.window + 1);
    float alibi_slope = 0.0f, softcap_inverse = 0.0f;
    if (Shaped) {
        if (shaping.alibi != nullptr) alibi_slope = shaping.alibi[h];
        if (shaping.softcap > 0.0f) softcap_inverse = 1.0f / shaping.softcap;
    }

    for (int i = tid; i < kQueryTile * D; i += blockDim.x) {
        const int r = i / D, d = i % D;
        q_tile[i] = m0 + r < M ? q[(int64_t)(m0 + r) * ldq + (int64_t)h * D + d] * scale : 0.0f;
    }

    float run_max[kQueriesPerWarp], run_sum[kQueriesPerWarp], acc[kQueriesPerWarp][DPL];
    int64_t query_pos[kQueriesPerWarp];
#pragma unroll
    for (int s = 0; s < kQueriesPerWarp; ++s) {
        run_max[s] = -INFINITY;
        run_sum[s] = 0.0f;
        const int m = m0 + warp * kQueriesPerWarp + s;
        query_pos[s] = m < M ? (int64_t)positions[m] : -1;  // -1: no query, sees no key
#pragma unroll
        for (int d = 0; d < DPL; ++d) acc[s][d] = 0.0f;
    }

    for (int64_t t0 = key_first; t0 < key_end; t0 += kKeyTile) {
        __syncthreads();  // q_tile written / previous tile consumed
        const int D4 = D / 4;
        for (int i = tid; i < kKeyTile * D4; i += blockDim.x) {
            const int r = i / D4, d4 = i % D4;
            const int64_t t = t0 + r;
            float4 kv4 = make_float4(0.f, 0.f, 0.f, 0.f), vv4 = kv4;
            if (t < key_end) {  // rows past the end stay zero: never multiply garbage
                kv4 = *reinterpret_cast<const float4*>(keys + t * D + 4 * d4);
                vv4 = *reinterpret_cast<const float4*>(values + t * D + 4 * d4);
            }
            *reinterpret_cast<float4*>(k_tile + r * ldk + 4 * d4) = kv4;
            *reinterpret_cast<float4*>(v_tile + r * D + 4 * d4) = vv4;
        }
        __syncthreads();

        const int64_t t = t0 + lane;
        float score[kQueriesPerWarp];
#pragma unroll
        for (int s = 0; s < kQueriesPerWarp; ++s) score[s] = 0.0f;
        const float* k_row = k_tile + lane * ldk;
        for (int d = 0; d < D; d += 4) {
            const float4 kk = *reinterpret_cast<const float4*>(k_row + d);
#pragma unroll
            for (int s = 0; s < kQueriesPerWarp; ++s) {
                const float4 qq = *reinterpret_cast<const float4*>(q_tile + (warp * kQueriesPerWarp + s) * D + d);
                score[s] = fmaf(qq.x, kk.x, fmaf(qq.y, kk.y, fmaf(qq.z, kk.z, fmaf(qq.w, kk.w, score[s]))));
            }
        }
        if (Shaped) {
#pragma unroll
            for (int s = 0; s < kQueriesPerWarp; ++s) {
                if (shaping.alibi != nullptr) score[s] += alibi_slope * (float)(t - query_pos[s]);
                if (shaping.softcap > 0.0f) score[s] = shaping.softcap * tanhf(score[s] * softcap_inverse);
            }
        }
        float prob[kQueriesPerWarp];
#pragma unroll
        for (int s = 0; s < kQueriesPerWarp; ++s) {
            bool visible = t < key_end && t <= query_pos[s];
            if (Shaped && shaping.window > 0) visible = visible && t > query_pos[s] - shaping.window;
            float tile_max = visible ? score[s] : -INFINITY;
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1)
                tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
            const float new_max = fmaxf(run_max[s], tile_max);
            prob[s] = 0.0f;
            if (new_max == -INFINITY) continue;  // nothing visible yet (uniform across the warp)
            const float correction = expf(run_max[s] - new_max);  // 0 when run_max is -inf
            prob[s] = visible ? expf(score[s] - new_max) : 0.0f;
            float tile_sum = prob[s];
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1) tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, offset);
            run_sum[s] = run_sum[s] * correction + tile_sum;
            run_max[s] = new_max;
#pragma unroll
            for (int d = 0; d < DPL; ++d) acc[s][d] *= correction;
        }
        for (int j = 0; j < kKeyTile; ++j) {
            const float* v_row = v_tile + j * D;
            float v[DPL];
#pragma unroll
            for (int d = 0; d < DPL; ++d) v[d] = lane + 32 * d < D ? v_row[lane + 32 * d] : 0.0f;
#pragma unroll
            for (int s = 0; s < kQueriesPerWarp; ++s) {
                const float p = __shfl_sync(0xffffffffu, prob[s], j);
#pragma unroll
                for (int d = 0; d < DPL; ++d) acc[s][d] = fmaf(p, v[d], acc[s][d]);
            }
        }
    }

#pragma unroll
    for (int s = 0; s < kQueriesPerWarp; ++s) {
        const int m = m0 + warp * kQueriesPerWarp + s;
        if (m >= M) continue;
        if (n_splits == 1) {
            const float inv = 1.0f / run_sum[s];  // > 0: every query sees key 0
#pragma unroll
            for (int d = 0; d < DPL; ++d)
                if (lane + 32 * d < D) out[(int64_t)m * ldo + (int64_t)h * D + lane + 32 * d] = acc[s][d] * inv;
        } else {
            const int64_t slot = ((int64_t)m * n_heads + h) * n_splits + split;
            if (lane == 0) {
                partial_stats[2 * slot] = run_max[s];
                partial_stats[2 * slot + 1] = run_sum[s];
            }
#pragma unroll
            for (int d = 0; d < DPL; ++d)
                if (lane + 32 * d < D) partial_out[slot * D + lane + 32 * d] = acc[s][d];
        }
    }
}

// One block per (row, head), one thread per head value.
__global__ void merge_splits_kernel(const float* __restrict__ partial_stats, const float* __restrict__ partial_out,
                                    int n_heads, int D, int n_splits, float* __restrict__ out, int64_t ldo) {
    const int m = blockIdx.x / n_heads, h = blockIdx.x % n_heads, d = threadIdx.x;
    if (d >= D) return;
    const int64_t first = ((int64_t)m * n_heads + h) * n_splits;
    float max_all = -INFINITY;
    for (int s = 0; s < n_splits; ++s) max_all = fmaxf(max_all, partial_stats[2 * (first + s)]);
    float total = 0.0f, value = 0.0f;
    for (int s = 0; s < n_splits; ++s) {
        const float sum = partial_stats[2 * (first + s) + 1];
        if (sum == 0.0f) continue;  // a piece past the last key, or one the query cannot see
        const float weight = expf(partial_stats[2 * (first + s)] - max_all);
        total += weight * sum;
        value += weight * partial_out[(first + s) * D + d];
    }
    out[(int64_t)m * ldo + (int64_t)h * D + d] = value / total;
}

// Raises the kernel's dynamic shared-memory limit when D needs more than the
// default 48 KB (D > 128); done once per kernel, outside any graph capture.
template <int DPL, bool Shaped>
void allow_attention_smem_for(int64_t D) {
    static size_t allowed = 48 * 1024;
    const size_t smem = attention_smem_bytes(D);
    if (smem > allowed) {
        PYLLM_CUDA_CHECK(cudaFuncSetAttribute(attention_kernel<DPL, Shaped>,
                                              cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        allowed = smem;
    }
}

template <int DPL>
void allow_attention_smem(int64_t D) {
    allow_attention_smem_for<DPL, false>(D);
    allow_attention_smem_for<DPL, true>(D);
}

// Calls f(std::integral_constant<int, DPL>) with the head values per lane D needs.
template <typename Fn>
void dispatch_head_dim(int64_t D, Fn&& f) {
    if (D <= 32) f(std::integral_constant<int, 1>());
    else if (D <= 64) f(std::integral_constant<int, 2>());
    else if (D <= 128) f(std::integral_constant<int, 4>());
    else f(std::integral_constant<int, 8>());
}

template <int DPL>
void launch_attention(const float* q, int64_t ldq, const float* k_cache, const float* v_cache, int64_t M,
                      int64_t n_heads, int64_t n_kv_heads, int64_t D, int64_t cache_len, const int32_t* positions,
                      float scale, float* out, int64_t ldo, AttentionSplit split, float* stats, float* partial,
                      const AttentionShaping& shaping, cudaStream_t stream) {
    allow_attention_smem<DPL>(D);
    const size_t smem = attention_smem_bytes(D);
    const dim3 grid((unsigned)((M + kQueryTile - 1) / kQueryTile), (unsigned)n_heads, (unsigned)split.n_splits);
    if (shaping.any())
        attention_kernel<DPL, true><<<grid, kWarps * 32, smem, stream>>>(
            q, ldq, k_cache, v_cache, (int)M, (int)n_heads, (int)n_kv_heads, (int)D, cache_len, positions, scale, out,
            ldo, split.n_splits, split.split_len, stats, partial, shaping);
    else
        attention_kernel<DPL, false><<<grid, kWarps * 32, smem, stream>>>(
            q, ldq, k_cache, v_cache, (int)M, (int)n_heads, (int)n_kv_heads, (int)D, cache_len, positions, scale, out,
            ldo, split.n_splits, split.split_len, stats, partial, shaping);
    PYLLM_CUDA_CHECK_LAUNCH("attention");
}

}  // namespace

void prepare_attention(int64_t D) {
    if (D % 4 != 0 || D > kMaxAttentionHeadDim) return;  // attention() reports it
    dispatch_head_dim(D, [&](auto dpl) { allow_attention_smem<decltype(dpl)::value>(D); });
}

AttentionSplit decode_split(int64_t n_heads, int64_t cache_len) {
    const int64_t tiles = (cache_len + kKeyTile - 1) / kKeyTile;
    const int64_t wanted = std::max<int64_t>(1, (2 * device_sm_count() + n_heads - 1) / n_heads);
    AttentionSplit split;
    split.n_splits = (int32_t)std::min(tiles, wanted);
    const int64_t tiles_per_split = (tiles + split.n_splits - 1) / split.n_splits;
    split.split_len = (int32_t)(tiles_per_split * kKeyTile);
    split.n_splits = (int32_t)((tiles + tiles_per_split - 1) / tiles_per_split);
    return split;
}

void attention(const float* q, int64_t ldq, const float* k_cache, const float* v_cache, int64_t M, int64_t n_heads,
               int64_t n_kv_heads, int64_t D, int64_t cache_len, const int32_t* positions, float scale, float* out,
               int64_t ldo, AttentionSplit split, AttentionWorkspace& ws, cudaStream_t stream,
               const AttentionShaping& shaping) {
    if (M <= 0) return;
    if (shaping.window < 0 || !(shaping.softcap >= 0.0f))
        throw std::invalid_argument("attention: window and softcap must be >= 0");
    if (D % 4 != 0 || D > kMaxAttentionHeadDim)
        throw std::invalid_argument("CUDA attention needs head_dim a multiple of 4 and at most 256, got " +
                                    std::to_string(D));
    if (n_kv_heads <= 0 || n_heads % n_kv_heads != 0)
        throw std::invalid_argument("attention: query heads must be a multiple of kv heads");
    if (split.n_splits < 1 || (split.n_splits > 1 && (split.split_len <= 0 || split.split_len % kKeyTile != 0)))
        throw std::invalid_argument("attention: bad key split");
    float *stats = nullptr, *partial = nullptr;
    if (split.n_splits > 1) {
        const size_t slots = (size_t)(M * n_heads * split.n_splits);
        ws.partial_stats.reserve(slots * 2 * sizeof(float));
        ws.partial_out.reserve(slots * (size_t)D * sizeof(float));
        stats = ws.partial_stats.as<float>();
        partial = ws.partial_out.as<float>();
    }
    dispatch_head_dim(D, [&](auto dpl) {
        launch_attention<decltype(dpl)::value>(q, ldq, k_cache, v_cache, M, n_heads, n_kv_heads, D, cache_len,
                                               positions, scale, out, ldo, split, stats, partial, shaping, stream);
    });
    if (split.n_splits > 1) {
        merge_splits_kernel<<<(unsigned)(M * n_heads), (unsigned)((D + 31) / 32 * 32), 0, stream>>>(
            stats, partial, (int)n_heads, (int)D, split.n_splits, out, ldo);
        PYLLM_CUDA_CHECK_LAUNCH("merge_splits");
    }
}

}  // namespace cuda
}  // namespace pyllm
