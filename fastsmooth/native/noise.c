/* The native CPU twin of the noise kernels (kernels/perturb.py, kernels/samplers.py).

   Draws the very Philox4x32-10 words of the Triton kernels and of the torch reference under the keying
   of fastsmooth/seeding.py (key = seed; counter = (element group, copy, image, domain + tag)) and
   applies the same samplers:
     float mode  out = cast(x + eps), eps in float32 (Box-Muller, -log U, S32, ExpInf's r S32);
     grid mode   out = cast(fl32((k + nu) / G)), nu drawn exactly (alias tables; ExpInf in float64).
   Grid-mode integers equal the other backends' exactly; float-mode values agree within the rounding
   of the float32 logarithm, sine and cosine (polynomials below, within 2 ulps of the exact values).

   Built by setup.py as the extension fastsmooth._native_noise (no Python API: fastsmooth/native_backend.py
   calls fs_fill through ctypes, which releases the GIL, on one thread per core). The hot loops run over
   the 128 groups of a chunk, so that the compiler vectorizes them; target_clones compiles them for
   AVX-512, AVX2 and baseline x86-64, chosen at load time. No fused multiply-add (-ffp-contract=off):
   the float32 operations are those of the kernels. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FS_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
/* The alias lookups vectorize into gathers: measured here 0.41 ns an element with AVX2, 0.60 with
   AVX-512 (whose gathers some microcode slows, bench/RESULTS.md): no AVX-512 clone for them. */
#define FS_GATHER_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FS_CLONES
#define FS_GATHER_CLONES
#endif

#define LANE 128
#define CHUNK 512
#define TAG_ELEMENT 0u
#define TAG_GAMMA 1u
#define TAG_COPY 2u
#define TAG_LAPLACE_TAIL 3u
#define TAG_GRID_LOW 4u

enum { NOISE_GAUSSIAN = 0, NOISE_LAPLACE = 1, NOISE_UNIFORM = 2, NOISE_EXPINF = 3 };
enum { OUT_F32 = 0, OUT_BF16 = 1, OUT_F16 = 2 };

/* Everything a fill needs besides the segment; mirrored by ctypes in native_backend.py. */
typedef struct {
    int32_t noise;           /* NOISE_* */
    int32_t grid;            /* 0: float mode; else G, inputs k / G */
    int64_t dim;             /* elements of a copy */
    float lam;               /* lambda in float32 (float mode) */
    double lam64;            /* lambda in float64 (ExpInf) */
    double dd, cc, inv_alpha, inv_k;   /* ExpInf: Marsaglia-Tsang constants, 1/k */
    int32_t boost;           /* ExpInf: d/k < 1 */
    int32_t max_iterations;  /* ExpInf: cap of Marsaglia-Tsang iterations */
    uint32_t k0, k1;         /* Philox key */
    uint32_t domain;         /* added to every tag */
    int32_t bits;            /* alias table: log2 of the buckets */
    int32_t offset;          /* alias table: bucket of nu = 0 */
    const uint32_t *packed;  /* alias table: (threshold's high bits << bits) | alias, one word a bucket */
    const uint32_t *t_lo;    /* alias thresholds, low 32 bits */
    int32_t out_dtype;       /* OUT_* */
    int32_t channels;        /* channels_last output with this many channels; 0: contiguous */
} fs_plan;

/* -- Philox4x32-10 (Salmon et al. 2011) ----------------------------------------------------- */

