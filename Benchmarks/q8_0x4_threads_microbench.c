// Two cores streaming a model's q8_0 weights through the batch-1 kernel (issue 14, session 13): how
// the rows of each matrix are split between the cores decides the bandwidth. Wall time of one pass
// over every matrix (SmolLM2-135M or GPT-2 shape, fused as the engine runs them: qkv, o, gate|up,
// down per layer, then the head), a spin barrier after each matrix unless named "nb", variants
// timed in turn round after round, each round's time against the same round's 1-thread plain read.
//
//   clang -O3 -march=native -I Sources/CQuant/include -o /tmp/q8t Benchmarks/q8_0x4_threads_microbench.c -lm -lpthread
//   /tmp/q8t [rounds] [smollm2|gpt2] ["plain2m dyn64 share ..." = only these variants]
//
// plain1 / plain2 / plain2m  a plain AVX2 read: 1 thread; 2 threads, halves of the whole buffer; halves of each matrix
// lib1                       the kernel (pf2lora_q8_0x4_dot_rows as CQuant.c stands), 1 thread, 64-row chunks
// dyn32/64/128/256           2 threads, chunks of N rows handed out in turn from one shared atomic counter
//                            (the engine's scheme before session 13)
// inter64                    2 threads, 64-row chunks interleaved statically (t, t + 2, ...): no atomics
// half / halfnb              2 threads, each a contiguous half of each matrix (with / without the barrier)
// share                      2 threads, each a contiguous share taken in 64-row chunks from its front, the
//                            other's stolen from its back (WorkerPool.Context.chunks since session 13)
// inter64np / half_np        inter64 / half with the kernel's software prefetch removed
//
// Session 13 (AMD EPYC family 26, 2 vCPUs, idle, 12:08-12:12 UTC), GB/s, SmolLM2 shape, one run of 15
// rounds: plain2m 56.7, dyn64 42.0, inter64 42.3, half 54.8, share 52.9 (GPT-2: 58.3, 45.5, 45.8,
// 57.6, 57.2). Interleaved chunks lose a quarter of two cores' bandwidth with or without the atomic
// counter and with or without the software prefetch (inter64np as slow as inter64): the split is
// the cause, not the counter's cache-line traffic nor prefetches into the other core's chunk.
#define _GNU_SOURCE
#include "../Sources/CQuant/CQuant.c"
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <pthread.h>
#include <stdatomic.h>

#define NO_PREFETCH(Q)
__attribute__((target("avxvnni,avx2,fma,f16c")))
static void dot4_nopf(const uint8_t *q, const uint8_t *sc, long nb, const int8_t *xq, const float *xd, const int32_t *xc, float *out) {
    DOT4_BODY(X4_CHUNK_VNNI, X4_START_VNNI, NO_PREFETCH) }
typedef struct { long rows, cols; uint8_t *w; } mat;
static mat ms[400]; static int nm; static long total; static uint8_t *base;
static int8_t *xq; static float *xd; static int32_t *xc; static float *outs[2];
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

static _Atomic long gen; static _Atomic long done; static int cur;
static _Atomic long arrived; static _Atomic long round_;
static _Atomic long counters[4][16];
static void barrier(void) {
    long r = atomic_load_explicit(&round_, memory_order_acquire);
    if (atomic_fetch_add(&arrived, 1) + 1 == 2) { atomic_store(&arrived, 0); atomic_fetch_add(&round_, 1); }
    else while (atomic_load_explicit(&round_, memory_order_acquire) == r) __builtin_ia32_pause();
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
    float f[8]; _mm256_storeu_ps(f, s); return f[0] + f[7];
}
static volatile float sink;
static void kernN(int i, long row0, long row1, float *out) {
    long nb = ms[i].cols / QK, G = (ms[i].rows + 3) / 4; const uint8_t *quants = ms[i].w, *scales = quants + G * nb * 128;
    for (long g = row0 / 4; g <= (row1 - 1) / 4; g++) { float o[4]; dot4_nopf(quants + g * nb * 128, scales + g * nb * 8, nb, xq, xd, xc, o);
        long r1 = 4 * g + 4 > row1 ? row1 - 4 * g : 4; for (long k = 0; k < r1; k++) out[4 * g + k] = o[k]; } }
