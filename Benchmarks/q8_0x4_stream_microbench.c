// The q8_0x4 batch-1 kernel streaming a whole model's weights, against a plain AVX2 read of the same
// bytes, one thread, thread CPU time (issue 14, session 11). Variants of the kernel's memory access
// (prefetch distance / hint, the scales' stream, two row streams) are timed in turn in the same
// process, round after round, and checked to give the baseline's bits.
//
//   git show ffa5c79:Sources/CQuant/CQuant.c > /tmp/CQuant-s13.c   (its variants are built on the kernel
//   before session 14's unsigned-weight change; with that file's include/ and half.h beside it)
//   clang -O3 -I Sources/CQuant/include -I Sources/CQuant -DCQUANT_SRC='"/tmp/CQuant-s13.c"' -o /tmp/q8s Benchmarks/q8_0x4_stream_microbench.c -lm
//   /tmp/q8s [rounds] [smollm2|gpt2] ["pf4k pf6k ..." = only these variants]
//
// "lib" is pf2lora_q8_0x4_dot_rows as CQuant.c stands (6 KB ahead since session 11; "pf1536" is
// the distance before). Session 11's machine (AMD family 26, 2 cores, 04:11 UTC, load 12-14 of
// compilers, 21 rounds), per-round ratio to the plain read, median: SmolLM2 1536 B 0.84, 4 KB 0.92,
// 6 KB 0.93, 8 KB 0.92; GPT-2 0.87 / 0.96 / 0.97 / 0.96. Hints to L2 (T1) or NTA, the next group's
// scales prefetched: no better than T0 at 4-6 KB; two row streams (a chunk's halves alternated):
// 0.61-0.70x, much worse.
//
// shape: smollm2 (default; 30 layers of hidden 576, MLP 1536, 3 key/value heads of 64, the tied
// 49152-row head) or gpt2 (12 layers of 768, MLP 3072, the 50257-row head). Every matrix is walked
// in 64-row chunks, matrix after matrix, as one decode step at 1 thread calls the kernel.
#define _GNU_SOURCE
#ifndef CQUANT_SRC
#define CQUANT_SRC "../Sources/CQuant/CQuant.c"
#endif
#include CQUANT_SRC

#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static double now_cpu(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

typedef struct { long rows, cols; uint8_t *w; } mat;

// ---- variants of the four-row dot: the same arithmetic (DOT4_BODY's), other loads / hints ----

#define V_CHUNK X4_CHUNK
#define DOT4_VARIANT(NAME, PF)                                                                    \
    __attribute__((target("avxvnni,avx2,fma,f16c")))                                             \
    static void NAME(const uint8_t *q, const uint8_t *sc, long nb, const int8_t *xq, const float *xd, float *out) { \
        const __m256i lo4 = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3), hi4 = _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7); \
        __m256 a = _mm256_setzero_ps(), b = a;                                                   \
        long j = 0;                                                                              \
        for (; j + 2 <= nb; j += 2) {                                                            \
            const uint8_t *q0 = q + j * 128, *q1 = q0 + 128;                                     \
            const int8_t *x0 = xq + j * QK, *x1 = x0 + QK;                                       \
            PF                                                                                   \
            __m256i t = _mm256_setzero_si256(), u = t;                                           \
            V_CHUNK(t, q0, x0, 0, isum_vnni) V_CHUNK(u, q1, x1, 0, isum_vnni) V_CHUNK(t, q0, x0, 1, isum_vnni) \
            V_CHUNK(u, q1, x1, 1, isum_vnni) V_CHUNK(t, q0, x0, 2, isum_vnni) V_CHUNK(u, q1, x1, 2, isum_vnni) \
            V_CHUNK(t, q0, x0, 3, isum_vnni) V_CHUNK(u, q1, x1, 3, isum_vnni)                    \
            __m256 s = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + j * 8))), \
                                     _mm256_setr_m128(_mm_broadcast_ss(xd + j), _mm_broadcast_ss(xd + j + 1))); \
            a = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(s, lo4), _mm256_cvtepi32_ps(t), a);     \
            b = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(s, hi4), _mm256_cvtepi32_ps(u), b);     \
        }                                                                                        \
        if (j < nb) {                                                                            \
            const uint8_t *q0 = q + j * 128;                                                     \
            const int8_t *x0 = xq + j * QK;                                                      \
            __m256i t = _mm256_setzero_si256();                                                  \
            V_CHUNK(t, q0, x0, 0, isum_vnni) V_CHUNK(t, q0, x0, 1, isum_vnni) V_CHUNK(t, q0, x0, 2, isum_vnni) \
            V_CHUNK(t, q0, x0, 3, isum_vnni)                                                     \
            __m128 s = _mm_mul_ps(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(sc + j * 8))), _mm_broadcast_ss(xd + j)); \
            a = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(_mm256_castps128_ps256(s), lo4), _mm256_cvtepi32_ps(t), a); \
        }                                                                                        \
        __m256 ab = _mm256_add_ps(a, b);                                                         \
        __m256 h = _mm256_add_ps(ab, _mm256_permute_ps(ab, 0xB1));                               \
        __m128 l = _mm256_castps256_ps128(h), hh = _mm256_extractf128_ps(h, 1);                  \
        out[0] = _mm_cvtss_f32(l); out[1] = _mm_cvtss_f32(_mm_movehl_ps(l, l));                  \
        out[2] = _mm_cvtss_f32(hh); out[3] = _mm_cvtss_f32(_mm_movehl_ps(hh, hh));               \
    }

