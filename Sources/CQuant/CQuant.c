#include "CQuant.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define PF2LORA_X86 1
#include <immintrin.h>
#include <cpuid.h>
#endif

#define QK 32
#define BLOCK_BYTES 34

// MARK: - Half to float, portable (the scalar path must not need F16C)

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000 | (man << 13);                    // inf, nan
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);           // normal
    } else if (man == 0) {
        bits = sign;                                               // zero
    } else {                                                       // subnormal: normalize
        int e = -1;
        do { man <<= 1; e++; } while ((man & 0x400) == 0);
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t load_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

// MARK: - CPU features

#ifdef PF2LORA_X86
static int detect_isa(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return PF2LORA_ISA_SCALAR;
    int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    if (!(fma && osxsave && avx && f16c)) return PF2LORA_ISA_SCALAR;
    // The OS must save the YMM registers (XCR0 bits 1 and 2).
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 6) != 6) return PF2LORA_ISA_SCALAR;
    if (__get_cpuid_max(0, 0) < 7) return PF2LORA_ISA_SCALAR;
    __cpuid_count(7, 0, a, b, c, d);
    if (!((b >> 5) & 1)) return PF2LORA_ISA_SCALAR;                // AVX2
    __cpuid_count(7, 1, a, b, c, d);
    if ((a >> 4) & 1) return PF2LORA_ISA_AVXVNNI;                  // AVX-VNNI
    return PF2LORA_ISA_AVX2;
}
#else
static int detect_isa(void) { return PF2LORA_ISA_SCALAR; }
#endif

static int cpu_level = -1;   // detected once; racing first calls compute the same value
static int max_level = 99;

int pf2lora_cpu_isa(void) {
    int l = __atomic_load_n(&cpu_level, __ATOMIC_RELAXED);
    if (l < 0) { l = detect_isa(); __atomic_store_n(&cpu_level, l, __ATOMIC_RELAXED); }
    return l;
}

int pf2lora_quant_isa(void) {
    int cpu = pf2lora_cpu_isa(), m = __atomic_load_n(&max_level, __ATOMIC_RELAXED);
    return cpu < m ? cpu : m;
}

int pf2lora_quant_set_isa(int level) {
    __atomic_store_n(&max_level, level < 0 ? 0 : level, __ATOMIC_RELAXED);
    return pf2lora_quant_isa();
}

const char *pf2lora_cpu_requirement_error(int needs_avx2, int isa) {
    if (!needs_avx2 || isa >= PF2LORA_ISA_AVX2) return 0;
    return "this pf2lora was built for x86-64 CPUs with AVX2, FMA and F16C (Intel Haswell, AMD Excavator and later), "
           "and this CPU (or its OS) does not offer them; build it for this machine with "
           "PF2LORA_TARGET_CPU=generic swift build -c release (portable, slower vector code; q8_0 weights use a scalar path)";
}

// MARK: - Activation quantization

static void quantize_scalar(const float *x, int8_t *q, float *d, long n) {
    for (long b = 0; b < n / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0;
        for (int i = 0; i < QK; i++) { float a = fabsf(xb[i]); if (a > amax) amax = a; }
        float db = amax / 127.0f, id = db != 0 ? 1.0f / db : 0.0f;
        d[b] = db;
        for (int i = 0; i < QK; i++) q[b * QK + i] = (int8_t)nearbyintf(xb[i] * id);   // nearest even
    }
}

