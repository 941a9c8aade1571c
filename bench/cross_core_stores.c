/* Cross-core store probe: why bench/ numbers on a VM swing (README "Measured").
 * Two threads pinned to CPUs 0 and 1 each write N bytes into their own buffer (W=0 plain
 * stores, W=1 streaming stores, W=2 plain + prefetchw PF bytes ahead), then read the other's.
 * On this project's VM, plain writes to lines the other core had just read ran at ~40 GB/s in
 * some minutes and ~2.5 GB/s in others; streaming stores at 14-27 GB/s in both.
 *   cc -O2 -mavx2 -mprfchw -pthread -o /tmp/xc bench/cross_core_stores.c && /tmp/xc 1048576 0 0 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <time.h>
#include <immintrin.h>
static size_t N; static char *buf[2]; static char *dst[2]; static char *srcb[2];
static volatile uint64_t flag[2][16];
static int ITER=100, W, R; static size_t PF=2048;
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static void cp(char*d,const char*s,size_t n,int nt){ for(size_t i=0;i<n;i+=64){ if(nt==2) __builtin_prefetch(d+i+PF,1,3); __m256i a=_mm256_load_si256((const __m256i*)(s+i)), b=_mm256_load_si256((const __m256i*)(s+i+32));
  if(nt==1){_mm256_stream_si256((__m256i*)(d+i),a);_mm256_stream_si256((__m256i*)(d+i+32),b);} else {_mm256_store_si256((__m256i*)(d+i),a);_mm256_store_si256((__m256i*)(d+i+32),b);} } if(nt==1)_mm_sfence();}
static void *run(void *a){ int me=(int)(intptr_t)a; cpu_set_t s;CPU_ZERO(&s);CPU_SET(me,&s);sched_setaffinity(0,sizeof s,&s);
  double tw=0,tr=0,tt=0;
  for(int i=1;i<=ITER;i++){ double t0=now(); 
     cp(buf[me],srcb[me],N,W); double t1=now(); tw+=t1-t0;
    __atomic_store_n(&flag[me][0],i,__ATOMIC_RELEASE);
    while(__atomic_load_n(&flag[1-me][0],__ATOMIC_ACQUIRE)<i); double t2=now();
    if(R==2) memcpy(dst[me],buf[1-me],N); else cp(dst[me],buf[1-me],N,R); double t3=now(); tr+=t3-t2;
    __atomic_store_n(&flag[me][8],i,__ATOMIC_RELEASE); while(__atomic_load_n(&flag[1-me][8],__ATOMIC_ACQUIRE)<i); tt+=now()-t0;}
  if(me==0) printf("W%d R%d N=%8zu: write %.2f GB/s, cross-read %.2f GB/s, total %.1f us\n",W,R,N,N*ITER/tw/1e9,N*ITER/tr/1e9,tt/ITER*1e6); return 0;}
int main(int c,char**v){N=atol(v[1]); W=atoi(v[2]); R=atoi(v[3]); if(c>4)PF=atol(v[4]); for(int i=0;i<2;i++){buf[i]=aligned_alloc(4096,N);dst[i]=aligned_alloc(4096,N);srcb[i]=aligned_alloc(4096,N);memset(dst[i],0,N);memset(buf[i],0,N);memset(srcb[i],1,N);}
 pthread_t t[2]; for(int i=0;i<2;i++)pthread_create(&t[i],0,run,(void*)(intptr_t)i); for(int i=0;i<2;i++)pthread_join(t[i],0);}
