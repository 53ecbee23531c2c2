// The tensor-core weight layout's fields (src/mma.rs `repack`, `slot`): pair i (0..15) of a block of BITS words,
// two neighbouring rows of K of one column at bits (s, s + 16) of a word, turned into one bf16x2 register of an
// `mma.m16n8k16` fragment holding base + q in both halves. Used by the GEMV (gptq_mma.cu) and the GEMM
// (gptq_gemm.cu).
//
// A field at bits 0..2 of a bf16 half under the exponent of 128 reads as 128 + q; a field at bits 3..5 under the
// exponent of 16 reads as 16 + q (the mantissa's step there is 1/8). So a 3-bit field at either place becomes a
// value with one LOP3 (mask and exponent), and a word's five fields (bits 0, 3, 6, 9, 12) need two shifts, not
// four. The layout puts the fields so that pairs i % 4 < 2 (the lower 8 rows of K of an mma step) all read as
// 128 + q and pairs i % 4 ≥ 2 (the upper 8) all as MMA_BASE_HI + q: the bases then come out of the sums of x over
// each half of the step, whatever the column.
#pragma once

#define BF16X2_128 0x43004300u
#define BF16X2_16 0x41804180u

// v in both halves of a bf16x2 register (round to nearest).
__device__ __forceinline__ u32 bf16x2_splat(float v) {
    const u32 h = __bfloat16_as_ushort(__float2bfloat16(v));
    return h | (h << 16);
}

// a · 1 + c on bf16x2 (sm_80's bf16 FMA; one instruction): exact for the weights' (base + q) − (base + z), every
// value an integer below 256.
__device__ __forceinline__ u32 bf16x2_add(u32 a, u32 c) {
    u32 d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(0x3F803F80u), "r"(c));
    return d;
}

// The base of pairs i % 4 ≥ 2 (pairs i % 4 < 2 read as 128 + q at every width).
template <int BITS>
__host__ __device__ constexpr float mma_base_hi() {
    return BITS == 3 ? 16.f : 128.f;
}

// (a & MASK) | MAGIC as one LOP3: written out, the compiler makes it an AND and an OR (two constants do not fit
// one instruction's immediate; here one goes to a register, once).
template <u32 MASK, u32 MAGIC>
__device__ __forceinline__ u32 and_or(u32 a) {
    u32 d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(MASK), "r"(MAGIC));
    return d;
}

template <int BITS>
__device__ __forceinline__ u32 mma_pair(const u32* w, int i) {
    if (BITS == 2) {
        const u32 v = w[i / 8] >> (2 * (i % 8));
        return and_or<0x00030003u, BF16X2_128>(v);
    }
    if (BITS == 4) {
        const u32 v = w[i / 4] >> (4 * (i % 4));
        return and_or<0x000F000Fu, BF16X2_128>(v);
    }
    // 3 bits: pair i at (word, bit) 0:(0,0) 1:(1,0) 2:(0,3) 3:(1,3) 4:(0,6) 5:(1,6) 6:(0,9) 7:(1,9) 8:(0,12)
    // 9:(1,12) 10:(2,3) 11:(2,9) 12:(2,0) 13:(2,6) 14:(2,12); pair 15's three bits are bit 15 of words 0, 1, 2.
    constexpr u32 LO = 0x00070007u, HI = 0x00380038u;
    switch (i) {
        case 0: return and_or<LO, BF16X2_128>(w[0]);
        case 1: return and_or<LO, BF16X2_128>(w[1]);
        case 2: return and_or<HI, BF16X2_16>(w[0]);
        case 3: return and_or<HI, BF16X2_16>(w[1]);
        case 4: return and_or<LO, BF16X2_128>(w[0] >> 6);
        case 5: return and_or<LO, BF16X2_128>(w[1] >> 6);
        case 6: return and_or<HI, BF16X2_16>(w[0] >> 6);
        case 7: return and_or<HI, BF16X2_16>(w[1] >> 6);
        case 8: return and_or<LO, BF16X2_128>(w[0] >> 12);
        case 9: return and_or<LO, BF16X2_128>(w[1] >> 12);
        case 10: return and_or<HI, BF16X2_16>(w[2]);
        case 11: return and_or<HI, BF16X2_16>(w[2] >> 6);
        case 12: return and_or<LO, BF16X2_128>(w[2]);
        case 13: return and_or<LO, BF16X2_128>(w[2] >> 6);
        case 14: return and_or<HI, BF16X2_16>(w[2] >> 9);
        default:  // bit 15 of each word to bits 3, 4, 5 (and 19, 20, 21)
            return and_or<0x00080008u, BF16X2_16>(w[0] >> 12) | ((w[1] >> 11) & 0x00100010u) |
                   ((w[2] >> 10) & 0x00200020u);
    }
}

// The base of pair i (what mma_pair adds to q).
template <int BITS>
__device__ __forceinline__ float mma_pair_base(int i) {
    return (i & 2) ? mma_base_hi<BITS>() : 128.f;
}
