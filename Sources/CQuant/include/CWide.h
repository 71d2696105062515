#ifndef PF2LORA_CWIDE_H
#define PF2LORA_CWIDE_H

// Batch-invariant row-dot kernels for the pooled decode pass (Sources/CQuant/Wide.c).
//
// out[v * stride + r] = W[r, :] . x_v for r in [r0, r1) and the `count` inputs x_v = xs + v * cols,
// W (rows, cols) row-major at f32, f16 (IEEE half) or bf16. Register-blocked: four weight rows times
// three inputs per tile, so each weight value loaded is used for three inputs and each input value for
// four weight rows. Every (row, input) pair is summed in one fixed order whatever `count`, `r0`, `r1`
// and the input's position are: A eight-lane accumulators (A = 1 at f32, 4 at f16 and bf16), each fed
// its 8-column blocks in ascending k (accumulator s the blocks s, s + A, s + 2A, ... of the whole
// groups of A blocks, the blocks after them into accumulator 0), added in one fixed tree, the lanes
// added in one fixed tree, then the cols % 8 tail fused in ascending k (Wide.c's header has it all).
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
