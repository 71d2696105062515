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

#include "half.h"

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

// AVX-512F with the OS saving the opmask and all 32 zmm registers (XCR0 bits 1, 2, 5, 6, 7).
#ifdef PF2LORA_X86
static int detect_avx512(void) {
    if (detect_isa() < PF2LORA_ISA_AVX2) return 0;
    unsigned a, b, c, d, lo, hi;
    __cpuid_count(7, 0, a, b, c, d);
    if (!((b >> 16) & 1)) return 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (lo & 0xe6) == 0xe6;
}
#else
static int detect_avx512(void) { return 0; }
#endif

static int cpu_avx512 = -1;

int pf2lora_cpu_has_avx512(void) {
    int v = __atomic_load_n(&cpu_avx512, __ATOMIC_RELAXED);
    if (v < 0) { v = detect_avx512(); __atomic_store_n(&cpu_avx512, v, __ATOMIC_RELAXED); }
    return v;
}

int pf2lora_use_avx512(void) {
    return __atomic_load_n(&max_level, __ATOMIC_RELAXED) >= PF2LORA_ISA_AVX512 && pf2lora_cpu_has_avx512();
}

const char *pf2lora_cpu_requirement_error(int needs_avx2, int isa) {
    if (!needs_avx2 || isa >= PF2LORA_ISA_AVX2) return 0;
    return "this pf2lora was built for x86-64 CPUs with AVX2, FMA and F16C (Intel Haswell, AMD Excavator and later), "
           "and this CPU (or its OS) does not offer them; build it for this machine with "
           "PF2LORA_TARGET_CPU=generic swift build -c release (portable, slower vector code; q8_0 weights use a scalar path)";
}

// MARK: - Activation quantization

// The interleaved layout's correction per block (see "The four-row interleaved layout"): -128 times
// the sums of the block's values 8c..8c+3 and 8c+4..8c+7 over its four chunks c.
static inline void block_corrections(const int8_t *q, int32_t *c) {
    int32_t s0 = 0, s1 = 0;
    for (int k = 0; k < 4; k++) {
        for (int i = 0; i < 4; i++) { s0 += q[8 * k + i]; s1 += q[8 * k + 4 + i]; }
    }
    c[0] = -128 * s0; c[1] = -128 * s1;
}

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

