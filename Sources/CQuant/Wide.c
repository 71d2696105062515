// Batch-invariant row-dot kernels for the pooled decode pass: see include/CWide.h.
//
// Every (weight row, input) pair has its own four 8-lane accumulators, at f32, f16 and bf16 alike.
// Accumulator s takes one fused multiply-add per 8 columns k = 8 (4 b + s) ... + 7 for b = 0, 1, ...
// in ascending order; the 8-column blocks after the last whole group of four go to accumulator 0, in
// ascending order. Then the accumulators are added in a fixed tree, (a0 + a1) + (a2 + a3), the 8
// lanes reduced by `wide_hsum8`'s fixed tree, and the cols % 8 tail fused in ascending order. A tile
// only decides how many pairs share the loads, never the order within a pair, so the result of a
// pair does not depend on the tile it fell in: alone (count 1), at any position of any batch, in any
// row range. The scalar path computes each lane with fmaf in the same order, so it gives the same
// bits as the AVX2 path.
//
// f32 (session 9): one input is read one row at a time, its four accumulators fed in one sequential
// pass over the row (four independent FMA chains; C microbenchmark, SmolLM2 head shape: 0.87-0.94x of
// a plain read, where 8-row tiles with one accumulator per row read at 0.71-0.77x). Two or more
// inputs: row tiles of 4; each row is first streamed on its own with the first 2-3 inputs in one
// pass (4 accumulators x 3 inputs = 12 registers), then the tile's other inputs run as 4 x 3 tiles
// (below) over the rows now in L1: the matrix is read from memory once, one row at a time.
//
// Tiles of 4 rows x 3 inputs (f16 and bf16; f32 after the first pass): 12 accumulators, 3 input
// registers and 1 weight register (the 16 YMM registers); per 8 columns 7 loads for 12 FMAs. A tile makes four passes over its rows,
// pass s over accumulator s's columns, keeping the 12 accumulators of each pass in memory until the
// tree (the rows and inputs are in L1 after the first pass). One 16-bit input is read one row at a
// time, its four accumulators fed in one sequential pass: the old Swift loop's order, whose four
// independent FMA chains read f16 rows from memory faster than one (SmolLM2 shape, C
// microbenchmark by thread CPU time, session 5: 0.94x the time of one accumulator).

#include "CWide.h"
#include "CQuant.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define WIDE_X86 1
#include <immintrin.h>
#endif

#define WIDE_RT 4   // weight rows per tile
#define WIDE_VT 3   // inputs per tile
// One tile shape of a switch over R * 4 + V (every shape its own unrolled instance), and the switch
// over all twelve (R = 1-4 rows, V = 1-3 inputs).
#define WIDE_CASE(TILE, R, V) case (R) * 4 + (V): TILE(w, C, xs, v, r, R, V, out, stride); break;
#define WIDE_TILE_SWITCH(TILE, R, V)                                                                  \
    switch ((R) * 4 + (V)) {                                                                        \
        WIDE_CASE(TILE, 4, 3) WIDE_CASE(TILE, 4, 2) WIDE_CASE(TILE, 4, 1)                           \
        WIDE_CASE(TILE, 3, 3) WIDE_CASE(TILE, 3, 2) WIDE_CASE(TILE, 3, 1)                           \
        WIDE_CASE(TILE, 2, 3) WIDE_CASE(TILE, 2, 2) WIDE_CASE(TILE, 2, 1)                           \
        WIDE_CASE(TILE, 1, 3) WIDE_CASE(TILE, 1, 2) WIDE_CASE(TILE, 1, 1)                           \
    }
#define WIDE_PREFETCH_BYTES 6144       // a CPU with AVX-VNNI (see WIDE_ROW4)
#define WIDE_PREFETCH_BYTES_AVX2 768   // an AVX2-only CPU

// MARK: - Weight loads (scalar)

#include "half.h"

