// Shared helpers of pipemoe's kernels. Compiled by NVRTC for the device's own sm_XX (sm_80+; nothing Hopper-only).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

typedef unsigned int u32;
typedef unsigned long long u64;

#define NEG_INF (-__int_as_float(0x7f800000))

// A GPTQ weight's zeros come as a null pointer when every one is 2^(BITS−1), sym_zero (a symmetric weight:
// src/gemv.rs uploads none). gptq_zero: the zero at index i of [groups, out]; shared_zero: what a kernel whose
// zeros land as 0 (a cp.async of nothing) adds to each — sym_zero, or 0 when the zeros are read.
template <int BITS>
__device__ __forceinline__ constexpr float sym_zero() {
    return (float)(1 << (BITS - 1));
}
template <int BITS>
__device__ __forceinline__ float gptq_zero(const __half* zeros, size_t i) {
    return zeros ? __half2float(zeros[i]) : sym_zero<BITS>();
}
template <int BITS>
__device__ __forceinline__ float shared_zero(const __half* zeros) {
    return zeros ? 0.f : sym_zero<BITS>();
}

// Rust's f32::total_cmp as an unsigned order (-NaN < -inf < … < -0 < +0 < … < +inf < +NaN): every bit of a
// negative flipped, the sign of any other. The router, the indexer's top-k and the sampler order by it.
__device__ __forceinline__ u32 total_order_key(float x) {
    const u32 u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Warp-wide sum.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Warp-wide max.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum or max (blockDim.x a multiple of 32, ≤ 1024); `scratch` holds 32 floats of shared memory: each
// warp's result, then the first warp's over them (lanes past the warps hold the identity).
template <bool MAX>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
    v = MAX ? warp_max(v) : warp_sum(v);
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        float t = threadIdx.x < (blockDim.x + 31) / 32 ? scratch[threadIdx.x] : MAX ? NEG_INF : 0.f;
        t = MAX ? warp_max(t) : warp_sum(t);
        if (threadIdx.x == 0) scratch[0] = t;
    }
    __syncthreads();
    float r = scratch[0];
    __syncthreads();
    return r;
}
__device__ __forceinline__ float block_sum(float v, float* scratch) { return block_reduce<false>(v, scratch); }
__device__ __forceinline__ float block_max(float v, float* scratch) { return block_reduce<true>(v, scratch); }

// Stable block-wide compaction: how many threads before this one (in thread order) have `flag` set; `*total`
// gets the count over the block. Every thread must call it (blockDim.x a multiple of 32, ≤ 1024); `scratch`
// holds 32 u32 of shared memory and is free again on return.
__device__ __forceinline__ u32 block_count_before(bool flag, u32* total, u32* scratch) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 ballot = __ballot_sync(0xffffffffu, flag);
    if (lane == 0) scratch[warp] = __popc(ballot);
    __syncthreads();
    u32 before = __popc(ballot & ((1u << lane) - 1u)), all = 0;
    for (u32 w = 0; w < blockDim.x / 32; ++w) {
        const u32 c = scratch[w];
        before += w < warp ? c : 0u;
        all += c;
    }
    __syncthreads();
    *total = all;
    return before;
}

// 8 bf16 values, loaded as 16 bytes, as f32.
__device__ __forceinline__ void bf16x8_to_f32(uint4 u, float* v) {
    const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        v[2 * i] = __uint_as_float(w[i] << 16);
        v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
}
// 8 consecutive activations (16-byte aligned) as f32: one 16-byte load for bf16, two for f32.
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* v) { bf16x8_to_f32(*(const uint4*)p, v); }
__device__ __forceinline__ void load8(const float* p, float* v) {
    const float4 a = *(const float4*)p, b = *(const float4*)(p + 4);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

// Asynchronous copies global → shared (sm_80+) and their group fences. The "memory" clobbers keep the compiler
// from moving shared-memory accesses across them: a lane may read a slot right after its own wait, with no barrier.
__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
// 16 bytes, bypassing L1; `bytes` < 16 zero-fills the rest (0: nothing is read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes = 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async8(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
// The same to a shared-memory address already converted (smem_addr): hot loops convert once.
__device__ __forceinline__ void cp_async16_at(u32 dst, const void* src, int bytes = 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
// A weight's 16 bytes, streamed once a step: with MMA_EVICT_FIRST (an experiment's define) under an L2 evict-first
// policy (`policy`, from weight_policy()), so that the weights streaming through L2 leave it the data that is read
// again — activations, partial sums, the cache, the kernels' code; without, cp_async16_at.
#ifndef MMA_EVICT_FIRST
#define MMA_EVICT_FIRST 0
#endif
__device__ __forceinline__ unsigned long long weight_policy() {
    unsigned long long p = 0;
#if MMA_EVICT_FIRST
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
#endif
    return p;
}
__device__ __forceinline__ void cp_async16_w_at(u32 dst, const void* src, unsigned long long policy) {
#if MMA_EVICT_FIRST
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "l"(policy)
                 : "memory");
#else
    (void)policy;
    cp_async16_at(dst, src);
#endif
}
// 16 bytes through L1 (allocating there): for data several warps of an SM copy within a short time (the x rows
// of a GEMV chunk, which every warp on other columns of the same chunk copies too), so that L2 sends it once.
__device__ __forceinline__ void cp_async16_ca_at(u32 dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async8_at(u32 dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// A pair (xa, xb) rotated by the angle whose cosine and sine are c and s, its roundings spelled out (one rounded
// product, then a fused multiply-add) so that every kernel using it gives the same bits.
__device__ __forceinline__ float2 rotate(float xa, float xb, float c, float s) {
    return make_float2(fmaf(xa, c, -__fmul_rn(xb, s)), fmaf(xb, c, __fmul_rn(xa, s)));
}
// One value of a rotated pair, rotate's first (`first`: x is the pair's first, other its second) or second (x the
// second): the same operations, so the same bits.
__device__ __forceinline__ float rotate_one(float x, float other, float c, float s, bool first) {
    const float os = __fmul_rn(other, s);
    return fmaf(x, c, first ? -os : os);
}

// The last of a launch's blocks to arrive at `*counter` (`expected` arrivals) learns it is last and leaves the
// counter at 0 for the next launch; every block's stores before its arrival (its partial sums) are then visible to
// it, and its reads before it are done. One thread arrives, after the block's barrier (as cooperative groups' grid
// sync does; every thread fencing had its warps wait out their own stores, session 28), by one read-modify-write
// with release and acquire semantics at GPU scope: the barrier puts every thread's accesses before thread 0's
// release, which is cumulative over them, and the last block's acquire (passed on by the second barrier) puts the
// others' before its reads. That is one MEMBAR.ALL.GPU and an L1 invalidation (sm_86 and sm_90), where the
// `__threadfence()` pair around a relaxed atomicAdd was two MEMBAR.SC.GPU, each draining the SM's memory traffic.
// An experiment's knob: -DARRIVE_SC=1 puts the fences back.
__device__ __forceinline__ bool arrive_last(int* counter, int expected) {
    __shared__ int last;
    __syncthreads();
    if (threadIdx.x == 0) {
#if defined(ARRIVE_SC) && ARRIVE_SC
        __threadfence();
        last = atomicAdd(counter, 1) == expected - 1;
        if (last) __threadfence();
#else
        int before;
        asm volatile("atom.add.acq_rel.gpu.s32 %0, [%1], 1;" : "=r"(before) : "l"(counter) : "memory");
        last = before == expected - 1;
#endif
        if (last) *counter = 0;
    }
    __syncthreads();
    return last;
}