void pf2lora_q8_quantize_activations(const float *x, int8_t *q, float *d, int32_t *c, long n) {
#ifdef PF2LORA_X86
    if (pf2lora_quant_isa() >= PF2LORA_ISA_AVX2) quantize_avx2(x, q, d, n);
    else
#endif
    quantize_scalar(x, q, d, n);
    if (c) for (long b = 0; b < n / QK; b++) block_corrections(q + b * QK, c + 2 * b);
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

// MARK: - The four-row interleaved layout (q8_0x4)
//
// Rows 4g..4g+3 form group g (rows past the last are padding, never read out). With nb = cols / 32
// blocks per row and G = ceil(rows / 4) groups, the quants come first: block j of group g is 128
// bytes at (g * nb + j) * 128, four chunks of 32 bytes, chunk c holding values 8c..8c+7 of the four
// rows (8 bytes each, row order), each value q stored as the unsigned byte q + 128 (q XOR 0x80). The
// scales follow all quants: at G * nb * 128 + (g * nb + j) * 8 the four rows' f16 d of block j. One
// 32-byte load then serves four rows, the activations' 8 bytes are broadcast to all four, and one FMA
// per block applies the four rows' scales (llama.cpp's REPACK q8_0 gemv is built the same way).
//
// Why + 128: x86's int8 dot product (`vpdpbusd`) multiplies unsigned bytes by signed ones. With
// signed weights each chunk needed two `vpsign`s to move the sign onto the activations; with
// unsigned ones it is one `vpdpbusd` straight into the accumulator, whose start is the block's
// correction -128 * (sum of the activations over the same bytes), computed once per input
// (`pf2lora_q8_quantize_activations`' c). Session 14: 2 uops per 32 weight bytes instead of 6, the
// same bits; over L1- / L2-resident weights only 1.03-1.07x faster (the kernel was not bound by its
// instruction count), streaming from memory level.
//
// Every path computes, for row r and block j, two exact int32 sums L0 = sum over c of values
// 8c..8c+3 (w * x) and L1 = sum over c of values 8c+4..8c+7; then with s = dw_j * dx_j (f32),
// (A0, A1) = fma(s, (L0, L1), (A0, A1)) for even j and for a last unpaired block, (B0, B1) likewise
// for odd j; the result is (A0 + B0) + (A1 + B1). The scalar path does exactly that, so all paths
// agree to the bit, whatever the batch or the row range.

long pf2lora_q8_0x4_bytes(long rows, long cols) { return (rows + 3) / 4 * (cols / QK) * 136; }

static inline uint8_t *x4_quants(uint8_t *w, long cols, long g, long j) { return w + (g * (cols / QK) + j) * 128; }
static inline uint8_t *x4_scale(uint8_t *w, long rows, long cols, long r, long j) {
    long nb = cols / QK, G = (rows + 3) / 4;
    return w + G * nb * 128 + ((r / 4) * nb + j) * 8 + (r % 4) * 2;
}

void pf2lora_q8_0x4_set_row(void *w, long rows, long cols, long r, const void *blocks) {
    const uint8_t *src = (const uint8_t *)blocks;
    for (long j = 0; j < cols / QK; j++) {
        const uint8_t *blk = src + j * BLOCK_BYTES;
        memcpy(x4_scale((uint8_t *)w, rows, cols, r, j), blk, 2);
        uint8_t *q = x4_quants((uint8_t *)w, cols, r / 4, j) + (r % 4) * 8;
        for (int c = 0; c < 4; c++)
            for (int i = 0; i < 8; i++) q[32 * c + i] = blk[2 + 8 * c + i] ^ 0x80;
    }
}

void pf2lora_q8_0x4_get_row(const void *w, long rows, long cols, long r, void *blocks) {
    uint8_t *dst = (uint8_t *)blocks;
    for (long j = 0; j < cols / QK; j++) {
        uint8_t *blk = dst + j * BLOCK_BYTES;
        memcpy(blk, x4_scale((uint8_t *)w, rows, cols, r, j), 2);
        const uint8_t *q = x4_quants((uint8_t *)w, cols, r / 4, j) + (r % 4) * 8;
        for (int c = 0; c < 4; c++)
            for (int i = 0; i < 8; i++) blk[2 + 8 * c + i] = q[32 * c + i] ^ 0x80;
    }
}

void pf2lora_q8_0x4_row_to_f32(const void *w, long rows, long cols, long r, float *out) {
    for (long j = 0; j < cols / QK; j++) {
        float d = half_to_float(load_u16(x4_scale((uint8_t *)w, rows, cols, r, j)));
        const uint8_t *q = x4_quants((uint8_t *)w, cols, r / 4, j) + (r % 4) * 8;
        for (int c = 0; c < 4; c++)
            for (int i = 0; i < 8; i++) out[j * QK + 8 * c + i] = d * (float)(int8_t)(q[32 * c + i] ^ 0x80);
    }
}

static inline void dot4_scalar(const uint8_t *q, const uint8_t *sc, long nb, const int8_t *xq, const float *xd, const int32_t *xc,
                               float *out) {
    (void)xc;
    for (int rr = 0; rr < 4; rr++) {
        float a0 = 0, a1 = 0, b0 = 0, b1 = 0;
        for (long j = 0; j < nb; j++) {
            const uint8_t *qw = q + j * 128 + rr * 8;
            const int8_t *qx = xq + j * QK;
            int32_t l0 = 0, l1 = 0;
            for (int c = 0; c < 4; c++) {
                for (int i = 0; i < 4; i++) l0 += (int32_t)(int8_t)(qw[32 * c + i] ^ 0x80) * (int32_t)qx[8 * c + i];
                for (int i = 4; i < 8; i++) l1 += (int32_t)(int8_t)(qw[32 * c + i] ^ 0x80) * (int32_t)qx[8 * c + i];
            }
            float s = half_to_float(load_u16(sc + j * 8 + rr * 2)) * xd[j];
            if (j & 1) { b0 = fmaf(s, (float)l0, b0); b1 = fmaf(s, (float)l1, b1); }
            else { a0 = fmaf(s, (float)l0, a0); a1 = fmaf(s, (float)l1, a1); }
        }
        out[rr] = (a0 + b0) + (a1 + b1);
    }
}

#ifdef PF2LORA_X86
// One chunk: four rows' 8 values against the same 8 activation values, into T's int32 lanes (row k
// in lanes 2k (values 0-3) and 2k + 1 (values 4-7)). AVX2: the stored byte back to signed (XOR
// 0x80), then |w| times the sign-moved x in pairs (`vpmaddubsw`: |w| <= 128, |x| <= 127, no
// saturation) and pairs of those (`vpmaddwd`), added. AVX-VNNI: the stored unsigned byte times x
// (`vpdpbusd`) straight into T, which starts at the block's correction (X4_START_VNNI).
#define X4_CHUNK_AVX2(T, QB, XQ, C)                                                              \
    {                                                                                            \
        __m256i w = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)((QB) + 32 * (C))), _mm256_set1_epi8((char)0x80)); \
        int64_t xv; memcpy(&xv, (XQ) + 8 * (C), 8);                                              \
        __m256i x = _mm256_set1_epi64x(xv);                                                      \
        T = _mm256_add_epi32(T, isum_avx2(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)));     \
    }
#define X4_CHUNK_VNNI(T, QB, XQ, C)                                                              \
    {                                                                                            \
        int64_t xv; memcpy(&xv, (XQ) + 8 * (C), 8);                                              \
        T = _mm256_dpbusd_avx_epi32(T, _mm256_loadu_si256((const __m256i *)((QB) + 32 * (C))), _mm256_set1_epi64x(xv)); \
    }
#define X4_START_AVX2(J) _mm256_setzero_si256()
#define X4_START_VNNI(J) x4_correction(xc, J)

// Block j's correction in every row's lanes: (-128 X0, -128 X1) repeated.
__attribute__((target("avx2")))
static inline __m256i x4_correction(const int32_t *xc, long j) {
    int64_t c; memcpy(&c, xc + 2 * j, 8);
    return _mm256_set1_epi64x(c);
}

