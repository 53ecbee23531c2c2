//! The tensor-core GEMV (kernels/gptq_mma.cu): the repacking of GPTQ weights into per-lane `mma.m16n8k16`
//! fragments at load, and its launches. Used for bf16 activations when the shape allows (`eligible`).

use cudarc::driver::{CudaFunction, LaunchConfig};

use crate::act::ActDtype;
use crate::error::{Error, Result};
use crate::gemv::GpuGptq;
use crate::gpu::Gpu;

/// Rows of K per chunk (one scale per chunk: group sizes must be multiples of it).
pub const CHUNK: usize = 128;
/// Output columns per block: 4 warps × 2 tiles of 16.
pub const BLOCK_COLS: usize = 128;
const THREADS: u32 = 128;

/// Whether a weight can take the tensor-core layout: 2/3/4 bits (the bf16 trick holds 128 + q exactly up to
/// 7 bits, and the packing is written for these), whole chunks of K, whole groups per chunk, whole column tiles.
pub fn eligible(bits: u32, k: usize, n: usize, group_size: usize) -> bool {
    matches!(bits, 2..=4) && k.is_multiple_of(CHUNK) && group_size.is_multiple_of(CHUNK) && n.is_multiple_of(16)
}

/// Word and shift of pair `i` (0..16) inside a block of `bits` words; `None` for 3-bit pair 15 (spread over bits
/// 15 and 31 of the three words).
fn slot(bits: u32, i: usize) -> Option<(usize, u32)> {
    match bits {
        2 => Some((i / 8, 2 * (i % 8) as u32)),
        4 => Some((i / 4, 4 * (i % 4) as u32)),
        _ if i < 15 => Some((i / 5, 3 * (i % 5) as u32)),
        _ => None,
    }
}

/// The checkpoint packing (`[K·bits/32, N]`, rows already in group order) → `[tile][chunk][bits][lane]` pairs of
/// words, lane L of tile t and chunk c holding the A fragments of `mma.m16n8k16` for its 8 k-steps.
///
/// Runs at load for every linear (tens of thousands on a real model), so it is written for speed: the values
/// are first unpacked column-major (`[N][K]` bytes: one tile then touches 16 contiguous columns), and tiles are
/// shared out among the host's threads.
pub fn repack(qweight: &[u32], bits: u32, k: usize, n: usize) -> Vec<u32> {
    let b = bits as usize;
    let mask = (1u32 << b) - 1;
    let (tiles, chunks) = (n / 16, k / CHUNK);
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(tiles.max(1));
    let tiles_per_thread = tiles.div_ceil(threads.max(1)).max(1);
    // q[col][row]: 32 rows of a column come from `bits` words of one packed row block; columns shared out.
    let mut q = vec![0u8; k * n];
    std::thread::scope(|scope| {
        for (part, cols) in q.chunks_mut(16 * tiles_per_thread * k).enumerate() {
            scope.spawn(move || {
                for (i, column) in cols.chunks_mut(k).enumerate() {
                    let col = part * 16 * tiles_per_thread + i;
                    for blk in 0..k / 32 {
                        let mut acc: u128 = 0;
                        for j in 0..b {
                            acc |= u128::from(qweight[(blk * b + j) * n + col]) << (32 * j);
                        }
                        for (r, v) in column[blk * 32..blk * 32 + 32].iter_mut().enumerate() {
                            *v = ((acc >> (r * b)) as u32 & mask) as u8;
                        }
                    }
                }
            });
        }
    });
    let per_tile = chunks * b * 64;
    let mut out = vec![0u32; tiles * per_tile];
    std::thread::scope(|scope| {
        for (part, region) in out.chunks_mut(tiles_per_thread * per_tile).enumerate() {
            let q = &q;
            scope.spawn(move || {
                for (i, tile_out) in region.chunks_mut(per_tile).enumerate() {
                    repack_tile(q, bits, k, part * tiles_per_thread + i, tile_out);
                }
            });
        }
    });
    out
}

