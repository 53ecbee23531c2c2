//! Device tests: every elementwise, row-wise, linear, router and experts operation of `CudaBackend` against the
//! CPU backend (the f32 reference) on fresh random inputs, at small shapes and at the real model's (MODEL_SPEC
//! §6: hidden 7168, moe_intermediate 2048, 3-bit g128), with f32 and with bf16 activations. (The cache, attention
//! and indexer have their own file, device_attention.rs; the GEMV kernels device.rs.)
//!
//! Inputs are bf16-representable values, so both backends start from the same numbers in either mode.
//! Tolerances (relative L2 over the output):
//! - f32 activations: 1e-5 for elementwise ops (same f32 arithmetic; RoPE's fast-math sincos differs from the
//!   CPU's by ~1e-6 relative), 1e-4 for reductions and matmuls (f32 sums in another order).
//! - bf16 activations: 1e-2; every output is rounded to bf16 (2^-9 relative per value, ~3e-3 over a vector)
//!   and matmul inputs between ops are bf16 too. A wrong index, bit or scale is far above either.

mod common;

use common::experts::*;
use common::*;
use half::bf16;
use pipemoe_cuda::backend::GpuTensor;
use pipemoe_cuda::experts::{GpuExperts, GpuRoutes};
use pipemoe_cuda::gpu::Apart;
use pipemoe_cuda::{ActDtype, CudaBackend};
use pipemoe_model::backend::{
    Backend, ExpertWeights, HostLinear, INDEXER_NORM_EPS, MlaPrep, MlaPrepped, RopeSpec, RouterDims, Row,
};
use pipemoe_model::cpu::CpuBackend;

fn values(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| bf16::from_f32((rng.uniform() * 2.0 - 1.0) * scale).to_f32()).collect()
}

fn dense(rng: &mut Rng, out_features: usize, in_features: usize) -> HostLinear {
    HostLinear::Dense { out_features, in_features, data: values(rng, out_features * in_features, 0.1) }
}

fn gptq(rng: &mut Rng, in_features: usize, out_features: usize, bits: u32, group: i64) -> HostLinear {
    HostLinear::Gptq(random_weight(rng, in_features, out_features, bits, group, false))
}

fn tol(act: ActDtype, exact: f64) -> f64 {
    match act {
        ActDtype::F32 => exact,
        ActDtype::Bf16 => 1e-2,
    }
}

fn check(what: &str, act: ActDtype, got: &[f32], want: &[f32], exact: f64) {
    if want.iter().all(|&v| v == 0.0) {
        // (e.g. every expert of the step held elsewhere) the output must be exactly zero too.
        assert!(got.iter().all(|&v| v == 0.0), "{what} ({act:?}): expected zeros");
        return;
    }
    let err = rel_l2(got, want);
    let limit = tol(act, exact);
    eprintln!("{what} ({act:?}): rel L2 {err:.2e}");
    assert!(err <= limit, "{what} ({act:?}): rel L2 {err:e} > {limit:e}");
}

/// Both backends, in each activation dtype.
fn backends() -> Vec<(ActDtype, CudaBackend)> {
    let gpu = CudaBackend::new(0).expect("cuda:0");
    vec![
        (ActDtype::F32, gpu.clone().with_act_dtype(ActDtype::F32)),
        (ActDtype::Bf16, gpu.with_act_dtype(ActDtype::Bf16)),
    ]
}

fn up<B: Backend>(b: &B, rows: usize, cols: usize, v: &[f32]) -> B::Tensor {
    b.upload(rows, cols, v.to_vec()).expect("upload")
}