// The quants stream through memory (one pass over every matrix per token): the loads of the
// products alone keep too few cache misses in flight to reach a plain read's bandwidth at 1 thread,
// so each iteration asks for the four lines X4_PREFETCH_BYTES ahead (past a matrix's end they are
// harmless hints). A C microbenchmark over the SmolLM2 shape's 143 MB (alternating rounds): products
// 0.76-0.78x of a plain read without, 0.86-0.95x with 1-3 KB ahead (session 7's machine). On session
// 11's (AMD, family 26; Benchmarks/q8_0x4_stream_microbench.c, thread CPU time, per-round ratios)
// 1.5 KB gave 0.82-0.88x and 4-8 KB 0.92-1.00x (SmolLM2 and GPT-2 shapes), flat over 4-8 KB: 6 KB.
// A plain read gains nothing from the same hints (0.98-1.01x), so the read bound stands. Loads
// only: no result changes.
//
// Two tiers on the AVX2 path (session 15; AMD EPYC family 23 model 49 = Zen 2, AVX2 without
// AVX-VNNI, one core reading ~15 GB/s). One distance was not enough there: 6 KB to L1 streamed at
// 0.82-0.84x of a plain read (1.5-12 KB alike), 6 or 16 KB to L2 alone or NTA 0.82-0.86x; 1.5 KB to
// L1 plus 12-16 KB to L2 0.86-0.89x (0.75-6 KB plus 8-16 KB 0.84-0.88x; 3 + 24 KB 0.82-0.83x).
// Benchmarks/q8_0x4_threads_microbench.c `lib1`, binaries alternating, medians of 5 rounds. Decode,
// 1 thread, vs the in-process read: SmolLM2 0.82-0.84 -> 0.86-0.87x, GPT-2 0.84-0.86 -> 0.90-0.93x.
// The compute is not the limit there (in L2 the kernel runs at ~30 GB/s, and dropping the XOR below
// changed nothing). Nor is the scales' second stream (a plain read of 143 MB plus a 1/16 side stream
// reads as fast as one stream, session 16). Every line needs both hints there: one hint per two
// lines in either tier (the adjacent line left to the hardware) streamed at 0.60-0.85x (session 16,
// `lib1` with 2 or 1 of the 4 lines per tier). A plain read slows ~10 % under the same hints, about
// the kernel's remaining gap to the hint-free read.
//
// One short tier on the AVX2 path since session 17 (the same Zen 2): each line asked for 768 bytes
// ahead into L1, nothing into L2. Sessions 15-16 tried single distances from 1.5 KB up only; below
// that the stream is another: over the SmolLM2 shape's 143 MB, 1 thread, 7 alternating rounds
// against the same round's plain read, the two tiers 0.84-0.88x, one tier 256 bytes 0.87x, 512
// 0.97x, 768 0.96x, 1 KB 0.98x (1.5-12 KB 0.82-0.84x, session 15), no hints 0.76-0.77x
// (Benchmarks/q8_0x4_distance_microbench.c). Decode,
// q8_0, contexts 512-576, 3-4 alternating rounds against the two tiers: SmolLM2 +16 % at 1 thread,
// +7 % at 2 (every round; 0.79 -> 0.87x and 0.80 -> 0.85x of the in-process read bound), GPT-2 +9 %
// and +8 %. The AVX-VNNI path keeps the one 6 KB tier measured on its machine (session 11's, above):
// the AVX2 loop is the only one an AVX2-only CPU runs, and the one tuned on it.
#ifndef X4_PREFETCH_BYTES   // a -D for the microbenchmarks
#define X4_PREFETCH_BYTES 6144
#endif
#ifndef X4_NEAR_BYTES
#define X4_NEAR_BYTES 768
#endif
#define X4_PREFETCH_LINES(Q, AHEAD, HINT)                                                        \
    _mm_prefetch((const char *)(Q) + (AHEAD), HINT);                                             \
    _mm_prefetch((const char *)(Q) + (AHEAD) + 64, HINT);                                        \
    _mm_prefetch((const char *)(Q) + (AHEAD) + 128, HINT);                                       \
    _mm_prefetch((const char *)(Q) + (AHEAD) + 192, HINT);
#define X4_PREFETCH(Q) X4_PREFETCH_LINES(Q, X4_PREFETCH_BYTES, _MM_HINT_T0)
#define X4_PREFETCH_NEAR(Q) X4_PREFETCH_LINES(Q, X4_NEAR_BYTES, _MM_HINT_T0)

#define DOT4_BODY(CHUNK, START, PREFETCH)                                                        \
    const __m256i lo4 = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3), hi4 = _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7); \
    __m256 a = _mm256_setzero_ps(), b = a;                                                       \
    long j = 0;                                                                                  \
    for (; j + 2 <= nb; j += 2) {                                                                \
        const uint8_t *q0 = q + j * 128, *q1 = q0 + 128;                                         \
        const int8_t *x0 = xq + j * QK, *x1 = x0 + QK;                                           \
        PREFETCH(q0)                                                                             \
        /* two accumulators per block, so that the chunks' sums do not wait on one another */    \
        __m256i t = START(j), u = START(j + 1), t2 = _mm256_setzero_si256(), u2 = t2;            \
        CHUNK(t, q0, x0, 0) CHUNK(u, q1, x1, 0) CHUNK(t2, q0, x0, 1) CHUNK(u2, q1, x1, 1)        \
        CHUNK(t, q0, x0, 2) CHUNK(u, q1, x1, 2) CHUNK(t2, q0, x0, 3) CHUNK(u2, q1, x1, 3)        \
        t = _mm256_add_epi32(t, t2); u = _mm256_add_epi32(u, u2);                                \
        __m256 s = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + j * 8))), \
                                 _mm256_setr_m128(_mm_broadcast_ss(xd + j), _mm_broadcast_ss(xd + j + 1))); \
        a = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(s, lo4), _mm256_cvtepi32_ps(t), a);         \
        b = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(s, hi4), _mm256_cvtepi32_ps(u), b);         \
    }                                                                                            \
    if (j < nb) {                                                                                \
        const uint8_t *q0 = q + j * 128;                                                         \
        const int8_t *x0 = xq + j * QK;                                                          \
        __m256i t = START(j), t2 = _mm256_setzero_si256();                                       \
        CHUNK(t, q0, x0, 0) CHUNK(t2, q0, x0, 1) CHUNK(t, q0, x0, 2) CHUNK(t2, q0, x0, 3)        \
        t = _mm256_add_epi32(t, t2);                                                             \
        __m128 s = _mm_mul_ps(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(sc + j * 8))), _mm_broadcast_ss(xd + j)); \
        a = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(_mm256_castps128_ps256(s), lo4), _mm256_cvtepi32_ps(t), a); \
    }                                                                                            \
    __m256 ab = _mm256_add_ps(a, b);                        /* (A0 + B0, A1 + B1) per row */     \
    __m256 h = _mm256_add_ps(ab, _mm256_permute_ps(ab, 0xB1));                                   \
    __m128 l = _mm256_castps256_ps128(h), hh = _mm256_extractf128_ps(h, 1);                      \
    out[0] = _mm_cvtss_f32(l); out[1] = _mm_cvtss_f32(_mm_movehl_ps(l, l));                      \
    out[2] = _mm_cvtss_f32(hh); out[3] = _mm_cvtss_f32(_mm_movehl_ps(hh, hh));

