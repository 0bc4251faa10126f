/* Residual add + RMSNorm for the cpu backend, float32, bitwise torch's eager result.
 *
 * Built with paged_decode.c into one library by tessellm/backends/cpu/native.py and called
 * through ctypes by CpuOps.rms_norm / fused_add_rms_norm (ops.py). The reference
 * (backends/reference/ops.py) is, per row of n values:
 *
 *     r = x + residual                      (with a residual)
 *     ms = sum(r * r) / n                   torch.pow(r, 2).mean(-1)
 *     out = w * (r * (1 / sqrt(ms + eps)))
 *
 * Every step is one correctly rounded float operation except the sum, whose order is torch's
 * (aten/src/ATen/native/cpu/SumKernel.cpp, cascade_sum over a contiguous row): the row is read
 * as vectors of W lanes (W = 16 with AVX-512, 8 with AVX2: torch's CPU capability, passed in),
 * the vectors summed in 4 interleaved accumulators (ilp 4), those in chunks of 16 ("levels"),
 * then the accumulators added, the scalar tail summed from 0, and the W lanes added to it one
 * by one. The caller checks the result bitwise against torch at first use of a row width
 * (native.py: the library is refused otherwise), so a torch that sums in another order costs
 * speed, never a different number. No FMA contraction here (GCC's pragma, clang's pragma).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#define MAX_W 16
#define ILP 4
#define LEVELS 4

/* acc[k][l] += square of element (row i, column k): vector i * ILP + k, lane l. */
static inline void add_row(float acc[ILP][MAX_W], const float *x, int64_t i, int W) {
    for (int k = 0; k < ILP; k++) {
        const float *v = x + (i * ILP + k) * W;
        for (int l = 0; l < W; l++) {
            float s = v[l] * v[l];
            acc[k][l] += s;
        }
    }
}

/* torch's multi_row_sum<nrows = 4> over `size` rows of ILP vectors of W lanes. */
static void multi_row_sum(const float *x, int64_t size, int W, float out[ILP][MAX_W]) {
    const int64_t power = 4; /* max(4, CeilLog2(size) / 4): 4 for size < 2^20 (checked by the caller) */
    const int64_t step = (int64_t)1 << power, mask = step - 1;
    float acc[LEVELS][ILP][MAX_W];
    memset(acc, 0, sizeof(acc));
    int64_t i = 0;
    while (i + step <= size) {
        for (int64_t j = 0; j < step; j++, i++) add_row(acc[0], x, i, W);
        for (int j = 1; j < LEVELS; j++) {
            for (int k = 0; k < ILP; k++)
                for (int l = 0; l < W; l++) {
                    acc[j][k][l] += acc[j - 1][k][l];
                    acc[j - 1][k][l] = 0.0f;
                }
            if (i & (mask << (j * power))) break;
        }
    }
    for (; i < size; i++) add_row(acc[0], x, i, W);
    for (int j = 1; j < LEVELS; j++)
        for (int k = 0; k < ILP; k++)
            for (int l = 0; l < W; l++) acc[0][k][l] += acc[j][k][l];
    memcpy(out, acc[0], sizeof(acc[0]));
}

/* torch's float32 sum of x[i]^2 over a contiguous row of n >= W values (vectorized_inner_sum). */
static float sum_squares(const float *x, int64_t n, int W) {
    const int64_t vecs = n / W, size_ilp = vecs / ILP;
    float part[ILP][MAX_W];
    multi_row_sum(x, size_ilp, W, part);
    for (int64_t i = size_ilp * ILP; i < vecs; i++)
        for (int l = 0; l < W; l++) {
            float s = x[i * W + l] * x[i * W + l];
            part[0][l] += s;
        }
    for (int k = 1; k < ILP; k++)
        for (int l = 0; l < W; l++) part[0][l] += part[k][l];
    float acc = 0.0f;
    for (int64_t i = vecs * W; i < n; i++) {
        float s = x[i] * x[i];
        acc += s;
    }
    for (int l = 0; l < W; l++) acc += part[0][l];
    return acc;
}

/* rows x n, all contiguous float32, n a multiple of 16 (with a scalar tail torch's order was
 * not matched for every input: 1 row of 17 differs in ~1/4 of random draws). With `residual` (may be NULL): res_out = x + residual and
 * the norm of res_out; without: the norm of x (res_out unused). Returns -1 for shapes it does
 * not take (the caller then runs torch). */
int tl_add_rms_norm(const float *x, const float *residual, float *res_out, const float *w,
                    float *out, int64_t rows, int64_t n, float eps, int W) {
    if ((W != 8 && W != 16) || n % 16 || n / W / ILP >= ((int64_t)1 << 20)) return -1;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *o = out + r * n;
        if (residual != NULL) {
            float *s = res_out + r * n;
            const float *b = residual + r * n;
            for (int64_t i = 0; i < n; i++) s[i] = xr[i] + b[i];
            xr = s;
        }
        float ms = sum_squares(xr, n, W) / (float)n;
        float inv = 1.0f / sqrtf(ms + eps);
        for (int64_t i = 0; i < n; i++) {
            float t = xr[i] * inv;
            o[i] = w[i] * t;
        }
    }
    return 0;
}
