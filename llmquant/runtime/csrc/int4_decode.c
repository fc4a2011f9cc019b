/* Decode PyTorch's CPU int4 packing (aten::_convert_weight_to_int4pack_for_cpu) into bfloat16
 * W^T rows: the prefill path of llmquant.runtime.kernels.Int4CpuKernel in one pass over the bytes.
 *
 * Layout (codes handed to the packer in kernels.feed_order(N), so bytes hold adjacent outputs):
 *   full blocks  packed[b][k][j], b < NB = N / 64, j < 32: low nibble = output 64b + 2j,
 *                high nibble = output 64b + 2j + 1 (natural order);
 *   tail         packed[NB*Kp*32 + k*(t/2) + j], t = N - 64*NB: outputs 64NB + 2j, + 1.
 *   sz[g][f][2]  bfloat16 (scale, zero) of fed row f = natural output n: f = 64b + j + 32h for
 *                n = 64b + 2j + h inside full blocks, f = n in the tail.
 * out[k][n] = bf16_rne((q - 8) * scale + zero), q the code; rows k in [k0, k1), g = k / kgs.
 * The arithmetic (float multiply, float add, round to nearest even) is the one torch.addcmul uses
 * for bfloat16 on CPU, so the result equals the torch-ops path bit for bit (tested).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static inline float bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f2bf(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;        /* finite inputs only: scales are finite */
}

static void decode_range(const uint8_t *packed, const uint16_t *sz, uint16_t *out, int64_t Kp,
                         int64_t N, int64_t kgs, int64_t k0, int64_t k1, float *S, float *Z)
{
    const int64_t NB = N / 64, t = N - NB * 64;
    int64_t g_loaded = -1;
    for (int64_t k = k0; k < k1; ++k) {
        const int64_t g = k / kgs;
        if (g != g_loaded) {                                 /* natural-order float scales/zeros */
            const uint16_t *s = sz + g * N * 2;
            for (int64_t b = 0; b < NB; ++b)
                for (int j = 0; j < 32; ++j)
                    for (int h = 0; h < 2; ++h) {
                        const int64_t f = 64 * b + j + 32 * h, n = 64 * b + 2 * j + h;
                        S[n] = bf2f(s[2 * f]);
                        Z[n] = bf2f(s[2 * f + 1]);
                    }
            for (int64_t n = NB * 64; n < N; ++n) { S[n] = bf2f(s[2 * n]); Z[n] = bf2f(s[2 * n + 1]); }
            g_loaded = g;
        }
        uint32_t *o = (uint32_t *)(out + k * N);             /* two bf16 outputs per word */
        for (int64_t b = 0; b < NB; ++b) {
            const uint8_t *p = packed + (b * Kp + k) * 32;
            const float *sb = S + 64 * b, *zb = Z + 64 * b;
            uint32_t *ob = o + 32 * b;
            for (int j = 0; j < 32; ++j) {
                const float lo = (float)((int)(p[j] & 15) - 8), hi = (float)((int)(p[j] >> 4) - 8);
                ob[j] = f2bf(lo * sb[2 * j] + zb[2 * j]) | (f2bf(hi * sb[2 * j + 1] + zb[2 * j + 1]) << 16);
            }
        }
        if (t) {
            const uint8_t *p = packed + NB * Kp * 32 + k * (t / 2);
            const float *sb = S + 64 * NB, *zb = Z + 64 * NB;
            uint32_t *ob = o + 32 * NB;
            for (int64_t j = 0; j < t / 2; ++j) {
                const float lo = (float)((int)(p[j] & 15) - 8), hi = (float)((int)(p[j] >> 4) - 8);
                ob[j] = f2bf(lo * sb[2 * j] + zb[2 * j]) | (f2bf(hi * sb[2 * j + 1] + zb[2 * j + 1]) << 16);
            }
        }
    }
}

/* Rows [0, rows) split over `threads` OpenMP threads (the process's libgomp: torch's). Returns 0,
 * or -1 when scratch memory could not be allocated. */
int llmq_int4_decode(const uint8_t *packed, const uint16_t *sz, uint16_t *out, int64_t Kp, int64_t N,
                     int64_t kgs, int64_t rows, int threads)
{
    int failed = 0;
    if (threads < 1) threads = 1;
    #pragma omp parallel num_threads(threads) reduction(|:failed)
    {
        int nt = 1, id = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads(); id = omp_get_thread_num();
#endif
        const int64_t per = (rows + nt - 1) / nt, k0 = id * per, k1 = k0 + per < rows ? k0 + per : rows;
        float *S = (float *)malloc(sizeof(float) * 2 * N);
        if (!S) failed = 1;
        else {
            if (k0 < k1) decode_range(packed, sz, out, Kp, N, kgs, k0, k1, S, S + N);
            free(S);
        }
    }
    return failed ? -1 : 0;
}
