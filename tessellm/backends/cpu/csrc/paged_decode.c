/* Paged decode attention for the cpu backend: one query token per sequence, read in place from
 * the paged K/V cache (no gathered copy), online softmax in float32.
 *
 * Built on first use by tessellm/backends/cpu/native.py (cc -O3 -march=native -fopenmp) and
 * called through ctypes. Layouts (all contiguous, checked by the caller):
 *   q          float32 [n, H, D]        (rows are the decode sequences, in order)
 *   k/v cache  float32 or bfloat16 [num_blocks, block_size, KVH, D]
 *   tables     int32 [n, table_stride]  block ids of each sequence
 *   seq_lens   int32 [n]                keys per sequence; 0 gives zeros
 *   out        float32 [n, H, D]
 * GQA: the G = H / KVH query heads of a KV head run in the same task, so each K/V row is read
 * once. Tasks are (sequence, range of KV heads), spread over the OpenMP threads of the
 * process's one runtime (torch's libgomp). A sliding window w (> 0) keeps keys at positions
 * >= len - w. A soft-cap c (> 0, Gemma 2's attn_logit_softcapping) turns each scaled score s
 * into c * tanh(s / c) before the softmax (softcap_row). Attention sinks (gpt-oss; `sinks`, one
 * logit per query head, NULL for none) join each head's softmax once, after its last tile, as a
 * key with no value (join_sinks). With AVX-512 and D % 16 == 0 a tile is at most 16 tokens:
 * its scores of one query are the lanes of one vector (a transpose-and-add tree, no horizontal
 * sum per token), the softmax runs on those vectors, and the next tile's K and V rows are
 * prefetched a row at a time inside the loops (a burst of a whole tile's prefetches stalls the
 * core on its miss buffers: 64 decodes of SmolLM2's shapes, 2 threads, 2.0 -> 1.3 ms).
 * Otherwise plain C that the compiler vectorizes, tiles of up to TILE tokens prefetched a tile
 * ahead.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define MAX_H 128    /* query heads */
#define MAX_D 256
#define MAX_HD 8192  /* query heads x head size: the per-task state lives on the stack */
#define TILE 32      /* tokens per online-softmax step (at most one block) */
#ifndef PF_DIST
#define PF_DIST 1  /* tiles ahead (row-interleaved prefetch: 1 measured best, 2-4 within noise) */
#endif
#ifndef PF_LOC
#define PF_LOC 2  /* into L2: two tiles of K and V would not fit L1 */
#endif

/* exp(x) for x <= 0 (larger x is not passed), ~1 ulp: Cody-Waite reduction and the Cephes
 * polynomial, plain arithmetic so that the tile loop vectorizes. */
static inline float exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : x;
    float fx = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2) */
    float r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    union { float f; int32_t i; } u;
    u.i = ((int32_t)fx + 127) << 23;
    return y * u.f;
}

static inline const float *row_f32(const void *base, int64_t idx, int D, float *tmp, int bf16) {
    if (!bf16) return (const float *)base + idx;
    const uint16_t *src = (const uint16_t *)base + idx;
    uint32_t *dst = (uint32_t *)tmp;
#pragma omp simd
    for (int d = 0; d < D; d++) dst[d] = (uint32_t)src[d] << 16;
    return tmp;
}

/* s[t] = cap * tanh(s[t] / cap), t < n: Cephes' tanhf (an odd polynomial below |x| 0.625, else
 * 1 - 2 / (exp(2|x|) + 1) through exp_nonpos(-2|x|)), both sides computed and one kept, so the
 * loop vectorizes; within a few float32 ulp of libm's tanhf. */
static inline void softcap_row(float *s, int n, float cap) {
    const float inv = 1.0f / cap;
#pragma omp simd
    for (int t = 0; t < n; t++) {
        float x = s[t] * inv, z = fabsf(x), z2 = x * x;
        float e = exp_nonpos(-2.0f * z);
        float big = (1.0f - e) / (1.0f + e);
        float small = ((((-5.70498872745e-3f * z2 + 2.06390887954e-2f) * z2 - 5.37397155531e-2f) * z2
                        + 1.33314422036e-1f) * z2 - 3.33332819422e-1f) * z2 * z + z;
        s[t] = copysignf(z > 0.625f ? big : small, x) * cap;
    }
}

