#ifndef PF2LORA_CMEMORY_H
#define PF2LORA_CMEMORY_H

// The C library's allocator hooks that Swift's Glibc module does not expose (malloc.h).

#ifdef __cplusplus
extern "C" {
#endif

/// Returns the heap's free pages to the operating system (glibc's `malloc_trim(0)`: every arena,
/// free pages in the middle of the heap included, not only its top). 1 when memory was released,
/// 0 when none was or the C library has no such call (macOS, musl).
int pf2lora_release_free_heap(void);

/// Asks for the cache lines of [p, p + bytes) ahead of their use (read, kept in every cache level).
/// Many short, scattered streams (the client pairs of a decode step) are latency-bound without it:
/// the hardware prefetchers start too late on runs of a few kilobytes.
static inline void pf2lora_prefetch(const void *p, long bytes) {
    const char *c = (const char *)p;
    for (long i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 3);
}

#ifdef __cplusplus
}
#endif

#endif
