//! The block-paged latent cache's test helpers (device_attention): values written with a record of them, and
//! read back against it at each cache dtype's precision.

use half::bf16;
use pipemoe_cuda::CudaBackend;
use pipemoe_cuda::cache::{GpuLayerCache, KvDtype};
use pipemoe_model::backend::{Backend, Row};

use super::{Rng, uniform};

/// Cached values read back (`got`) against those written (`want`), rows of `dim`: equal in f32, the bf16
/// rounding in bf16, within e4m3's precision in fp8.
pub fn check_stored(dtype: KvDtype, got: &[f32], want: &[f32], dim: usize, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (p, (g, w)) in got.chunks(dim).zip(want.chunks(dim)).enumerate() {
        let max = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (i, (&g, &w)) in g.iter().zip(w).enumerate() {
            let ok = match dtype {
                KvDtype::F32 => g == w,
                KvDtype::Bf16 => g == bf16::from_f32(w).to_f32(),
                // e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 relative; below 2^-6 · scale the step is fixed.
                KvDtype::Fp8 => (g - w).abs() <= (w.abs() * 0.0625).max(max / 448.0 * 2f32.powi(-9)) * 1.01,
            };
            assert!(ok, "{what} {dtype:?} position {p} [{i}]: stored {g}, wrote {w}");
        }
    }
}

/// One sequence's values as written.
pub struct Written {
    pub latent: Vec<f32>,
    pub k_pe: Vec<f32>,
    pub index_k: Vec<f32>,
}

/// Writes `rows` (any mix of sequences) with fresh random values, recording them per sequence in `log`.
pub fn write_rows(
    g: &CudaBackend,
    cache: &mut GpuLayerCache,
    rng: &mut Rng,
    rows: &[Row],
    log: &mut std::collections::HashMap<u64, Written>,
) -> pipemoe_model::Result<()> {
    let (lora, rope, idim) = (cache.lora, cache.rope, cache.index_dim);
    let (lat, pe, ik) = (
        uniform(rng, rows.len() * lora, 3.0),
        uniform(rng, rows.len() * rope, 1.0),
        uniform(rng, rows.len() * idim, 2.0),
    );
    let up = |v: &Vec<f32>, c| g.upload(rows.len(), c, v.clone()).expect("upload");
    let index = (idim > 0).then(|| up(&ik, idim));
    g.cache_write(cache, rows, &up(&lat, lora), &up(&pe, rope), index.as_ref())?;
    for (r, row) in rows.iter().enumerate() {
        let w = log.entry(row.seq).or_insert(Written { latent: vec![], k_pe: vec![], index_k: vec![] });
        w.latent.extend_from_slice(&lat[r * lora..(r + 1) * lora]);
        w.k_pe.extend_from_slice(&pe[r * rope..(r + 1) * rope]);
        w.index_k.extend_from_slice(&ik[r * idim..(r + 1) * idim]);
    }
    Ok(())
}

pub fn check_seq(g: &CudaBackend, cache: &GpuLayerCache, seq: u64, want: &Written) {
    let got = cache.read(&g.gpu, seq).expect("read back");
    assert_eq!(g.cache_len(cache, seq), want.latent.len() / cache.lora, "seq {seq} length");
    check_stored(cache.dtype, &got.latent, &want.latent, cache.lora, "latent");
    check_stored(cache.dtype, &got.k_pe, &want.k_pe, cache.rope, "k_pe");
    check_stored(cache.dtype, &got.index_k, &want.index_k, cache.index_dim.max(1), "indexer key");
}