#if defined(__AVX512F__)
/* 16 cache values from element idx, widened to float32 (a bfloat16 is a float32's top half). */
static inline __attribute__((always_inline)) __m512 load16(const void *c, int64_t idx, int bf16) {
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                      _mm256_loadu_si256((const __m256i *)((const uint16_t *)c + idx))), 16))
                : _mm512_loadu_ps((const float *)c + idx);
}
#endif

/* Prefetch n cache values from element idx. */
static inline __attribute__((always_inline)) void prefetch_row(const void *c, int64_t idx, int n, int bf16) {
    const int esize = bf16 ? 2 : 4;
    const char *row = (const char *)c + idx * esize;
    for (int b = 0; b < n * esize; b += 64) __builtin_prefetch(row + b, 0, PF_LOC);
}

/* One tile of nt tokens starting at element `base` of the caches, KV heads [0, nkv) of the
 * task (base already points at its first head): scores s[i][t] = q_i . k_t (q pre-scaled). */
static inline __attribute__((always_inline)) void tile_scores(
        const float *qs, const void *kc, int64_t base, int64_t tok_stride, int nt, int nkv,
        const int D, const int G, int bf16, float s[][TILE]) {
    float tmp[MAX_D];
    for (int t = 0; t < nt; t++)
        for (int h = 0; h < nkv; h++) {
            const float *k = row_f32(kc, base + t * tok_stride + (int64_t)h * D, D, tmp, bf16);
            for (int g = 0; g < G; g++) {
                const float *qg = qs + (int64_t)(h * G + g) * D;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int d = 0; d < D; d++) dot += qg[d] * k[d];
                s[h * G + g][t] = dot;
            }
        }
}

/* acc_i += sum_t p[i][t] v_t over the tile (same arguments as tile_scores). With pfb >= 0 (the
 * vector path) the V rows of pfn tokens from element pfb on are prefetched, a row per token. */
static inline __attribute__((always_inline)) void tile_values(
        float *acc, const void *vc, int64_t base, int64_t tok_stride, int nt, int nkv,
        const int D, const int G, int bf16, float p[][TILE], int64_t pfb, int pfn) {
#if defined(__AVX512F__)
    if (D % 16 == 0) {
        const int DV = D / 16, GB = DV <= 24 ? 24 / DV : 1;  /* queries kept in registers */
        for (int h = 0; h < nkv; h++)
            for (int g0 = 0; g0 < G; g0 += GB) {
                const int gn = G - g0 < GB ? G - g0 : GB;
                __m512 a[24];
                float *ah = acc + (int64_t)(h * G + g0) * D;
                for (int i = 0; i < gn * DV; i++) a[i] = _mm512_loadu_ps(ah + 16 * i);
                for (int t = 0; t < nt; t++) {
                    int64_t idx = base + t * tok_stride + (int64_t)h * D;
                    if (g0 == 0 && t < pfn) prefetch_row(vc, pfb + t * tok_stride + (int64_t)h * D, D, bf16);
                    for (int j = 0; j < DV; j++) {
                        __m512 v = load16(vc, idx + 16 * j, bf16);
                        for (int g = 0; g < gn; g++)
                            a[g * DV + j] = _mm512_fmadd_ps(_mm512_set1_ps(p[h * G + g0 + g][t]), v, a[g * DV + j]);
                    }
                }
                for (int i = 0; i < gn * DV; i++) _mm512_storeu_ps(ah + 16 * i, a[i]);
            }
        return;
    }
#endif
    float tmp[MAX_D];
    for (int t = 0; t < nt; t++)
        for (int h = 0; h < nkv; h++) {
            const float *v = row_f32(vc, base + t * tok_stride + (int64_t)h * D, D, tmp, bf16);
            for (int g = 0; g < G; g++) {
                float pt = p[h * G + g][t], *a = acc + (int64_t)(h * G + g) * D;
#pragma omp simd
                for (int d = 0; d < D; d++) a[d] += pt * v[d];
            }
        }
}

#if defined(__AVX512F__)
/* r[t] = the sum of x_t's 16 lanes, t < 16, by a transpose-and-add tree (45 instructions for
 * the 16 sums instead of 16 horizontal reductions); v holds x_t at v[t / 4 + 4 * (t % 4)]. */
static inline __attribute__((always_inline)) __m512 hsum16x16(const __m512 *v) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)  /* a[i]: v[2i] and v[2i+1] each folded to 8 lanes */
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++)  /* b[i]: 128-bit chunk m holds v[4i+m] folded to 4 lanes */
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_unpacklo_ps(b[2 * i], b[2 * i + 1]), _mm512_unpackhi_ps(b[2 * i], b[2 * i + 1]));
    __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(c[0]), _mm512_castps_pd(c[1]));
    __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(c[0]), _mm512_castps_pd(c[1]));
    return _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));  /* lane 4m+k: v[m+4k] */
}