#[test]
fn elementwise_and_row_ops_match_the_cpu() {
    if no_gpu() {
        return;
    }
    let cpu = CpuBackend::F32;
    let mut rng = Rng::new(21);
    for (act, gpu) in backends() {
        for (rows, cols) in [(1usize, 64usize), (5, 7168), (37, 576)] {
            let (a, b) = (values(&mut rng, rows * cols, 3.0), values(&mut rng, rows * cols, 3.0));
            let w = values(&mut rng, cols, 1.0);
            let bias = values(&mut rng, cols, 0.5);
            let shape = format!("[{rows}, {cols}]");
            // rms_norm, layer_norm
            let (wc, wg) = (cpu.load_vector(w.clone()).unwrap(), gpu.load_vector(w.clone()).unwrap());
            let (bc, bg) = (cpu.load_vector(bias.clone()).unwrap(), gpu.load_vector(bias.clone()).unwrap());
            let (xc, xg) = (up(&cpu, rows, cols, &a), up(&gpu, rows, cols, &a));
            let (yc, yg) = (up(&cpu, rows, cols, &b), up(&gpu, rows, cols, &b));
            let want = cpu.download(&cpu.rms_norm(&xc, &wc, 1e-6).unwrap()).unwrap();
            check(
                &format!("rms_norm {shape}"),
                act,
                &gpu.download(&gpu.rms_norm(&xg, &wg, 1e-6).unwrap()).unwrap(),
                &want,
                1e-4,
            );
            // add_rms_norm: the fused kernel gives what the add and the norm give apart on the device, bit for bit
            // (the sum is stored rounded, then normed), and the CPU's within the dtype's tolerance.
            let (mut fused_x, mut apart_x) = (up(&gpu, rows, cols, &a), up(&gpu, rows, cols, &a));
            let fused = gpu.add_rms_norm(&mut fused_x, &yg, &wg, 1e-6).unwrap();
            gpu.add_assign(&mut apart_x, &yg).unwrap();
            let apart = gpu.rms_norm(&apart_x, &wg, 1e-6).unwrap();
            assert_eq!(gpu.download(&fused_x).unwrap(), gpu.download(&apart_x).unwrap(), "add_rms_norm {shape}: x");
            assert_eq!(gpu.download(&fused).unwrap(), gpu.download(&apart).unwrap(), "add_rms_norm {shape}");
            let mut xc2 = up(&cpu, rows, cols, &a);
            let want = cpu.download(&cpu.add_rms_norm(&mut xc2, &yc, &wc, 1e-6).unwrap()).unwrap();
            check(&format!("add_rms_norm {shape}"), act, &gpu.download(&fused).unwrap(), &want, 1e-4);
            let other = up(&gpu, rows, cols + 1, &values(&mut rng, rows * (cols + 1), 1.0));
            assert!(gpu.add_rms_norm(&mut fused_x, &other, &wg, 1e-6).is_err(), "add_rms_norm of mismatched shapes");
            let want = cpu.download(&cpu.layer_norm(&xc, &wc, &bc, 1e-6).unwrap()).unwrap();
            let got = gpu.download(&gpu.layer_norm(&xg, &wg, &bg, 1e-6).unwrap()).unwrap();
            check(&format!("layer_norm {shape}"), act, &got, &want, 1e-4);
            // silu_mul, add, scale
            let want = cpu.download(&cpu.silu_mul(&xc, &yc).unwrap()).unwrap();
            check(
                &format!("silu_mul {shape}"),
                act,
                &gpu.download(&gpu.silu_mul(&xg, &yg).unwrap()).unwrap(),
                &want,
                1e-5,
            );
            let (mut sc, mut sg) = (up(&cpu, rows, cols, &a), up(&gpu, rows, cols, &a));
            cpu.add_assign(&mut sc, &yc).unwrap();
            gpu.add_assign(&mut sg, &yg).unwrap();
            cpu.scale(&mut sc, 0.37).unwrap();
            gpu.scale(&mut sg, 0.37).unwrap();
            check(&format!("add+scale {shape}"), act, &gpu.download(&sg).unwrap(), &cpu.download(&sc).unwrap(), 1e-5);
            // gather_rows, columns: exact copies in either dtype
            let idx: Vec<usize> = (0..rows + 2).map(|i| (i * 7 + 3) % rows).collect();
            let want = cpu.download(&cpu.gather_rows(&xc, &idx).unwrap()).unwrap();
            assert_eq!(gpu.download(&gpu.gather_rows(&xg, &idx).unwrap()).unwrap(), want, "gather_rows {shape}");
            let (start, len) = (cols / 3, cols / 2);
            let want = cpu.download(&cpu.columns(&xc, start, len).unwrap()).unwrap();
            assert_eq!(gpu.download(&gpu.columns(&xg, start, len).unwrap()).unwrap(), want, "columns {shape}");
            assert!(gpu.gather_rows(&xg, &[rows]).is_err() && gpu.columns(&xg, cols, 1).is_err());
            // split_columns: 1, 3 and 6 runs (more than one launch's 4), each an exact copy.
            let w3 = [cols / 4, cols / 2, cols - cols / 4 - cols / 2];
            let w6 = [1, cols / 5, 2, cols / 3, 3, cols - cols / 5 - cols / 3 - 6];
            for widths in [&[cols][..], &w3[..], &w6[..]] {
                let want: Vec<Vec<f32>> =
                    cpu.split_columns(&xc, widths).unwrap().iter().map(|t| cpu.download(t).unwrap()).collect();
                let got: Vec<Vec<f32>> =
                    gpu.split_columns(&xg, widths).unwrap().iter().map(|t| gpu.download(t).unwrap()).collect();
                assert_eq!(got, want, "split_columns {widths:?} {shape}");
            }
            assert!(gpu.split_columns(&xg, &[cols, 1]).is_err() && gpu.split_columns(&xg, &[0, cols]).is_err());
        }
        // RoPE, both pairings, at MLA's and the indexer's shapes, positions up to 64K.
        for (heads, head_dim, offset, interleaved) in [(128usize, 192usize, 128usize, true), (64, 128, 0, false)] {
            let rows = 6;
            let half = (head_dim - offset).min(64) / 2;
            let inv_freq: Vec<f32> = (0..half).map(|i| 10000f32.powf(-(i as f32) / half as f32)).collect();
            let r: Vec<Row> = (0..rows).map(|i| Row { seq: 1, pos: i * 13_000 + 5 }).collect();
            let x = values(&mut rng, rows * heads * head_dim, 2.0);
            let spec = RopeSpec { heads, head_dim, offset, interleaved };
            let mut xc = up(&cpu, rows, heads * head_dim, &x);
            let mut xg = up(&gpu, rows, heads * head_dim, &x);
            cpu.rope(&mut xc, spec, &inv_freq, &r).unwrap();
            gpu.rope(&mut xg, spec, &inv_freq, &r).unwrap();
            let what = format!("rope heads {heads} dim {head_dim} interleaved {interleaved}");
            check(&what, act, &gpu.download(&xg).unwrap(), &cpu.download(&xc).unwrap(), 1e-5);
            // rope_columns: the same heads cut out of a wider row (columns before and after them) and roped in one
            // launch must be what columns then rope give on the device, bit for bit: by 8-value pieces when the
            // part starts on a multiple of 8 (40 columns in) and the step has 8 rows or more, value by value when
            // it does not (41 columns in, or 6 rows); 8 rows take 2 heads a block (64 heads: 1), 100 rows up to 16
            // (64 heads: 12 a block, the last block 4).
            for (before, rows) in [(40, 8), (40, 6), (41, 8), (40, 100)] {
                let after = 24;
                let r: Vec<Row> = (0..rows).map(|i| Row { seq: 1, pos: i * 650 + 5 }).collect();
                let wide_cols = before + heads * head_dim + after;
                let wide = up(&gpu, rows, wide_cols, &values(&mut rng, rows * wide_cols, 2.0));
                let mut apart = gpu.columns(&wide, before, heads * head_dim).unwrap();
                gpu.rope(&mut apart, spec, &inv_freq, &r).unwrap();
                let fused = gpu.rope_columns(&wide, before, spec, &inv_freq, &r).unwrap();
                let (got, want) = (gpu.download(&fused).unwrap(), gpu.download(&apart).unwrap());
                assert_eq!(got, want, "rope_columns {what}, {rows} rows {before} columns in ({act:?})");
                assert!(gpu.rope_columns(&wide, before + after + 1, spec, &inv_freq, &r).is_err(), "past the row");
            }
        }
        // rope_columns2: attention's q and the indexer's query from one fused row, as rope_columns gives each, bit
        // for bit — one launch at 1 and 6 rows, each part its own from 8 rows (the pieces).
        let q = RopeSpec { heads: 128, head_dim: 192, offset: 128, interleaved: true };
        let ix = RopeSpec { heads: 64, head_dim: 128, offset: 0, interleaved: false };
        let inv_freq: Vec<f32> = (0..32).map(|i| 10000f32.powf(-(i as f32) / 32.0)).collect();
        for rows in [1, 6, 8] {
            let r: Vec<Row> = (0..rows).map(|i| Row { seq: 1, pos: i * 777 + 3 }).collect();
            let cols = 128 * 192 + 64 * 128;
            let both = up(&gpu, rows, cols, &values(&mut rng, rows * cols, 2.0));
            let (gq, gi) = gpu.rope_columns2(&both, (0, q), (128 * 192, ix), &inv_freq, &r).unwrap();
            let want_q = gpu.download(&gpu.rope_columns(&both, 0, q, &inv_freq, &r).unwrap()).unwrap();
            let want_i = gpu.download(&gpu.rope_columns(&both, 128 * 192, ix, &inv_freq, &r).unwrap()).unwrap();
            assert_eq!(gpu.download(&gq).unwrap(), want_q, "rope_columns2 q, {rows} rows ({act:?})");
            assert_eq!(gpu.download(&gi).unwrap(), want_i, "rope_columns2 index query, {rows} rows ({act:?})");
            assert!(gpu.rope_columns2(&both, (0, q), (128 * 192 + 1, ix), &inv_freq, &r).is_err(), "past the row");
        }
        // Embedding rows.
        let table = dense(&mut rng, 300, 96);
        let (tc, tg) = (cpu.load_linear(table.clone()).unwrap(), gpu.load_linear(table).unwrap());
        let ids = [0u32, 299, 17, 17];
        let want = cpu.download(&cpu.embed(&tc, &ids).unwrap()).unwrap();
        assert_eq!(gpu.download(&gpu.embed(&tg, &ids).unwrap()).unwrap(), want, "embed ({act:?})");
        assert!(gpu.embed(&tg, &[300]).is_err(), "a token past the vocabulary is an error");
    }
}