static inline void philox(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                          uint32_t out[4]) {
    for (int r = 0; r < 10; r++) {
        uint64_t pa = (uint64_t)c0 * 0xD2511F53u, pb = (uint64_t)c2 * 0xCD9E8D57u;
        uint32_t n0 = (uint32_t)(pb >> 32) ^ c1 ^ k0, n2 = (uint32_t)(pa >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)pb;
        c3 = (uint32_t)pa;
        c0 = n0;
        c2 = n2;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

/* The words of groups g0 .. g0 + n - 1 (n <= 128): w[l][t] is word l of group g0 + t. Sixteen (AVX-512) or
   eight (AVX2) groups at a time where the CPU has the instructions: the high half of each 32 x 32-bit
   product from the even and odd lanes' 64-bit products (vpmuludq), the low half by vpmulld; chosen once,
   at the first call (__builtin_cpu_supports). The same words whichever runs. */

static void philox_run_scalar(uint32_t g0, int n, uint32_t copy, uint32_t image, uint32_t tag, uint32_t k0,
                              uint32_t k1, uint32_t w[4][LANE]) {
    uint32_t out[4];
    for (int t = 0; t < n; t++) {
        philox(g0 + (uint32_t)t, copy, image, tag, k0, k1, out);
        w[0][t] = out[0]; w[1][t] = out[1]; w[2][t] = out[2]; w[3][t] = out[3];
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

__attribute__((target("avx512f")))
static void philox_run_avx512(uint32_t g0, int n, uint32_t copy, uint32_t image, uint32_t tag, uint32_t k0,
                              uint32_t k1, uint32_t w[4][LANE]) {
    const __m512i ma = _mm512_set1_epi32((int)0xD2511F53u), mb = _mm512_set1_epi32((int)0xCD9E8D57u);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int t = 0; t < n; t += 16) {
        __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32((int)(g0 + (uint32_t)t)), iota);
        __m512i c1 = _mm512_set1_epi32((int)copy), c2 = _mm512_set1_epi32((int)image), c3 = _mm512_set1_epi32((int)tag);
        uint32_t a = k0, b = k1;
        for (int r = 0; r < 10; r++) {
            __m512i even_b = _mm512_mul_epu32(c2, mb), odd_b = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), mb);
            __m512i even_a = _mm512_mul_epu32(c0, ma), odd_a = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), ma);
            __m512i hi_b = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even_b, 32), odd_b);
            __m512i hi_a = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even_a, 32), odd_a);
            __m512i lo_b = _mm512_mullo_epi32(c2, mb), lo_a = _mm512_mullo_epi32(c0, ma);
            c0 = _mm512_xor_si512(_mm512_xor_si512(hi_b, c1), _mm512_set1_epi32((int)a));
            c2 = _mm512_xor_si512(_mm512_xor_si512(hi_a, c3), _mm512_set1_epi32((int)b));
            c1 = lo_b;
            c3 = lo_a;
            a += 0x9E3779B9u;
            b += 0xBB67AE85u;
        }
        _mm512_storeu_si512((void *)&w[0][t], c0);
        _mm512_storeu_si512((void *)&w[1][t], c1);
        _mm512_storeu_si512((void *)&w[2][t], c2);
        _mm512_storeu_si512((void *)&w[3][t], c3);
    }
}

__attribute__((target("avx2")))
static void philox_run_avx2(uint32_t g0, int n, uint32_t copy, uint32_t image, uint32_t tag, uint32_t k0,
                            uint32_t k1, uint32_t w[4][LANE]) {
    const __m256i ma = _mm256_set1_epi32((int)0xD2511F53u), mb = _mm256_set1_epi32((int)0xCD9E8D57u);
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int t = 0; t < n; t += 8) {
        __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32((int)(g0 + (uint32_t)t)), iota);
        __m256i c1 = _mm256_set1_epi32((int)copy), c2 = _mm256_set1_epi32((int)image), c3 = _mm256_set1_epi32((int)tag);
        uint32_t a = k0, b = k1;
        for (int r = 0; r < 10; r++) {
            __m256i even_b = _mm256_mul_epu32(c2, mb), odd_b = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), mb);
            __m256i even_a = _mm256_mul_epu32(c0, ma), odd_a = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), ma);
            __m256i hi_b = _mm256_blend_epi32(_mm256_srli_epi64(even_b, 32), odd_b, 0xAA);
            __m256i hi_a = _mm256_blend_epi32(_mm256_srli_epi64(even_a, 32), odd_a, 0xAA);
            __m256i lo_b = _mm256_mullo_epi32(c2, mb), lo_a = _mm256_mullo_epi32(c0, ma);
            c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), _mm256_set1_epi32((int)a));
            c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), _mm256_set1_epi32((int)b));
            c1 = lo_b;
            c3 = lo_a;
            a += 0x9E3779B9u;
            b += 0xBB67AE85u;
        }
        _mm256_storeu_si256((__m256i *)&w[0][t], c0);
        _mm256_storeu_si256((__m256i *)&w[1][t], c1);
        _mm256_storeu_si256((__m256i *)&w[2][t], c2);
        _mm256_storeu_si256((__m256i *)&w[3][t], c3);
    }
}
#endif