/* exp_nonpos on 16 lanes (the same reduction and polynomial; 2^n applied by scalef). */
static inline __attribute__((always_inline)) __m512 exp16_nonpos(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fmadd_ps(fx, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(_mm512_mul_ps(y, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, fx);
}

/* tile_scores for tiles of at most 16 tokens with D % 16 == 0: a query's 16 scores come out as
 * one vector (lanes past nt are 0). The K rows of the next tile's pfn tokens from element pfb
 * on are prefetched a row per token. */
static inline __attribute__((always_inline)) void tile_scores16(
        const float *qs, const void *kc, int64_t base, int64_t tok_stride, int nt, int nkv,
        const int D, const int G, int bf16, float s[][TILE], int64_t pfb, int pfn) {
    const int DV = D / 16;
    for (int h = 0; h < nkv; h++)
        for (int g = 0; g < G; g++) {
            const float *qg = qs + (int64_t)(h * G + g) * D;
            __m512 qv[MAX_D / 16], v[16];
            for (int j = 0; j < DV; j++) qv[j] = _mm512_loadu_ps(qg + 16 * j);
            for (int t = 0; t < 16; t++) {
                __m512 x = _mm512_setzero_ps();
                if (t < nt) {
                    int64_t idx = base + t * tok_stride + (int64_t)h * D;
                    if (g == 0 && t < pfn) prefetch_row(kc, pfb + t * tok_stride + (int64_t)h * D, D, bf16);
                    x = _mm512_mul_ps(load16(kc, idx, bf16), qv[0]);
                    for (int j = 1; j < DV; j++) x = _mm512_fmadd_ps(load16(kc, idx + 16 * j, bf16), qv[j], x);
                }
                v[t / 4 + 4 * (t % 4)] = x;
            }
            _mm512_storeu_ps(s[h * G + g], hsum16x16(v));
        }
}

/* tile_softmax for tiles of at most 16 tokens: one vector a query. */
static inline void tile_softmax16(float s[][TILE], int nt, int nh, int D, float *m, float *l, float *acc) {
    const __mmask16 live = nt >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nt) - 1);
    for (int i = 0; i < nh; i++) {
        __m512 sv = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), live, s[i]);
        float mx = _mm512_reduce_max_ps(sv);
        if (mx > m[i]) {
            float corr = m[i] == -INFINITY ? 0.0f : expf(m[i] - mx);
            l[i] *= corr;
            float *a = acc + (int64_t)i * D;
            for (int d = 0; d < D; d += 16)
                _mm512_storeu_ps(a + d, _mm512_mul_ps(_mm512_loadu_ps(a + d), _mm512_set1_ps(corr)));
            m[i] = mx;
        }
        __m512 p = _mm512_maskz_mov_ps(live, exp16_nonpos(_mm512_sub_ps(sv, _mm512_set1_ps(m[i]))));
        l[i] += _mm512_reduce_add_ps(p);
        _mm512_storeu_ps(s[i], p);
    }
}
#endif

/* Online softmax over one tile: s becomes the probabilities, acc/l rescaled to the new max. */
static inline void tile_softmax(float s[][TILE], int nt, int nh, int D, float *m, float *l, float *acc) {
    for (int i = 0; i < nh; i++) {
        float mx = m[i];
        for (int t = 0; t < nt; t++) mx = s[i][t] > mx ? s[i][t] : mx;
        if (mx > m[i]) {
            float corr = m[i] == -INFINITY ? 0.0f : expf(m[i] - mx);
            l[i] *= corr;
            float *a = acc + (int64_t)i * D;
#pragma omp simd
            for (int d = 0; d < D; d++) a[d] *= corr;
            m[i] = mx;
        }
        float *si = s[i], sum = 0.0f;
#pragma omp simd
        for (int t = 0; t < nt; t++) si[t] = exp_nonpos(si[t] - mx);
        for (int t = 0; t < nt; t++) sum += si[t];
        l[i] += sum;
    }
}

/* Prefetch the K and V rows of the task's heads (span values a token) of nt tokens from element
 * `base` on, in one burst: the plain-C path's next tile (block ids are random: the hardware
 * prefetchers cannot follow a sequence across blocks). */
