#ifndef PF2LORA_CWIDE_H
#define PF2LORA_CWIDE_H

// Batch-invariant row-dot kernels for the pooled decode pass (Sources/CQuant/Wide.c).
//
// out[v * stride + r] = W[r, :] . x_v for r in [r0, r1) and the `count` inputs x_v = xs + v * cols,
// W (rows, cols) row-major at f32, f16 (IEEE half) or bf16. Register-blocked: at f16 and bf16 four
// weight rows times three inputs per tile; at f32 one row at a time, its inputs in groups of up to three
// (the row re-read from L1 for each group). Every (row, input) pair is summed in one fixed order
// whatever `count`, `r0`, `r1` and the input's position are: four eight-lane accumulators, accumulator s
// fed the 8-column blocks s, s + 4, s + 8, ... of the whole groups of four blocks in ascending k, the
// blocks after them into accumulator 0, added as (a0 + a1) + (a2 + a3), the lanes added in one fixed
// tree, then the cols % 8 tail fused in ascending k (Wide.c's header has it all).
// So an input's results are the same bits alone or in any batch, at any position. The AVX2 path and
// the scalar path (CPUs without AVX2/FMA, or `pf2lora_quant_set_isa(0)`) give the same bits.

#include <stdint.h>

void pf2lora_wide_f32_dot_rows(const float *w, long cols, const float *xs, long count, long r0, long r1,
                               float *out, long stride);
void pf2lora_wide_f16_dot_rows(const uint16_t *w, long cols, const float *xs, long count, long r0, long r1,
                               float *out, long stride);
void pf2lora_wide_bf16_dot_rows(const uint16_t *w, long cols, const float *xs, long count, long r0, long r1,
                                float *out, long stride);

#endif
