#include "CMemory.h"
#include <stdint.h>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

int pf2lora_release_free_heap(void) {
#if defined(__GLIBC__)
    return malloc_trim(0);
#else
    return 0;
#endif
}

#if defined(__x86_64__)
#include <immintrin.h>

// Four 256-bit accumulators; with `prefetch` each 256-byte step asks for the lines 6 KB ahead, as
// the decode kernels' weight streams do on a CPU with AVX-VNNI (CQuant.c X4_PREFETCH_BYTES,
// Wide.c WIDE_PREFETCH_BYTES; on an AVX2-only CPU they ask 768 bytes ahead since session 17).
// Which form reads faster depends on the CPU: on session 13's (AMD Zen 5) the read without the hints
// measured below the kernels it bounds at 1 thread; on session 15's (AMD Zen 2) the hints slowed the
// read 9 % (16.1-16.3 vs 14.2-14.9 GB/s, one core) and the f32 kernel, which has none, streamed
// 1.03-1.06x "faster than memory". So the bound is the faster of the two (`bench decode` and
// `bench blas` time both).
__attribute__((target("avx2")))
static uint32_t read_avx2(const unsigned char *p, long n, long *done, int prefetch) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    long i = 0;
    for (; i + 256 <= n; i += 256) {
        if (prefetch) {
            _mm_prefetch((const char *)p + i + 6144, _MM_HINT_T0);
            _mm_prefetch((const char *)p + i + 6144 + 64, _MM_HINT_T0);
            _mm_prefetch((const char *)p + i + 6144 + 128, _MM_HINT_T0);
            _mm_prefetch((const char *)p + i + 6144 + 192, _MM_HINT_T0);
        }
        a0 = _mm256_add_epi32(a0, _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)(p + i)), _mm256_loadu_si256((const __m256i *)(p + i + 128))));
        a1 = _mm256_add_epi32(a1, _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)(p + i + 32)), _mm256_loadu_si256((const __m256i *)(p + i + 160))));
        a2 = _mm256_add_epi32(a2, _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)(p + i + 64)), _mm256_loadu_si256((const __m256i *)(p + i + 192))));
        a3 = _mm256_add_epi32(a3, _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)(p + i + 96)), _mm256_loadu_si256((const __m256i *)(p + i + 224))));
    }
    __m256i s = _mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3));
    uint32_t lanes[8], t = 0;
    _mm256_storeu_si256((__m256i *)lanes, s);
    for (int k = 0; k < 8; k++) t += lanes[k];
    *done = i;
    return t;
}
#endif

uint32_t pf2lora_read_bytes(const void *p, long bytes, int prefetch) {
    const unsigned char *c = (const unsigned char *)p;
    uint32_t t = 0;
    long i = 0;   // the whole 256-byte blocks read by the AVX2 loop, the rest here
#if defined(__x86_64__)
    if (__builtin_cpu_supports("avx2")) t = read_avx2(c, bytes, &i, prefetch);
#endif
    for (; i + 4 <= bytes; i += 4) { uint32_t v; __builtin_memcpy(&v, c + i, 4); t += v; }
    for (; i < bytes; i++) t += c[i];
    return t;
}