typedef void (*philox_run_fn)(uint32_t, int, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t[4][LANE]);

static philox_run_fn choose_philox_run(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (getenv("FASTSMOOTH_NATIVE_ISA") == NULL || strcmp(getenv("FASTSMOOTH_NATIVE_ISA"), "avx512") == 0) {
        if (__builtin_cpu_supports("avx512f")) return philox_run_avx512;
    }
    if (getenv("FASTSMOOTH_NATIVE_ISA") == NULL || strcmp(getenv("FASTSMOOTH_NATIVE_ISA"), "scalar") != 0) {
        if (__builtin_cpu_supports("avx2")) return philox_run_avx2;
    }
#endif
    return philox_run_scalar;
}

static philox_run_fn philox_run_impl = NULL;

/* A whole vector of groups past n is computed and left unread (w has room for 128); tiny runs go scalar. */
static inline void philox_run(uint32_t g0, int n, uint32_t copy, uint32_t image, uint32_t tag, uint32_t k0,
                              uint32_t k1, uint32_t w[4][LANE]) {
    if (n < 8) philox_run_scalar(g0, n, copy, image, tag, k0, k1, w);
    else philox_run_impl(g0, n, copy, image, tag, k0, k1, w);
}

/* -- float32 functions (vectorizable; Cephes' polynomials, Moshier 1992) -------------------- */

static inline uint32_t bits_of(float f) { union { float f; uint32_t i; } u = { f }; return u.i; }
static inline float float_of(uint32_t i) { union { uint32_t i; float f; } u = { i }; return u.f; }

/* log x for normal x > 0 (the samplers' uniforms are >= 2^-62), branch-free: x = 2^e m with m in
   [sqrt(1/2), sqrt(2)) by integer arithmetic on the bits (as musl's logf), then Cephes' polynomial for
   log(1 + f), f = m - 1, and e log 2 in two parts. */
static inline float fs_logf(float x) {
    uint32_t ix = bits_of(x) + (0x3F800000u - 0x3F3504F3u);
    float fe = (float)((int32_t)(ix >> 23) - 0x7F);
    float f = float_of((ix & 0x007FFFFFu) + 0x3F3504F3u) - 1.0f, z = f * f;
    float y = 7.0376836292e-2f;
    y = y * f - 1.1514610310e-1f;
    y = y * f + 1.1676998740e-1f;
    y = y * f - 1.2420140846e-1f;
    y = y * f + 1.4249322787e-1f;
    y = y * f - 1.6668057665e-1f;
    y = y * f + 2.0000714765e-1f;
    y = y * f - 2.4999993993e-1f;
    y = y * f + 3.3333331174e-1f;
    y = y * f * z;
    y += -2.12194440e-4f * fe;
    y += -0.5f * z;
    return (f + y) + 0.693359375f * fe;
}

/* sin(pi s) and cos(pi s) for s in [-1, 1]: s = q/2 + r with |r| <= 1/4 (exact), Cephes' sinf / cosf
   polynomials on [-pi/4, pi/4], then the quadrant q mod 4 by swapping and sign bits (branch-free). */
