// Decode attention microbenchmark in a decode's access order (issue 14, session 17): g = 3 query heads
// per KV head, each item a score pass then a value pass over T f16 keys / values (a split decode part
// is T ~ 256-460 at contexts 512-912), the items visited in a shuffled order, so that no hint running
// past one item's last row fetches the next item's first (in `attention_microbench.c` the heads lie
// back to back and are visited in order, which rewards long prefetch distances that a decode step,
// whose participants jump between KV heads and parts, does not see). Rows on 2 MB pages advised
// MADV_HUGEPAGE (as `LargeBuffer` allocates the KV cache), NKV items in DRAM. Thread CPU time, best of
// 7 rounds of 5 passes over all items, microseconds per round.
//
//   clang -O3 -DSRC='"Sources/CQuant/CQuant.c"' -I. -ISources/CQuant/include -ISources/CQuant -o /tmp/attn_rnd Benchmarks/attention_random_microbench.c -lm
//   /tmp/attn_rnd 272 900          (T, items)
//   -DSCORES_AHEAD_H=.. -DSCORES_FAR_H=.. (bytes) and -DVALUES_NEAR_H=.. -DVALUES_FAR_H=.. (f16 rows) set the distances.
#include SRC
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <time.h>
#include <sys/mman.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
static void *big(size_t n) {
    const size_t H = 2u << 20;
    n = (n + H - 1) / H * H;
    char *p = mmap(0, n + H, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) { perror("mmap"); exit(1); }
    p = (char *)(((uintptr_t)p + H - 1) & ~(uintptr_t)(H - 1));
    madvise(p, n, MADV_HUGEPAGE);
    return p;
}
int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: %s T items\n", argv[0]); return 2; }
    const long T = atol(argv[1]), nkv = atol(argv[2]), g = 3, cap = T + 256;   // rows past T: a cache's unused capacity
    uint16_t *K = big(nkv * cap * 64 * 2), *V = big(nkv * cap * 64 * 2);
    float *q = malloc(nkv * g * 64 * 4), *sc = malloc(g * T * 4), *o = malloc(g * 64 * 4), one[3] = {1, 1, 1};
    srand(1);
    for (long i = 0; i < nkv * cap * 64; i++) {
        K[i] = float_to_half((rand() / (float)RAND_MAX - 0.5f) * 4);
        V[i] = float_to_half(rand() / (float)RAND_MAX - 0.5f);
    }
    for (long i = 0; i < nkv * g * 64; i++) q[i] = rand() / (float)RAND_MAX - 0.5f;
    long *order = malloc(nkv * sizeof(long));
    for (long i = 0; i < nkv; i++) order[i] = i;
    for (long i = nkv - 1; i > 0; i--) { long j = rand() % (i + 1), t = order[i]; order[i] = order[j]; order[j] = t; }
    double best = 1e9;
    float sink = 0;
    for (int rep = 0; rep < 7; rep++) {
        double t0 = now();
        for (int it = 0; it < 5; it++) for (long x = 0; x < nkv; x++) {
            const long h = order[x];
            pf2lora_attention_scores64_f16(q + h * g * 64, g, K + h * cap * 64, T, 0.125f, sc);
            pf2lora_attention_values64_f16(sc, g, T, V + h * cap * 64, one, o);
            sink += o[0];
        }
        const double d = (now() - t0) / 5 * 1e6;
        if (d < best) best = d;
    }
    printf("T=%ld items=%ld g=3: %.0f us per round (%.1f ns per position) [%g]\n", T, nkv, best, best * 1e3 / (nkv * T), sink);
}
