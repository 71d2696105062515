// The q8_0x4 AVX2 kernel's weight stream at one thread (issue 14, session 17): how far ahead, into
// which cache, and over how many concurrent streams the software prefetch asks for the quants. One
// pass of the kernel over a model's q8_0 matrices (SmolLM2-135M shape, fused as the engine runs
// them: qkv, o, gate|up, down per layer, then the head; 143 MB on 2 MB pages), each round's time
// against the same round's plain AVX2 read of the same bytes, variants in turn round after round.
//
//   clang -O3 -DX4_NEAR_BYTES=768 -DX4_FAR_BYTES=4096 -I Sources/CQuant/include -o /tmp/q8d Benchmarks/q8_0x4_distance_microbench.c -lm
//   /tmp/q8d [rounds]
//
// lib        pf2lora_q8_0x4_dot_rows as CQuant.c stands
// tiersN     X4_NEAR_BYTES into L1 plus X4_FAR_BYTES into L2 for every line (sessions 15-16's AVX2 form)
// nearN      X4_NEAR_BYTES into L1 only (the AVX2 form since session 17, 768 bytes)
// farN       X4_FAR_BYTES into L2 only
// npN        no software prefetch
// N = 1: each matrix's 4-row groups in order; N = 2, 3: the groups in N contiguous parts, visited
// group by group round robin over the parts (N streams in flight; the same outputs).
//
// Session 17 (AMD EPYC Zen 2, AVX2 only, 2 vCPUs, one core reading 15-18 GB/s), 7 rounds, per-round
// ratio to the plain read (medians), the fast-phase run: tiers1 / tiers2 (1.5 + 12 KB) 0.86 / 0.87;
// near1 / near2 at 512 bytes 0.94 / 1.00, 768 0.99 / 1.03, 1 KB 0.99 / 0.95, 1.5 KB 0.82 / 0.90;
// np1 / np2 0.77-0.78 / 0.79-0.81 (table: Benchmarks/README.md "The weight streams' prefetch distance").
#define _GNU_SOURCE
#include "../Sources/CQuant/CQuant.c"
#ifndef X4_FAR_BYTES   // the L2 tier of sessions 15-16 (CQuant.c kept it until session 17)
#define X4_FAR_BYTES 12288
#endif
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

#define PF_NONE(Q)
#define PF_FAR(Q) X4_PREFETCH_LINES(Q, X4_FAR_BYTES, _MM_HINT_T1)
#define PF_NEAR(Q) X4_PREFETCH_LINES(Q, X4_NEAR_BYTES, _MM_HINT_T0)
#define PF_TIERS(Q) PF_NEAR(Q) PF_FAR(Q)
#define DOT(NAME, PF)                                                                                        \
    __attribute__((target("avx2,fma,f16c"), noinline)) static void NAME(const uint8_t *q, const uint8_t *sc, long nb, \
        const int8_t *xq, const float *xd, const int32_t *xc, float *out) { (void)xc; DOT4_BODY(X4_CHUNK_AVX2, X4_START_AVX2, PF) }