static inline void prefetch_tile(const void *kc, const void *vc, int64_t base, int64_t tok_stride,
                                 int nt, int span, int bf16) {
    for (int t = 0; t < nt; t++) {
        prefetch_row(kc, base + t * tok_stride, span, bf16);
        prefetch_row(vc, base + t * tok_stride, span, bf16);
    }
}

/* Attention sinks: head i's logit sinks[i] joins its online softmax (max m, sum l, unnormalized
 * acc) as one more key whose value is zero: the max may rise, the sum gains exp(sink - max). */
static inline void join_sinks(const float *sinks, int nh, int D, float *m, float *l, float *acc) {
    for (int i = 0; i < nh; i++) {
        float sk = sinks[i], mx = m[i] > sk ? m[i] : sk;
        float corr = m[i] == -INFINITY ? 0.0f : expf(m[i] - mx);
        l[i] = l[i] * corr + expf(sk - mx);
        float *a = acc + (int64_t)i * D;
        for (int d = 0; d < D; d++) a[d] *= corr;
        m[i] = mx;
    }
}

/* KV heads [h0, h1) of one sequence: their G queries each against keys [start, len), tile by
 * tile (at most 16 tokens on the vector path, TILE otherwise, of one block; with all KV heads in the task a tile's K and its V
 * are each one contiguous stretch of the block). */
static inline __attribute__((always_inline)) void attend(
        const float *q, const void *kc, const void *vc, const int32_t *table, int start, int len,
        int bs, int KVH, const int D, const int G, int h0, int h1, float scale, float softcap,
        const float *sinks, int bf16, float *out) {
    const int nkv = h1 - h0, nh = nkv * G;
    float qs[MAX_HD], acc[MAX_HD], s[MAX_H][TILE], m[MAX_H], l[MAX_H];
    const float *qh = q + (int64_t)h0 * G * D;
    for (int i = 0; i < nh * D; i++) {
        qs[i] = qh[i] * scale;
        acc[i] = 0.0f;
    }
    for (int i = 0; i < nh; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
    }
    const int64_t tok_stride = (int64_t)KVH * D, block_stride = (int64_t)bs * KVH * D;
#if defined(__AVX512F__)
    const int vec = D % 16 == 0, tile = vec ? 16 : TILE;
#else
    const int tile = TILE;
#endif
    const int step = bs < tile ? bs : tile;  /* tokens a full tile holds */
    for (int t0 = start; t0 < len;) {
        int off = t0 % bs, nt = bs - off < tile ? bs - off : tile;
        if (nt > len - t0) nt = len - t0;
        int64_t base = (int64_t)table[t0 / bs] * block_stride + (int64_t)off * tok_stride + (int64_t)h0 * D;
        int t1 = t0 + nt, tp = t1 + (PF_DIST - 1) * step, np = 0;  /* PF_DIST tiles ahead */
        int64_t bp = -1;
        if (PF_DIST && tp < len) {
            int offp = tp % bs;
            np = bs - offp < step ? bs - offp : step;
            if (np > len - tp) np = len - tp;
            bp = (int64_t)table[tp / bs] * block_stride + (int64_t)offp * tok_stride + (int64_t)h0 * D;
        }
#if defined(__AVX512F__)
        if (vec) {
            tile_scores16(qs, kc, base, tok_stride, nt, nkv, D, G, bf16, s, bp, np);
            if (softcap > 0.0f)
                for (int i = 0; i < nh; i++) softcap_row(s[i], 16, softcap);
            tile_softmax16(s, nt, nh, D, m, l, acc);
            tile_values(acc, vc, base, tok_stride, nt, nkv, D, G, bf16, s, bp, np);
            t0 = t1;
            continue;
        }
#endif
        if (bp >= 0) prefetch_tile(kc, vc, bp, tok_stride, np, nkv * D, bf16);
        tile_scores(qs, kc, base, tok_stride, nt, nkv, D, G, bf16, s);
        if (softcap > 0.0f)
            for (int i = 0; i < nh; i++) softcap_row(s[i], nt, softcap);
        tile_softmax(s, nt, nh, D, m, l, acc);
        tile_values(acc, vc, base, tok_stride, nt, nkv, D, G, bf16, s, -1, 0);
        t0 = t1;
    }
    if (sinks) join_sinks(sinks + (int64_t)h0 * G, nh, D, m, l, acc);
    float *o = out + (int64_t)h0 * G * D;
    for (int i = 0; i < nh; i++) {
        float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
        for (int d = 0; d < D; d++) o[(int64_t)i * D + d] = acc[(int64_t)i * D + d] * inv;
    }
}

