// The f16 / f32 batch-1 row kernels (Wide.c's one-input pass) streaming a whole model's weights,
// against a plain AVX2 read of the same bytes, one thread, thread CPU time (issue 14, session 11):
// prefetch distances in turn in the same process, each checked to give the library's bits.
//
//   clang -O3 -I Sources/CQuant/include -o /tmp/ws Benchmarks/wide_stream_microbench.c -lm && /tmp/ws [rounds] [smollm2|gpt2] [f16|f32]
//
// "lib" is pf2lora_wide_f16/f32_dot_rows as Wide.c stands (16-bit rows 6 KB ahead since session 11,
// 1 KB before). Session 11's machine (AMD family 26, 03:55 UTC, load 11-13 of compilers, 15 / 11
// rounds), f16, per-round ratio to the plain read, median: SmolLM2 1 KB 0.85, none 0.88, 2 KB 0.90,
// 4 KB 0.98, 6 KB 0.99, 8 KB 0.98; GPT-2 1 KB 0.84, 4 KB 0.96, 6 KB 0.98, 8 KB 0.97. f32 (538 MB)
// was too noisy under that load to tell. Session 17 (AMD Zen 2, AVX2 only; d2k / d3k replaced by
// d512 / d768; "lib" since then 768 bytes on an AVX2-only CPU, see Wide.c), f16, 7 / 5 rounds: SmolLM2
// none 0.86, 512 0.88, 768 0.99, 1 KB 0.97, 4 KB 0.83, 6 KB 0.82, 8 KB 0.86; GPT-2 none 0.86, 512
// 0.97, 768 1.00, 1 KB 0.97, 4-8 KB 0.84-0.86.
#define _GNU_SOURCE
#include "../Sources/CQuant/Wide.c"
#include "../Sources/CQuant/CQuant.c"

#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static double now_cpu(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

// Wide.c's WIDE_ROW4 with the distance D (bytes; 0: no hint) and LPI lines hinted per iteration.
#define ROW4_D(NAME, T, LOAD8, D)                                                                     \
__attribute__((target("avx2,fma,f16c")))                                                            \
static void NAME(const T *w, long C, const float *x, long r0, long r1, float *out) {                \
    long C32 = C & ~31L, C8 = C & ~7L;                                                              \
    for (long r = r0; r < r1; r++) {                                                                \
        const T *wr = w + r * C;                                                                    \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                 \
        long k = 0;                                                                                 \
        for (; k < C32; k += 32) {                                                                  \
            if (D) { for (int l = 0; l < (int)(32 * sizeof(T)); l += 64) _mm_prefetch((const char *)(wr + k) + (D) + l, _MM_HINT_T0); } \
            a0 = _mm256_fmadd_ps(LOAD8(wr, k), _mm256_loadu_ps(x + k), a0);                         \
            a1 = _mm256_fmadd_ps(LOAD8(wr, k + 8), _mm256_loadu_ps(x + k + 8), a1);                 \
            a2 = _mm256_fmadd_ps(LOAD8(wr, k + 16), _mm256_loadu_ps(x + k + 16), a2);               \
            a3 = _mm256_fmadd_ps(LOAD8(wr, k + 24), _mm256_loadu_ps(x + k + 24), a3);               \
        }                                                                                           \
        for (; k < C8; k += 8) a0 = _mm256_fmadd_ps(LOAD8(wr, k), _mm256_loadu_ps(x + k), a0);      \
        float s = wide_hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));          \
        out[r] = s;                                                                                 \
    }                                                                                               \
}
ROW4_D(h0, uint16_t, wide_f16_8, 0)
ROW4_D(h1k, uint16_t, wide_f16_8, 1024)
ROW4_D(h512, uint16_t, wide_f16_8, 512)
ROW4_D(h768, uint16_t, wide_f16_8, 768)
ROW4_D(h4k, uint16_t, wide_f16_8, 4096)
ROW4_D(h6k, uint16_t, wide_f16_8, 6144)
ROW4_D(h8k, uint16_t, wide_f16_8, 8192)
ROW4_D(f0, float, wide_f32_8, 0)
ROW4_D(f2k, float, wide_f32_8, 2048)
ROW4_D(f4k, float, wide_f32_8, 4096)
ROW4_D(f6k, float, wide_f32_8, 6144)
ROW4_D(f8k, float, wide_f32_8, 8192)
ROW4_D(f12k, float, wide_f32_8, 12288)

