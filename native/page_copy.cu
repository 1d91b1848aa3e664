// Batched page copies for kvmkt-connector, compiled at run time with NVRTC.
//
// A KV page is one block of one segment (a layer's K or V, or both, depending on the
// layout). The addresses may point at local memory or at another GPU's memory mapped
// through CUDA IPC, in which case the loads travel over NVLink. One thread block per page
// (grid-stride over pages); every thread keeps UNROLL 16-byte loads in flight before
// storing, because a peer read has microseconds of latency and only many outstanding
// requests fill the link.
//
// Requires page_bytes % 16 == 0 and 16-byte aligned addresses (checked by the caller).

// Tunables (benchmarks/transport_bench.py --sweep compiles variants with -D).
#ifndef UNROLL
#define UNROLL 4
#endif
#ifndef MAX_THREADS
#define MAX_THREADS 512
#endif

#ifndef STREAMING
#define STREAMING 0
#endif

typedef uint4 Vec16;

// STREAMING=1: evict-first loads and stores (the pages pass through once).
__device__ __forceinline__ Vec16 load16(const Vec16* p)
{
#if STREAMING
    return __ldcs(p);
#else
    return *p;
#endif
}

__device__ __forceinline__ void store16(Vec16* p, Vec16 v)
{
#if STREAMING
    __stcs(p, v);
#else
    *p = v;
#endif
}

__device__ __forceinline__ void copy_page(const Vec16* __restrict__ s, Vec16* __restrict__ d,
                                          unsigned long long n_vec)
{
    const unsigned long long step = (unsigned long long)blockDim.x * UNROLL;
    for (unsigned long long i = threadIdx.x; i < n_vec; i += step) {
        Vec16 v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const unsigned long long j = i + (unsigned long long)u * blockDim.x;
            if (j < n_vec) v[u] = load16(s + j);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const unsigned long long j = i + (unsigned long long)u * blockDim.x;
            if (j < n_vec) store16(d + j, v[u]);
        }
    }
}

// Explicit addresses: page p goes from src[p] to dst[p] (benchmarks, odd layouts).
extern "C" __global__ void __launch_bounds__(MAX_THREADS)
kvmkt_copy_pages(const unsigned long long* __restrict__ src,
                 const unsigned long long* __restrict__ dst,
                 unsigned long long page_bytes,
                 unsigned int n_pages)
{
    for (unsigned int p = blockIdx.x; p < n_pages; p += gridDim.x) {
        copy_page(reinterpret_cast<const Vec16*>(src[p]), reinterpret_cast<Vec16*>(dst[p]),
                  page_bytes / 16);
    }
}

// Addresses computed here from block ids, which travel inside the launch itself (a kernel
// parameter of up to 32 KB, CUDA 12.1+ drivers): no host buffer to page-lock, no separate
// host-to-device copy before the kernel, nothing to keep alive after the launch call. A load
// larger than INLINE_BLOCKS blocks is several launches. segs holds, per segment, {src block
// 0, src stride, dst block 0, dst stride} in bytes (on the GPU, built once per peer).
// Page p is block p % n_blocks of segment p / n_blocks.
#ifndef INLINE_BLOCKS
#define INLINE_BLOCKS 3968  // 24 + 8 * 3968 bytes = 31,768 <= the 32,764-byte parameter limit
#endif

struct InlineBlocks {
    const long long* segs;
    unsigned long long page_bytes;
    unsigned int n_blocks;
    unsigned int n_segs;
    int ids[2 * INLINE_BLOCKS];  // source ids from 0, destination ids from INLINE_BLOCKS
};
// transport/page_copy.py's LaunchParameter packs this layout: fields in the order declared,
// no padding (the ids start at byte 24)
static_assert(sizeof(InlineBlocks) == 24 + 8 * INLINE_BLOCKS, "InlineBlocks layout");

// __grid_constant__: the parameter is read in place (constant cache, warp-uniform reads);
// without it an indexed by-value parameter would be copied to every thread's local memory.
extern "C" __global__ void __launch_bounds__(MAX_THREADS)
kvmkt_copy_blocks(const __grid_constant__ InlineBlocks a)
{
    const unsigned long long n_pages = (unsigned long long)a.n_blocks * a.n_segs;
    for (unsigned long long p = blockIdx.x; p < n_pages; p += gridDim.x) {
        const unsigned int seg = (unsigned int)(p / a.n_blocks);
        const unsigned int i = (unsigned int)(p - (unsigned long long)seg * a.n_blocks);
        const long long* g = a.segs + 4 * seg;
        const long long s = g[0] + (long long)a.ids[i] * g[1];
        const long long d = g[2] + (long long)a.ids[INLINE_BLOCKS + i] * g[3];
        copy_page(reinterpret_cast<const Vec16*>(s), reinterpret_cast<Vec16*>(d),
                  a.page_bytes / 16);
    }
}