/// One 16-column tile of `repack`, from the column-major values.
fn repack_tile(q: &[u8], bits: u32, k: usize, t: usize, out: &mut [u32]) {
    let b = bits as usize;
    let mut words = [0u32; 8];
    for c in 0..k / CHUNK {
        for lane in 0..32 {
            words[..2 * b].fill(0);
            for p in 0..32 {
                let (ks, reg) = (p / 4, p % 4);
                let col = 16 * t + lane / 4 + 8 * (reg & 1);
                let row = CHUNK * c + 16 * ks + 2 * (lane % 4) + 8 * (reg >> 1);
                let (lo, hi) = (u32::from(q[col * k + row]), u32::from(q[col * k + row + 1]));
                let blk = &mut words[(p / 16) * b..(p / 16 + 1) * b];
                match slot(bits, p % 16) {
                    Some((w, sh)) => blk[w] |= (lo << sh) | (hi << (sh + 16)),
                    None => {
                        for (j, word) in blk.iter_mut().enumerate() {
                            *word |= ((lo >> j) & 1) << 15 | ((hi >> j) & 1) << 31;
                        }
                    }
                }
            }
            for (wi, &word) in words[..2 * b].iter().enumerate() {
                out[((c * b + wi / 2) * 32 + lane) * 2 + wi % 2] = word;
            }
        }
    }
}

/// Kernel rows per launch: 8 (one n8 half) or 16.
fn bucket(batch: usize) -> usize {
    if batch <= 8 { 8 } else { 16 }
}

/// Chunks each warp keeps in flight behind its math, and the shape of a block (kernels/gptq_mma.cu).
const STAGES: usize = 4;
const WARPS: usize = 4;
const TILES_PER_WARP: usize = 2;
/// Shared memory a block stays within, so it needs no opt-in and a 3090's 100 KiB hold two blocks.
const SMEM_BLOCK: usize = 44 * 1024;

/// Shared memory of a launch: the warps' rings of weight words, Σx per (row, chunk) for the kernel's MB rows,
/// and `rows` staged rows of x (the batch, or a grouped tile's rows).
pub(crate) fn smem_bytes(bits: u32, rows: usize, chunk: usize) -> u32 {
    let ring = WARPS * STAGES * TILES_PER_WARP * bits as usize * 32 * 8;
    (ring + bucket(rows) * (chunk / CHUNK) * 4 + rows * (chunk + 8) * 2) as u32
}

/// Rows of K per split: whole chunks within the block's shared memory, and as many splits as fill one wave of
/// resident blocks (more leaves a tail wave; fewer leaves multiprocessors idle).
pub(crate) fn k_chunk(w: &GpuGptq, gpu: &Gpu, rows: usize, blocks_x: usize) -> usize {
    let k = w.in_features;
    let fixed = smem_bytes(w.bits, rows, 0) as usize;
    let per_chunk = smem_bytes(w.bits, rows, CHUNK) as usize - fixed;
    let limit = ((SMEM_BLOCK.saturating_sub(fixed)) / per_chunk).max(1) * CHUNK;
    let want = k.div_ceil(CHUNK).min(limit / CHUNK) * CHUNK;
    let per_sm = (gpu.smem_per_sm / smem_bytes(w.bits, rows, want) as usize).clamp(1, 8);
    let splits = (per_sm * gpu.sm_count as usize / blocks_x.max(1)).clamp(1, k / CHUNK);
    (k.div_ceil(splits).div_ceil(CHUNK) * CHUNK).clamp(CHUNK, limit)
}

pub(crate) fn scratch_len(w: &GpuGptq, gpu: &Gpu, batch: usize) -> usize {
    let bx = w.out_features.div_ceil(BLOCK_COLS);
    w.in_features.div_ceil(k_chunk(w, gpu, batch, bx)) * batch * w.out_features
}

