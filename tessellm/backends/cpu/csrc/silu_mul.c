/* SiLU-and-mul for the cpu backend, float32, bitwise torch's eager `F.silu(gate) * up`.
 *
 * Built with the other kernels into one library by tessellm/backends/cpu/native.py and called
 * through ctypes by CpuOps.silu_and_mul (ops.py). Per row of x = [gate (d) | up (d)]:
 *
 *     out[i] = (gate[i] / (1 + exp(-gate[i]))) * up[i]
 *
 * torch's silu kernel (aten/src/ATen/native/cpu/Activation.cpp, cpu_kernel_vec) runs each
 * row's first `block * floor(d / block)` values through its vector path, whose exp is SLEEF's
 * expf_u10 (block = two vectors: 32 lanes with AVX-512, 16 with AVX2), and the rest through
 * its scalar path, std::exp (the C library's expf). `sleef_expf` below is SLEEF's xexpf
 * algorithm step for step: round d/ln2 to an integer q, the reduced argument in two FMA steps,
 * a degree-6 polynomial by FMA, the scaling by 2^q in two exact halves, the limits at -104 and
 * 100. Every other step is one correctly rounded float operation, in torch's order (the silu
 * into one rounding, then the product). The caller probes the result bitwise against torch
 * for each row width before use (ops.py: the library's path is skipped otherwise), so a torch
 * that computes it another way costs speed, never a different number. No FMA contraction here
 * (GCC's pragma, clang's pragma): the polynomial's FMAs are explicit.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

static inline float pow2i(int32_t q) {
    int32_t bits = (q + 0x7f) << 23;
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

static inline float sleef_expf(float d) {
    float qf = rintf(d * 1.442695040888963407359924681001892137f); /* R_LN2f */
    int32_t q = (int32_t)qf;
    float s = fmaf(qf, -0.693145751953125f, d);        /* -L2Uf */
    s = fmaf(qf, -1.428606765330187045e-06f, s);        /* -L2Lf */
    float u = 0.000198527617612853646278381f;
    u = fmaf(u, s, 0.00139304355252534151077271f);
    u = fmaf(u, s, 0.00833336077630519866943359f);
    u = fmaf(u, s, 0.0416664853692054748535156f);
    u = fmaf(u, s, 0.166666671633720397949219f);
    u = fmaf(u, s, 0.5f);
    u = 1.0f + fmaf(s * s, u, s);
    u = u * pow2i(q >> 1) * pow2i(q - (q >> 1));
    if (d < -104.0f) u = 0.0f;
    if (d > 100.0f) u = INFINITY;
    return u;
}

/* x: rows x 2d contiguous float32; out: rows x d contiguous. `block` (16 or 32): torch's vector
 * step, see above. Returns -1 for arguments it does not take (the caller then runs torch). */
int tl_silu_and_mul(const float *x, float *out, int64_t rows, int64_t d, int block) {
    if ((block != 16 && block != 32) || d <= 0 || rows < 0) return -1;
    const int64_t vec_end = d / block * block;
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = x + r * 2 * d, *up = gate + d;
        float *o = out + r * d;
        for (int64_t i = 0; i < vec_end; i++) {
            float silu = gate[i] / (1.0f + sleef_expf(-gate[i]));
            o[i] = silu * up[i];
        }
        for (int64_t i = vec_end; i < d; i++) {
            float silu = gate[i] / (1.0f + expf(-gate[i]));
            o[i] = silu * up[i];
        }
    }
    return 0;
}
