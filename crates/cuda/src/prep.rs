//! Attention's fused preparation of its projections (`mla_prep_*`, kernels/ops.cu): q_a and the latent RMS-normed,
//! k_pe roped, the indexer key layer-normed and roped and its head weights scaled, in one launch that can also
//! write the cache; and a decode step's preparation with its fused query (`mla_prep_fused_query`), where the query
//! launches norm q_a themselves and the rest of the preparation runs beside the indexer's branch.

use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use pipemoe_model::backend::{Backend, MlaDims, MlaPrep, MlaPrepped, PrepQuery, Row};

use crate::attention::{attend_selected, cache_target};
use crate::backend::{CudaBackend, GpuTensor, GpuWeight, MResult, m, md, shape};
use crate::cache::GpuLayerCache;
use crate::gpu::Apart;
use crate::graph::Ints;
use crate::launch::{ArgOrNull, rows_cfg};
use crate::qrope::{QaNorm, RopeLaunch};

/// One `mla_prep_*` launch's inputs and outputs, checked and allocated ([`PrepLaunch::new`]) apart from the launch
/// itself, so that a caller can allocate on the main stream before a fork and launch after it.
pub(crate) struct PrepLaunch<'a> {
    proj: &'a GpuTensor,
    p: MlaPrep<'a, CudaSlice<f32>>,
    half: usize,
    positions: Ints,
    freq: std::sync::Arc<CudaSlice<f32>>,
    /// The rows' cache slots, when the launch writes the cache.
    slots: Option<Ints>,
    pub out: MlaPrepped<GpuTensor>,
}

impl<'a> PrepLaunch<'a> {
    /// The launch's checks and outputs. With `cache`, the rows' slots are reserved there and the launch writes
    /// their latent, k_pe and indexer key into it as `Backend::cache_write` would. Without `with_q`, q_a is not
    /// normed (its columns stay in `proj`; `out.q_a` is `None`): a query launch norms it itself.
    pub(crate) fn new(
        b: &CudaBackend,
        proj: &'a GpuTensor,
        p: MlaPrep<'a, CudaSlice<f32>>,
        inv_freq: &[f32],
        rows: &[Row],
        cache: Option<&mut GpuLayerCache>,
        with_q: bool,
    ) -> MResult<Self> {
        let (q_a, lora, rope, idx) = (p.q_a.map_or(0, |q| q.0), p.latent.0, p.rope, p.index_key.map_or(0, |k| k.0));
        let iw = p.index_weights.map_or(0, |w| w.0);
        let half = inv_freq.len();
        let short = |w: &CudaSlice<f32>, n: usize| w.len() < n;
        let bad = proj.cols != q_a + lora + rope + idx + iw
            || rows.len() != proj.rows
            || p.index_weights.is_some_and(|(n, _)| n == 0)
            || lora == 0
            || 2 * half > rope
            || (idx > 0 && 2 * half > idx)
            || p.q_a.is_some_and(|(n, w)| n == 0 || short(w, n))
            || short(p.latent.1, lora)
            || p.index_key.is_some_and(|(n, w, bias)| n == 0 || short(w, n) || short(bias, n))
            || cache.as_ref().is_some_and(|c| c.lora != lora || c.rope != rope || c.index_dim != idx);
        if bad {
            return Err(shape(
                "mla_prep",
                format!(
                    "[{}, {}] as {q_a} + {lora} + {rope} + {idx} + {iw} for {} rows, {half} rope pairs",
                    proj.rows,
                    proj.cols,
                    rows.len()
                ),
            ));
        }
        let n = proj.rows;
        let out = MlaPrepped {
            q_a: p.q_a.filter(|_| with_q).map(|_| b.output(n, q_a)).transpose()?,
            latent: b.output(n, lora)?,
            k_pe: b.output(n, rope)?,
            index_key: p.index_key.map(|_| b.output(n, idx)).transpose()?,
            index_weights: p.index_weights.map(|_| b.output(n, iw)).transpose()?,
        };
        let positions = crate::graph::positions(b, rows)?;
        let freq = b.gpu.uploaded_f32(inv_freq).map_err(m)?;
        let slots = match cache {
            Some(c) if n > 0 => Some(cache_target(b, c, rows)?.0),
            _ => None,
        };
        Ok(PrepLaunch { proj, p, half, positions, freq, slots, out })
    }