static inline float wide_bf16(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float wide_f32_1(const float *w, long k) { return w[k]; }
static inline float wide_f16_1(const uint16_t *w, long k) { return half_to_float(w[k]); }
static inline float wide_bf16_1(const uint16_t *w, long k) { return wide_bf16(w[k]); }

// The fixed reduction tree of the 8 lanes (the AVX2 `wide_hsum8` adds in this order).
static inline float wide_hsum8_scalar(const float *v) {
    float h[4];
    for (int k = 0; k < 4; k++) h[k] = v[k] + v[k + 4];
    return (h[0] + h[2]) + (h[1] + h[3]);
}

// MARK: - Scalar path (same bits as the AVX2 path)

#define WIDE_SCALAR(NAME, T, LOAD1)                                                                   \
static void NAME(const T *w, long C, const float *xs, long count, long r0, long r1, float *out,     \
                 long stride) {                                                                     \
    long CA = C & ~31L, C8 = C & ~7L;                                                               \
    for (long r = r0; r < r1; r++) {                                                                \
        const T *wr = w + r * C;                                                                    \
        for (long v = 0; v < count; v++) {                                                          \
            const float *x = xs + v * C;                                                            \
            float acc[4][8] = {{0}};                                                                \
            for (long k = 0; k < CA; k += 32)                                                       \
                for (int a = 0; a < 4; a++)                                                         \
                    for (int j = 0; j < 8; j++) {                                                   \
                        long c = k + 8 * a + j;                                                     \
                        acc[a][j] = fmaf(LOAD1(wr, c), x[c], acc[a][j]);                            \
                    }                                                                               \
            for (long k = CA; k < C8; k += 8)                                                       \
                for (int j = 0; j < 8; j++) acc[0][j] = fmaf(LOAD1(wr, k + j), x[k + j], acc[0][j]); \
            float t[8];                                                                             \
            for (int j = 0; j < 8; j++)                                                             \
                t[j] = (acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]);                           \
            float s = wide_hsum8_scalar(t);                                                         \
            for (long k = C8; k < C; k++) s = fmaf(LOAD1(wr, k), x[k], s);                          \
            out[v * stride + r] = s;                                                                \
        }                                                                                           \
    }                                                                                               \
}

WIDE_SCALAR(wide_f32_scalar, float, wide_f32_1)
WIDE_SCALAR(wide_f16_scalar, uint16_t, wide_f16_1)
WIDE_SCALAR(wide_bf16_scalar, uint16_t, wide_bf16_1)

// MARK: - AVX2 + FMA path

#ifdef WIDE_X86
__attribute__((target("avx2,fma,f16c")))
static inline float wide_hsum8(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));   // v[i] + v[i + 4]
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));                                          // (0 + 2), (1 + 3)
    a = _mm_add_ss(a, _mm_movehdup_ps(a));                                           // (0 + 2) + (1 + 3)
    return _mm_cvtss_f32(a);
}

__attribute__((target("avx2,fma,f16c"))) static inline __m256 wide_f32_8(const float *w, long k) {
    return _mm256_loadu_ps(w + k);
}
__attribute__((target("avx2,fma,f16c"))) static inline __m256 wide_f16_8(const uint16_t *w, long k) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + k)));
}
__attribute__((target("avx2,fma,f16c"))) static inline __m256 wide_bf16_8(const uint16_t *w, long k) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + k))), 16));
}

// Eight columns k..k+7 of every (row, input) pair of a tile into its accumulator (used by WIDE_TILE).
#define WIDE_TILE_STEP(LOAD8, k)                                                                      \
    do {                                                                                            \
        __m256 xv[WIDE_VT];                                                                         \
        for (int j = 0; j < V; j++) xv[j] = _mm256_loadu_ps(x + j * C + (k));                      \
        for (int i = 0; i < R; i++) {                                                               \
            __m256 wv = LOAD8(wr + i * C, (k));                                                     \
            for (int j = 0; j < V; j++) acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]);         \
        }                                                                                           \
    } while (0)