/// `Backend::mla_prep` as the trait's default runs it: the split, then each op.
fn prep_apart(
    b: &CudaBackend,
    proj: &<CudaBackend as Backend>::Tensor,
    p: &MlaPrep<'_, <CudaBackend as Backend>::Vector>,
    inv_freq: &[f32],
    rows: &[Row],
) -> Vec<Vec<f32>> {
    let widths: Vec<usize> =
        [p.q_a.map(|q| q.0), Some(p.latent.0), Some(p.rope), p.index_key.map(|k| k.0), p.index_weights.map(|w| w.0)]
            .into_iter()
            .flatten()
            .collect();
    let mut parts = b.split_columns(proj, &widths).unwrap().into_iter();
    let mut out = Vec::new();
    if let Some((_, w)) = p.q_a {
        out.push(b.download(&b.rms_norm(&parts.next().unwrap(), w, p.eps).unwrap()).unwrap());
    }
    out.push(b.download(&b.rms_norm(&parts.next().unwrap(), p.latent.1, p.eps).unwrap()).unwrap());
    let mut k_pe = parts.next().unwrap();
    b.rope(&mut k_pe, RopeSpec::k_pe(p.rope), inv_freq, rows).unwrap();
    out.push(b.download(&k_pe).unwrap());
    if let Some((dim, w, bias)) = p.index_key {
        let mut k = b.layer_norm(&parts.next().unwrap(), w, bias, INDEXER_NORM_EPS).unwrap();
        b.rope(&mut k, RopeSpec::indexer(1, dim), inv_freq, rows).unwrap();
        out.push(b.download(&k).unwrap());
    }
    if let Some((_, s)) = p.index_weights {
        let mut w = parts.next().unwrap();
        b.scale(&mut w, s).unwrap();
        out.push(b.download(&w).unwrap());
    }
    out
}

