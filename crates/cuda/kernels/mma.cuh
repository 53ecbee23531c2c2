// Tensor-core fragments shared by the kernels on `mma.m16n8k16` (flash_mma.cu, mla_absorb_mma.cu, indexer.cu,
// gptq_mma.cu): ldmatrix loads, the bf16 multiply with f32 accumulation, f32 pairs split into bf16 value and
// remainder.
#pragma once

// Four 8×8 b16 matrices (A fragments, or B fragments of blocks stored n-major), or transposed (B fragments of
// blocks stored k-major): lane L gives row L % 8 of matrix L / 8.
__device__ __forceinline__ void ldmatrix_x4(u32 r[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 r[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// The same at a shared-memory address already converted (smem_addr): hot loops convert once and add offsets.
__device__ __forceinline__ void ldmatrix_x4_at(u32 r[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans_at(u32 r[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += A·B for one m16n8k16 step, bf16 inputs, f32 accumulators.
__device__ __forceinline__ void mma_16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two values as bf16x2 (the first in the low half), rounded, and what the rounding left, also bf16x2.
__device__ __forceinline__ void split_bf16x2(float x, float y, u32& hi, u32& lo) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    const __nv_bfloat162 l = __floats2bfloat162_rn(x - __low2float(h), y - __high2float(h));
    hi = *(const u32*)&h;
    lo = *(const u32*)&l;
}
