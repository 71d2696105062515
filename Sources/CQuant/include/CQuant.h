#ifndef PF2LORA_CQUANT_H
#define PF2LORA_CQUANT_H

// Integer kernels of the q8_0 weight format that Swift cannot express: x86's int8 dot products
// (vpmaddubsw + vpmaddwd on AVX2, vpdpbusd with AVX-VNNI), chosen at run time from what the CPU
// has, with a portable scalar path that computes the same bits. See Sources/PF2LoRA/Tensor/WeightStorage.swift.
//
// q8_0 is GGUF's block format: each row of `cols` values (cols a multiple of 32) is cols / 32 blocks
// of 34 bytes, an IEEE half scale d then 32 int8 values q; the value is d * q.
// Activations are quantized per block of 32 as llama.cpp does: int8 values and one f32 scale each.

#include <stdint.h>
#include "CWide.h"   // the batch-invariant f32 / f16 / bf16 row-dot kernels of pooled decode (Wide.c)

#ifdef __cplusplus
extern "C" {
#endif

/// Instruction sets the kernels can use, lowest first.
enum {
    PF2LORA_ISA_SCALAR = 0,
    PF2LORA_ISA_AVX2 = 1,     // AVX2 + FMA + F16C (x86-64-v3's vector part)
    PF2LORA_ISA_AVXVNNI = 2,  // the above + AVX-VNNI (256-bit vpdpbusd)
    PF2LORA_ISA_AVX512 = 3,   // a cap, not a level `pf2lora_cpu_isa` reports (a CPU can have AVX-512
                              // without AVX-VNNI): AVX-512F kernels run when the CPU has it and the cap
                              // (`pf2lora_quant_set_isa`) is at least this
};

/// The best level this CPU (and its OS) supports.
int pf2lora_cpu_isa(void);

/// The level the kernels use: `pf2lora_cpu_isa()` unless lowered by `pf2lora_quant_set_isa`.
int pf2lora_quant_isa(void);

/// Uses at most `level` from now on (tests compare the paths; a level the CPU lacks is clamped).
/// Returns the level in use.
int pf2lora_quant_set_isa(int level);

/// Whether the CPU (and its OS) offer AVX-512F with the zmm state saved.
int pf2lora_cpu_has_avx512(void);

/// Whether the AVX-512F kernels run now: the CPU has it and the cap is >= PF2LORA_ISA_AVX512.
int pf2lora_use_avx512(void);

/// NULL when a build whose vector code needs AVX2 + FMA + F16C (`needs_avx2`: Package.swift's
/// default -target-cpu haswell) can run on a CPU of `isa` (from `pf2lora_cpu_isa`), else the error
/// line to print. Compiled for baseline x86-64, so the CLI can call it before any AVX instruction.
const char *pf2lora_cpu_requirement_error(int needs_avx2, int isa);

/// Activations for the q8_0 dot: n values (n % 32 == 0) into n int8 values `q` and n / 32 scales
/// `d`: d = max|x| / 127 per block, q = x / d rounded to nearest even (0 when the block is zero).
/// Unless `c` is NULL, also n / 16 int32 corrections for the interleaved kernel: per block,
/// -128 times the sums of q over values 8k..8k+3 and over 8k+4..8k+7 (k = 0..3).
void pf2lora_q8_quantize_activations(const float *x, int8_t *q, float *d, int32_t *c, long n);

/// out[v * stride + r] = W[r, :] . x_v for r in [row0, row1) and v in [0, count): W's rows are
/// q8_0 (cols / 32 blocks of 34 bytes), x_v the activations quantized above (cols int8 values at
/// xq + v * cols, scales at xd + v * cols / 32). Every path sums each x_v in the same order, so a
/// result does not depend on `count`, on the row range, or on the instruction set.
void pf2lora_q8_0_dot_rows(const void *w, long cols, const int8_t *xq, const float *xd, long count,
                           long row0, long row1, float *out, long stride);

/// The four-row interleaved q8_0 layout the serving weights use (CQuant.c, "q8_0x4"): groups of 4
/// rows (the last padded with zero rows), all quants first, block by block four rows' 8-value chunks
/// side by side, then all scales. The bytes of a (rows, cols) matrix.
long pf2lora_q8_0x4_bytes(long rows, long cols);

/// Row r of an interleaved matrix from / to the standard q8_0 blocks (cols / 32 blocks of 34 bytes).
void pf2lora_q8_0x4_set_row(void *w, long rows, long cols, long r, const void *blocks);
void pf2lora_q8_0x4_get_row(const void *w, long rows, long cols, long r, void *blocks);

/// Row r of an interleaved matrix as cols f32 values (d * q, exact).
void pf2lora_q8_0x4_row_to_f32(const void *w, long rows, long cols, long r, float *out);

/// `pf2lora_q8_0_dot_rows` for an interleaved matrix of `rows` rows: each activation load serves
/// four rows. Every path sums each x_v in the same order (CQuant.c), so a result does not depend on
/// `count`, on the row range, or on the instruction set; it differs in its last bits from the
/// standard layout's kernel (another summation order).
/// xc: the activations' corrections (`pf2lora_q8_quantize_activations`' c, cols / 16 per input).
void pf2lora_q8_0x4_dot_rows(const void *w, long rows, long cols, const int8_t *xq, const float *xd, const int32_t *xc,
                             long count, long row0, long row1, float *out, long stride);

/// Decode attention scores for head_dim 64: scores[i * T + j] = scale * (q_i . k_j) for the g query
/// heads q_i (64 floats each, contiguous) and the T keys k_j (64 floats each, contiguous). AVX2: eight
/// keys at a time, within them up to three heads x four keys in registers (each key chunk loaded once
/// for the heads), one transposing reduction per head and four or eight keys; the scalar path sums
/// in the same order.
void pf2lora_attention_scores64(const float *q, long g, const float *k, long T, float scale, float *scores);

/// The half-precision KV cache (`KVCache` at f16): n floats to IEEE halves rounded to nearest even
/// (as F16C's vcvtps2ph), and back (exact). The scalar paths give the same bits as F16C's.
void pf2lora_f32_to_f16(const float *x, uint16_t *h, long n);
void pf2lora_f16_to_f32(const uint16_t *h, float *x, long n);

/// `pf2lora_attention_scores64` over T half keys (64 halves each): each key is widened exactly, so
/// the scores equal, to the bit, those of the f32 kernel on the widened keys.
void pf2lora_attention_scores64_f16(const float *q, long g, const uint16_t *k, long T, float scale, float *scores);

/// The value pass of decode attention over T f32 values (64 floats each): for the g heads,
/// out[i * 64 + e] = inv[i] * sum_j p[i * T + j] * v[j][e], summed in order of j with one fused
/// multiply-add per term on every path (scalar; AVX2 up to three heads per value row, half a row per
/// pass; AVX-512F three heads per value row), so the same bits on each.
void pf2lora_attention_values64(const float *p, long g, long T, const float *v, const float *inv, float *out);

/// The value pass of decode attention over T half values (64 halves each): for the g heads,
/// out[i * 64 + e] = inv[i] * sum_j p[i * T + j] * v[j][e], summed in order of j with one fused
/// multiply-add per term on every path (the same bits on the scalar, AVX2 and AVX-512F paths).
void pf2lora_attention_values64_f16(const float *p, long g, long T, const uint16_t *v, const float *inv, float *out);

#ifdef __cplusplus
}
#endif

#endif