static inline void fs_sincospi(float s, float *sn, float *cs) {
    float q = rintf(2.0f * s);
    float r = s - 0.5f * q;
    float x = r * 3.14159265358979f, x2 = x * x;
    float sp = ((-1.9515295891e-4f * x2 + 8.3321608736e-3f) * x2 - 1.6666654611e-1f) * x2 * x + x;
    float cp = ((2.443315711809948e-5f * x2 - 1.388731625493765e-3f) * x2 + 4.166664568298827e-2f) * x2 * x2
               - 0.5f * x2 + 1.0f;
    uint32_t qi = (uint32_t)(int32_t)q & 3u, swap = 0u - (qi & 1u);
    uint32_t sb = bits_of(sp), cb = bits_of(cp);
    uint32_t s1 = (sb & ~swap) | (cb & swap), c1 = (cb & ~swap) | (sb & swap);
    *sn = float_of(s1 ^ ((qi & 2u) << 30));
    *cs = float_of(c1 ^ (((qi + 1u) & 2u) << 30));
}

static inline float u31(uint32_t w) { return ((float)(w & 0x7FFFFFFFu) + 0.5f) * 4.656612873077393e-10f; }
static inline float s32(uint32_t w) { return ((float)(int32_t)w + 0.5f) * 4.656612873077393e-10f; }
static inline double u31_64(uint32_t w) { return ((double)(w & 0x7FFFFFFFu) + 0.5) * 4.656612873077393e-10; }
static inline double s32_64(uint32_t w) { return ((double)(int32_t)w + 0.5) * 4.656612873077393e-10; }

/* -- one chunk of a copy: the values of its elements -------------------------------------------
   vals[e - chunk start] for the chunk's elements: float eps (float mode) or int32 nu (grid mode). */

typedef struct { double log_g; int64_t face; float sign; } expinf_copy;

static expinf_copy expinf_per_copy(const fs_plan *p, uint32_t copy, uint32_t image) {
    expinf_copy out = { -INFINITY, 0, 1.0f };
    uint32_t w[4];
    for (int it = 0; it < p->max_iterations; it++) {   /* Marsaglia & Tsang (2000), float64 */
        philox((uint32_t)it, copy, image, p->domain + TAG_GAMMA, p->k0, p->k1, w);
        double z = sqrt(-2.0 * log(u31_64(w[0]))) * cos(s32_64(w[1]) * 3.141592653589793);
        double y = 1.0 + p->cc * z, v = y * y * y;
        int pos = v > 0.0;
        double vs = pos ? v : 1.0, ua = u31_64(w[2]);
        if (pos && log(ua) < 0.5 * z * z + p->dd - p->dd * vs + p->dd * log(vs)) {
            out.log_g = log(p->dd * vs);
            break;
        }
    }
    philox(0u, copy, image, p->domain + TAG_COPY, p->k0, p->k1, w);
    if (p->boost) out.log_g = out.log_g + log(u31_64(w[3])) * p->inv_alpha;
    uint64_t d = (uint64_t)p->dim, lo = (uint64_t)w[0] * d, hi = (uint64_t)w[1] * d;
    out.face = (int64_t)((hi + (lo >> 32)) >> 32);     /* floor(W d / 2^64), W = w1 2^32 + w0 */
    out.sign = (w[2] & 1u) ? 1.0f : -1.0f;
    return out;
}

/* Elements of lane l that a chunk of ``elems`` elements holds (its groups t < n feed them). */
static inline int lane_len(int elems, int l, int n) {
    int len = elems - l * LANE;
    return len < 0 ? 0 : (len < n ? len : n);
}