/// The tensor-core GEMV's launch for `batch` ≤ 16 rows of `xd` inputs (bf16 only): (kernel, configuration, rows of
/// K per split). `GpuGptq::gemv` runs it with the scalar kernel's arguments and adds the splits.
pub(crate) fn launch<'g>(
    w: &GpuGptq,
    gpu: &'g Gpu,
    xd: ActDtype,
    batch: usize,
) -> Result<(&'g CudaFunction, LaunchConfig, usize)> {
    if xd != ActDtype::Bf16 {
        return Err(Error::Shape { what: "gemv", reason: "weights packed for tensor cores take bf16 inputs".into() });
    }
    let (k, n) = (w.in_features, w.out_features);
    let bx = n.div_ceil(BLOCK_COLS);
    let chunk = k_chunk(w, gpu, batch, bx);
    let f = gpu.function(&format!("gptq_mma_gemv_w{}_b{}_bf16", w.bits, bucket(batch)))?;
    let cfg = LaunchConfig {
        grid_dim: (bx as u32, k.div_ceil(chunk) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem_bytes(w.bits, batch, chunk),
    };
    Ok((f, cfg, chunk))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads value (row, col) back from the repacked words the way the kernel's `pair_bits` does.
    fn unpack(words: &[u32], bits: u32, k: usize, col: usize, row: usize) -> u32 {
        let b = bits as usize;
        let (t, r16, c, kk) = (col / 16, col % 16, row / CHUNK, row % CHUNK);
        let (ks, k16) = (kk / 16, kk % 16);
        let lane = (r16 % 8) * 4 + (k16 % 8) / 2;
        let p = ks * 4 + (r16 / 8) + 2 * (k16 / 8);
        let lw: Vec<u32> =
            (0..2 * b).map(|wi| words[((((t * (k / CHUNK) + c) * b + wi / 2) * 32 + lane) * 2) + wi % 2]).collect();
        let blk = &lw[(p / 16) * b..(p / 16 + 1) * b];
        let pair = match slot(bits, p % 16) {
            Some((w, sh)) => (blk[w] >> sh) & (((1 << b) - 1) * 0x10001),
            None => ((blk[0] >> 15) & 0x10001) | ((blk[1] >> 14) & 0x20002) | ((blk[2] >> 13) & 0x40004),
        };
        if k16 % 2 == 1 { pair >> 16 } else { pair & 0xFFFF }
    }

    #[test]
    fn repacking_keeps_every_value() {
        for bits in [2u32, 3, 4] {
            let (k, n) = (256, 32);
            let layout = pipemoe_quant::GptqLayout::new(
                k,
                n,
                pipemoe_quant::Bits::new(bits).unwrap(),
                pipemoe_quant::GroupSize::Rows(128),
            )
            .unwrap();
            let q: Vec<u8> = (0..k * n).map(|i| ((i * 7 + i / 13) % (1 << bits)) as u8).collect();
            let packed = pipemoe_quant::pack::pack_qweight(&q, &layout).unwrap();
            let words = repack(&packed, bits, k, n);
            assert_eq!(words.len(), packed.len(), "{bits}-bit: same bytes");
            for row in 0..k {
                for col in 0..n {
                    assert_eq!(
                        unpack(&words, bits, k, col, row),
                        u32::from(q[row * n + col]),
                        "{bits}-bit ({row},{col})"
                    );
                }
            }
        }
        // The real expert shape, timed (a load-time cost paid for every linear of the model).
        let (k, n) = (7168, 2048);
        let packed: Vec<u32> = (0..k * 3 / 32 * n).map(|i| (i as u32).wrapping_mul(2_654_435_761)).collect();
        let t0 = std::time::Instant::now();
        let words = repack(&packed, 3, k, n);
        eprintln!("repack 7168x2048 3-bit: {:?}", t0.elapsed());
        assert_eq!(words.len(), packed.len());
        assert!(eligible(3, 7168, 2048, 128) && !eligible(8, 7168, 2048, 128) && !eligible(3, 7168, 2048, 64));
    }
}