#define PF4(Q, D, H) _mm_prefetch((const char *)(Q) + (D), H); _mm_prefetch((const char *)(Q) + (D) + 64, H); \
                     _mm_prefetch((const char *)(Q) + (D) + 128, H); _mm_prefetch((const char *)(Q) + (D) + 192, H);

DOT4_VARIANT(d_none, )
DOT4_VARIANT(d_pf1k, PF4(q0, 1024, _MM_HINT_T0))
DOT4_VARIANT(d_pf1536, PF4(q0, 1536, _MM_HINT_T0))
DOT4_VARIANT(d_pf2k, PF4(q0, 2048, _MM_HINT_T0))
DOT4_VARIANT(d_pf3k, PF4(q0, 3072, _MM_HINT_T0))
DOT4_VARIANT(d_pf4k, PF4(q0, 4096, _MM_HINT_T0))
DOT4_VARIANT(d_pf6k, PF4(q0, 6144, _MM_HINT_T0))
DOT4_VARIANT(d_pf5k, PF4(q0, 5120, _MM_HINT_T0))
DOT4_VARIANT(d_pf8k, PF4(q0, 8192, _MM_HINT_T0))
DOT4_VARIANT(d_pf12k, PF4(q0, 12288, _MM_HINT_T0))
DOT4_VARIANT(d_pf4k_t1, PF4(q0, 4096, _MM_HINT_T1))
DOT4_VARIANT(d_pf8k_t1, PF4(q0, 8192, _MM_HINT_T1))
DOT4_VARIANT(d_pf4knta, PF4(q0, 4096, _MM_HINT_NTA))

typedef void (*d4)(const uint8_t *, const uint8_t *, long, const int8_t *, const float *, float *);

// The row loop of pf2lora_q8_0x4_dot_rows at count 1 (whole groups: chunks are multiples of 4).
static void rows_std(d4 dot, const mat *m, const int8_t *xq, const float *xd, long row0, long row1, float *out) {
    long nb = m->cols / QK, G = (m->rows + 3) / 4;
    const uint8_t *quants = m->w, *scales = quants + G * nb * 128;
    for (long g = row0 / 4; g <= (row1 - 1) / 4; g++) {
        float o[4];
        dot(quants + g * nb * 128, scales + g * nb * 8, nb, xq, xd, o);
        long r1 = 4 * g + 4 > row1 ? row1 - 4 * g : 4;
        for (long k = 0; k < r1; k++) out[4 * g + k] = o[k];
    }
}

// Scales of the next group prefetched too.
static void rows_scpf(d4 dot, const mat *m, const int8_t *xq, const float *xd, long row0, long row1, float *out) {
    long nb = m->cols / QK, G = (m->rows + 3) / 4;
    const uint8_t *quants = m->w, *scales = quants + G * nb * 128;
    for (long g = row0 / 4; g <= (row1 - 1) / 4; g++) {
        float o[4];
        const uint8_t *sc = scales + g * nb * 8;
        for (long l = 0; l < nb * 8; l += 64) _mm_prefetch((const char *)sc + 4 * nb * 8 + l, _MM_HINT_T0);
        dot(quants + g * nb * 128, sc, nb, xq, xd, o);
        long r1 = 4 * g + 4 > row1 ? row1 - 4 * g : 4;
        for (long k = 0; k < r1; k++) out[4 * g + k] = o[k];
    }
}