__attribute__((target("avx2,fma,f16c"), always_inline))
static inline void dot4_avx2(const uint8_t *q, const uint8_t *sc, long nb, const int8_t *xq, const float *xd, const int32_t *xc,
                             float *out) { (void)xc; DOT4_BODY(X4_CHUNK_AVX2, X4_START_AVX2, X4_PREFETCH_NEAR) }

__attribute__((target("avxvnni,avx2,fma,f16c"), always_inline))
static inline void dot4_vnni(const uint8_t *q, const uint8_t *sc, long nb, const int8_t *xq, const float *xd, const int32_t *xc,
                             float *out) { DOT4_BODY(X4_CHUNK_VNNI, X4_START_VNNI, X4_PREFETCH) }
#endif

// Group by group: its 4 rows (cols * 34 / 8 bytes) are read from memory once and stay in L1 for
// every sequence. The AVX2 loop takes the groups of [row0, row1) as two streams, the first half's and
// the second half's groups in turn (STREAMS 2; each group's outputs as before, the same bits): two
// hinted streams kept the memory busier on session 17's Zen 2 (Benchmarks/q8_0x4_distance_microbench.c,
// 768 bytes ahead: one stream 0.94-0.98x of a plain read, two 0.98-1.04x, three no better; decode
// q8_0 4 alternating rounds: SmolLM2 +3 % / +2 % at 1 / 2 threads, GPT-2 +0 % / +1.5 %). A group only partly in [row0, row1) is computed whole; only its rows in range are
// written. One loop per ISA with its dot product inlined (through a function pointer per group, the
// calls and the copies out of o[4] took ~4% of a 1-thread decode step's samples).
#define X4_GROUP(DOT, G)                                                                         \
    {                                                                                            \
        const long g = (G);                                                                      \
        const uint8_t *q = quants + g * nb * 128, *sc = scales + g * nb * 8;                     \
        long r0 = 4 * g < row0 ? row0 - 4 * g : 0, r1 = 4 * g + 4 > row1 ? row1 - 4 * g : 4;     \
        for (long v = 0; v < count; v++) {                                                      \
            float o[4];                                                                          \
            DOT(q, sc, nb, xq + v * cols, xd + v * nb, xc + 2 * v * nb, o);                      \
            for (long k = r0; k < r1; k++) out[v * stride + 4 * g + k] = o[k];                   \
        }                                                                                        \
    }
#define X4_ROWS(NAME, DOT, ATTR, STREAMS)                                                        \
    ATTR static void NAME(const uint8_t *quants, const uint8_t *scales, long nb, const int8_t *xq, const float *xd,       \
                          const int32_t *xc, long count, long cols, long row0, long row1, float *out, long stride) {    \
        /* STREAMS 1: every group in the first "half" */                                        \
        const long g0 = row0 / 4, n = (row1 - 1) / 4 - g0 + 1, half = (STREAMS) == 2 ? (n + 1) / 2 : n; \
        for (long i = 0; i < half; i++) {                                                        \
            X4_GROUP(DOT, g0 + i)                                                                \
            if (half + i < n) X4_GROUP(DOT, g0 + half + i)                                       \
        }                                                                                        \
    }

X4_ROWS(rows4_scalar, dot4_scalar, , 1)
#ifdef PF2LORA_X86
X4_ROWS(rows4_avx2, dot4_avx2, __attribute__((target("avx2,fma,f16c"))), 2)
X4_ROWS(rows4_vnni, dot4_vnni, __attribute__((target("avxvnni,avx2,fma,f16c"))), 1)
#endif

void pf2lora_q8_0x4_dot_rows(const void *w, long rows, long cols, const int8_t *xq, const float *xd, const int32_t *xc,
                             long count, long row0, long row1, float *out, long stride) {
    if (row0 >= row1) return;
    long nb = cols / QK, G = (rows + 3) / 4;
    const uint8_t *quants = (const uint8_t *)w, *scales = quants + G * nb * 128;
#ifdef PF2LORA_X86
    int isa = pf2lora_quant_isa();
    if (isa >= PF2LORA_ISA_AVXVNNI) { rows4_vnni(quants, scales, nb, xq, xd, xc, count, cols, row0, row1, out, stride); return; }
    if (isa >= PF2LORA_ISA_AVX2) { rows4_avx2(quants, scales, nb, xq, xd, xc, count, cols, row0, row1, out, stride); return; }
#endif
    rows4_scalar(quants, scales, nb, xq, xd, xc, count, cols, row0, row1, out, stride);
}