FS_CLONES
static void float_chunk(const fs_plan *p, uint32_t chunk, int n, int elems, uint32_t copy, uint32_t image,
                        const expinf_copy *ex, float radius, float *restrict vals) {
    uint32_t w[4][LANE];
    const float lam = p->lam;
    philox_run(chunk * LANE, n, copy, image, p->domain + TAG_ELEMENT, p->k0, p->k1, w);
    if (p->noise == NOISE_GAUSSIAN) {
        for (int h = 0; h < 2; h++) {          /* Box-Muller on lanes (0, 1) and (2, 3) */
            const uint32_t *wa = w[2 * h], *wb = w[2 * h + 1];
            float *va = vals + 2 * h * LANE, *vb = vals + (2 * h + 1) * LANE;
            for (int t = 0, len = lane_len(elems, 2 * h, n); t < len; t++) {
                float low = ((float)(wb[t] & 0xFFu) + 0.5f) * 0.00390625f;
                float u = ((float)(wa[t] & 0x7FFFFFFFu) + low) * 4.656612873077393e-10f;
                float rad = sqrtf(-2.0f * fs_logf(u));
                float s = ((float)((int32_t)wb[t] >> 8) + 0.5f) * 1.1920928955078125e-07f, sn, cs;
                fs_sincospi(s, &sn, &cs);
                va[t] = lam * (rad * cs);
                vb[t] = lam * (rad * sn);
            }
        }
    } else if (p->noise == NOISE_LAPLACE) {
        int first_cell = 0;
        for (int l = 0; l < 4; l++) {
            float *v = vals + l * LANE;
            for (int t = 0, len = lane_len(elems, l, n); t < len; t++) {
                float mag = -fs_logf(u31(w[l][t]));
                v[t] = lam * float_of(bits_of(mag) ^ (w[l][t] & 0x80000000u));   /* the word's sign */
                first_cell |= (w[l][t] & 0x7FFFFFFFu) == 0;
            }
        }
        if (first_cell) {                      /* U31's first cell: 31 more bits (probability 2^-31) */
            uint32_t tail[4][LANE];
            philox_run(chunk * LANE, n, copy, image, p->domain + TAG_LAPLACE_TAIL, p->k0, p->k1, tail);
            for (int l = 0; l < 4; l++)
                for (int t = 0, len = lane_len(elems, l, n); t < len; t++)
                    if ((w[l][t] & 0x7FFFFFFFu) == 0) {
                        float u = ((float)(tail[l][t] & 0x7FFFFFFFu) + 0.5f) * 2.168404344971009e-19f;
                        float mag = -logf(u);
                        vals[l * LANE + t] = lam * (((int32_t)w[l][t] < 0) ? -mag : mag);
                    }
        }
    } else if (p->noise == NOISE_UNIFORM) {
        for (int l = 0; l < 4; l++)
            for (int t = 0, len = lane_len(elems, l, n); t < len; t++) vals[l * LANE + t] = lam * s32(w[l][t]);
    } else {
        for (int l = 0; l < 4; l++)
            for (int t = 0, len = lane_len(elems, l, n); t < len; t++) vals[l * LANE + t] = radius * s32(w[l][t]);
        int64_t local = ex->face - (int64_t)chunk * CHUNK;
        if (local >= 0 && local < CHUNK && (local % LANE) < n) vals[local] = radius * ex->sign;
    }
}