fn prepped<B: Backend>(b: &B, p: MlaPrepped<B::Tensor>) -> Vec<Vec<f32>> {
    [p.q_a, Some(p.latent), Some(p.k_pe), p.index_key, p.index_weights]
        .into_iter()
        .flatten()
        .map(|t| b.download(&t).unwrap())
        .collect()
}

#[test]
fn mla_prep_gives_what_the_ops_apart_give() {
    if no_gpu() {
        return;
    }
    let cpu = CpuBackend::F32;
    let mut rng = Rng::new(23);
    for (act, gpu) in backends() {
        // The real model's parts (q_lora 1536, kv_lora 512, qk_rope 64, indexer head_dim 128 and 64 head weights),
        // the same without the head weights, V3 without q LoRA or indexer, and odd widths with fewer rope pairs
        // than columns.
        for (q_a, lora, rope, idx, iw, half, rows) in [
            (1536usize, 512usize, 64usize, 128usize, 64usize, 32usize, 1usize),
            (1536, 512, 64, 128, 0, 32, 5),
            (1536, 512, 64, 128, 64, 32, 5),
            (0, 512, 64, 0, 0, 32, 3),
            (24, 40, 18, 20, 6, 8, 2),
        ] {
            let total = q_a + lora + rope + idx + iw;
            let index_weights = (iw > 0).then_some((iw, (iw as f32).powf(-0.5)));
            let x = values(&mut rng, rows * total, 3.0);
            // (An absent part's vectors have one value: an empty device allocation is an error, and none is read.)
            let (qw, lw) = (values(&mut rng, q_a.max(1), 1.0), values(&mut rng, lora, 1.0));
            let (kw, kb) = (values(&mut rng, idx.max(1), 1.0), values(&mut rng, idx.max(1), 0.5));
            let inv_freq: Vec<f32> = (0..half).map(|i| 10000f32.powf(-(i as f32) / half as f32)).collect();
            let r: Vec<Row> = (0..rows).map(|i| Row { seq: 1, pos: i * 13_000 + 5 }).collect();
            let what = format!("mla_prep {q_a}+{lora}+{rope}+{idx}+{iw} x {rows} ({act:?})");
            let run = |cpu_side: bool| -> Vec<Vec<f32>> {
                let [qv, lv, kwv, kbv] = [&qw, &lw, &kw, &kb]
                    .map(|v| (cpu.load_vector(v.clone()).unwrap(), gpu.load_vector(v.clone()).unwrap()));
                if cpu_side {
                    let p = MlaPrep {
                        q_a: (q_a > 0).then_some((q_a, &qv.0)),
                        latent: (lora, &lv.0),
                        rope,
                        index_key: (idx > 0).then_some((idx, &kwv.0, &kbv.0)),
                        index_weights,
                        eps: 1e-6,
                    };
                    return prepped(&cpu, cpu.mla_prep(&up(&cpu, rows, total, &x), &p, &inv_freq, &r).unwrap());
                }
                let p = MlaPrep {
                    q_a: (q_a > 0).then_some((q_a, &qv.1)),
                    latent: (lora, &lv.1),
                    rope,
                    index_key: (idx > 0).then_some((idx, &kwv.1, &kbv.1)),
                    index_weights,
                    eps: 1e-6,
                };
                let proj = up(&gpu, rows, total, &x);
                let fused = prepped(&gpu, gpu.mla_prep(&proj, &p, &inv_freq, &r).unwrap());
                assert_eq!(fused, prep_apart(&gpu, &proj, &p, &inv_freq, &r), "{what}: fused vs apart");
                let wrong = up(&gpu, rows, total + 1, &values(&mut Rng::new(1), rows * (total + 1), 1.0));
                assert!(gpu.mla_prep(&wrong, &p, &inv_freq, &r).is_err(), "{what}: a projection of the wrong width");
                assert!(gpu.mla_prep(&proj, &p, &inv_freq, &r[1..]).is_err(), "{what}: fewer positions than rows");
                fused
            };
            let (got, want) = (run(false), run(true));
            for (g, w) in got.iter().zip(&want) {
                check(&what, act, g, w, 1e-4);
            }
        }
    }
}

