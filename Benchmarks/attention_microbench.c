// Decode attention microbenchmark (issue 14, session 10): the head_dim-64 score and value passes over
// an f16 and an f32 cache, called through CQuant's public functions, g query heads per key/value head,
// T keys, NKV passes per "step" (SmolLM2: g = 3, 90 passes; GPT-2: g = 1, 144 = NKV 48 x 3 / g).
// Thread CPU time, best of 7 x 10 steps, microseconds per step. Writes the outputs of three passes to
// DUMP, so two builds can be compared byte for byte. NKV=900 makes the passes' cache exceed L3 (DRAM).
//
//   clang -O3 -DNEW -DSRC='"Sources/CQuant/CQuant.c"' -I. -ISources/CQuant/include -o /tmp/attn Benchmarks/attention_microbench.c -lm
//   git show a3105ae:Sources/CQuant/CQuant.c > /tmp/old/CQuant.c  (with its include/ and half.h beside it)
//   clang -O3 -DSRC='"/tmp/old/CQuant.c"' -I/tmp/old/include -o /tmp/attn_old Benchmarks/attention_microbench.c -lm
//   [NKV=900] /tmp/attn 528 3 99 /tmp/new.bin     (T, g, ISA cap, DUMP)
//
// -DNEW also times the f32 value pass (`pf2lora_attention_values64`, C since session 10).
//
// Session 16 (Zen 2, AVX2 only): the AVX2 value pass blocked over up to three heads (half a row each
// pass) and both passes' prefetch distances; -DVALUES_NEAR=.. -DVALUES_FAR=.. (f32 rows; f16 rows
// -DVALUES_NEAR_H / _FAR_H since session 17) and
// -DSCORES_AHEAD_H=.. -DSCORES_FAR_H=.. / -DSCORES_AHEAD_F=.. (bytes) set them. The heads lie one after
// another here, so hints past a head's last row fetch the next head's (as for a split decode's first
// part, not its second): decide distances by decode A/B (`bench decode`), not by this alone.
//   NKV=900 /tmp/attn 320 3 99 /tmp/new.bin    (a split part of 320 positions, in DRAM)
#include SRC
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
static long NKV = 90;
int main(int argc, char **argv) {
    if (getenv("NKV")) NKV = atol(getenv("NKV"));
    long T = atol(argv[1]), g = atol(argv[2]); int isa = atoi(argv[3]); const char *dump = argv[4];
    pf2lora_quant_set_isa(isa);
    long nkv = NKV * 3 / g;
    uint16_t *K = malloc(nkv * T * 64 * 2), *V = malloc(nkv * T * 64 * 2);
    float *Kf = malloc(nkv * T * 64 * 4), *Vf = malloc(nkv * T * 64 * 4);
    float *q = malloc(nkv * g * 64 * 4), *sc = malloc(g * T * 4), *o = malloc(g * 64 * 4);
    srand(1);
    for (long i = 0; i < nkv * T * 64; i++) { Kf[i] = (rand() / (float)RAND_MAX - 0.5f) * 4; Vf[i] = (rand() / (float)RAND_MAX - 0.5f) * 4; K[i] = float_to_half(Kf[i]); V[i] = float_to_half(Vf[i]); }
    for (long i = 0; i < nkv * g * 64; i++) q[i] = (rand() / (float)RAND_MAX - 0.5f);
    float inv[8] = {0.001f, 0.002f, 0.003f, 0.004f, 0.005f, 0.006f, 0.007f, 0.008f};
    FILE *f = fopen(dump, "wb");
    for (int h = 0; h < 3; h++) {
        pf2lora_attention_scores64_f16(q + h * g * 64, g, K + h * T * 64, T, 0.125f, sc); fwrite(sc, 4, g * T, f);
        pf2lora_attention_values64_f16(sc, g, T, V + h * T * 64, inv, o); fwrite(o, 4, g * 64, f);
        pf2lora_attention_scores64(q + h * g * 64, g, Kf + h * T * 64, T, 0.125f, sc); fwrite(sc, 4, g * T, f);
#ifdef NEW
        pf2lora_attention_values64(sc, g, T, Vf + h * T * 64, inv, o); fwrite(o, 4, g * 64, f);
#endif
    }
    fclose(f);
    double best[4] = {1e9, 1e9, 1e9, 1e9};
    for (int rep = 0; rep < 7; rep++) {
        double t0;
#define RUN(idx, CALL) t0 = now(); for (int it = 0; it < 10; it++) for (long h = 0; h < nkv; h++) { CALL; } { double d = (now() - t0) / 10 * 1e6; if (d < best[idx]) best[idx] = d; }
        RUN(0, pf2lora_attention_scores64_f16(q + h * g * 64, g, K + h * T * 64, T, 0.125f, sc))
        RUN(1, pf2lora_attention_values64_f16(sc, g, T, V + h * T * 64, inv, o))
        RUN(2, pf2lora_attention_scores64(q + h * g * 64, g, Kf + h * T * 64, T, 0.125f, sc))
#ifdef NEW
        RUN(3, pf2lora_attention_values64(sc, g, T, Vf + h * T * 64, inv, o))
#endif
    }
    printf("T=%ld g=%ld isa=%d us/step(%ld kv heads): scores_f16 %.0f values_f16 %.0f scores_f32 %.0f values_f32(C) %.0f\n", T, g, isa, nkv, best[0], best[1], best[2], best[3]);
}