static void kern(int i, long r0, long r1, float *out) { pf2lora_q8_0x4_dot_rows(ms[i].w, ms[i].rows, ms[i].cols, xq, xd, xc, 1, r0, r1, out, 0); }
static const char *names[] = {"plain1", "plain2", "plain2m", "lib1", "dyn64", "dyn256", "half", "halfnb", "dyn32", "dyn128", "unused", "inter64", "share", "inter64np", "half_np", "share16"};
static _Atomic unsigned long pk[4][2][8];
// Contiguous shares with stealing, as WorkerPool.Context.chunks: per participant, packed (taken from
// the front, taken from the back) counts of its share of `unit`-row units, reset two matrices ahead;
// the owner takes up to `most` units at a time from its front, the other one unit from its back.
static void shares(int t, long unit, long most, float *out) {
    for (int i = 0; i < nm; i++) {
        long n = (ms[i].rows + unit - 1) / unit;
        if (t == 0) { atomic_store_explicit(&pk[(i + 2) & 3][0][0], 0, memory_order_relaxed); atomic_store_explicit(&pk[(i + 2) & 3][1][0], 0, memory_order_relaxed); }
        for (int k = 0; k < 2; k++) {
            int o = (t + k) % 2; long s0 = n * o / 2, len = n * (o + 1) / 2 - s0;
            _Atomic unsigned long *c = &pk[i & 3][o][0];
            for (;;) {
                unsigned long v = atomic_load_explicit(c, memory_order_relaxed), f = v & 0xffffffff, b = v >> 32;
                long left = len - (long)(f + b);
                if (left <= 0) break;
                long take = k == 0 ? (left < most ? left : most) : 1;
                unsigned long nv = k == 0 ? v + take : v + (1ul << 32);
                if (!atomic_compare_exchange_weak_explicit(c, &v, nv, memory_order_relaxed, memory_order_relaxed)) continue;
                long ch = k == 0 ? s0 + (long)f : s0 + len - 1 - (long)b, lo = ch * unit, hi = lo + take * unit;
                kern(i, lo, hi < ms[i].rows ? hi : ms[i].rows, out);
            }
        }
        barrier();
    }
}
static void work(int v, int t, int P) {
    float *out = outs[t];
    switch (v) {
    case 0: if (t == 0) sink += plain_read(base, total); break;
    case 1: { long h = total / 2 / 128 * 128; sink += t == 0 ? plain_read(base, h) : plain_read(base + h, total - h); break; }
    case 2: for (int i = 0; i < nm; i++) { long b = pf2lora_q8_0x4_bytes(ms[i].rows, ms[i].cols); long h = b / 2 / 128 * 128;
                sink += t == 0 ? plain_read(ms[i].w, h) : plain_read(ms[i].w + h, b - h); barrier(); } break;
    case 3: if (t == 0) for (int i = 0; i < nm; i++) for (long r = 0; r < ms[i].rows; r += 64) kern(i, r, r + 64 < ms[i].rows ? r + 64 : ms[i].rows, out); break;
    case 4: case 5: case 8: case 9: {
        long size = v == 4 ? 64 : v == 5 ? 256 : v == 8 ? 32 : 128;
        for (int i = 0; i < nm; i++) {
            if (t == 0) atomic_store_explicit(&counters[(i + 2) & 3][0], 0, memory_order_relaxed);
            _Atomic long *c = &counters[i & 3][0];
            for (;;) { long lo = atomic_fetch_add_explicit(c, 1, memory_order_relaxed) * size; if (lo >= ms[i].rows) break;
                kern(i, lo, lo + size < ms[i].rows ? lo + size : ms[i].rows, out); }
            barrier();
        } break; }
    case 6: case 7: for (int i = 0; i < nm; i++) { long G = (ms[i].rows + 3) / 4, h = (G / 2) * 4;
                if (t == 0) kern(i, 0, h, out); else kern(i, h, ms[i].rows, out); if (v == 6) barrier(); } break;
    case 11: for (int i = 0; i < nm; i++) { for (long lo = 64 * t; lo < ms[i].rows; lo += 128) kern(i, lo, lo + 64 < ms[i].rows ? lo + 64 : ms[i].rows, out); barrier(); } break;
    case 12: shares(t, 64, 1, out); break;   // contiguous shares in 64-row units, thieves take one
    case 15: shares(t, 16, 4, out); break;   // 16-row units, the owner takes 4 (64 rows) at a time, thieves one
    case 13: for (int i = 0; i < nm; i++) { for (long lo = 64 * t; lo < ms[i].rows; lo += 128) kernN(i, lo, lo + 64 < ms[i].rows ? lo + 64 : ms[i].rows, out); barrier(); } break;
    case 14: for (int i = 0; i < nm; i++) { long G = (ms[i].rows + 3) / 4, h = (G / 2) * 4;
                if (t == 0) kernN(i, 0, h, out); else kernN(i, h, ms[i].rows, out); barrier(); } break;
    }
}
static void *worker(void *arg) {
    long seen = 0;
    for (;;) { long g; while ((g = atomic_load(&gen)) == seen) __builtin_ia32_pause(); seen = g; if (cur < 0) return 0;
        work(cur, 1, 2); atomic_fetch_add(&done, 1); }
}
static int cmpd(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return x < y ? -1 : x > y; }
int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 15;
    const char *shape = argc > 2 ? argv[2] : "smollm2";
    long H, F, KV, L, V;
    if (!strcmp(shape, "gpt2")) { H = 768; F = 3072; KV = 768; L = 12; V = 50257; } else { H = 576; F = 1536; KV = 192; L = 30; V = 49152; }
    for (long l = 0; l < L; l++) {
        long shp[7][2] = {{H, H}, {KV, H}, {KV, H}, {H, H}, {F, H}, {F, H}, {H, F}};
        // fused as the engine runs them: qkv one matrix, gate|up one matrix
        if (!strcmp(shape, "gpt2")) { long s2[4][2] = {{3 * H, H}, {H, H}, {F, H}, {H, F}}; for (int i = 0; i < 4; i++) { ms[nm].rows = s2[i][0]; ms[nm].cols = s2[i][1]; nm++; } }
        else { long s2[4][2] = {{H + 2 * KV, H}, {H, H}, {2 * F, H}, {H, F}}; for (int i = 0; i < 4; i++) { ms[nm].rows = s2[i][0]; ms[nm].cols = s2[i][1]; nm++; } }
        (void)shp;
    }
    ms[nm].rows = V; ms[nm].cols = H; nm++;
    for (int i = 0; i < nm; i++) total += pf2lora_q8_0x4_bytes(ms[i].rows, ms[i].cols);
    uint8_t *buf = mmap(0, total + (4 << 20), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    base = (uint8_t *)(((uintptr_t)buf + (2 << 20) - 1) & ~(uintptr_t)((2 << 20) - 1));
    madvise(base, total, MADV_HUGEPAGE);
    srand(1); long off = 0;
    for (int i = 0; i < nm; i++) { ms[i].w = base + off; long b = pf2lora_q8_0x4_bytes(ms[i].rows, ms[i].cols), G = (ms[i].rows + 3) / 4, nb = ms[i].cols / QK;
        for (long k = 0; k < G * nb * 128; k++) ms[i].w[k] = (uint8_t)(rand() % 255 - 127);
        for (long k = 0; k < G * nb * 4; k++) { uint16_t h = 0x2000 + rand() % 0x1000; memcpy(ms[i].w + G * nb * 128 + 2 * k, &h, 2); }
        off += (b + 63) / 64 * 64; }
    long maxc = 2 * F; xq = aligned_alloc(64, maxc); xd = aligned_alloc(64, maxc / QK * 4 + 64); float *x = malloc(maxc * 4);
    for (long i = 0; i < maxc; i++) x[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    xc = aligned_alloc(64, maxc / 16 * 4 + 64);
    pf2lora_q8_quantize_activations(x, xq, xd, xc, maxc);
    outs[0] = aligned_alloc(64, V * 4 + 4096); outs[1] = aligned_alloc(64, V * 4 + 4096);
    printf("%s: %d matrices, %.1f MB\n", shape, nm, total / 1e6);
    pthread_t th; pthread_create(&th, 0, worker, 0);
    const char *only = argc > 3 ? argv[3] : "";
    int nv = sizeof names / sizeof names[0]; int use[32];
    for (int v = 0; v < nv; v++) { char key[64]; snprintf(key, sizeof key, " %s ", names[v]); char pad[512]; snprintf(pad, sizeof pad, " %s ", only);
        use[v] = strcmp(names[v], "unused") && (!*only || strstr(pad, key) != 0 || v == 0); }
    double t[32][200];
    for (int r = -1; r < rounds; r++) for (int k = 0; k < nv; k++) { int v = (k + (r < 0 ? 0 : r)) % nv; if (!use[v]) continue;
        atomic_store(&done, 0); for (int c = 0; c < 4; c++) { atomic_store(&counters[c][0], 0); atomic_store(&pk[c][0][0], 0); atomic_store(&pk[c][1][0], 0); }
        double t0 = now(); cur = v; atomic_fetch_add(&gen, 1); work(v, 0, 2); while (atomic_load(&done) < 1) __builtin_ia32_pause();
        if (r >= 0) t[v][r] = now() - t0; }
    for (int v = 0; v < nv; v++) { if (!use[v]) continue; double s[200], q[200];
        for (int r = 0; r < rounds; r++) { s[r] = t[v][r]; q[r] = t[0][r] / t[v][r]; }
        qsort(s, rounds, 8, cmpd); qsort(q, rounds, 8, cmpd);
        printf("%-8s median %6.2f GB/s (%6.3f ms)  per-round vs plain1 median %.3f [%.3f..%.3f]\n", names[v], total / s[rounds / 2] / 1e9, s[rounds / 2] * 1e3, q[rounds / 2], q[0], q[rounds - 1]); }
    return 0;
}