#[test]
fn linears_match_the_cpu() {
    if no_gpu() {
        return;
    }
    let cpu = CpuBackend::F32;
    let mut rng = Rng::new(22);
    // (in, out, weight) — dense, every bit width, and the real shapes; rows on both sides of the 16-row GEMV.
    let cases: Vec<(usize, usize, u32, i64)> = vec![
        (96, 80, 0, 0),
        (100, 40, 0, 0),
        (7168, 256, 0, 0),
        (256, 96, 2, 128),
        (256, 96, 3, 64),
        (512, 128, 4, 128),
        (256, 64, 8, 64),
        (7168, 2048, 3, 128),
        (2048, 7168, 3, 128),
        (7168, 576, 3, 128),
    ];
    for (act, gpu) in backends() {
        for &(k, n, bits, group) in &cases {
            let w = if bits == 0 { dense(&mut rng, n, k) } else { gptq(&mut rng, k, n, bits, group) };
            let (wc, wg) = (cpu.load_linear(w.clone()).unwrap(), gpu.load_linear(w).unwrap());
            for rows in [1usize, 3, 16, 37] {
                let x = values(&mut rng, rows * k, 1.0);
                let want = cpu.download(&cpu.linear(&up(&cpu, rows, k, &x), &wc).unwrap()).unwrap();
                let got = gpu.download(&gpu.linear(&up(&gpu, rows, k, &x), &wg).unwrap()).unwrap();
                check(&format!("linear {k}->{n} w{bits} g{group} rows {rows}"), act, &got, &want, 1e-4);
            }
            assert!(gpu.linear(&up(&gpu, 1, k + 1, &vec![0.0; k + 1]), &wg).is_err(), "a wrong width is an error");
        }
    }
}

fn router_dims(n_experts: usize, top_k: usize, n_group: usize, topk_group: usize) -> RouterDims {
    RouterDims { n_experts, top_k, n_group, topk_group, norm_topk_prob: true, scaling: 2.5 }
}

