//! The cache writes and the attention side of `CudaBackend` (MODEL_SPEC §2.5, §2.6): one launch per row of the
//! step over that row's sequence buffers (first version; a batched, tiled kernel is issue 6's).

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use pipemoe_model::backend::{IndexerDims, MlaDims, Row, Selection};

use crate::backend::{CudaBackend, GpuTensor, MResult, grid, md, shape, top};
use crate::cache::{GpuLayerCache, SeqBuf};

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
    let dtype = cache.dtype;
    let (es, code) = (dtype.bytes(), dtype.code());
    for (r, row) in rows.iter().enumerate() {
        let len = cache.len(row.seq);
        if row.pos != len {
            return Err(pipemoe_model::Error::CachePosition { seq: row.seq, expected: len, found: row.pos });
        }
        let buf = cache.reserve(&b.gpu, row.seq, row.pos + 1).map_err(crate::backend::m)?;
        let p = row.pos;
        let SeqBuf { latent: cl, k_pe: ck, index_k: ci, scales, .. } = buf;
        let mut sc = scales.slice_mut(p * 3..(p + 1) * 3);
        store(
            b,
            &latent.data.slice(r * lora..(r + 1) * lora),
            &mut cl.slice_mut(p * lora * es..(p + 1) * lora * es),
            &mut sc,
            0,
            code,
        )?;
        store(
            b,
            &k_pe.data.slice(r * rope..(r + 1) * rope),
            &mut ck.slice_mut(p * rope * es..(p + 1) * rope * es),
            &mut sc,
            1,
            code,
        )?;
        if let Some(k) = index_k {
            store(
                b,
                &k.data.slice(r * idim..(r + 1) * idim),
                &mut ci.slice_mut(p * idim * es..(p + 1) * idim * es),
                &mut sc,
                2,
                code,
            )?;
        }
        buf.len = p + 1;
    }
    Ok(())
}

/// One row of one component into the cache (converted to the cache's dtype) and its scale.
fn store(
    b: &CudaBackend,
    src: &CudaView<'_, f32>,
    dst: &mut CudaViewMut<'_, u8>,
    scales: &mut CudaViewMut<'_, f32>,
    component: usize,
    code: i32,
) -> MResult<()> {
    let n = src.len() as i32;
    let mut scale = scales.slice_mut(component..component + 1);
    let mut l = b.gpu.stream.launch_builder(b.f("cache_store_f32")?);
    l.arg(src).arg(&n).arg(dst).arg(&mut scale).arg(&code);
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    unsafe { l.launch(one) }.map_err(md("cache_store"))?;
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
        let (ni, hi, di, code) = (n as i32, d.heads as i32, dim as i32, cache.dtype.code());
        let mut l = b.gpu.stream.launch_builder(b.f("indexer_scores_f32")?);
        l.arg(&qr).arg(&wr).arg(&buf.index_k).arg(&buf.scales).arg(&code).arg(&ni).arg(&hi).arg(&di).arg(&mut scores);
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
        let code = cache.dtype.code();
        l.arg(&qr).arg(&buf.latent).arg(&buf.k_pe).arg(&buf.scales).arg(&code).arg(kv_b);
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