/* attend() with D as a constant where it is common (the vector loops unroll). */
static void attend_task(const float *q, const void *kc, const void *vc, const int32_t *table,
                        int start, int len, int bs, int KVH, int D, int G, int h0, int h1,
                        float scale, float softcap, const float *sinks, int bf16, float *out) {
#define ATTEND(DD, BF) attend(q, kc, vc, table, start, len, bs, KVH, DD, G, h0, h1, scale, softcap, sinks, BF, out)
    if (bf16) {
        if (D == 64) ATTEND(64, 1); else if (D == 128) ATTEND(128, 1); else ATTEND(D, 1);
    } else {
        if (D == 64) ATTEND(64, 0); else if (D == 128) ATTEND(128, 0); else ATTEND(D, 0);
    }
#undef ATTEND
}

/* Returns 0, or -1 when the shapes are outside what this kernel handles (nothing written).
 * softcap: the logit soft-cap, 0 for none. sinks: float32 [H] attention sinks, or NULL.
 * Tasks: each sequence's KV heads cut into `chunks` ranges, enough tasks for the threads when
 * the batch is small, all heads of a sequence in one task (contiguous reads) when it is not. */
int tl_paged_decode(const float *q, int64_t q_row_stride, const void *k_cache, const void *v_cache,
                    int cache_bf16, const int32_t *tables, int64_t table_stride,
                    const int32_t *seq_lens, int n, int H, int KVH, int D, int bs, int window,
                    float scale, float softcap, const float *sinks, float *out, int num_threads) {
    if (KVH <= 0 || H % KVH || H > MAX_H || D > MAX_D || D <= 0 || H * D > MAX_HD || bs <= 0) return -1;
    const int G = H / KVH;
    int chunks = n > 0 ? (4 * num_threads + n - 1) / n : 1;
    if (chunks > KVH) chunks = KVH;
    const int64_t tasks = (int64_t)n * chunks;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t i = 0; i < tasks; i++) {
        int seq = (int)(i / chunks), c = (int)(i % chunks);
        int h0 = (int)((int64_t)KVH * c / chunks), h1 = (int)((int64_t)KVH * (c + 1) / chunks);
        int len = seq_lens[seq];
        int start = window > 0 && len - window > 0 ? len - window : 0;
        float *o = out + (int64_t)seq * H * D;
        if (len <= 0) {
            memset(o + (int64_t)h0 * G * D, 0, sizeof(float) * (h1 - h0) * G * D);
            continue;
        }
        attend_task(q + (int64_t)seq * q_row_stride, k_cache, v_cache, tables + (int64_t)seq * table_stride,
                    start, len, bs, KVH, D, G, h0, h1, scale, softcap, sinks, cache_bf16, o);
    }
    return 0;
}

/* NeoX rotary embedding in place, float32: q [T, qh*D] and k [T, kh*D] rows (strides in floats),
 * positions int64 [T], cos_sin [*, R] rows (cos of the R/2 frequencies, then sin); the first R
 * dims of each head rotate, the rest stay. Each product is rounded before the sum, as torch's
 * (x1*cos - x2*sin, x2*cos + x1*sin) does, so the result is bitwise the reference's: no
 * contraction into FMAs here (GCC's attribute, the standard pragma for clang). */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
__attribute__((optimize("fp-contract=off")))
#endif
static void rotate_heads(float *x, int heads, int D, int half, const float *cos, const float *sin) {
    for (int h = 0; h < heads; h++) {
        float *x1 = x + (int64_t)h * D, *x2 = x1 + half;
#pragma omp simd
        for (int i = 0; i < half; i++) {
            float a = x1[i], b = x2[i];
            float ac = a * cos[i], bs = b * sin[i], bc = b * cos[i], as = a * sin[i];
            x1[i] = ac - bs;
            x2[i] = bc + as;
        }
    }
}

int tl_rotary_neox(float *q, int64_t q_stride, int qh, float *k, int64_t k_stride, int kh,
                   const int64_t *pos, const float *cos_sin, int64_t cs_stride, int T, int D, int R,
                   int num_threads) {
    if (R <= 0 || R % 2 || R > D) return -1;
    const int half = R / 2;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (T >= 32)
    for (int t = 0; t < T; t++) {
        const float *cs = cos_sin + pos[t] * cs_stride;
        rotate_heads(q + t * q_stride, qh, D, half, cs, cs + half);
        rotate_heads(k + t * k_stride, kh, D, half, cs, cs + half);
    }
    return 0;
}