FS_GATHER_CLONES
static void grid_chunk(const fs_plan *p, uint32_t chunk, int n, int elems, uint32_t copy, uint32_t image,
                       const expinf_copy *ex, double a, int32_t *restrict vals) {
    uint32_t w[4][LANE];
    philox_run(chunk * LANE, n, copy, image, p->domain + TAG_ELEMENT, p->k0, p->k1, w);
    if (p->noise == NOISE_EXPINF) {
        uint32_t lw[4][LANE];
        philox_run(chunk * LANE, n, copy, image, p->domain + TAG_GRID_LOW, p->k0, p->k1, lw);
        for (int l = 0; l < 4; l++)
            for (int t = 0, len = lane_len(elems, l, n); t < len; t++) {
                uint64_t kk = ((uint64_t)w[l][t] << 21) | (uint64_t)(lw[l][t] >> 11);
                double s = (double)((int64_t)(2 * kk + 1) - 9007199254740992LL) * 1.1102230246251565e-16;
                vals[l * LANE + t] = (int32_t)floor(a * s + 0.5);
            }
        int64_t local = ex->face - (int64_t)chunk * CHUNK;
        if (local >= 0 && local < CHUNK && (local % LANE) < n) vals[local] = (int32_t)floor(a * (double)ex->sign + 0.5);
        return;
    }
    const int bits = p->bits, shift = 32 - bits;
    const uint32_t mask = (1u << shift) - 1u, amask = (1u << bits) - 1u;
    const uint32_t *restrict packed = p->packed;
    const int32_t offset = p->offset;
    int ties = 0;
    for (int l = 0; l < 4; l++)
        for (int t = 0, len = lane_len(elems, l, n); t < len; t++) {
            uint32_t i = w[l][t] >> shift, v = w[l][t] & mask, e = packed[i], th = e >> bits;
            vals[l * LANE + t] = (v < th ? (int32_t)i : (int32_t)(e & amask)) - offset;
            ties |= v == th;
        }
    if (ties) {                               /* the low word decides (probability <= 2^-(32-bits)) */
        uint32_t lw[4][LANE];
        philox_run(chunk * LANE, n, copy, image, p->domain + TAG_GRID_LOW, p->k0, p->k1, lw);
        for (int l = 0; l < 4; l++)
            for (int t = 0, len = lane_len(elems, l, n); t < len; t++) {
                uint32_t i = w[l][t] >> shift, v = w[l][t] & mask, e = packed[i];
                if (v == e >> bits) vals[l * LANE + t] = (lw[l][t] < p->t_lo[i] ? (int32_t)i : (int32_t)(e & amask)) - offset;
            }
    }
}

/* -- output ------------------------------------------------------------------------------- */

static inline uint16_t bf16_rtne(float y) {
    union { float f; uint32_t i; } u = { y };
    if (y != y) return 0x7FC0;
    return (uint16_t)((u.i + 0x7FFFu + ((u.i >> 16) & 1u)) >> 16);
}

/* Elements e0 .. e0 + n - 1 of a copy's model input into y: x + eps, or fl32((k + nu) / G). */
FS_CLONES
static void model_input(const fs_plan *p, const void *x, const void *vals, int64_t e0, int64_t n, float *restrict y) {
    if (p->grid) {
        const int32_t *k = (const int32_t *)x + e0, *nu = (const int32_t *)vals;
        const float g = (float)p->grid;
        /* the input formed from integers (Voracek & Hein, ICLR 2023); IEEE division: one float per integer */
        for (int64_t i = 0; i < n; i++) y[i] = (float)(k[i] + nu[i]) / g;
    } else {
        const float *xf = (const float *)x + e0, *eps = (const float *)vals;
        for (int64_t i = 0; i < n; i++) y[i] = xf[i] + eps[i];
    }
}

/* out[o + i] = cast(y[i]), i < n: one rounding to the output dtype. */
FS_CLONES
static void put(const fs_plan *p, const float *restrict y, int64_t n, void *restrict out, int64_t o) {
    if (p->out_dtype == OUT_F32) { float *q = (float *)out + o; for (int64_t i = 0; i < n; i++) q[i] = y[i]; }
    else if (p->out_dtype == OUT_BF16) { uint16_t *q = (uint16_t *)out + o; for (int64_t i = 0; i < n; i++) q[i] = bf16_rtne(y[i]); }
    else { _Float16 *q = (_Float16 *)out + o; for (int64_t i = 0; i < n; i++) q[i] = (_Float16)y[i]; }
}