// MARK: - Half-precision KV cache
//
// f32 -> f16 rounds to nearest even as F16C's vcvtps2ph with imm 0 does, including subnormal halves,
// overflow to infinity and NaNs (quieted, payload truncated); f16 -> f32 is exact. The scalar paths
// give the same bits as the F16C ones.

static inline uint16_t float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffff;
    if (ax > 0x7f800000) return (uint16_t)(sign | 0x7e00 | ((ax >> 13) & 0x3ff));   // NaN
    if (ax >= 0x477ff000) return (uint16_t)(sign | 0x7c00);                         // >= 65520: inf
    if (ax < 0x38800000) {                                                          // below 2^-14
        if (ax <= 0x33000000) return (uint16_t)sign;                                // <= 2^-25: 0 (a tie goes to even 0)
        uint32_t e = ax >> 23, mant = (ax & 0x7fffff) | 0x800000, shift = 126 - e;  // units of 2^-24
        uint32_t r = mant >> shift, rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t h = (ax - 0x38000000) >> 13, rem = ax & 0x1fff;                        // rebias 127 -> 15
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;                            // a carry moves into the exponent
    return (uint16_t)(sign | h);
}

#ifdef PF2LORA_X86
__attribute__((target("avx2,fma,f16c")))
static void to_f16_f16c(const float *x, uint16_t *h, long n) {
    long i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < n; i++) h[i] = float_to_half(x[i]);
}

__attribute__((target("avx2,fma,f16c")))
static void to_f32_f16c(const uint16_t *h, float *x, long n) {
    long i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    for (; i < n; i++) x[i] = half_to_float(h[i]);
}
#endif

void pf2lora_f32_to_f16(const float *x, uint16_t *h, long n) {
#ifdef PF2LORA_X86
    if (pf2lora_quant_isa() >= PF2LORA_ISA_AVX2) { to_f16_f16c(x, h, n); return; }
#endif
    for (long i = 0; i < n; i++) h[i] = float_to_half(x[i]);
}

void pf2lora_f16_to_f32(const uint16_t *h, float *x, long n) {
#ifdef PF2LORA_X86
    if (pf2lora_quant_isa() >= PF2LORA_ISA_AVX2) { to_f32_f16c(h, x, n); return; }
#endif
    for (long i = 0; i < n; i++) x[i] = half_to_float(h[i]);
}


// MARK: - Decode attention, head_dim 64
//
// Scores: scores[i * T + j] = scale * (q_i . k_j). Every path sums a key's 64 products in one order:
// lane e (0..7) takes dims 8c + e for c = 0..7 by fused multiply-adds, then the lanes
// ((0+1) + (2+3)) + ((4+5) + (6+7)) (`score1`), so f32 keys and exactly widened f16 keys give the same
// bits, on every path and for any block shape. Values: out[i * 64 + e] = inv[i] * sum_j p[i * T + j]
// v[j][e], summed in order of j with one fused multiply-add per term on every path.
//
// The vector paths block over the g query heads that share a key/value head: a key or value row is
// loaded (and for f16 widened) once for up to three heads, which reuse it from registers.

// Key j's scores against the g query heads; every path computes each key's score this way.
static inline void score1(const float *q, long g, const float *kr, long T, long j, float scale, float *scores) {
    for (long i = 0; i < g; i++) {
        const float *qi = q + i * 64;
        float l[8];
        for (int e = 0; e < 8; e++) {
            float a = 0;
            for (int c = 0; c < 8; c++) a = fmaf(qi[8 * c + e], kr[8 * c + e], a);
            l[e] = a;
        }
        // the AVX2 path's reduction order: (0+1, 2+3, 4+5, 6+7), then pairs, then halves
        scores[i * T + j] = scale * (((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7])));
    }
}

// Keys j0..T-1.
static void scores64_scalar(const float *q, long g, const float *k, long j0, long T, float scale, float *scores) {
    for (long j = j0; j < T; j++) score1(q, g, k + j * 64, T, j, scale, scores);
}

static void scores64_f16_scalar(const float *q, long g, const uint16_t *k, long j0, long T, float scale, float *scores) {
    float kr[64];
    for (long j = j0; j < T; j++) {
        for (int e = 0; e < 64; e++) kr[e] = half_to_float(k[j * 64 + e]);
        score1(q, g, kr, T, j, scale, scores);
    }
}

// `half`: the rows are IEEE halves (widened exactly as read), else f32.
static void values64_scalar(const float *p, long g, long T, const void *v, int half, const float *inv, float *out) {
    for (long i = 0; i < g; i++) {
        for (int e = 0; e < 64; e++) {
            float a = 0;
            for (long j = 0; j < T; j++) {
                float x = half ? half_to_float(((const uint16_t *)v)[j * 64 + e]) : ((const float *)v)[j * 64 + e];
                a = fmaf(p[i * T + j], x, a);
            }
            out[i * 64 + e] = a * inv[i];
        }
    }
}

#ifdef PF2LORA_X86
#define ATT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define ATT_INLINE __attribute__((always_inline)) static inline

// Eight values of a row at element offset `off`, as f32.
ATT_AVX2 ATT_INLINE __m256 ld8(const void *r, long off, int half) {
    return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)r + off)))
                : _mm256_loadu_ps((const float *)r + off);
}

