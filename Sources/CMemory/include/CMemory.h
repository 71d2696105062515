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

/// The bytes of [p, p + bytes) summed as little-endian 32-bit words (wrapping; a tail of fewer than
/// four bytes byte by byte), with wide loads: the memory-read bound that `pf2lora bench` judges the
/// decode kernels by (AVX2, with the kernels' software prefetch when `prefetch` is nonzero, which reads
/// faster on some CPUs and slower on others: the bound times both; scalar without AVX2).
unsigned int pf2lora_read_bytes(const void *p, long bytes, int prefetch);

/// Asks for the cache lines of [p, p + bytes) ahead of their use (read, kept in every cache level).
/// Many short, scattered streams (the client pairs of a decode step) are latency-bound without it:
/// the hardware prefetchers start too late on runs of a few kilobytes.
static inline void pf2lora_prefetch(const void *p, long bytes) {
    const char *c = (const char *)p;
    for (long i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 3);
}

/// Work sharing with stealing (`WorkerPool.Context.chunks`): `*c` counts the units taken of one
/// participant's contiguous share of `len` units, from its front in the low 32 bits and from its
/// back in the high 32. The owner takes half of what is left at a time, at least `most` units (all
/// when fewer are left), the others (when their own shares are gone) one from the back, so each
/// participant reads one contiguous run. Returns the first unit's index in the share (`*n` units),
/// or -1 when none is left. Relaxed: the pool's barriers order the chunks' data.
///
/// Half at a time, not `most`: every take is a locked instruction, which on x86 waits for all the
/// loads in flight, and the owner's loads in flight are its weight stream. Taking `most` (64 rows)
/// at a time, those waits were ~5% of a 2-thread q8_0 decode step when the host's memory was fast
/// (session 14, `perf`); halving takes ~log2 of the chunks, and a slowed owner still leaves the
/// back half of what remains to the others.
static inline long pf2lora_take_front(unsigned long long *c, long len, long most, long *n) {
    unsigned long long v = __atomic_load_n(c, __ATOMIC_RELAXED);
    for (;;) {
        unsigned long long f = v & 0xffffffffull, b = v >> 32;
        long left = len - (long)(f + b);
        if (left <= 0) return -1;
        long take = left <= most ? left : (left / 2 > most ? left / 2 : most);
        if (__atomic_compare_exchange_n(c, &v, v + (unsigned long long)take, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
            *n = take;
            return (long)f;
        }
    }
}

static inline long pf2lora_take_back(unsigned long long *c, long len) {
    unsigned long long v = __atomic_load_n(c, __ATOMIC_RELAXED);
    for (;;) {
        unsigned long long f = v & 0xffffffffull, b = v >> 32;
        if ((long)(f + b) >= len) return -1;
        if (__atomic_compare_exchange_n(c, &v, v + (1ull << 32), 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return len - 1 - (long)b;
    }
}

static inline void pf2lora_store_relaxed(unsigned long long *c, unsigned long long v) { __atomic_store_n(c, v, __ATOMIC_RELAXED); }

/// Adds 1 to `*c` and returns the old value, acquiring and releasing (what one participant wrote
/// before it is seen by the one that counts after it).
static inline unsigned long long pf2lora_arrive(unsigned long long *c) { return __atomic_fetch_add(c, 1, __ATOMIC_ACQ_REL); }

#ifdef __cplusplus
}
#endif

#endif