// Two streams: the chunk's first and second halves of groups, alternately.
static void rows_two(d4 dot, const mat *m, const int8_t *xq, const float *xd, long row0, long row1, float *out) {
    long nb = m->cols / QK, G = (m->rows + 3) / 4;
    const uint8_t *quants = m->w, *scales = quants + G * nb * 128;
    long g0 = row0 / 4, g1 = (row1 - 1) / 4 + 1, n = g1 - g0, h = (n + 1) / 2;
    for (long i = 0; i < h; i++) {
        for (int s = 0; s < 2; s++) {
            long g = g0 + i + s * h;
            if (g >= g1) continue;
            float o[4];
            dot(quants + g * nb * 128, scales + g * nb * 8, nb, xq, xd, o);
            long r1 = 4 * g + 4 > row1 ? row1 - 4 * g : 4;
            for (long k = 0; k < r1; k++) out[4 * g + k] = o[k];
        }
    }
}

typedef void (*rows_fn)(d4, const mat *, const int8_t *, const float *, long, long, float *);

static void pass_kernel(rows_fn rf, d4 dot, mat *ms, int nm, const int8_t *xq, const float *xd, float *out) {
    for (int i = 0; i < nm; i++)
        for (long r = 0; r < ms[i].rows; r += 64) rf(dot, &ms[i], xq, xd, r, r + 64 < ms[i].rows ? r + 64 : ms[i].rows, out);
}

static void pass_lib(mat *ms, int nm, const int8_t *xq, const float *xd, float *out) {
    for (int i = 0; i < nm; i++)
        for (long r = 0; r < ms[i].rows; r += 64)
            pf2lora_q8_0x4_dot_rows(ms[i].w, ms[i].rows, ms[i].cols, xq, xd, 1, r, r + 64 < ms[i].rows ? r + 64 : ms[i].rows, out, 0);
}