// The scores of n = 4 or 8 keys from their 8-lane sums a[0..n-1] (lane x of the result: key x), the
// tree of `score1`: hadd pairs lanes (0+1, 2+3), the second hadd the pairs, then the two halves.
ATT_AVX2 ATT_INLINE void store_scores(const __m256 *a, int n, __m256 sv, float *dst) {
    if (n == 4) {
        __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_storeu_ps(dst, _mm_mul_ps(_mm256_castps256_ps128(sv), s));
    } else {
        __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        __m256 h4 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
        __m256 s = _mm256_add_ps(_mm256_permute2f128_ps(h0, h4, 0x20), _mm256_permute2f128_ps(h0, h4, 0x31));
        _mm256_storeu_ps(dst, _mm256_mul_ps(sv, s));
    }
}

// hg (1..3) query heads at q against the n (4 or 8) keys at kb: hg * n <= 12 accumulators, each
// key chunk loaded (widened) once for the hg heads. Scores of head i at dst + i * T.
ATT_AVX2 ATT_INLINE void scores_block(const float *q, int hg, const void *kb, int n, int half, long T, __m256 sv, float *dst) {
    __m256 a[3][8];
    for (int i = 0; i < hg; i++) for (int x = 0; x < n; x++) a[i][x] = _mm256_setzero_ps();
    for (int c = 0; c < 8; c++) {
        __m256 qc[3];
        for (int i = 0; i < hg; i++) qc[i] = _mm256_loadu_ps(q + i * 64 + 8 * c);
        for (int x = 0; x < n; x++) {
            __m256 kx = ld8(kb, x * 64 + 8 * c, half);
            for (int i = 0; i < hg; i++) a[i][x] = _mm256_fmadd_ps(qc[i], kx, a[i][x]);
        }
    }
    for (int i = 0; i < hg; i++) store_scores(a[i], n, sv, dst + i * T);
}

// The last n = 1..7 keys (f32 rows at kr): padded with zero keys to eight, scored as any eight into
// a scratch row per head (the same bits as `score1`), the n real ones copied (eight lanes stored in
// place would overwrite the next head's first scores).
ATT_AVX2 static void scores_tail_avx2(const float *q, long g, const float *kr, long n, long j, __m256 sv, float *scores, long T) {
    float kb[8 * 64];
    memcpy(kb, kr, (size_t)n * 64 * sizeof(float));
    memset(kb + n * 64, 0, (size_t)(8 - n) * 64 * sizeof(float));
    for (long i = 0; i < g; i++) {
        float row[8];
        scores_block(q + i * 64, 1, kb, 8, 0, 8, sv, row);
        memcpy(scores + i * T + j, row, (size_t)n * sizeof(float));
    }
}

// Eight keys at a time; within them the heads three at a time (4 keys x 3 heads, twice), then a
// remaining two (4 x 2) or one (8 x 1).
//
// The keys come from memory at each step (the weights stream through the caches between layers).
// Each block asks for lines ahead: f32 rows 8 KB ahead into L1; f16 rows in two tiers, 1 KB into L1
// and 4 KB into L2. Session 16 (Zen 2, AVX2 only, Benchmarks/attention_microbench.c, 900 or 2700
// heads of 320 keys, 3 rounds): f16 keys 4 KB ahead alone 3.9-4.0 / 11.0-11.7 ms (g = 3 / 1), two
// tiers 3.6-3.7 / 9.6-9.9 ms; f32 rows did not gain from two tiers (3 + 24 KB: 2-6 % slower) and keep
// one. Session 16 had the f16 tiers at 1.5 / 12 KB, chosen where the heads lie back to back and are
// visited in order, so a hint far past one head's end fetched the next head's start; a decode step's
// participants jump between KV heads and parts. Visited in a shuffled order
// (Benchmarks/attention_random_microbench.c, score + value pass, g = 3, 3 alternating rounds) the
// shorter tiers (keys 1 / 4 KB, f16 values 8 / 32 rows) took 7.4-7.9 instead of 8.7-8.9 ms at 272 keys a
// part and 6.7-7.0 instead of 7.3-7.6 at 544, in order as before within noise, and in decode (q8_0,
// 2 threads, contexts 512-768, 3 profiles each) the two passes' samples against the kernel's fell
// 0.161-0.169 -> 0.150-0.163 (SmolLM2) and 0.206-0.218 -> 0.198-0.202 (GPT-2): about 1 % of a step.
// Past the last key the hints run on, as the value pass's (below). Loads only: the same bits.
#ifndef SCORES_AHEAD_H   // -D for the microbenchmark
#define SCORES_AHEAD_H 1024
#define SCORES_FAR_H 4096
#endif
#ifndef SCORES_AHEAD_F
#define SCORES_AHEAD_F 8192
#endif
ATT_AVX2 ATT_INLINE void scores64_blocked(const float *q, long g, const void *k, int half, long T, float scale, float *scores) {
    const __m256 sv = _mm256_set1_ps(scale);
    const long es = half ? 2 : 4;
    long j = 0;
    for (; j + 8 <= T; j += 8) {
        const char *kb = (const char *)k + j * 64 * es;
        if (half) {
            for (long l = 0; l < 8 * 64 * 2; l += 64) {
                _mm_prefetch(kb + SCORES_AHEAD_H + l, _MM_HINT_T0);
                _mm_prefetch(kb + SCORES_FAR_H + l, _MM_HINT_T1);
            }
        } else {
            for (long l = 0; l < 8 * 64 * 4; l += 64) _mm_prefetch(kb + SCORES_AHEAD_F + l, _MM_HINT_T0);
        }
        long i = 0;
        for (; i + 3 <= g; i += 3) {
            scores_block(q + i * 64, 3, kb, 4, half, T, sv, scores + i * T + j);
            scores_block(q + i * 64, 3, kb + 4 * 64 * es, 4, half, T, sv, scores + i * T + j + 4);
        }
        if (g - i == 2) {
            scores_block(q + i * 64, 2, kb, 4, half, T, sv, scores + i * T + j);
            scores_block(q + i * 64, 2, kb + 4 * 64 * es, 4, half, T, sv, scores + i * T + j + 4);
        } else if (g - i == 1) {
            scores_block(q + i * 64, 1, kb, 8, half, T, sv, scores + i * T + j);
        }
    }
    if (j < T) {
        if (half) {
            float kr[7 * 64];
            pf2lora_f16_to_f32((const uint16_t *)k + j * 64, kr, (T - j) * 64);
            scores_tail_avx2(q, g, kr, T - j, j, sv, scores, T);
        } else {
            scores_tail_avx2(q, g, (const float *)k + j * 64, T - j, j, sv, scores, T);
        }
    }
}

