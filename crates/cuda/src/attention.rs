//! The cache writes and the attention side of `CudaBackend` (MODEL_SPEC §2.5, §2.6): one launch per row of the
//! step over that row's sequence buffers (first version; a batched, tiled kernel is issue 6's).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use pipemoe_model::backend::{IndexerDims, MlaDims, Row, Selection};

use crate::backend::{CudaBackend, GpuTensor, MResult, grid, md, shape, top};
use crate::cache::GpuLayerCache;

/// Shared memory the attention kernel may use (the sm_80+ default without opting in).
const SMEM_BYTES: usize = 48 * 1024;

pub fn cache_write(
    b: &CudaBackend,
    cache: &mut GpuLayerCache,
    rows: &[Row],
    latent: &GpuTensor,
    k_pe: &GpuTensor,
    index_k: Option<&GpuTensor>,
) -> MResult<()> {
    let (lora, rope, idim) = (cache.lora, cache.rope, cache.index_dim);
    if latent.cols != lora || k_pe.cols != rope || latent.rows != rows.len() || (idim > 0) != index_k.is_some() {
        return Err(shape("cache_write", "latent, k_pe or indexer key mis-shaped".into()));
    }
    let s = &b.gpu.stream;
    for (r, row) in rows.iter().enumerate() {
        let len = cache.len(row.seq);
        if row.pos != len {
            return Err(pipemoe_model::Error::CachePosition { seq: row.seq, expected: len, found: row.pos });
        }
        let buf = cache.reserve(&b.gpu, row.seq, row.pos + 1).map_err(crate::backend::m)?;
        let p = row.pos;
        s.memcpy_dtod(
            &latent.data.slice(r * lora..(r + 1) * lora),
            &mut buf.latent.slice_mut(p * lora..(p + 1) * lora),
        )
        .map_err(md("cache latent"))?;
        s.memcpy_dtod(&k_pe.data.slice(r * rope..(r + 1) * rope), &mut buf.k_pe.slice_mut(p * rope..(p + 1) * rope))
            .map_err(md("cache k_pe"))?;
        if let Some(k) = index_k {
            s.memcpy_dtod(
                &k.data.slice(r * idim..(r + 1) * idim),
                &mut buf.index_k.slice_mut(p * idim..(p + 1) * idim),
            )
            .map_err(md("cache indexer key"))?;
        }
        buf.len = p + 1;
    }
    Ok(())
}

pub fn indexer_select(
    b: &CudaBackend,
    cache: &GpuLayerCache,
    q: &GpuTensor,
    w: &GpuTensor,
    d: &IndexerDims,
    rows: &[Row],
) -> MResult<Vec<Vec<u32>>> {
    let mut out = Vec::with_capacity(rows.len());
    let dim = d.head_dim;
    for (r, row) in rows.iter().enumerate() {
        let n = row.pos + 1;
        if n <= d.topk {
            out.push((0..n as u32).collect());
            continue;
        }
        let buf = cache.seqs.get(&row.seq).ok_or(pipemoe_model::Error::UnknownSequence { seq: row.seq })?;
        let mut scores: CudaSlice<f32> = b.zeros(n)?;
        let qr = q.data.slice(r * d.heads * dim..(r + 1) * d.heads * dim);
        let wr = w.data.slice(r * d.heads..(r + 1) * d.heads);
        let (ni, hi, di) = (n as i32, d.heads as i32, dim as i32);
        let mut l = b.gpu.stream.launch_builder(b.f("indexer_scores_f32")?);
        l.arg(&qr).arg(&wr).arg(&buf.index_k).arg(&ni).arg(&hi).arg(&di).arg(&mut scores);
        unsafe { l.launch(grid(n * 32, 256)) }.map_err(md("indexer_scores"))?;
        let host = b.gpu.stream.clone_dtoh(&scores).map_err(md("download scores"))?;
        out.push(top(&host[..n], d.topk));
    }
    Ok(out)
}

pub fn mla(
    b: &CudaBackend,
    cache: &GpuLayerCache,
    q: &GpuTensor,
    kv_b: &CudaSlice<f32>,
    d: &MlaDims,
    rows: &[Row],
    selection: &Selection,
) -> MResult<GpuTensor> {
    let qk = d.qk_nope + d.qk_rope;
    if q.cols != d.heads * qk || q.rows != rows.len() {
        return Err(shape("mla_attention", format!("q [{}, {}]", q.rows, q.cols)));
    }
    let mut out = b.zeros(rows.len() * d.heads * d.v_head)?;
    for (r, row) in rows.iter().enumerate() {
        let buf = cache.seqs.get(&row.seq).ok_or(pipemoe_model::Error::UnknownSequence { seq: row.seq })?;
        let keys: Option<CudaSlice<i32>> = match selection {
            Some(sel) => Some(b.upload_i32(&sel[r].iter().map(|&k| k as i32).collect::<Vec<_>>())?),
            None => None,
        };
        let n_keys = selection.as_ref().map_or(row.pos + 1, |s| s[r].len());
        let smem = (2 * d.kv_lora + n_keys + 32) * 4;
        if smem > SMEM_BYTES {
            return Err(shape("mla_attention", format!("{n_keys} keys exceed this kernel's shared-memory limit")));
        }
        let qr = q.data.slice(r * d.heads * qk..(r + 1) * d.heads * qk);
        let mut o = out.slice_mut(r * d.heads * d.v_head..(r + 1) * d.heads * d.v_head);
        let (nk, nope, rope, v, lora) =
            (n_keys as i32, d.qk_nope as i32, d.qk_rope as i32, d.v_head as i32, d.kv_lora as i32);
        let null: u64 = 0;
        let mut l = b.gpu.stream.launch_builder(b.f("mla_attention_f32")?);
        l.arg(&qr).arg(&buf.latent).arg(&buf.k_pe).arg(kv_b);
        match &keys {
            Some(k) => l.arg(k),
            None => l.arg(&null),
        };
        l.arg(&nk).arg(&nope).arg(&rope).arg(&v).arg(&lora).arg(&d.softmax_scale).arg(&mut o);
        let cfg =
            LaunchConfig { grid_dim: (d.heads as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: smem as u32 };
        unsafe { l.launch(cfg) }.map_err(md("mla_attention"))?;
    }
    Ok(GpuTensor { rows: rows.len(), cols: d.heads * d.v_head, data: out })
}