#[test]
fn the_router_matches_the_cpu() {
    if no_gpu() {
        return;
    }
    let cpu = CpuBackend::F32;
    let mut rng = Rng::new(23);
    for (act, gpu) in backends() {
        for (hidden, dims) in
            [(64, router_dims(16, 4, 4, 2)), (7168, router_dims(256, 8, 8, 4)), (7168, router_dims(128, 8, 8, 4))]
        {
            let gate = dense(&mut rng, dims.n_experts, hidden);
            let bias = values(&mut rng, dims.n_experts, 0.01);
            let (gc, gg) = (cpu.load_linear(gate.clone()).unwrap(), gpu.load_linear(gate).unwrap());
            let (bc, bg) = (cpu.load_vector(bias.clone()).unwrap(), gpu.load_vector(bias).unwrap());
            let rows = 9;
            let x = values(&mut rng, rows * hidden, 1.0);
            let want = cpu.route(&up(&cpu, rows, hidden, &x), &gc, &bc, &dims).unwrap();
            let got = gpu.routes_to_host(&gpu.route(&up(&gpu, rows, hidden, &x), &gg, &bg, &dims).unwrap()).unwrap();
            // The logits are f32 sums of the same bf16 inputs: the same experts, the weights to f32 precision.
            assert_eq!(got.experts, want.experts, "router {} experts ({act:?})", dims.n_experts);
            check(&format!("router weights {}", dims.n_experts), ActDtype::F32, &got.weights, &want.weights, 1e-5);
            // One row takes the fused launch (router_route): what the 9-row launches gave that row, bit for bit.
            let k = dims.top_k;
            for r in [0, 4, 8] {
                let one = up(&gpu, 1, hidden, &x[r * hidden..(r + 1) * hidden]);
                let row = gpu.routes_to_host(&gpu.route(&one, &gg, &bg, &dims).unwrap()).unwrap();
                assert_eq!(row.experts, got.experts[r * k..(r + 1) * k], "router row {r} alone ({act:?})");
                assert_eq!(row.weights, got.weights[r * k..(r + 1) * k], "router row {r} alone ({act:?})");
            }
            // A layer's residual add and post-attention norm with the router (one launch at one row,
            // add_norm_route): what add_rms_norm and then route give, bit for bit — the residual, the normed row and
            // the routing.
            let norm = gpu.load_vector(values(&mut rng, hidden, 1.0)).unwrap();
            let bits = |t: &<CudaBackend as Backend>::Tensor| -> Vec<u32> {
                gpu.download(t).unwrap().iter().map(|v| v.to_bits()).collect()
            };
            for r in [0, 8] {
                let (h, a) = (&x[r * hidden..(r + 1) * hidden], &x[(8 - r) * hidden..(9 - r) * hidden]);
                let (mut fused_h, mut apart_h, ag) =
                    (up(&gpu, 1, hidden, h), up(&gpu, 1, hidden, h), up(&gpu, 1, hidden, a));
                let (fused, fused_r) = gpu.add_rms_norm_route(&mut fused_h, &ag, &norm, 1e-6, &gg, &bg, &dims).unwrap();
                gpu.gpu.set_apart(&[Apart::NormRoute]);
                let (apart, apart_r) = gpu.add_rms_norm_route(&mut apart_h, &ag, &norm, 1e-6, &gg, &bg, &dims).unwrap();
                gpu.gpu.set_apart(&[]);
                let what = format!("add_rms_norm_route {hidden} x {} row {r} ({act:?})", dims.n_experts);
                assert_eq!(bits(&fused_h), bits(&apart_h), "{what}: the residual");
                assert_eq!(bits(&fused), bits(&apart), "{what}: the normed row");
                let (fr, ar) = (gpu.routes_to_host(&fused_r).unwrap(), gpu.routes_to_host(&apart_r).unwrap());
                assert_eq!(fr.experts, ar.experts, "{what}: experts");
                let wbits = |w: &[f32]| w.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(wbits(&fr.weights), wbits(&ar.weights), "{what}: weights");
            }
        }
    }
}