DOT(d_none, PF_NONE)
DOT(d_far, PF_FAR)
DOT(d_near, PF_NEAR)
DOT(d_tiers, PF_TIERS)
typedef void (*dotf)(const uint8_t *, const uint8_t *, long, const int8_t *, const float *, const int32_t *, float *);
typedef struct { long rows, cols; uint8_t *w; } mat;
static mat ms[400];
static int nm;
static long total;
static uint8_t *base;
static int8_t *xq;
static float *xd, *out;
static int32_t *xc;
static volatile float sink;
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
__attribute__((target("avx2"))) static float plain_read(const uint8_t *p, long n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (long i = 0; i + 128 <= n; i += 128) {
        a0 = _mm256_add_ps(a0, _mm256_loadu_ps((const float *)(p + i)));
        a1 = _mm256_add_ps(a1, _mm256_loadu_ps((const float *)(p + i + 32)));
        a2 = _mm256_add_ps(a2, _mm256_loadu_ps((const float *)(p + i + 64)));
        a3 = _mm256_add_ps(a3, _mm256_loadu_ps((const float *)(p + i + 96)));
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    float f[8];
    _mm256_storeu_ps(f, s);
    return f[0] + f[7];
}
// Every matrix's groups in S contiguous parts, visited group by group round robin over the parts.
static void streams(dotf d, int S) {
    for (int i = 0; i < nm; i++) {
        long nb = ms[i].cols / QK, G = (ms[i].rows + 3) / 4, per = (G + S - 1) / S;
        const uint8_t *quants = ms[i].w, *scales = quants + G * nb * 128;
        for (long k = 0; k < per; k++)
            for (int s = 0; s < S; s++) {
                long g = s * per + k;
                if (g < G) d(quants + g * nb * 128, scales + g * nb * 8, nb, xq, xd, xc, out + 4 * g);
            }
    }
}
static const char *names[] = {"plain", "lib", "tiers1", "tiers2", "near1", "near2", "near3", "far1", "far2", "np1", "np2"};
static void run(int v) {
    switch (v) {
    case 0: sink += plain_read(base, total); break;
    case 1: for (int i = 0; i < nm; i++) pf2lora_q8_0x4_dot_rows(ms[i].w, ms[i].rows, ms[i].cols, xq, xd, xc, 1, 0, ms[i].rows, out, 0); break;
    case 2: streams(d_tiers, 1); break;
    case 3: streams(d_tiers, 2); break;
    case 4: streams(d_near, 1); break;
    case 5: streams(d_near, 2); break;
    case 6: streams(d_near, 3); break;
    case 7: streams(d_far, 1); break;
    case 8: streams(d_far, 2); break;
    case 9: streams(d_none, 1); break;
    case 10: streams(d_none, 2); break;
    }
}
static int cmpd(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return x < y ? -1 : x > y; }
int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 7;
    if (rounds < 1 || rounds > 64) rounds = 7;
    const long H = 576, F = 1536, KV = 192, L = 30, V = 49152;
    for (long l = 0; l < L; l++) {
        long s2[4][2] = {{H + 2 * KV, H}, {H, H}, {2 * F, H}, {H, F}};
        for (int i = 0; i < 4; i++) { ms[nm].rows = s2[i][0]; ms[nm].cols = s2[i][1]; nm++; }
    }
    ms[nm].rows = V; ms[nm].cols = H; nm++;
    for (int i = 0; i < nm; i++) total += (pf2lora_q8_0x4_bytes(ms[i].rows, ms[i].cols) + 63) / 64 * 64;
    uint8_t *buf = mmap(0, total + (4 << 20), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    base = (uint8_t *)(((uintptr_t)buf + (2 << 20) - 1) & ~(uintptr_t)((2 << 20) - 1));
    madvise(base, total, MADV_HUGEPAGE);
    srand(1);
    long off = 0;
    for (int i = 0; i < nm; i++) {
        ms[i].w = base + off;
        long b = pf2lora_q8_0x4_bytes(ms[i].rows, ms[i].cols), G = (ms[i].rows + 3) / 4, nb = ms[i].cols / QK;
        for (long k = 0; k < G * nb * 128; k++) ms[i].w[k] = (uint8_t)(rand() % 255 - 127);
        for (long k = 0; k < G * nb * 4; k++) { uint16_t h = 0x2000 + rand() % 0x1000; memcpy(ms[i].w + G * nb * 128 + 2 * k, &h, 2); }
        off += (b + 63) / 64 * 64;
    }
    long maxc = 2 * F;
    xq = aligned_alloc(64, maxc);
    xd = aligned_alloc(64, maxc / QK * 4 + 64);
    xc = aligned_alloc(64, maxc / 16 * 4 + 64);
    float *x = malloc(maxc * 4);
    for (long i = 0; i < maxc; i++) x[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    pf2lora_q8_quantize_activations(x, xq, xd, xc, maxc);
    out = aligned_alloc(64, V * 4 + 4096);
    printf("smollm2 shape: %d matrices, %.1f MB; near %d, far %d bytes\n", nm, total / 1e6, X4_NEAR_BYTES, X4_FAR_BYTES);
    const int nv = sizeof names / sizeof names[0];
    double t[16][64];
    for (int r = -1; r < rounds; r++)
        for (int k = 0; k < nv; k++) {
            int v = (k + (r < 0 ? 0 : r)) % nv;
            double t0 = now();
            run(v);
            if (r >= 0) t[v][r] = now() - t0;
        }
    for (int v = 0; v < nv; v++) {
        double q[64], s[64];
        for (int r = 0; r < rounds; r++) { q[r] = t[0][r] / t[v][r]; s[r] = t[v][r]; }
        qsort(q, rounds, 8, cmpd);
        qsort(s, rounds, 8, cmpd);
        printf("%-7s median %5.2f GB/s  vs plain per round: median %.3f [%.3f..%.3f]\n", names[v], total / s[rounds / 2] / 1e9, q[rounds / 2], q[0], q[rounds - 1]);
    }
    return 0;
}
