// The memory-read bound's two forms on one core (issue 14, session 15): a plain AVX2 read of 143 MB
// (the SmolLM2-135M shape's q8_0 weights) with the decode kernels' 6 KB software prefetch (the form
// `pf2lora_read_bytes` had alone until session 15), without it, with the q8_0x4 AVX2 loop's two tiers
// (1.5 KB to L1, 12 KB to L2), and an f32-kernel-like FMA pass without hints. Variants in turn, round
// after round, wall time; each round's speed against the same round's 6 KB read.
//
//   clang -O3 -o /tmp/readv Benchmarks/read_prefetch_microbench.c && /tmp/readv [rounds]
//
// Session 15 (AMD EPYC family 23 model 49 = Zen 2, 2 vCPUs, idle, 9 rounds, two runs): none 16.1-16.3
// GB/s (1.09x the 6 KB read per round, median), 6 KB 14.2-14.9, tiers 0.96-0.98x, fma 1.10-1.13x. The
// hints slow a plain read there, so since session 15 the bound is the faster of the read with and
// without them (`WorkerPool.readBoundSeconds`); on session 13's Zen 5 the read with them was the
// faster one.
//
// Session 16 added "2none" / "2tiers": the same read split as the q8_0x4 layout splits its bytes, 16/17
// of them in one stream and 1/17 (the scales) in a second, read in step. Same machine, 9 rounds twice:
// 2none 1.14x the 6 KB read (none 1.08-1.12x), 2tiers 0.99-1.00x (tiers 0.97x): the second stream
// costs nothing.
#define _GNU_SOURCE
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define BODY(PF) \
  __m256i a0=_mm256_setzero_si256(),a1=a0,a2=a0,a3=a0; \
  for(long i=0;i+256<=n;i+=256){ PF \
    a0=_mm256_add_epi32(a0,_mm256_add_epi32(_mm256_loadu_si256((const __m256i*)(p+i)),_mm256_loadu_si256((const __m256i*)(p+i+128)))); \
    a1=_mm256_add_epi32(a1,_mm256_add_epi32(_mm256_loadu_si256((const __m256i*)(p+i+32)),_mm256_loadu_si256((const __m256i*)(p+i+160)))); \
    a2=_mm256_add_epi32(a2,_mm256_add_epi32(_mm256_loadu_si256((const __m256i*)(p+i+64)),_mm256_loadu_si256((const __m256i*)(p+i+192)))); \
    a3=_mm256_add_epi32(a3,_mm256_add_epi32(_mm256_loadu_si256((const __m256i*)(p+i+96)),_mm256_loadu_si256((const __m256i*)(p+i+224))));} \
  __m256i s=_mm256_add_epi32(_mm256_add_epi32(a0,a1),_mm256_add_epi32(a2,a3)); return _mm256_extract_epi32(s,0);
#define P4(D,H) _mm_prefetch(p+i+(D),H);_mm_prefetch(p+i+(D)+64,H);_mm_prefetch(p+i+(D)+128,H);_mm_prefetch(p+i+(D)+192,H);
__attribute__((target("avx2"))) static int r_none(const char*p,long n){BODY()}
__attribute__((target("avx2"))) static int r_6k(const char*p,long n){BODY(P4(6144,_MM_HINT_T0))}
__attribute__((target("avx2"))) static int r_tiers(const char*p,long n){BODY(P4(1536,_MM_HINT_T0) P4(12288,_MM_HINT_T1))}
// f32-kernel-like: FMA per 32 bytes, no prefetch
__attribute__((target("avx2,fma"))) static int r_fma(const char*p,long n){ __m256 a0=_mm256_setzero_ps(),a1=a0,a2=a0,a3=a0; __m256 x=_mm256_set1_ps(1.0f);
  for(long i=0;i+128<=n;i+=128){ a0=_mm256_fmadd_ps(_mm256_loadu_ps((const float*)(p+i)),x,a0); a1=_mm256_fmadd_ps(_mm256_loadu_ps((const float*)(p+i+32)),x,a1); a2=_mm256_fmadd_ps(_mm256_loadu_ps((const float*)(p+i+64)),x,a2); a3=_mm256_fmadd_ps(_mm256_loadu_ps((const float*)(p+i+96)),x,a3);}
  __m256 s=_mm256_add_ps(_mm256_add_ps(a0,a1),_mm256_add_ps(a2,a3)); return (int)_mm256_cvtss_f32(s);}
#define BODY2(PF) \
  __m256i a0=_mm256_setzero_si256(),a1=a0,a2=a0,a3=a0,c=a0; \
  for(long i=0,k=0;i+256<=n;i+=256,k+=16){ PF \
    a0=_mm256_add_epi32(a0,_mm256_add_epi32(_mm256_loadu_si256((const __m256i*)(p+i)),_mm256_loadu_si256((const __m256i*)(p+i+128)))); \
    a1=_mm256_add_epi32(a1,_mm256_add_epi32(_mm256_loadu_si256((const __m256i*)(p+i+32)),_mm256_loadu_si256((const __m256i*)(p+i+160)))); \
    a2=_mm256_add_epi32(a2,_mm256_add_epi32(_mm256_loadu_si256((const __m256i*)(p+i+64)),_mm256_loadu_si256((const __m256i*)(p+i+192)))); \
    a3=_mm256_add_epi32(a3,_mm256_add_epi32(_mm256_loadu_si256((const __m256i*)(p+i+96)),_mm256_loadu_si256((const __m256i*)(p+i+224)))); \
    c=_mm256_add_epi32(c,_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)(sc+k))));} \
  __m256i s=_mm256_add_epi32(_mm256_add_epi32(a0,a1),_mm256_add_epi32(a2,_mm256_add_epi32(a3,c))); return _mm256_extract_epi32(s,0);
static const char *sc;
__attribute__((target("avx2"))) static int r2_none(const char*p,long n){n=n*16/17;BODY2()}
__attribute__((target("avx2"))) static int r2_tiers(const char*p,long n){n=n*16/17;BODY2(P4(1536,_MM_HINT_T0) P4(12288,_MM_HINT_T1))}
int main(int argc,char**argv){ long n=143L<<20; int R=argc>1?atoi(argv[1]):7;
  char*b=mmap(0,n+(2<<20),PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0); char*p=(char*)(((uintptr_t)b+(2<<20)-1)&~(uintptr_t)((2<<20)-1)); madvise(p,n,MADV_HUGEPAGE); memset(p,1,n); sc=p+n*16/17;
  int (*f[])(const char*,long)={r_none,r_6k,r_tiers,r2_none,r2_tiers}; const char*nm[]={"none","6k","tiers","2none","2tiers"}; double t[5][64]; volatile int sink=0;
  for(int r=0;r<R;r++) for(int v=0;v<5;v++){ double t0=now(); sink+=f[v](p,n); t[v][r]=now()-t0; }
  for(int v=0;v<5;v++){ double q[64]; for(int r=0;r<R;r++) q[r]=t[1][r]/t[v][r]; for(int a=0;a<R;a++)for(int c=a+1;c<R;c++) if(q[c]<q[a]){double z=q[a];q[a]=q[c];q[c]=z;}
    double s[64]; memcpy(s,t[v],R*8); for(int a=0;a<R;a++)for(int c=a+1;c<R;c++) if(s[c]<s[a]){double z=s[a];s[a]=s[c];s[c]=z;}
    printf("%-6s median %.2f GB/s  speed vs 6k per round median %.3f [%.3f..%.3f]\n",nm[v],n/s[R/2]/1e9,q[R/2],q[0],q[R-1]); }
}
