// Batched page copy for kvmkt-connector, compiled at run time with NVRTC.
//
// Copies n_pages pages of page_bytes each from src[p] to dst[p]. The addresses may point
// at local memory or at another GPU's memory mapped through CUDA IPC, in which case the
// loads travel over NVLink. One thread block per page (grid-stride over pages); every
// thread keeps UNROLL 16-byte loads in flight before storing, because a peer read has
// microseconds of latency and only many outstanding requests fill the link.
//
// Requires page_bytes % 16 == 0 and 16-byte aligned addresses (checked by the caller).

#define UNROLL 4

struct alignas(16) Vec16 {
    unsigned long long lo, hi;
};

extern "C" __global__ void __launch_bounds__(512)
kvmkt_copy_pages(const unsigned long long* __restrict__ src,
                 const unsigned long long* __restrict__ dst,
                 unsigned long long page_bytes,
                 unsigned int n_pages)
{
    const unsigned long long n_vec = page_bytes / 16;
    const unsigned long long step = (unsigned long long)blockDim.x * UNROLL;
    for (unsigned int p = blockIdx.x; p < n_pages; p += gridDim.x) {
        const Vec16* __restrict__ s = reinterpret_cast<const Vec16*>(src[p]);
        Vec16* __restrict__ d = reinterpret_cast<Vec16*>(dst[p]);
        for (unsigned long long i = threadIdx.x; i < n_vec; i += step) {
            Vec16 v[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const unsigned long long j = i + (unsigned long long)u * blockDim.x;
                if (j < n_vec) v[u] = s[j];
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const unsigned long long j = i + (unsigned long long)u * blockDim.x;
                if (j < n_vec) d[j] = v[u];
            }
        }
    }
}