    /// The launch on `s`; `cache` the one [`PrepLaunch::new`] reserved the slots in (when it had one).
    /// It writes its outputs through shared references: the caller holds them until the launches that read them.
    pub(crate) fn launch(&self, b: &CudaBackend, s: &CudaStream, cache: Option<&GpuLayerCache>) -> MResult<()> {
        let _p = b.gpu.span(|| if self.slots.is_some() { "mla_prep+cache_write" } else { "mla_prep" }.into());
        let (p, proj, null) = (&self.p, self.proj, 0u64);
        let (q_a, idx) = (p.q_a.map_or(0, |q| q.0) as i32, p.index_key.map_or(0, |k| k.0) as i32);
        let (lora, rope, half) = (p.latent.0 as i32, p.rope as i32, self.half as i32);
        let (iw, iw_scale) = p.index_weights.map_or((0, 1.0), |(n, s)| (n as i32, s));
        let pool = match (&self.slots, cache.and_then(|c| c.pool().map(|p| (c, p)))) {
            (Some(_), Some(pool)) => Some(pool),
            (Some(_), None) => return Err(shape("mla_prep", "slots reserved in a cache without a pool".into())),
            (None, _) => None,
        };
        let pos = self.positions.view();
        let out = &self.out;
        let mut l = s.launch_builder(b.op("mla_prep", &proj.data)?);
        l.arg(&proj.data).arg(&q_a).arg(&lora).arg(&rope).arg(&idx).arg(&iw).arg(&iw_scale);
        l.arg_or_null(p.q_a.map(|(_, w)| w));
        l.arg(p.latent.1);
        match p.index_key {
            Some((_, w, bias)) => l.arg(w).arg(bias),
            None => l.arg(&null).arg(&null),
        };
        l.arg(&p.eps).arg(&pos).arg(self.freq.as_ref()).arg(&half);
        l.arg_or_null(out.q_a.as_ref().map(|t| &t.data));
        l.arg(&out.latent.data).arg(&out.k_pe.data);
        l.arg_or_null(out.index_key.as_ref().map(|t| &t.data));
        l.arg_or_null(out.index_weights.as_ref().map(|t| &t.data));
        let slots = self.slots.as_ref().map(|s| s.view());
        let code = pool.map_or(0, |(c, _)| c.dtype.code());
        match (&slots, pool) {
            (Some(s), Some((_, pool))) => {
                l.arg(s).arg(&pool.latent).arg(&pool.k_pe).arg(&pool.index_k).arg(&pool.scales)
            }
            _ => l.arg(&null).arg(&null).arg(&null).arg(&null).arg(&null),
        };
        l.arg(&code);
        let n = proj.rows;
        let cfg = LaunchConfig { grid_dim: (n.max(1) as u32, 5, 1), ..rows_cfg(n) };
        // SAFETY: matches mla_prep_*: proj holds rows·(q_a + lora + rope + idx + iw) values, each output rows·width
        // of the same dtype, the norms' vectors at least their widths, 2·half ≤ rope (and ≤ idx) as `new` checked;
        // the kernel touches an absent output (null: q_a's without `with_q`) never, its part returning first, nor
        // an absent part's pointers, as its width is 0; with a cache, its dims are the parts' (checked), every
        // row's slot is reserved in its pool and `slots` holds one a row.
        unsafe { l.launch(cfg) }.map_err(md("mla_prep"))?;
        Ok(())
    }
}

