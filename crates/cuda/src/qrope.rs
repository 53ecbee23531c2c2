//! `Backend::linear_rope_columns2` on the device: a decode step's fused q_b + wq_b projection with attention's q
//! and the indexer's query cut out of it and roped in the GEMV's own store (kernels/gptq_rope.cu), bit for bit
//! what the GEMV then `rope_columns2` give, with one launch and one pass over q fewer on the attention's critical
//! path (H200, docs/PERF.md session 26: -10.3 us a 2-layer one-row step; the kernel takes 12.0 us where the plain
//! GEMV took 14.9 and `rope_cols2` 3.1).

use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use pipemoe_model::backend::{RopeSpec, Row};

use crate::act::ActDtype;
use crate::backend::{CudaBackend, GpuTensor, GpuWeight, GpuWeightKind, MResult, m, md, shape};
use crate::gemv::{GpuGptq, Packing};
use crate::gpu::Apart;
use crate::launch::ArgOrNull;

/// Pairs a head may rotate in the fused store (`ROPE_MAX_HALF`: DeepSeek's 64 rope dims are 32); 8 and 16 too
/// (the demo model's 32 dims).
const HALVES: [usize; 3] = [8, 16, 32];
/// Columns a block of the ≤ 8-row GEMV stores (4 tiles of 16): a part's heads and rotated columns must be whole
/// blocks of them.
const BLOCK_COLS: usize = 64;

/// Whether one part's heads fit the fused store at `half` pairs a head: whole blocks a head, its rotated columns
/// starting on a multiple of their own width (so a pair's two values are a lane's, or lanes L and L ^ 4's).
fn part_fits(spec: &RopeSpec, half: usize) -> bool {
    spec.head_dim.is_multiple_of(BLOCK_COLS)
        && spec.offset.is_multiple_of(2 * half)
        && spec.offset + 2 * half <= spec.head_dim
}

/// The fused launch, or `None` where it does not apply — `Apart::QRope`, a weight not packed for tensor cores or
/// with a row order of K, other than bf16 rows, more than 8 rows, parts that do not tile the matrix's columns in
/// whole blocks, a rope width but 16, 32 or 64, or a launch shape with splits of K or warps side by side — and the
/// caller runs the GEMV and `rope_columns2` apart.
pub(crate) fn linear_rope2(
    b: &CudaBackend,
    x: &GpuTensor,
    w: &GpuWeight,
    a: (usize, RopeSpec),
    c: (usize, RopeSpec),
    inv_freq: &[f32],
    rows: &[Row],
) -> MResult<Option<(GpuTensor, GpuTensor)>> {
    let Some(l) = RopeLaunch::new(b, x, w, a, c, inv_freq, rows)? else { return Ok(None) };
    let blocks = l.blocks();
    l.launch(b, &b.gpu.stream, 0..blocks.1)?;
    Ok(Some((l.y1, l.y2)))
}

/// q_a's RMSNorm in the launch (`gptq_mma_gemv_rope_norm_*`): the GEMV's x is the first K columns of `raw`'s
/// rows (the fused projection `[q_a | latent | ...]`), normed by `norm` and `eps` in every block as mla_prep's
/// first part norms them, bit for bit (kernels/gptq_rope.cu `fill_x`).
#[derive(Clone, Copy)]
pub(crate) struct QaNorm<'a> {
    pub raw: &'a GpuTensor,
    /// q_a's width: the weight's in-features.
    pub width: usize,
    pub norm: &'a CudaSlice<f32>,
    pub eps: f32,
}

/// The widest q_a `fill_x` norms (two pieces of 8 a thread of 128).
const NORM_MAX_K: usize = 2048;

/// One fused q_b + wq_b launch's inputs and outputs, allocated (on the main stream) and checked: launched whole, or
/// as two launches of its two parts' blocks, on two streams ([`RopeLaunch::blocks`]).
pub(crate) struct RopeLaunch<'a> {
    x: &'a GpuTensor,
    /// With q_a's norm in the launch: `x` is the raw projection.
    norm: Option<QaNorm<'a>>,
    g: &'a GpuGptq,
    shape: crate::mma::Shape,
    parts: [[i32; 5]; 2],
    half: i32,
    positions: crate::graph::Ints,
    freq: std::sync::Arc<cudarc::driver::CudaSlice<f32>>,
    /// The first part's columns (attention's q) and the second's (the indexer's query), as the kernel writes them.
    pub y1: GpuTensor,
    pub y2: GpuTensor,
}