ATT_AVX2 static void scores64_avx2(const float *q, long g, const float *k, long T, float scale, float *scores) {
    scores64_blocked(q, g, k, 0, T, scale, scores);
}

ATT_AVX2 static void scores64_f16_avx2(const float *q, long g, const uint16_t *k, long T, float scale, float *scores) {
    scores64_blocked(q, g, k, 1, T, scale, scores);
}

// Value pass, AVX2. A value row is read from memory once for every head of its group: up to three
// heads at a time over half a row (dims [d0, d0 + 32): 4 x 3 = 12 accumulators of the 16 ymm
// registers), the two halves one pass each; the first pass asks for whole rows ahead (two tiers:
// VALUES_NEAR(_H) rows into L1, VALUES_FAR(_H) into L2: f16 rows 8 and 32 since session 17, see the
// key pass's distances above; f32 rows keep session 16's 12 and 96, the f32 decode measured no gain
// from the f16 rows' distances: GPT-2 f32, 1 thread, 10 alternating rounds 0.99x), so the second
// finds them in cache. One head alone
// takes the whole row in eight accumulators. Until session 16 every head was its own pass over the
// rows, each chunk widened once per head, with no prefetch. Session 16 (Zen 2, AVX2 only,
// Benchmarks/attention_microbench.c, 320 rows per pass as a split decode part, 3 rounds): f16
// g = 3 5.7-6.1 -> 4.0-4.2 ms, g = 1 10.5-11.3 -> 8.5-8.9 ms; f32 8.5-9.0 -> 8.2-8.3 / 16.9-18.7 ->
// 16.2-16.6 ms. Every output is the same sum in order of j, one fused multiply-add per term, on
// every path: the same bits.
#ifndef VALUES_NEAR   // -D for the microbenchmark: f32 rows (session 16's distances)
#define VALUES_NEAR 12
#define VALUES_FAR 96
#endif
#ifndef VALUES_NEAR_H  // f16 rows (session 17's)
#define VALUES_NEAR_H 8
#define VALUES_FAR_H 32
#endif
// Past the last row (T) the hints run on: past a split decode's first part lie the second's rows,
// which the same participant often reads next. Clamping them at T measured slower in decode
// (session 16, 1 thread, 4 alternating rounds: q8_0 SmolLM2 86.5 vs 89.8, GPT-2 91.1 vs 95.8 tok/s).
#define VALUES_PREFETCH(V, J, ROW)                                                              \
    for (long l = 0; l < (ROW); l += 64) {                                                       \
        const long near_ = (ROW) == 128 ? VALUES_NEAR_H : VALUES_NEAR, far_ = (ROW) == 128 ? VALUES_FAR_H : VALUES_FAR; \
        _mm_prefetch((const char *)(V) + ((J) + near_) * (ROW) + l, _MM_HINT_T0);                \
        _mm_prefetch((const char *)(V) + ((J) + far_) * (ROW) + l, _MM_HINT_T1);                 \
    }
ATT_AVX2 ATT_INLINE void values_half_avx2(const float *p, int hg, long T, const void *v, int half, long d0, int prefetch,
                                          const float *inv, float *out) {
    __m256 a[3][4];
    for (int i = 0; i < hg; i++) for (int x = 0; x < 4; x++) a[i][x] = _mm256_setzero_ps();
    const long row = half ? 128 : 256;
    for (long j = 0; j < T; j++) {
        if (prefetch) VALUES_PREFETCH(v, j, row)
        __m256 w[3];
        for (int i = 0; i < hg; i++) w[i] = _mm256_broadcast_ss(p + i * T + j);
        for (int x = 0; x < 4; x++) {
            __m256 vx = ld8(v, j * 64 + d0 + 8 * x, half);
            for (int i = 0; i < hg; i++) a[i][x] = _mm256_fmadd_ps(w[i], vx, a[i][x]);
        }
    }
    for (int i = 0; i < hg; i++) {
        const __m256 s = _mm256_set1_ps(inv[i]);
        for (int x = 0; x < 4; x++) _mm256_storeu_ps(out + i * 64 + d0 + 8 * x, _mm256_mul_ps(a[i][x], s));
    }
}

ATT_AVX2 ATT_INLINE void values_one_avx2(const float *pi, long T, const void *v, int half, float inv, float *out) {
    __m256 a[8];
    for (int x = 0; x < 8; x++) a[x] = _mm256_setzero_ps();
    const long row = half ? 128 : 256;
    for (long j = 0; j < T; j++) {
        VALUES_PREFETCH(v, j, row)
        const __m256 w = _mm256_broadcast_ss(pi + j);
        for (int x = 0; x < 8; x++) a[x] = _mm256_fmadd_ps(w, ld8(v, j * 64 + 8 * x, half), a[x]);
    }
    const __m256 s = _mm256_set1_ps(inv);
    for (int x = 0; x < 8; x++) _mm256_storeu_ps(out + 8 * x, _mm256_mul_ps(a[x], s));
}