#ifdef PF2LORA_X86
__attribute__((target("avx2,fma,f16c")))
static void quantize_avx2(const float *x, int8_t *q, float *d, long n) {
    const __m256 signBit = _mm256_set1_ps(-0.0f);
    for (long b = 0; b < n / QK; b++) {
        const float *xb = x + b * QK;
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8), v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(signBit, v0), _mm256_andnot_ps(signBit, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(signBit, v2), _mm256_andnot_ps(signBit, v3)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float amax = _mm_cvtss_f32(h);
        float db = amax / 127.0f, id = db != 0 ? 1.0f / db : 0.0f;
        d[b] = db;
        __m256 s = _mm256_set1_ps(id);
        // cvtps2dq rounds to nearest even (the default MXCSR mode), as nearbyintf above.
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, s)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, s));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, s)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, s));
        // int32 -> int16 -> int8; the packs interleave 128-bit lanes, the permute puts them back in order.
        __m256i p01 = _mm256_packs_epi32(i0, i1), p23 = _mm256_packs_epi32(i2, i3);
        __m256i p = _mm256_packs_epi16(p01, p23);
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + b * QK), p);
    }
}
#endif

void pf2lora_q8_quantize_activations(const float *x, int8_t *q, float *d, long n) {
#ifdef PF2LORA_X86
    if (pf2lora_quant_isa() >= PF2LORA_ISA_AVX2) { quantize_avx2(x, q, d, n); return; }
#endif
    quantize_scalar(x, q, d, n);
}

// MARK: - Dot products
//
// Every path computes, for each block j, eight int32 lanes isum[k] = sum of w * x over bytes
// 4k..4k+3 (exact), then acc[j % 4][k] = fma(dw_j * dx_j, float(isum[k]), acc[j % 4][k]) (blocks
// past the last multiple of 4 go to acc[0]), and finally ((acc0 + acc1) + (acc2 + acc3)) reduced as
// lanes k + (k + 4), then (0 + 2, 1 + 3), then (0 + 1). The scalar path does exactly that, so all
// paths agree to the bit.

static float dot_scalar(const uint8_t *row, long nb, const int8_t *xq, const float *xd) {
    float acc[4][8] = {{0}};
    long full = nb / 4 * 4;
    for (long j = 0; j < nb; j++) {
        const uint8_t *blk = row + j * BLOCK_BYTES;
        const int8_t *qw = (const int8_t *)(blk + 2), *qx = xq + j * QK;
        float s = half_to_float(load_u16(blk)) * xd[j];
        float *a = acc[j < full ? j % 4 : 0];
        for (int k = 0; k < 8; k++) {
            int32_t t = 0;
            for (int i = 4 * k; i < 4 * k + 4; i++) t += (int32_t)qw[i] * (int32_t)qx[i];
            a[k] = fmaf(s, (float)t, a[k]);
        }
    }
    float v[8];
    for (int k = 0; k < 8; k++) v[k] = (acc[0][k] + acc[1][k]) + (acc[2][k] + acc[3][k]);
    float h[4];
    for (int k = 0; k < 4; k++) h[k] = v[k] + v[k + 4];
    return (h[0] + h[2]) + (h[1] + h[3]);
}

#ifdef PF2LORA_X86
__attribute__((target("avx2,fma,f16c")))
static inline float hsum8(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

// The scales of blocks j..j+3 times the inputs' (dw_j * dx_j), four at once. The half scales are
// inserted into a zeroed register: a lone `_cvtsh_ss` (or a load into an undefined register) is
// lowered to a `vpinsrw` into whatever register is at hand, here an accumulator, which chained
// every block's scale to the previous FMA and serialized the four accumulators (seen in the
// disassembly).
__attribute__((target("avx2,fma,f16c")))
static inline __m128 scales4(const uint8_t *row, long j, const float *xd) {
    __m128i h = _mm_setzero_si128();
    h = _mm_insert_epi16(h, load_u16(row + j * BLOCK_BYTES), 0);
    h = _mm_insert_epi16(h, load_u16(row + (j + 1) * BLOCK_BYTES), 1);
    h = _mm_insert_epi16(h, load_u16(row + (j + 2) * BLOCK_BYTES), 2);
    h = _mm_insert_epi16(h, load_u16(row + (j + 3) * BLOCK_BYTES), 3);
    return _mm_mul_ps(_mm_cvtph_ps(h), _mm_loadu_ps(xd + j));
}

__attribute__((target("avx2,fma,f16c")))
static inline __m128 scale1(const uint8_t *row, long j, const float *xd) {
    __m128i h = _mm_insert_epi16(_mm_setzero_si128(), load_u16(row + j * BLOCK_BYTES), 0);
    return _mm_mul_ss(_mm_cvtph_ps(h), _mm_load_ss(xd + j));
}

// Lane k of four scales, in all eight lanes.
#define LANE(S4, K) _mm256_permutevar8x32_ps(_mm256_castps128_ps256(S4), _mm256_set1_epi32(K))

#define Q8_BLOCK(J, ACC, ISUM, SCALE)                                                            \
    {                                                                                            \
        const uint8_t *blk = row + (J) * BLOCK_BYTES;                                            \
        __m256i w = _mm256_loadu_si256((const __m256i *)(blk + 2));                              \
        __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (J) * QK));                        \
        __m256i s32 = ISUM(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));                      \
        ACC = _mm256_fmadd_ps(SCALE, _mm256_cvtepi32_ps(s32), ACC);                              \
    }