/// `Backend::mla_prep` in one launch (`mla_prep_*`): a block per row and part. With `cache`, the same launch
/// writes the rows' latent, k_pe and indexer key into it as `Backend::cache_write` would (`mla_prep_write`).
pub(crate) fn mla_prep(
    b: &CudaBackend,
    proj: &GpuTensor,
    p: &MlaPrep<'_, CudaSlice<f32>>,
    inv_freq: &[f32],
    rows: &[Row],
    mut cache: Option<&mut GpuLayerCache>,
) -> MResult<MlaPrepped<GpuTensor>> {
    let launch = PrepLaunch::new(b, proj, *p, inv_freq, rows, cache.as_deref_mut(), true)?;
    launch.launch(b, &b.gpu.stream, cache.as_deref())?;
    Ok(launch.out)
}

/// `Backend::mla_prep_write`: one launch, or (`Apart::PrepWrite`, a benchmark's A/B) the prep and then the cache
/// write as two.
pub(crate) fn mla_prep_write(
    b: &CudaBackend,
    proj: &GpuTensor,
    p: &MlaPrep<'_, CudaSlice<f32>>,
    inv_freq: &[f32],
    rows: &[Row],
    cache: &mut GpuLayerCache,
) -> MResult<MlaPrepped<GpuTensor>> {
    if !b.gpu.is_apart(crate::gpu::Apart::PrepWrite) {
        return mla_prep(b, proj, p, inv_freq, rows, Some(cache));
    }
    let out = mla_prep(b, proj, p, inv_freq, rows, None)?;
    b.cache_write(cache, rows, &out.latent, &out.k_pe, out.index_key.as_ref())?;
    Ok(out)
}

/// `Backend::mla_prep_attention_fused` on the device. Where the normed query launch applies (`Gpu::prep_query`, off
/// by default until it has run on a GPU; `RopeLaunch::normed`: bf16, few enough rows, the fused query launch's
/// shapes), the step's critical path loses mla_prep: the branch forks after the fused projection and runs the
/// indexer's query launch (q_a normed in its blocks); the main stream runs mla_prep without q_a (the latent, k_pe,
/// the indexer key and weights, and the cache write); the branch then waits for it and selects, while the main
/// stream runs q's launch (q_a normed again in its blocks) and absorbs it. Elsewhere, mla_prep_write and then the
/// fused query, as the trait's default.
pub(crate) fn mla_prep_fused_query(
    b: &CudaBackend,
    cache: &mut GpuLayerCache,
    query: PrepQuery<'_, CudaBackend>,
    kv_b: &GpuWeight,
    d: &MlaDims,
    rows: &[Row],
) -> MResult<GpuTensor> {
    let PrepQuery { proj, prep, w, q, index, inv_freq, index_dims } = query;
    let parts = ((0, q), (q.heads * q.head_dim, index));
    let normed = match (prep.q_a, prep.index_weights, prep.index_key) {
        (Some((width, norm)), Some(_), Some(_))
            if !b.gpu.is_apart(Apart::PrepQuery) && !b.gpu.is_apart(Apart::EarlyIndex) =>
        {
            let n = QaNorm { raw: proj, width, norm, eps: prep.eps };
            RopeLaunch::normed(b, n, w, parts.0, parts.1, inv_freq, rows)?
        }
        _ => None,
    };
    let Some(launch) = normed else {
        return pipemoe_model::mla::prep_then_fused_query(b, cache, query, kv_b, d, rows);
    };
    // Every buffer of both streams' launches is allocated (and the step's tables made) before the fork.
    let prepared = PrepLaunch::new(b, proj, prep, inv_freq, rows, Some(&mut *cache), false)?;
    let cache = &*cache;
    let index_w = prepared.out.index_weights.as_ref().ok_or_else(|| shape("mla_prep", "no index weights".into()))?;
    let selecting = crate::indexer::prepare(b, cache, &launch.y2, index_w, index_dims, rows)?;
    let (split, blocks) = launch.blocks();
    let branch = b.gpu.branch();
    let s = match &branch {
        Some(br) => br.fork().map_err(m)?,
        None => &b.gpu.stream,
    };
    launch.launch(b, s, split..blocks)?;
    prepared.launch(b, &b.gpu.stream, Some(cache))?;
    if let Some(br) = &branch {
        br.wait_main().map_err(m)?;
    }
    let selection = selecting.launch(b, s);
    attend_selected(b, cache, &launch, split, selection, branch, (kv_b, d, rows))
}