#[test]
fn grouped_experts_match_the_cpu() {
    if no_gpu() {
        return;
    }
    let cpu = CpuBackend::F32;
    let mut rng = Rng::new(24);
    // (experts, hidden, inter, bits, top_k, act order, all symmetric): small shapes of every bit width, the real
    // dims, experts of which some gather x through a row order of K (the launches' `_perm` kernels: each block
    // takes its expert's way), and experts every one symmetric (the `_sym` kernels; elsewhere every third is).
    for (count, hidden, inter, bits, top_k, ordered, all_sym) in [
        (8usize, 256usize, 128usize, 3u32, 2usize, false, false),
        (6, 256, 256, 2, 3, false, false),
        (6, 384, 128, 4, 2, false, false),
        (8, 7168, 2048, 3, 4, false, false),
        (8, 256, 256, 3, 3, true, false),
        (8, 256, 256, 3, 3, false, true),
        (8, 7168, 2048, 3, 4, false, true), // the real dims, every expert symmetric (the `_sym` kernels)
    ] {
        let sym = |i: usize| all_sym || i % 3 == 1;
        let hs = host_experts_ordered(&mut rng, count, (hidden, inter, bits), |i| ordered && i % 3 != 2, sym);
        // A shared expert in the routed experts' format (it joins the grouped launches) and in another bit width
        // (it runs on its own and is added); symmetric with the routed ones when those all are.
        let other = if bits == 4 { 3 } else { 4 };
        let shared = [(hidden, inter, bits), (hidden, inter, other)]
            .map(|dims| host_experts_ordered(&mut rng, 1, dims, |_| false, sym));
        // All held, and a slice holding half (the other half's slots are skipped).
        for half in [false, true] {
            let held = |i: usize| !half || i.is_multiple_of(2);
            let ec = load(&cpu, &hs, held);
            let sc: Vec<_> = shared.iter().map(|s| load_one(&cpu, &s[0])).collect();
            // Inputs and the CPU's answers (alone, then with each shared expert) once, for both device backends:
            // the reference at the real dims is most of this test's time.
            // Rows 5 (small shapes): row 0 names its first expert twice, which the device plan places by its scan
            // instead of the rows' masks (experts_plan); the CPU adds the expert twice, weighted by each slot.
            let dup = hidden <= 384;
            let cases: Vec<_> = [1usize, 4, 16, 21, 40, 70, 5]
                .into_iter()
                .filter(|&rows| rows != 5 || dup)
                .map(|rows| {
                    let mut r = random_routing(&mut rng, rows, count, top_k);
                    if rows == 5 {
                        r.experts[1] = r.experts[0];
                    }
                    let x = values(&mut rng, rows * hidden, 1.0);
                    let xc = up(&cpu, rows, hidden, &x);
                    let mut want = vec![cpu.download(&cpu.experts(&xc, &ec, &r).unwrap()).unwrap()];
                    for s in &sc {
                        want.push(cpu.download(&cpu.experts_with_shared(&xc, &ec, s, &r).unwrap()).unwrap());
                    }
                    (rows, r, x, want)
                })
                .collect();
            let shape = format!("experts {count}x{hidden}x{inter} w{bits} top{top_k}");
            for (act, gpu) in backends() {
                let eg = load(&gpu, &hs, held);
                let sg: Vec<_> = shared.iter().map(|s| load_one(&gpu, &s[0])).collect();
                for (rows, r, x, want) in &cases {
                    let xg = up(&gpu, *rows, hidden, x);
                    let routes = GpuRoutes::from_host(&gpu, r, count).unwrap();
                    // Over 8 rows: the `_xs` kernels (sums of x by the plan and SiLU), then the loops' own sums; one
                    // row: also with the plan, with the down launch's warps over quarters of K, and as two launches
                    // (the usual one row with the shared expert in the launch: gptq_mma_moe_row, whose sums must be
                    // the two launches' bit for bit).
                    let aparts: &[&[Apart]] = match rows {
                        9.. => &[&[], &[Apart::LoopSums]],
                        1 => &[&[], &[Apart::Plan], &[Apart::QuarterK], &[Apart::MoeSplit]],
                        _ => &[&[]],
                    };
                    let mut first_shared: Option<Vec<u32>> = None;
                    for &apart in aparts {
                        gpu.gpu.set_apart(apart);
                        let got = gpu.download(&gpu.experts(&xg, &eg, &routes).unwrap()).unwrap();
                        let what =
                            format!("{shape} act_order {ordered} sym {all_sym} rows {rows} half {half} {apart:?}");
                        check(&what, act, &got, &want[0], 1e-4);
                        for (i, s_gpu) in sg.iter().enumerate() {
                            let y = gpu.experts_with_shared(&xg, &eg, s_gpu, &routes).unwrap();
                            let yh = gpu.download(&y).unwrap();
                            if i == 0 && (apart.is_empty() || apart == [Apart::MoeSplit]) {
                                let bits: Vec<u32> = yh.iter().map(|v| v.to_bits()).collect();
                                match &first_shared {
                                    None => first_shared = Some(bits),
                                    Some(one) => assert!(one == &bits, "{what}: one launch and two differ"),
                                }
                            }
                            check(&format!("{what} + shared expert {i}"), act, &yh, &want[i + 1], 1e-4);
                            if *rows == 1 {
                                added_in_the_combine(&gpu, &mut rng, (&xg, &eg, s_gpu, &routes), &y, &what, i == 0);
                            }
                        }
                    }
                    gpu.gpu.set_apart(&[]);
                }
            }
        }
    }
}