// |w| (unsigned) times sign-adjusted x: pairs to int16 (no saturation: |w|, |x| <= 128, 127), then
// pairs of those to int32: lane k sums bytes 4k..4k+3.
__attribute__((target("avx2,fma,f16c")))
static inline __m256i isum_avx2(__m256i aw, __m256i sx) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1));
}

// vpdpbusd: unsigned bytes times signed bytes, groups of 4 summed into int32 lanes.
__attribute__((target("avxvnni,avx2,fma,f16c")))
static inline __m256i isum_vnni(__m256i aw, __m256i sx) {
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), aw, sx);
}

#define DOT_BODY(ISUM)                                                                           \
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                  \
    long j = 0;                                                                                  \
    for (; j + 4 <= nb; j += 4) {                                                                \
        __m128 s4 = scales4(row, j, xd);                                                         \
        Q8_BLOCK(j, a0, ISUM, LANE(s4, 0)) Q8_BLOCK(j + 1, a1, ISUM, LANE(s4, 1))                \
        Q8_BLOCK(j + 2, a2, ISUM, LANE(s4, 2)) Q8_BLOCK(j + 3, a3, ISUM, LANE(s4, 3))            \
    }                                                                                            \
    for (; j < nb; j++) Q8_BLOCK(j, a0, ISUM, _mm256_broadcastss_ps(scale1(row, j, xd)))        \
    return hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));

__attribute__((target("avx2,fma,f16c")))
static float dot_avx2(const uint8_t *row, long nb, const int8_t *xq, const float *xd) { DOT_BODY(isum_avx2) }

__attribute__((target("avxvnni,avx2,fma,f16c")))
static float dot_vnni(const uint8_t *row, long nb, const int8_t *xq, const float *xd) { DOT_BODY(isum_vnni) }
#endif

typedef float (*dot_fn)(const uint8_t *, long, const int8_t *, const float *);

void pf2lora_q8_0_dot_rows(const void *w, long cols, const int8_t *xq, const float *xd, long count,
                           long row0, long row1, float *out, long stride) {
    long nb = cols / QK, rowBytes = nb * BLOCK_BYTES;
    dot_fn dot = dot_scalar;
#ifdef PF2LORA_X86
    int isa = pf2lora_quant_isa();
    if (isa >= PF2LORA_ISA_AVXVNNI) dot = dot_vnni;
    else if (isa >= PF2LORA_ISA_AVX2) dot = dot_avx2;
#endif
    // Row by row: the row (cols * 34 / 32 bytes) is read from memory once and stays in L1 for
    // every sequence.
    for (long r = row0; r < row1; r++) {
        const uint8_t *row = (const uint8_t *)w + r * rowBytes;
        for (long v = 0; v < count; v++) out[v * stride + r] = dot(row, nb, xq + v * cols, xd + v * nb);
    }
}