/* A whole copy y (logical order c HW + hw) into a channels_last row (hw C + c), cast; pixel by pixel,
   so that the stores are contiguous (three channels, the images' common case, unrolled). */
FS_CLONES
static void put_channels_last(const fs_plan *p, const float *restrict y, int64_t hw, void *restrict out) {
    const int64_t C = p->channels;
    if (p->out_dtype == OUT_BF16 && C == 3) {
        uint16_t *q = (uint16_t *)out;
        const float *a = y, *b = y + hw, *c = y + 2 * hw;
        for (int64_t i = 0; i < hw; i++) {
            q[3 * i] = bf16_rtne(a[i]);
            q[3 * i + 1] = bf16_rtne(b[i]);
            q[3 * i + 2] = bf16_rtne(c[i]);
        }
        return;
    }
    if (p->out_dtype == OUT_F32 && C == 3) {
        float *q = (float *)out;
        const float *a = y, *b = y + hw, *c = y + 2 * hw;
        for (int64_t i = 0; i < hw; i++) {
            q[3 * i] = a[i];
            q[3 * i + 1] = b[i];
            q[3 * i + 2] = c[i];
        }
        return;
    }
    for (int64_t i = 0; i < hw; i++)
        for (int64_t ch = 0; ch < C; ch++) {
            float v = y[ch * hw + i];
            if (p->out_dtype == OUT_F32) ((float *)out)[i * C + ch] = v;
            else if (p->out_dtype == OUT_BF16) ((uint16_t *)out)[i * C + ch] = bf16_rtne(v);
            else ((_Float16 *)out)[i * C + ch] = (_Float16)v;
        }
}

/* Copies first_copy .. first_copy + count - 1 of image ``image`` from ``x`` (float32 pixels, or int32
   grid indices) into rows out + i * row_stride (elements of the output dtype). Returns 0, or -1 when
   memory runs out. */
int fs_fill(const fs_plan *p, const void *x, void *out, int64_t row_stride, uint32_t image,
            uint32_t first_copy, int64_t count) {
    if (philox_run_impl == NULL) philox_run_impl = choose_philox_run();   /* idempotent: a race is harmless */
    const int64_t d = p->dim, chunks = (d + CHUNK - 1) / CHUNK;
    const int64_t hw = p->channels ? d / p->channels : 1;
    const size_t item = p->out_dtype == OUT_F32 ? 4 : 2;
    union { float f[CHUNK]; int32_t i[CHUNK]; } vals;
    float y[LANE];
    /* channels_last: the copy's model inputs in logical order, then one transposing store */
    float *whole = p->channels ? (float *)malloc((size_t)d * sizeof(float)) : NULL;
    if (p->channels && whole == NULL) return -1;
    for (int64_t c = 0; c < count; c++) {
        uint32_t copy = first_copy + (uint32_t)c;
        expinf_copy ex = { 0.0, -1, 1.0f };
        float radius = 0.0f;
        double a = 0.0;
        if (p->noise == NOISE_EXPINF) {
            ex = expinf_per_copy(p, copy, image);
            radius = (float)(p->lam64 * exp(ex.log_g * p->inv_k));
            a = ((double)p->grid * p->lam64) * exp(ex.log_g * p->inv_k);   /* (G lambda) s^(1/k), as the twins */
        }
        char *row = (char *)out + (size_t)c * (size_t)row_stride * item;
        for (int64_t ch = 0; ch < chunks; ch++) {
            int64_t e0 = ch * CHUNK, n = d - e0 < CHUNK ? d - e0 : CHUNK;
            int groups = n < LANE ? (int)n : LANE;   /* lanes 1-3 hold elements only in a full lane run */
            if (p->grid) grid_chunk(p, (uint32_t)ch, groups, (int)n, copy, image, &ex, a, vals.i);
            else float_chunk(p, (uint32_t)ch, groups, (int)n, copy, image, &ex, radius, vals.f);
            /* a partial chunk holds lanes l with e0 + l*128 + t < d: lane by lane */
            for (int l = 0; l < 4; l++) {
                int64_t start = l * LANE, len = n - start < LANE ? n - start : LANE;
                if (len <= 0) break;
                if (whole != NULL) {
                    model_input(p, x, (const char *)&vals + start * 4, e0 + start, len, whole + e0 + start);
                } else if (p->out_dtype == OUT_F32) {   /* straight into the row: no second pass */
                    model_input(p, x, (const char *)&vals + start * 4, e0 + start, len, (float *)row + e0 + start);
                } else {
                    model_input(p, x, (const char *)&vals + start * 4, e0 + start, len, y);
                    put(p, y, len, row, e0 + start);
                }
            }
        }
        if (whole != NULL) put_channels_last(p, whole, hw, row);
    }
    free(whole);
    return 0;
}