ATT_AVX2 ATT_INLINE void values64_avx2_any(const float *p, long g, long T, const void *v, int half, const float *inv, float *out) {
    long i = 0;
    // constant head counts, so that the accumulators are registers
    for (; i + 3 <= g; i += 3) {
        values_half_avx2(p + i * T, 3, T, v, half, 0, 1, inv + i, out + i * 64);
        values_half_avx2(p + i * T, 3, T, v, half, 32, 0, inv + i, out + i * 64);
    }
    if (g - i == 2) {
        values_half_avx2(p + i * T, 2, T, v, half, 0, 1, inv + i, out + i * 64);
        values_half_avx2(p + i * T, 2, T, v, half, 32, 0, inv + i, out + i * 64);
    } else if (g - i == 1) {
        values_one_avx2(p + i * T, T, v, half, inv[i], out + i * 64);
    }
}

ATT_AVX2 static void values64_avx2(const float *p, long g, long T, const float *v, const float *inv, float *out) {
    values64_avx2_any(p, g, T, v, 0, inv, out);
}

ATT_AVX2 static void values64_f16_avx2(const float *p, long g, long T, const uint16_t *v, const float *inv, float *out) {
    values64_avx2_any(p, g, T, v, 1, inv, out);
}

// Value pass, AVX-512F: 16-lane accumulators, each value row loaded (widened) once for up to three
// heads (3 x 4 zmm accumulators), the heads three at a time then one or two.
#define ATT_512 __attribute__((target("avx512f,avx2,fma,f16c")))

ATT_512 ATT_INLINE __m512 ld16(const void *r, long off, int half) {
    return half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)r + off)))
                : _mm512_loadu_ps((const float *)r + off);
}

ATT_512 ATT_INLINE void values_group512(const float *p, int hg, long T, const void *v, int half, const float *inv, float *out) {
    __m512 a[3][4];
    for (int i = 0; i < hg; i++) for (int x = 0; x < 4; x++) a[i][x] = _mm512_setzero_ps();
    const long es = half ? 2 : 4;
    for (long j = 0; j < T; j++) {
        for (long l = 0; l < 64 * es; l += 64) _mm_prefetch((const char *)v + (j + 32) * 64 * es + l, _MM_HINT_T0);
        __m512 w[3];
        for (int i = 0; i < hg; i++) w[i] = _mm512_set1_ps(p[i * T + j]);
        for (int x = 0; x < 4; x++) {
            __m512 vx = ld16(v, j * 64 + 16 * x, half);
            for (int i = 0; i < hg; i++) a[i][x] = _mm512_fmadd_ps(w[i], vx, a[i][x]);
        }
    }
    for (int i = 0; i < hg; i++) {
        __m512 s = _mm512_set1_ps(inv[i]);
        for (int x = 0; x < 4; x++) _mm512_storeu_ps(out + i * 64 + 16 * x, _mm512_mul_ps(a[i][x], s));
    }
}

ATT_512 ATT_INLINE void values64_512_any(const float *p, long g, long T, const void *v, int half, const float *inv, float *out) {
    long i = 0;
    for (; i + 3 <= g; i += 3) values_group512(p + i * T, 3, T, v, half, inv + i, out + i * 64);
    if (g - i == 2) values_group512(p + i * T, 2, T, v, half, inv + i, out + i * 64);
    else if (g - i == 1) values_group512(p + i * T, 1, T, v, half, inv + i, out + i * 64);
}

ATT_512 static void values64_512(const float *p, long g, long T, const float *v, const float *inv, float *out) {
    values64_512_any(p, g, T, v, 0, inv, out);
}

ATT_512 static void values64_f16_512(const float *p, long g, long T, const uint16_t *v, const float *inv, float *out) {
    values64_512_any(p, g, T, v, 1, inv, out);
}
#endif

void pf2lora_attention_scores64(const float *q, long g, const float *k, long T, float scale, float *scores) {
#ifdef PF2LORA_X86
    if (pf2lora_quant_isa() >= PF2LORA_ISA_AVX2) { scores64_avx2(q, g, k, T, scale, scores); return; }
#endif
    scores64_scalar(q, g, k, 0, T, scale, scores);
}

void pf2lora_attention_scores64_f16(const float *q, long g, const uint16_t *k, long T, float scale, float *scores) {
#ifdef PF2LORA_X86
    if (pf2lora_quant_isa() >= PF2LORA_ISA_AVX2) { scores64_f16_avx2(q, g, k, T, scale, scores); return; }
#endif
    scores64_f16_scalar(q, g, k, 0, T, scale, scores);
}

void pf2lora_attention_values64(const float *p, long g, long T, const float *v, const float *inv, float *out) {
#ifdef PF2LORA_X86
    if (pf2lora_use_avx512()) { values64_512(p, g, T, v, inv, out); return; }
    if (pf2lora_quant_isa() >= PF2LORA_ISA_AVX2) { values64_avx2(p, g, T, v, inv, out); return; }
#endif
    values64_scalar(p, g, T, v, 0, inv, out);
}

void pf2lora_attention_values64_f16(const float *p, long g, long T, const uint16_t *v, const float *inv, float *out) {
#ifdef PF2LORA_X86
    if (pf2lora_use_avx512()) { values64_f16_512(p, g, T, v, inv, out); return; }
    if (pf2lora_quant_isa() >= PF2LORA_ISA_AVX2) { values64_f16_avx2(p, g, T, v, inv, out); return; }
#endif
    values64_scalar(p, g, T, v, 1, inv, out);
}