/// One row's MoE output added into a residual by the grouped down launch's combine (`Gpu::input_norm`,
/// `FUSE_COMBINE_ADD`): the bits `add_assign` of the output `y` leaves, or the output itself where the backend does
/// not add it. Taken at DeepSeek's hidden size with the shared expert in the routed experts' format on bf16.
fn added_in_the_combine(
    gpu: &CudaBackend,
    rng: &mut Rng,
    (x, experts, shared, routes): (&GpuTensor, &GpuExperts, &ExpertWeights<CudaBackend>, &GpuRoutes),
    y: &GpuTensor,
    what: &str,
    same_format: bool,
) {
    let bits = |t: &GpuTensor| -> Vec<u32> { gpu.download(t).unwrap().iter().map(|v| v.to_bits()).collect() };
    let h0 = values(rng, x.cols, 2.0);
    let mut want = up(gpu, 1, x.cols, &h0);
    gpu.add_assign(&mut want, y).unwrap();
    let mut h = up(gpu, 1, x.cols, &h0);
    let rest = gpu.experts_with_shared_into(&mut h, x, experts, shared, routes).unwrap();
    let added = match rest {
        None => {
            assert_eq!(bits(&h), bits(&want), "{what}: the residual with the output added in the combine");
            true
        }
        Some(y2) => {
            assert_eq!(bits(&y2), bits(y), "{what}: the output, not added");
            assert_eq!(bits(&h), bits(&up(gpu, 1, x.cols, &h0)), "{what}: the residual, left alone");
            false
        }
    };
    let real = x.cols == 7168 && same_format && x.data.dtype() == ActDtype::Bf16;
    assert!(added || !real, "{what}: not added in the combine");
}

/// `./device_ops --ignored bench_experts --nocapture` on the GPU machine: one MoE layer's routed experts at the
/// real dims (hidden 7168, moe_intermediate 2048, 3-bit g128), top-8 of 32 distinct experts per step (so the
/// weights come from DRAM), batch 1/4/16, next to the streaming-read ceiling measured in the same run.
#[test]
#[ignore = "benchmark: run on the GPU machine"]
fn bench_experts() {
    if no_gpu() {
        return;
    }
    let gpu = CudaBackend::new(0).expect("cuda:0");
    let g = gpu.gpu.clone();
    let (ceiling, _) = read_ceiling_gbps(&g);
    let (count, hidden, inter, top_k) = (32usize, 7168usize, 2048usize, 8usize);
    let mut rng = Rng::new(31);
    let one = host_experts(&mut rng, 1, hidden, inter, 3);
    let hs: Vec<[HostLinear; 3]> = (0..count).map(|_| one[0].clone()).collect();
    let experts = load(&gpu, &hs, |_| true);
    let per_expert = match &one[0][0] {
        HostLinear::Gptq(w) => {
            3 * (w.layout().in_features * w.layout().out_features * 3 / 8
                + w.layout().n_groups() * w.layout().out_features * 2 * 2)
        }
        HostLinear::Dense { .. } => 0,
    };
    println!("{} — streaming read ceiling {ceiling:.0} GB/s", g.describe());
    println!(
        "{:<34} {:>5} {:>9} {:>9} {:>9} {:>8}",
        "routed experts (3-bit g128)", "batch", "MB", "us", "GB/s", "ceiling"
    );
    let mut rows_json = vec![format!("{{\"op\":\"stream_read\",\"gbps\":{ceiling:.1}}}")];
    for batch in [1usize, 4, 16] {
        let routes: Vec<GpuRoutes> = (0..8)
            .map(|_| GpuRoutes::from_host(&gpu, &random_routing(&mut rng, batch, count, top_k), count).unwrap())
            .collect();
        let distinct = |r: &GpuRoutes| {
            let mut e = gpu.routes_to_host(r).unwrap().experts;
            e.sort_unstable();
            e.dedup();
            e.len()
        };
        let avg_experts = routes.iter().map(distinct).sum::<usize>() as f64 / routes.len() as f64;
        let x = up(&gpu, batch, hidden, &values(&mut rng, batch * hidden, 1.0));
        let secs = time(&g, 24, &mut |i| {
            gpu.experts(&x, &experts, &routes[i % routes.len()]).expect("experts");
        });
        let bytes = avg_experts * per_expert as f64;
        let gbps = bytes / secs / 1e9;
        println!(
            "{:<34} {batch:>5} {:>9.1} {:>9.1} {gbps:>9.0} {:>7.0}%",
            format!("top-{top_k} of {count}, {avg_experts:.1} distinct"),
            bytes / 1e6,
            secs * 1e6,
            100.0 * gbps / ceiling
        );
        rows_json.push(format!("{{\"op\":\"routed_experts\",\"batch\":{batch},\"experts\":{avg_experts:.2},\"bytes\":{bytes:.0},\"seconds\":{secs:e},\"gbps\":{gbps:.1},\"ceiling_gbps\":{ceiling:.1}}}"));
    }
    if let Ok(path) = std::env::var("PIPEMOE_BENCH_OUT") {
        std::fs::write(path, format!("[{}]\n", rows_json.join(",\n"))).expect("write bench JSON");
    }
}
