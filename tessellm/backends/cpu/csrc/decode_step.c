/* One layer's batch of decodes in one call: NeoX rotary of q and k in place, k and v written
 * into the paged cache at their slots, then paged decode attention (paged_decode.c).
 *
 * Built with paged_decode.c and norm.c into one library by tessellm/backends/cpu/native.py and
 * called by CpuAttentionKernel.forward (attention.py) when the model hands it the rotary inputs
 * (``fuses_rotary``) and every sequence of the step is a decode. Each part is the separate
 * path's own arithmetic (tl_rotary_neox, a float32 copy or torch's round-to-nearest-even
 * bfloat16 conversion, tl_paged_decode), so the result is bitwise that path's.
 *   q      float32 [n, H, D] rows q_stride floats apart, unrotated (rotated in place)
 *   k, v   float32 [n, KVH, D] rows k_stride / v_stride apart (k rotated in place)
 *   pos    int64 [n], cos_sin float32 [*, D] rows cs_stride apart (cos then sin)
 *   slots  int64 [n] (< 0: not written), caches [blocks, bs, KVH, D] float32 or bfloat16
 * The rest as tl_paged_decode.
 */
#include <stdint.h>
#include <string.h>

int tl_rotary_neox(float *q, int64_t q_stride, int qh, float *k, int64_t k_stride, int kh,
                   const int64_t *pos, const float *cos_sin, int64_t cs_stride, int T, int D, int R,
                   int num_threads);
int tl_paged_decode(const float *q, int64_t q_row_stride, const void *k_cache, const void *v_cache,
                    int cache_bf16, const int32_t *tables, int64_t table_stride,
                    const int32_t *seq_lens, int n, int H, int KVH, int D, int bs, int window,
                    float scale, float softcap, const float *sinks, float *out, int num_threads);

/* torch's float -> bfloat16 (c10::BFloat16): round to nearest even, NaN to the quiet NaN. */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static void write_row(void *cache, int64_t slot, const float *src, int64_t width, int bf16) {
    if (bf16) {
        uint16_t *dst = (uint16_t *)cache + slot * width;
        for (int64_t i = 0; i < width; i++) dst[i] = to_bf16(src[i]);
    } else {
        memcpy((float *)cache + slot * width, src, sizeof(float) * width);
    }
}

int tl_decode_step(float *q, int64_t q_stride, float *k, int64_t k_stride, const float *v,
                   int64_t v_stride, const int64_t *pos, const float *cos_sin, int64_t cs_stride,
                   const int64_t *slots, void *k_cache, void *v_cache, int cache_bf16,
                   const int32_t *tables, int64_t table_stride, const int32_t *seq_lens, int n,
                   int H, int KVH, int D, int bs, int window, float scale, float softcap,
                   const float *sinks, float *out, int num_threads) {
    int rc = tl_rotary_neox(q, q_stride, H, k, k_stride, KVH, pos, cos_sin, cs_stride, n, D, D,
                            num_threads);
    if (rc) return rc;
    const int64_t width = (int64_t)KVH * D;
    for (int t = 0; t < n; t++) {
        if (slots[t] < 0) continue;
        write_row(k_cache, slots[t], k + t * k_stride, width, cache_bf16);
        write_row(v_cache, slots[t], v + t * v_stride, width, cache_bf16);
    }
    return tl_paged_decode(q, q_stride, k_cache, v_cache, cache_bf16, tables, table_stride,
                           seq_lens, n, H, KVH, D, bs, window, scale, softcap, sinks, out,
                           num_threads);
}