impl<'a> RopeLaunch<'a> {
    /// The launch where it applies (see [`linear_rope2`]), else `None`.
    pub(crate) fn new(
        b: &CudaBackend,
        x: &'a GpuTensor,
        w: &'a GpuWeight,
        a: (usize, RopeSpec),
        c: (usize, RopeSpec),
        inv_freq: &[f32],
        rows: &[Row],
    ) -> MResult<Option<RopeLaunch<'a>>> {
        Self::with_x(b, x, None, w, a, c, inv_freq, rows)
    }

    /// The launch over the raw projection, q_a normed in its blocks, where it applies: as [`RopeLaunch::new`]'s,
    /// and q_a the weight's in-features, a multiple of 128 up to 2,048, the projection's rows 16-byte aligned, and
    /// the rows' x within the block's shared budget ([`crate::mma::staged_x_shape`]). The caller checks
    /// `Apart::PrepQuery`.
    pub(crate) fn normed(
        b: &CudaBackend,
        n: QaNorm<'a>,
        w: &'a GpuWeight,
        a: (usize, RopeSpec),
        c: (usize, RopeSpec),
        inv_freq: &[f32],
        rows: &[Row],
    ) -> MResult<Option<RopeLaunch<'a>>> {
        let k = w.in_features;
        let fits = n.width == k
            && k.is_multiple_of(crate::mma::CHUNK)
            && k <= NORM_MAX_K
            && n.raw.cols >= k
            && n.raw.cols.is_multiple_of(8)
            && n.norm.len() >= k;
        if !fits {
            return Ok(None);
        }
        let Some(mut launch) = Self::with_x(b, n.raw, Some(n), w, a, c, inv_freq, rows)? else { return Ok(None) };
        // The x after the ring: every chunk's rows ([K / 128][rows][MMA_XS] bf16).
        let x_bytes = k / crate::mma::CHUNK * n.raw.rows * crate::mma::XS * 2;
        match crate::mma::staged_x_shape(launch.g, launch.shape, n.raw.rows, x_bytes) {
            Some(shape) => launch.shape = shape,
            None => return Ok(None),
        }
        Ok(Some(launch))
    }

    #[allow(clippy::too_many_arguments)]
    fn with_x(
        b: &CudaBackend,
        x: &'a GpuTensor,
        norm: Option<QaNorm<'a>>,
        w: &'a GpuWeight,
        (s1, p1): (usize, RopeSpec),
        (s2, p2): (usize, RopeSpec),
        inv_freq: &[f32],
        rows: &[Row],
    ) -> MResult<Option<RopeLaunch<'a>>> {
        let GpuWeightKind::Gptq(g) = &w.kind else { return Ok(None) };
        let (w1, w2, half) = (p1.heads * p1.head_dim, p2.heads * p2.head_dim, inv_freq.len());
        let fits = g.packing == Packing::Mma
            && g.perm.is_none()
            && x.data.dtype() == ActDtype::Bf16
            && (1..=8).contains(&x.rows)
            && HALVES.contains(&half)
            && s1 == 0
            && s2 == w1
            && s2 + w2 == g.out_features
            && p1.heads > 0
            && p2.heads > 0
            && part_fits(&p1, half)
            && part_fits(&p2, half);
        if !fits || b.gpu.is_apart(Apart::QRope) {
            return Ok(None);
        }
        let (_, grid) = crate::mma::plain_shape(g, &b.gpu, x.rows);
        if grid.splits != 1 {
            return Ok(None);
        }
        if (norm.is_none() && x.cols != g.in_features) || rows.len() != x.rows {
            let (r, c, k, n) = (x.rows, x.cols, g.in_features, rows.len());
            return Err(shape("linear_rope_columns2", format!("[{r}, {c}] for a weight of {k} in-features, {n} rows")));
        }
        let y1 = b.output(x.rows, w1)?;
        let y2 = b.output(x.rows, w2)?;
        let positions = crate::graph::positions(b, rows)?;
        let freq = b.gpu.uploaded_f32(inv_freq).map_err(m)?;
        let part =
            |s: usize, p: RopeSpec| [s, p.heads, p.head_dim, p.offset, usize::from(p.interleaved)].map(|v| v as i32);
        let parts = [part(s1, p1), part(s2, p2)];
        Ok(Some(RopeLaunch { x, norm, g, shape: grid, parts, half: half as i32, positions, freq, y1, y2 }))
    }

    /// The blocks of 64 columns where the second part begins, and all of them.
    pub(crate) fn blocks(&self) -> (usize, usize) {
        (self.parts[1][0] as usize / BLOCK_COLS, self.g.out_features / BLOCK_COLS)
    }

    /// Blocks `range` of the launch on `s` (every buffer it touches was allocated on the main stream before). It
    /// writes `y1` and `y2` through shared references: a launch of the second part's blocks goes on a branch whose
    /// next launches read `y2` (the indexer's query), which the caller holds meanwhile.
    pub(crate) fn launch(&self, b: &CudaBackend, s: &CudaStream, range: std::ops::Range<usize>) -> MResult<()> {
        let g = self.g;
        let _p = b.gpu.span(|| {
            // A part's launch says which (the whole launch keeps the name profiles have compared across sessions).
            let part = if range.len() == self.blocks().1 { String::new() } else { format!(" blocks {range:?}") };
            format!("linear gemv+rope {}->{} x{}{part}", g.in_features, g.out_features, self.x.rows)
        });
        let kind = if self.norm.is_some() { "rope_norm" } else { "rope" };
        let f = b.gpu.function(&format!("gptq_mma_gemv_{kind}_w{}_b8{}_bf16", g.bits, crate::mma::variant(g)));
        let f = f.map_err(m)?;
        let smem = self.shape.smem;
        b.gpu.allow_smem(f, smem as usize).map_err(m)?;
        let dims = [self.x.rows, g.in_features, g.out_features, g.group_size, self.shape.stages].map(|v| v as i32);
        let ([a, c], pos, block0) = (&self.parts, self.positions.view(), range.start as i32);
        let mut l = s.launch_builder(f);
        l.arg(&self.x.data).arg(&g.qweight);
        l.arg_or_null(g.zeros.as_ref());
        l.arg(&g.scales);
        l.arg(&dims[0]).arg(&dims[1]).arg(&dims[2]).arg(&dims[3]).arg(&dims[4]);
        l.arg(&pos).arg(self.freq.as_ref()).arg(&self.half);
        l.arg(&self.y1.data).arg(&a[0]).arg(&a[1]).arg(&a[2]).arg(&a[3]).arg(&a[4]);
        l.arg(&self.y2.data).arg(&c[0]).arg(&c[1]).arg(&c[2]).arg(&c[3]).arg(&c[4]);
        l.arg(&block0);
        let stride = self.x.cols as i32;
        if let Some(n) = &self.norm {
            l.arg(&stride).arg(n.norm).arg(&n.eps);
        }
        let cfg = LaunchConfig {
            grid_dim: (range.len() as u32, 1, 1),
            block_dim: (crate::mma::THREADS, 1, 1),
            shared_mem_bytes: smem,
        };
        // SAFETY: matches gptq_mma_gemv_rope_w*_b8[_sym]_bf16: x [rows, k] bf16 (rows ≤ 8), the repacked weight
        // without a row order, null zeros when symmetric (and only then `_sym`), one split in the split-K layout
        // (the block stores); the parts tile the n columns in whole 64-column blocks, of which `range` lies
        // within the n / 64; y1 and y2 hold rows·w1 and rows·w2 values; pos holds rows positions, inv_freq `half`
        // frequencies (8, 16 or 32). The `_norm` kernel: x the projection's rows of `stride` values (a multiple of
        // 8, whole allocation: 16-byte aligned), k ≤ 2048 a multiple of 128 and at most stride, the norm's vector
        // at least k floats, and the shared memory its ring of slots without x and then its x (`normed` checked
        // them and took `staged_x_shape`).
        unsafe { l.launch(cfg) }.map_err(md("gptq_mma_gemv_rope"))?;
        Ok(())
    }
}