// One tile: rows r..r+R-1 times inputs v..v+V-1 (R <= 4, V <= 3; all constants after inlining),
// four passes (accumulator s of every pair in pass s).
#define WIDE_TILE(NAME, T, LOAD8, LOAD1)                                                              \
__attribute__((target("avx2,fma,f16c"), always_inline))                                             \
static inline void NAME(const T *w, long C, const float *xs, long v0, long r, int R, int V,         \
                        float *out, long stride) {                                                  \
    __m256 acc[WIDE_RT][WIDE_VT];                                                                   \
    __m256 part[4][WIDE_RT][WIDE_VT];                                                               \
    const T *wr = w + r * C;                                                                        \
    const float *x = xs + v0 * C;                                                                   \
    long CA = C & ~31L, C8 = C & ~7L;                                                               \
    for (int s = 0; s < 4; s++) {                                                                   \
        for (int i = 0; i < R; i++) for (int j = 0; j < V; j++) acc[i][j] = _mm256_setzero_ps();    \
        for (long k = 8 * s; k < CA; k += 32) {                                                     \
            WIDE_TILE_STEP(LOAD8, k);                                                               \
        }                                                                                           \
        if (s == 0)                                                                                 \
            for (long k = CA; k < C8; k += 8) {                                                     \
                WIDE_TILE_STEP(LOAD8, k);                                                           \
            }                                                                                       \
        for (int i = 0; i < R; i++) for (int j = 0; j < V; j++) part[s][i][j] = acc[i][j];         \
    }                                                                                               \
    for (int i = 0; i < R; i++)                                                                     \
        for (int j = 0; j < V; j++) {                                                               \
            __m256 t = _mm256_add_ps(_mm256_add_ps(part[0][i][j], part[1][i][j]),                   \
                                     _mm256_add_ps(part[2][i][j], part[3][i][j]));                  \
            float s = wide_hsum8(t);                                                                \
            for (long k = C8; k < C; k++) s = fmaf(LOAD1(wr + i * C, k), x[j * C + k], s);          \
            out[(v0 + j) * stride + r + i] = s;                                                     \
        }                                                                                           \
}

WIDE_TILE(wide_f32_tile, float, wide_f32_8, wide_f32_1)
WIDE_TILE(wide_f16_tile, uint16_t, wide_f16_8, wide_f16_1)
WIDE_TILE(wide_bf16_tile, uint16_t, wide_bf16_8, wide_bf16_1)

// One input, one row, A = 4: the four accumulators fed in one sequential pass over the row (the
// same sums as a tile's four passes). The rows lie one after another, so the pass streams the whole
// matrix. 16-bit rows: each 64-byte line asks for the one `wide_ahead()` bytes ahead (a hint: past
// the end it is harmless, the sums are unchanged). C microbenchmark, SmolLM2 shape at f16 (270 MB,
// alternating rounds): 0.79x of a plain read without, 0.84-0.88x with 1 KB ahead (session 5's
// machine); on session 11's (AMD, family 26, AVX-512 + AVX-VNNI; Benchmarks/wide_stream_microbench.c,
// per-round ratios) 1 KB gave 0.84-0.86x, 4 KB 0.96-0.99x, 6 KB 0.98-0.99x, 8 KB 0.97-0.98x
// (SmolLM2, GPT-2): 6 KB. On session 15-17's (AMD Zen 2, AVX2 only) the same 6 KB streamed at
// 0.82-0.85x and 768 bytes at 0.99-1.00x (session 17, 7 / 5 rounds, SmolLM2 / GPT-2; 512 bytes
// 0.88 / 0.97x, 1 KB 0.97x, 4-8 KB 0.83-0.86x, none 0.86x), as the q8_0x4 AVX2 loop (CQuant.c). Which
// distance suits a CPU is measured, not derived: the CPU's level stands in for the two machines
// measured: an AVX2-only CPU gets 768 bytes, one with AVX-VNNI (as session 11's Zen 5) 6 KB; a CPU
// with AVX-512 but no AVX-VNNI reports as AVX2 (`pf2lora_cpu_isa`), so it gets 768 bytes, unmeasured.
// f32 rows: no hint (0.72-0.87x of a plain read with 1-2 KB ahead, 0.87-0.94x without; session 8).
static inline long wide_ahead(void) {
    return pf2lora_cpu_isa() >= PF2LORA_ISA_AVXVNNI ? WIDE_PREFETCH_BYTES : WIDE_PREFETCH_BYTES_AVX2;
}
#define WIDE_ROW4(NAME, T, LOAD8, LOAD1, PREFETCH)                                                    \
__attribute__((target("avx2,fma,f16c")))                                                            \
static void NAME(const T *w, long C, const float *x, long r0, long r1, float *out) {                \
    long C32 = C & ~31L, C8 = C & ~7L, ahead = PREFETCH ? wide_ahead() : 0;                         \
    for (long r = r0; r < r1; r++) {                                                                \
        const T *wr = w + r * C;                                                                    \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                 \
        long k = 0;                                                                                 \
        for (; k < C32; k += 32) {                                                                  \
            if (PREFETCH) _mm_prefetch((const char *)(wr + k) + ahead, _MM_HINT_T0);                \
            a0 = _mm256_fmadd_ps(LOAD8(wr, k), _mm256_loadu_ps(x + k), a0);                         \
            a1 = _mm256_fmadd_ps(LOAD8(wr, k + 8), _mm256_loadu_ps(x + k + 8), a1);                 \
            a2 = _mm256_fmadd_ps(LOAD8(wr, k + 16), _mm256_loadu_ps(x + k + 16), a2);               \
            a3 = _mm256_fmadd_ps(LOAD8(wr, k + 24), _mm256_loadu_ps(x + k + 24), a3);               \
        }                                                                                           \
        for (; k < C8; k += 8) a0 = _mm256_fmadd_ps(LOAD8(wr, k), _mm256_loadu_ps(x + k), a0);      \
        float s = wide_hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));          \
        for (k = C8; k < C; k++) s = fmaf(LOAD1(wr, k), x[k], s);                                   \
        out[r] = s;                                                                                 \
    }                                                                                               \
}