typedef void (*row_fn)(const void *, long, const float *, long, long, float *);
typedef struct { long rows, cols; uint8_t *w; } mat;

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
    int rounds = argc > 1 ? atoi(argv[1]) : 11;
    const char *shape = argc > 2 ? argv[2] : "smollm2";
    int f32 = argc > 3 && !strcmp(argv[3], "f32");
    long es = f32 ? 4 : 2;
    mat ms[400]; int nm = 0;
    long H, F, KV, L, V;
    if (!strcmp(shape, "gpt2")) { H = 768; F = 3072; KV = 768; L = 12; V = 50257; }
    else { H = 576; F = 1536; KV = 192; L = 30; V = 49152; }
    for (long l = 0; l < L; l++) {
        long shp[7][2] = {{H, H}, {KV, H}, {KV, H}, {H, H}, {F, H}, {F, H}, {H, F}};
        int k = !strcmp(shape, "gpt2") ? 6 : 7;
        for (int i = 0; i < k; i++) { ms[nm].rows = shp[i][0]; ms[nm].cols = shp[i][1]; nm++; }
    }
    ms[nm].rows = V; ms[nm].cols = H; nm++;
    long total = 0;
    for (int i = 0; i < nm; i++) total += ms[i].rows * ms[i].cols * es;
    uint8_t *buf = mmap(0, total + (2 << 20), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint8_t *base = (uint8_t *)(((uintptr_t)buf + (2 << 20) - 1) & ~(uintptr_t)((2 << 20) - 1));
    madvise(base, total, MADV_HUGEPAGE);
    srand(1);
    long off = 0;
    for (int i = 0; i < nm; i++) {
        ms[i].w = base + off;
        long n = ms[i].rows * ms[i].cols;
        for (long k = 0; k < n; k++) {
            float v = (float)rand() / (float)RAND_MAX - 0.5f;
            if (f32) memcpy(ms[i].w + 4 * k, &v, 4);
            else { uint16_t h = (uint16_t)((rand() & 0x8000) | (0x2c00 + rand() % 0x0c00)); memcpy(ms[i].w + 2 * k, &h, 2); }
        }
        off += n * es;
    }
    float *x = malloc(F * 4 + 64);
    for (long i = 0; i < F; i++) x[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    float *out0 = malloc(V * 4 + 64), *out1 = malloc(V * 4 + 64);
    printf("%s %s: %d matrices, %.1f MB\n", shape, f32 ? "f32" : "f16", nm, total / 1e6);
    struct { const char *name; row_fn f; } hv[] = {{"lib", 0}, {"d0", (row_fn)h0}, {"d1k", (row_fn)h1k}, {"d512", (row_fn)h512}, {"d768", (row_fn)h768},
                                                   {"d4k", (row_fn)h4k}, {"d6k", (row_fn)h6k}, {"d8k", (row_fn)h8k}, {"plain", 0}};
    struct { const char *name; row_fn f; } fv[] = {{"lib", 0}, {"d0", (row_fn)f0}, {"d2k", (row_fn)f2k}, {"d4k", (row_fn)f4k}, {"d6k", (row_fn)f6k},
                                                   {"d8k", (row_fn)f8k}, {"d12k", (row_fn)f12k}, {"plain", 0}, {"plain", 0}};
    int nv = f32 ? 8 : 9;
    const char *names[16]; row_fn fns[16];
    for (int v = 0; v < nv; v++) { names[v] = f32 ? fv[v].name : hv[v].name; fns[v] = f32 ? fv[v].f : hv[v].f; }
    double t[16][200];
    volatile float sink = 0;
    plain_read(base, total);
    #define PASS(BODY) for (int i = 0; i < nm; i++) for (long r = 0; r < ms[i].rows; r += 64) { long r1 = r + 64 < ms[i].rows ? r + 64 : ms[i].rows; BODY; }
    if (f32) PASS(pf2lora_wide_f32_dot_rows((const float *)ms[i].w, ms[i].cols, x, 1, r, r1, out0, 0))
    else PASS(pf2lora_wide_f16_dot_rows((const uint16_t *)ms[i].w, ms[i].cols, x, 1, r, r1, out0, 0))
    for (int v = 1; v < nv - 1; v++) {
        PASS(fns[v](ms[i].w, ms[i].cols, x, r, r1, out1))
        if (memcmp(out0, out1, V * 4)) printf("variant %s: different bits!\n", names[v]);
    }
    for (int r = 0; r < rounds; r++)
        for (int k = 0; k < nv; k++) {
            int v = (k + r) % nv;
            double t0 = now_cpu();
            if (v == nv - 1) sink += plain_read(base, total);
            else if (v == 0) {
                if (f32) PASS(pf2lora_wide_f32_dot_rows((const float *)ms[i].w, ms[i].cols, x, 1, r, r1, out1, 0))
                else PASS(pf2lora_wide_f16_dot_rows((const uint16_t *)ms[i].w, ms[i].cols, x, 1, r, r1, out1, 0))
            } else PASS(fns[v](ms[i].w, ms[i].cols, x, r, r1, out1))
            t[v][r] = now_cpu() - t0;
        }
    for (int v = 0; v < nv; v++) {
        double s[200], q[200];
        memcpy(s, t[v], rounds * sizeof(double));
        qsort(s, rounds, sizeof(double), cmpd);
        for (int r = 0; r < rounds; r++) q[r] = t[nv - 1][r] / t[v][r];
        qsort(q, rounds, sizeof(double), cmpd);
        printf("%-6s median %6.2f GB/s  best %6.2f  per-round vs plain median %.3f [%.3f .. %.3f]\n", names[v], total / s[rounds / 2] / 1e9,
               total / s[0] / 1e9, q[rounds / 2], q[0], q[rounds - 1]);
    }
    return 0;
}
