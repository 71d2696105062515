// Issue 14: the f32 pooled decode kernel of Wide.c at batch 1..32 against a plain read of the same
// matrices, SmolLM2-135M's f32 weights (30 layers + tied head, 538 MB: rows of 576 and of 1536
// columns), thread CPU time, best of REPS per batch width. Build from the repository root (clang -O2
// as SwiftPM builds CQuant), optionally against another Wide.c to compare kernels:
//   clang -O2 -ISources/CQuant/include -ISources/CQuant -o /tmp/wide_mb Benchmarks/wide_f32_microbench.c -lm
//   git show 5c24d90:Sources/CQuant/Wide.c > /tmp/Wide_old.c   # session 8's kernels (8-row tiles, 1 accumulator)
//   clang -O2 -ISources/CQuant/include -ISources/CQuant -DWIDE_SRC='"/tmp/Wide_old.c"' -o /tmp/wide_mb_old Benchmarks/wide_f32_microbench.c -lm
// Output per width: ms per pass over all weights and the pass's speed as a fraction of the plain read
// (at batch 1 the read bound; wider batches read the same bytes once and do more arithmetic).
#ifndef WIDE_SRC
#define WIDE_SRC "../Sources/CQuant/Wide.c"
#endif
#include WIDE_SRC
#include <sys/mman.h>
int pf2lora_quant_isa(void) { return 1; }
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double tcpu(void) { struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

__attribute__((target("avx2")))
static float plain(const float *w, long n) {
    __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
    for (long i = 0; i < n; i += 32) {
        a = _mm256_add_ps(a, _mm256_loadu_ps(w + i)); b = _mm256_add_ps(b, _mm256_loadu_ps(w + i + 8));
        c = _mm256_add_ps(c, _mm256_loadu_ps(w + i + 16)); d = _mm256_add_ps(d, _mm256_loadu_ps(w + i + 24));
    }
    return wide_hsum8(_mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
}

static float *alloc(long n) {
    float *p = aligned_alloc(2 << 20, (n * 4 + (2 << 20) - 1) & ~((2L << 20) - 1));
    madvise(p, n * 4, 14 /* MADV_HUGEPAGE */);
    for (long i = 0; i < n; i++) p[i] = (float)((i * 2654435761u) % 1000) * 1e-3f - 0.5f;
    return p;
}

int main(int argc, char **argv) {
    int reps = argc > 1 ? atoi(argv[1]) : 7;
    // 30 x (q 576 + k 192 + v 192 + o 576 + gate 1536 + up 1536) rows + head 49152 rows of 576; 30 x 576 rows of 1536.
    long RA = 30L * (576 + 192 + 192 + 576 + 1536 + 1536) + 49152, CA = 576, RB = 30L * 576, CB = 1536;
    float *wa = alloc(RA * CA), *wb = alloc(RB * CB);
    int widths[8] = {1, 2, 3, 4, 8, 16, 32}, nw = 7;
    if (argc > 2) { nw = 0; for (int i = 2; i < argc && nw < 8; i++) widths[nw++] = atoi(argv[i]); }   // [REPS [WIDTH...]]
    float *xs = alloc(32 * CB), *out = malloc(32 * RA * 4);
    double best[8], bplain = 1e9;
    for (int i = 0; i < nw; i++) best[i] = 1e9;
    volatile float sink = 0;
    for (int rep = 0; rep < reps; rep++) {
        double t0 = tcpu(); sink += plain(wa, RA * CA) + plain(wb, RB * CB); double t = tcpu() - t0;
        if (t < bplain) bplain = t;
        for (int i = 0; i < nw; i++) {
            t0 = tcpu();
            pf2lora_wide_f32_dot_rows(wa, CA, xs, widths[i], 0, RA, out, RA);
            pf2lora_wide_f32_dot_rows(wb, CB, xs, widths[i], 0, RB, out, RB);
            t = tcpu() - t0;
            if (t < best[i]) best[i] = t;
        }
    }
    double gb = (RA * CA + RB * CB) * 4 / 1e9;
    printf("%-10s %8.1f ms  %5.1f GB/s\n", "plain", bplain * 1e3, gb / bplain);
    for (int i = 0; i < nw; i++)
        printf("batch %-4d %8.1f ms  %5.2fx plain  %6.1f tok/s-equivalent\n", widths[i], best[i] * 1e3, bplain / best[i], widths[i] / best[i]);
    return (int)sink & 0;
}