WIDE_ROW4(wide_f32_row4, float, wide_f32_8, wide_f32_1, 0)
WIDE_ROW4(wide_f16_row4, uint16_t, wide_f16_8, wide_f16_1, 1)
WIDE_ROW4(wide_bf16_row4, uint16_t, wide_bf16_8, wide_bf16_1, 1)

// One f32 row times V (1-3, a constant after inlining) inputs x_0..x_{V-1} (x + j * C), the four
// accumulators of every pair fed in one sequential pass over the row: 4 V accumulators in registers.
__attribute__((target("avx2,fma,f16c"), always_inline))
static inline void wide_f32_row_group(const float *wr, long C, const float *x, int V, float *out, long stride) {
    __m256 acc[4][WIDE_VT];
    for (int s = 0; s < 4; s++) for (int j = 0; j < V; j++) acc[s][j] = _mm256_setzero_ps();
    long C32 = C & ~31L, C8 = C & ~7L, k = 0;
    for (; k < C32; k += 32)
        for (int s = 0; s < 4; s++) {
            __m256 wv = _mm256_loadu_ps(wr + k + 8 * s);
            for (int j = 0; j < V; j++) acc[s][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + j * C + k + 8 * s), acc[s][j]);
        }
    for (; k < C8; k += 8) {
        __m256 wv = _mm256_loadu_ps(wr + k);
        for (int j = 0; j < V; j++) acc[0][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + j * C + k), acc[0][j]);
    }
    for (int j = 0; j < V; j++) {
        float s = wide_hsum8(_mm256_add_ps(_mm256_add_ps(acc[0][j], acc[1][j]), _mm256_add_ps(acc[2][j], acc[3][j])));
        for (k = C8; k < C; k++) s = fmaf(wr[k], x[j * C + k], s);
        out[j * stride] = s;
    }
}

