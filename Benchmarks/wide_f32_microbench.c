// Session 8 (issue 14): the f32 one-input decode kernel (8-row tiles, one accumulator per row) vs a
// one-row kernel with four accumulators, against a plain read, thread CPU time, best of 15. Build from
// the repository root:
//   clang -O2 -ISources/CQuant/include -ISources/CQuant -o /tmp/wide_f32_microbench Benchmarks/wide_f32_microbench.c -lm
#include "../Sources/CQuant/Wide.c"
#include <sys/mman.h>
int pf2lora_quant_isa(void){return 2;}
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double tcpu(void){struct timespec t;clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t);return t.tv_sec+t.tv_nsec*1e-9;}
__attribute__((target("avx2,fma,f16c")))
static void f32_row4(const float *w, long C, const float *x, long r0, long r1, float *out, long PF) {
    long C32 = C & ~31L;
    for (long r = r0; r < r1; r++) {
        const float *wr = w + r * C;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (long k = 0; k < C32; k += 32) {
            if (PF) { _mm_prefetch((const char *)(wr + k) + PF, _MM_HINT_T0); _mm_prefetch((const char *)(wr + k) + PF + 64, _MM_HINT_T0); }
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k), _mm256_loadu_ps(x + k), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 8), _mm256_loadu_ps(x + k + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 16), _mm256_loadu_ps(x + k + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 24), _mm256_loadu_ps(x + k + 24), a3);
        }
        out[r] = wide_hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    }
}
__attribute__((target("avx2")))
static float plain(const float *w, long n){__m256 a=_mm256_setzero_ps(),b=a,c=a,d=a;for(long i=0;i<n;i+=32){a=_mm256_add_ps(a,_mm256_loadu_ps(w+i));b=_mm256_add_ps(b,_mm256_loadu_ps(w+i+8));c=_mm256_add_ps(c,_mm256_loadu_ps(w+i+16));d=_mm256_add_ps(d,_mm256_loadu_ps(w+i+24));}return wide_hsum8(_mm256_add_ps(_mm256_add_ps(a,b),_mm256_add_ps(c,d)));}
int main(){
  long R=49152*2, C=576; float *w=aligned_alloc(2<<20,R*C*4); madvise(w,R*C*4,14/*MADV_HUGEPAGE*/);
  for(long i=0;i<R*C;i++) w[i]=(float)((i*2654435761u)%1000)*1e-3f;
  float x[576], *out=malloc(R*4); for(int i=0;i<576;i++) x[i]=0.01f*i;
  double best[5]={1e9,1e9,1e9,1e9,1e9}; volatile float s=0;
  for(int rep=0;rep<15;rep++){
    double t0=tcpu(); s+=plain(w,R*C); double t=tcpu()-t0; if(t<best[0])best[0]=t;
    t0=tcpu(); wide_f32_rows1(w,C,x,0,R,out); t=tcpu()-t0; if(t<best[1])best[1]=t;
    t0=tcpu(); f32_row4(w,C,x,0,R,out,0); t=tcpu()-t0; if(t<best[2])best[2]=t;
    t0=tcpu(); f32_row4(w,C,x,0,R,out,1024); t=tcpu()-t0; if(t<best[3])best[3]=t;
    t0=tcpu(); f32_row4(w,C,x,0,R,out,2048); t=tcpu()-t0; if(t<best[4])best[4]=t;
  }
  double gb=R*C*4/1e9; const char*n[5]={"plain read","8-row tile (current)","row4 no pf","row4 pf1K","row4 pf2K"};
  for(int i=0;i<5;i++) printf("%-22s %.1f GB/s  %.2fx plain\n",n[i],gb/best[i],best[0]/best[i]);
  return (int)s&0;
}
