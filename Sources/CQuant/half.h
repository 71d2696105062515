// One half-to-float conversion for every C kernel of the target (CQuant.c, Wide.c). Portable:
// the scalar paths must not need F16C.
#ifndef PF2LORA_HALF_H
#define PF2LORA_HALF_H
#include <stdint.h>
#include <string.h>

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000 | (man << 13);                    // inf, nan
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);           // normal
    } else if (man == 0) {
        bits = sign;                                               // zero
    } else {                                                       // subnormal: normalize
        int e = -1;
        do { man <<= 1; e++; } while ((man & 0x400) == 0);
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#endif