// Two or more f32 inputs: row tiles of 4 (then the 1-3 left). Each row of a tile is first streamed
// from memory on its own, one sequential pass with its first 2 or 3 inputs (4 x 3 accumulators in
// registers); the tile's other inputs then run as 4-row x 3-input tiles (four passes, as the 16-bit
// tiles) over the rows now in L1. So the matrix is read from memory once, one row at a time, and
// wide batches keep the 4 x 3 tiles' 7 loads per 12 FMAs. C microbenchmark
// (Benchmarks/wide_f32_microbench.c, SmolLM2 f32 weights, time per pass vs session 8's kernels, 4
// runs): batch 1 0.76-0.83x, 4 0.72-0.85x, 8 0.89-0.94x, 16 1.04-1.16x, 32 1.07-1.16x.
__attribute__((target("avx2,fma,f16c")))
static void wide_f32_avx2(const float *w, long C, const float *xs, long count, long r0, long r1, float *out,
                          long stride) {
    if (count == 1) { wide_f32_row4(w, C, xs, r0, r1, out); return; }
    long v0 = count >= WIDE_VT ? WIDE_VT : count;
    for (long r = r0; r < r1; r += WIDE_RT) {
        int R = r1 - r < WIDE_RT ? (int)(r1 - r) : WIDE_RT;
        for (int i = 0; i < R; i++) {
            if (v0 == 3) wide_f32_row_group(w + (r + i) * C, C, xs, 3, out + r + i, stride);
            else wide_f32_row_group(w + (r + i) * C, C, xs, 2, out + r + i, stride);
        }
        for (long v = v0; v < count; v += WIDE_VT) {
            int V = count - v < WIDE_VT ? (int)(count - v) : WIDE_VT;
            WIDE_TILE_SWITCH(wide_f32_tile, R, V)
        }
    }
}

// 16-bit rows. One input: ONE (one row at a time). Otherwise row tiles of 4
// (then the 1-3 left), within each the inputs in tiles of 3 (then the 1-2 left): every tile shape is
// its own unrolled instance.
#define WIDE_AVX2(NAME, T, TILE, ONE)                                                                 \
__attribute__((target("avx2,fma,f16c")))                                                            \
static void NAME(const T *w, long C, const float *xs, long count, long r0, long r1, float *out,     \
                 long stride) {                                                                     \
    if (count == 1) { ONE(w, C, xs, r0, r1, out); return; }                                         \
    for (long r = r0; r < r1; r += WIDE_RT) {                                                       \
        int R = r1 - r < WIDE_RT ? (int)(r1 - r) : WIDE_RT;                                         \
        for (long v = 0; v < count; v += WIDE_VT) {                                                 \
            int V = count - v < WIDE_VT ? (int)(count - v) : WIDE_VT;                               \
            WIDE_TILE_SWITCH(TILE, R, V)                                                            \
        }                                                                                           \
    }                                                                                               \
}

WIDE_AVX2(wide_f16_avx2, uint16_t, wide_f16_tile, wide_f16_row4)
WIDE_AVX2(wide_bf16_avx2, uint16_t, wide_bf16_tile, wide_bf16_row4)
#endif

// MARK: - Entry points

void pf2lora_wide_f32_dot_rows(const float *w, long cols, const float *xs, long count, long r0, long r1,
                               float *out, long stride) {
#ifdef WIDE_X86
    if (pf2lora_quant_isa() >= PF2LORA_ISA_AVX2) { wide_f32_avx2(w, cols, xs, count, r0, r1, out, stride); return; }
#endif
    wide_f32_scalar(w, cols, xs, count, r0, r1, out, stride);
}

void pf2lora_wide_f16_dot_rows(const uint16_t *w, long cols, const float *xs, long count, long r0, long r1,
                               float *out, long stride) {
#ifdef WIDE_X86
    if (pf2lora_quant_isa() >= PF2LORA_ISA_AVX2) { wide_f16_avx2(w, cols, xs, count, r0, r1, out, stride); return; }
#endif
    wide_f16_scalar(w, cols, xs, count, r0, r1, out, stride);
}

void pf2lora_wide_bf16_dot_rows(const uint16_t *w, long cols, const float *xs, long count, long r0, long r1,
                                float *out, long stride) {
#ifdef WIDE_X86
    if (pf2lora_quant_isa() >= PF2LORA_ISA_AVX2) { wide_bf16_avx2(w, cols, xs, count, r0, r1, out, stride); return; }
#endif
    wide_bf16_scalar(w, cols, xs, count, r0, r1, out, stride);
}
