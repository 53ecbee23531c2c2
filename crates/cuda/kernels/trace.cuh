// Per-block timeline records for `pipemoe bench --trace` (src/trace.rs). Only with PIPEMOE_TRACE=1 is this pasted
// before every kernel source and `PIPEMOE_TRACE_KERNEL();` put first in every kernel's body; the kernels' own
// sources never name it. Each module (a kernel source) has its own record array; the host reads them all.
// A record, 4 u64: (FNV-1a of the kernel's name) << 32 | SM; the block's start and end on %globaltimer (ns, the
// same clock on every SM); gridDim's blocks << 32 | the block's linear index. Thread 0 of a block takes the end
// when it leaves the kernel, by whichever return.
#pragma once

#define PIPEMOE_TRACE_CAP 65536

extern "C" {
__device__ unsigned long long pipemoe_trace[PIPEMOE_TRACE_CAP * 4];
__device__ unsigned int pipemoe_trace_n;
}

__device__ __forceinline__ unsigned long long pipemoe_trace_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

struct PipemoeTraceScope {
    const char* name;
    unsigned long long t0;
    __device__ explicit PipemoeTraceScope(const char* n) : name(n), t0(pipemoe_trace_now()) {}
    __device__ ~PipemoeTraceScope() {
        if (threadIdx.x | threadIdx.y | threadIdx.z) return;
        const unsigned long long t1 = pipemoe_trace_now();
        unsigned h = 2166136261u;
        for (const char* p = name; *p; ++p) h = (h ^ (unsigned char)*p) * 16777619u;
        unsigned sm;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
        const unsigned i = atomicAdd(&pipemoe_trace_n, 1u);
        if (i >= PIPEMOE_TRACE_CAP) return;  // the host reports the count beyond the room
        unsigned long long* r = pipemoe_trace + 4ull * i;
        const unsigned blocks = gridDim.x * gridDim.y * gridDim.z;
        const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
        r[0] = ((unsigned long long)h << 32) | sm;
        r[1] = t0;
        r[2] = t1;
        r[3] = ((unsigned long long)blocks << 32) | b;
    }
};

#define PIPEMOE_TRACE_KERNEL() PipemoeTraceScope pipemoe_trace_scope_(__func__)