impl CudaBackend {
    /// The fused launch alone, as `Backend::linear_rope_columns2` would take it: `None` where it does not apply
    /// (tests: the fused store against the two launches, and that it is taken where it should be).
    pub fn linear_rope_fused(
        &self,
        x: &GpuTensor,
        w: &GpuWeight,
        a: (usize, RopeSpec),
        b: (usize, RopeSpec),
        inv_freq: &[f32],
        rows: &[Row],
    ) -> MResult<Option<(GpuTensor, GpuTensor)>> {
        linear_rope2(self, x, w, a, b, inv_freq, rows)
    }

    /// The fused launch with q_a's RMSNorm in its blocks, over `raw`'s first `w.in_features` columns normed by
    /// `norm` and `eps` (`gptq_mma_gemv_rope_norm`), whole: `None` where it does not apply (tests: against
    /// `rms_norm`, then the fused launch).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_rope_normed(
        &self,
        raw: &GpuTensor,
        (norm, eps): (&CudaSlice<f32>, f32),
        w: &GpuWeight,
        a: (usize, RopeSpec),
        b: (usize, RopeSpec),
        inv_freq: &[f32],
        rows: &[Row],
    ) -> MResult<Option<(GpuTensor, GpuTensor)>> {
        let n = QaNorm { raw, width: w.in_features, norm, eps };
        let Some(l) = RopeLaunch::normed(self, n, w, a, b, inv_freq, rows)? else {
            return Ok(None);
        };
        l.launch(self, &self.gpu.stream, 0..l.blocks().1)?;
        Ok(Some((l.y1, l.y2)))
    }
}