__attribute__((target("avx2")))
static float plain_read(const uint8_t *p, long n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (long i = 0; i + 128 <= n; i += 128) {
        a0 = _mm256_add_ps(a0, _mm256_loadu_ps((const float *)(p + i)));
        a1 = _mm256_add_ps(a1, _mm256_loadu_ps((const float *)(p + i + 32)));
        a2 = _mm256_add_ps(a2, _mm256_loadu_ps((const float *)(p + i + 64)));
        a3 = _mm256_add_ps(a3, _mm256_loadu_ps((const float *)(p + i + 96)));
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    float f[8]; _mm256_storeu_ps(f, s);
    return f[0] + f[7];
}

static int cmpd(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return x < y ? -1 : x > y; }

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 15;
    const char *shape = argc > 2 ? argv[2] : "smollm2";
    const char *only = argc > 3 ? argv[3] : "";
    mat ms[400]; int nm = 0;
    long H, F, KV, L, V;
    if (!strcmp(shape, "gpt2")) { H = 768; F = 3072; KV = 768; L = 12; V = 50257; }
    else { H = 576; F = 1536; KV = 192; L = 30; V = 49152; }
    for (long l = 0; l < L; l++) {
        long shp[7][2] = {{H, H}, {KV, H}, {KV, H}, {H, H}, {F, H}, {F, H}, {H, F}};
        int k = !strcmp(shape, "gpt2") ? 6 : 7;   // gpt2: qkv as one, fc, proj (approximate by 3 x q + o + fc + proj)
        for (int i = 0; i < k; i++) { ms[nm].rows = shp[i][0]; ms[nm].cols = shp[i][1]; nm++; }
    }
    ms[nm].rows = V; ms[nm].cols = H; nm++;
    long total = 0;
    for (int i = 0; i < nm; i++) total += pf2lora_q8_0x4_bytes(ms[i].rows, ms[i].cols);
    uint8_t *buf = mmap(0, total + (2 << 20), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint8_t *base = (uint8_t *)(((uintptr_t)buf + (2 << 20) - 1) & ~(uintptr_t)((2 << 20) - 1));
    madvise(base, total, MADV_HUGEPAGE);
    srand(1);
    long off = 0;
    for (int i = 0; i < nm; i++) {
        ms[i].w = base + off;
        long b = pf2lora_q8_0x4_bytes(ms[i].rows, ms[i].cols), G = (ms[i].rows + 3) / 4, nb = ms[i].cols / QK;
        for (long k = 0; k < G * nb * 128; k++) ms[i].w[k] = (uint8_t)(rand() % 255 - 127);
        for (long k = 0; k < G * nb * 4; k++) { uint16_t h = 0x2000 + rand() % 0x1000; memcpy(ms[i].w + G * nb * 128 + 2 * k, &h, 2); }
        off += b;
    }
    long maxc = F > H ? F : H;
    int8_t *xq = malloc(maxc); float *xd = malloc(maxc / QK * 4), *x = malloc(maxc * 4);
    for (long i = 0; i < maxc; i++) x[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    pf2lora_q8_quantize_activations(x, xq, xd, maxc);
    float *out0 = malloc(V * 4 + 64), *out1 = malloc(V * 4 + 64);
    printf("%s: %d matrices, %.1f MB, isa %d\n", shape, nm, total / 1e6, pf2lora_quant_isa());

    struct { const char *name; rows_fn rf; d4 dot; } vs[] = {
        {"lib", 0, 0},
        {"none", rows_std, d_none},
        {"pf1k", rows_std, d_pf1k},
        {"pf1536", rows_std, d_pf1536},
        {"pf2k", rows_std, d_pf2k},
        {"pf3k", rows_std, d_pf3k},
        {"pf4k", rows_std, d_pf4k},
        {"pf6k", rows_std, d_pf6k},
        {"pf5k", rows_std, d_pf5k},
        {"pf8k", rows_std, d_pf8k},
        {"pf12k", rows_std, d_pf12k},
        {"pf4k_t1", rows_std, d_pf4k_t1},
        {"pf8k_t1", rows_std, d_pf8k_t1},
        {"pf4knta", rows_std, d_pf4knta},
        {"pf4k+scpf", rows_scpf, d_pf4k},
        {"two+pf4k", rows_two, d_pf4k},
        {"plain", 0, 0},
    };
    int nv = sizeof vs / sizeof vs[0];
    int use[64];
    for (int v = 0; v < nv; v++) use[v] = !*only || strstr(only, vs[v].name) != 0 || v == 0 || v == nv - 1;
    double t[64][200];
    volatile float sink = 0;
    // touch, check bits
    plain_read(base, total);
    pass_lib(ms, nm, xq, xd, out0);
    for (int v = 1; v < nv - 1; v++) {
        if (!use[v]) continue;
        pass_kernel(vs[v].rf, vs[v].dot, ms, nm, xq, xd, out1);
        // out holds the last matrix (the head)
        if (memcmp(out0, out1, V * 4)) printf("variant %s: different bits!\n", vs[v].name);
    }
    for (int r = 0; r < rounds; r++) {
        for (int k = 0; k < nv; k++) {
            int v = (k + r) % nv;
            if (!use[v]) continue;
            double t0 = now_cpu();
            if (v == 0) pass_lib(ms, nm, xq, xd, out1);
            else if (v == nv - 1) sink += plain_read(base, total);
            else pass_kernel(vs[v].rf, vs[v].dot, ms, nm, xq, xd, out1);
            t[v][r] = now_cpu() - t0;
        }
    }
    double plainMed = 0;
    for (int v = nv - 1; v >= 0; v--) {
        if (!use[v]) continue;
        double s[200]; memcpy(s, t[v], rounds * sizeof(double));
        qsort(s, rounds, sizeof(double), cmpd);
        double med = s[rounds / 2], best = s[0];
        if (v == nv - 1) plainMed = med;
        printf("%-14s median %6.2f GB/s  best %6.2f GB/s  (%5.3f ms)  vs plain median %.3f\n", vs[v].name, total / med / 1e9,
               total / best / 1e9, med * 1e3, plainMed / med);
    }
    // per-round ratio to the same round's plain read, median
    for (int v = 0; v < nv - 1; v++) {
        if (!use[v]) continue;
        double s[200];
        for (int r = 0; r < rounds; r++) s[r] = t[nv - 1][r] / t[v][r];
        qsort(s, rounds, sizeof(double), cmpd);
        printf("%-14s per-round vs plain: median %.3f  [%.3f .. %.3f]\n", vs[v].name, s[rounds / 2], s[0], s[rounds - 1]);
    }
    return 0;
}