/* One share of a fill: copies first_copy .. + count of one image into rows from out. */
typedef struct {
    const void *x;
    void *out;
    uint32_t image, first_copy;
    int64_t count;
} fs_piece;

/* The pieces of a fill on ``threads`` threads of OpenMP's team -- the very team torch runs its
   intra-op work on when both use one libgomp (the loader shares the already-loaded libgomp.so.1):
   its threads are awake right after a forward, where a pool of our own would wait for a core that
   one of them is spinning on. Pieces write disjoint rows. */
int fs_fill_pieces(const fs_plan *p, const fs_piece *pieces, int64_t n_pieces, int64_t row_stride, int threads) {
    int failed = 0;
    if (philox_run_impl == NULL) philox_run_impl = choose_philox_run();
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static, 1) reduction(| : failed)
#endif
    for (int64_t i = 0; i < n_pieces; i++)
        failed |= fs_fill(p, pieces[i].x, pieces[i].out, row_stride, pieces[i].image, pieces[i].first_copy,
                          pieces[i].count) != 0;
    (void)threads;
    return failed ? -1 : 0;
}

/* Votes of float32 logits (rows x K, row stride in elements): counts[slots[b] * K + argmax] += 1 for rows
   whose logits are all finite, ties to the lowest class (as torch.argmax); the other rows add one to
   *nonfinite and never vote (DESIGN §5). The torch twin is kernels/vote.py's vote_reference. */
void fs_vote(const float *logits, int64_t rows, int64_t K, int64_t row_stride, const int64_t *slots,
             int64_t *counts, int64_t *nonfinite) {
    int64_t bad = 0;
    for (int64_t b = 0; b < rows; b++) {
        const float *z = logits + b * row_stride;
        int64_t best = 0;
        float top = z[0];
        int finite = 1;
        for (int64_t k = 0; k < K; k++) {
            float v = z[k];
            finite &= (v - v) == 0.0f;              /* false for NaN and +-inf */
            if (v > top) { top = v; best = k; }
        }
        if (finite) counts[slots[b] * K + best] += 1;
        else bad += 1;
    }
    *nonfinite += bad;
}

int fs_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int fs_abi_version(void) { return 3; }

/* Which Philox path runs: 2 AVX-512, 1 AVX2, 0 scalar (FASTSMOOTH_NATIVE_ISA=avx2|scalar caps it, for tests). */
int fs_isa(void) {
    philox_run_fn f = choose_philox_run();
#if defined(__x86_64__) && defined(__GNUC__)
    if (f == philox_run_avx512) return 2;
    if (f == philox_run_avx2) return 1;
#endif
    return f == philox_run_scalar ? 0 : -1;
}

static struct PyModuleDef module = { PyModuleDef_HEAD_INIT, "_native_noise",
                                     "fastsmooth's native noise sampler (called through ctypes).", -1,
                                     NULL, NULL, NULL, NULL, NULL };

PyMODINIT_FUNC PyInit__native_noise(void) { return PyModule_Create(&module); }
