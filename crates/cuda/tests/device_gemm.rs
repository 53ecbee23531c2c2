//! Device tests of the prefill GEMM (kernels/gptq_gemm.cu) against the CPU reference, and its benchmark next to
//! cuBLAS. Skipped, with the reason printed, where there is no GPU; run on the GPU machine as docs/CUDA.md says.
//!
//! Tolerance. The kernel rounds each weight (q − z)·s to bf16 (x is bf16 already) and sums the products in f32 on
//! the tensor cores. Two references, both with f32 sums:
//! - `exact`: the f32 weights of `GptqWeight::dequantize()`. Rounding to bf16 (8 significant bits, to nearest)
//!   moves a weight by at most 2^-8 of itself, spread evenly within that, so by an RMS ≤ 2^-8/√3 ≈ 2.3e-3; with
//!   random, independent x and W the relative L2 of y moves by that RMS. Allowed: 4e-3 with f32 output. A bf16
//!   output is one more rounding of at most 2^-8 per element (RMS ≤ 2.3e-3 again): 6e-3. A wrong bit, zero,
//!   scale, group or row order moves y by ≥ 1e-2 (a 32nd of the weights wrong is already ~0.2).
//! - `rounded`: those weights rounded to bf16 on the host as the kernel does (the f32 product (q − z)·s is exact,
//!   so both round the same value). What remains is summation order and the tensor cores' f32 accumulation,
//!   which truncates instead of rounding (≲ 1e-4 over K = 16384): allowed 5e-4, plus 2^-8 for a bf16 output.
//!
//! The same GEMM over weights in the tensor-core (Mma) layout (`mma_gemm_*` tests) is exact in its weights: it
//! multiplies bf16 x by q − z (small integers, exact in bf16) and applies each group's scale in f32 to an f32
//! chunk sum, so against the `exact` reference only summation order remains (f32 sums over ≤ 16384 products,
//! each side ≲ 1e-5 relative): allowed 1e-4 with f32 output, and 1e-4 + 2^-8 with bf16 output (rounding to
//! nearest moves each element by at most 2^-8 of itself, a hard bound on the relative L2). The checkpoint-packing
//! kernel's bf16 weights alone miss 1e-4 by an order of magnitude (≈ 1.7e-3), so the f32 case tells them apart.
//!
//! NaN anywhere fails (`rel_l2`), and y starts as NaN so an element the kernel never writes fails too.

mod common;

use common::*;
use half::bf16;
use pipemoe_cuda::gemv::Packing;
use pipemoe_cuda::{Act, ActDtype, GemmTile, Gpu, GpuGptq};
use pipemoe_quant::GptqWeight;

/// One GEMM shape: `y [m, n] = x [m, k] · Wᵀ`, W `bits`-bit with `group` (-1: one group), and where x starts in
/// its buffer (an offset that is not a multiple of 8 bf16 takes the kernel's realigning copy).
struct Case {
    k: usize,
    n: usize,
    bits: u32,
    group: i64,
    act_order: bool,
    m: usize,
    x_offset: usize,
}

const fn case(k: usize, n: usize, bits: u32, group: i64, act_order: bool, m: usize) -> Case {
    Case { k, n, bits, group, act_order, m, x_offset: 0 }
}

/// `Σ_i a[i]·b[i]` in f32 with eight partial sums (vectorizable; k is a multiple of 32).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l];
        }
    }
    acc.iter().sum()
}

/// y `[m, n]` = x `[m, k]` · wᵀ (`w` `[n, k]`) in f32, rows spread over the cores.
fn matmul(w: &[f32], x: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let rows = m.div_ceil(threads);
    std::thread::scope(|s| {
        for (i, yc) in y.chunks_mut(rows * n).enumerate() {
            s.spawn(move || {
                for (r, yr) in yc.chunks_mut(n).enumerate() {
                    let xr = &x[(i * rows + r) * k..][..k];
                    for (j, v) in yr.iter_mut().enumerate() {
                        *v = dot(xr, &w[j * k..][..k]);
                    }
                }
            });
        }
    });
    y
}

/// `(exact, rounded)`: y `[m, n]` with the f32 weights and with them rounded to bf16.
fn references(w: &GptqWeight, x: &[f32], m: usize) -> (Vec<f32>, Vec<f32>) {
    let (k, n) = (w.layout().in_features, w.layout().out_features);
    let exact_w = w.dequantize(); // [n, k]
    let rounded_w: Vec<f32> = exact_w.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    (matmul(&exact_w, x, m, k, n), matmul(&rounded_w, x, m, k, n))
}

/// Runs one case through both tile heights, the automatic choice and both output dtypes; asserts the tolerances.
fn check(gpu: &Gpu, rng: &mut Rng, c: &Case, sym: bool) {
    let w = weight_with_zeros(rng, (c.k, c.n, c.bits, c.group, c.act_order), sym);
    let x: Vec<f32> = (0..c.m * c.k).map(|_| bf16::from_f32(rng.uniform() * 2.0 - 1.0).to_f32()).collect();
    let (exact, rounded) = references(&w, &x, c.m);
    let g = GpuGptq::upload(gpu, &w).expect("upload");
    let mut host = vec![0f32; c.x_offset];
    host.extend_from_slice(&x);
    let xd = Act::from_f32(gpu, ActDtype::Bf16, &host).expect("x");
    let label = format!(
        "{}x{} w{} g{} act_order={} m {} x_offset {} sym={sym}",
        c.k, c.n, c.bits, c.group, c.act_order, c.m, c.x_offset
    );
    assert_eq!(g.symmetric(), sym, "{label}: symmetric zeros detected at upload");
    each_output(gpu, &g, c, &xd, &label, &mut |dtype, tile, got| {
        let (e_exact, e_rounded) = (rel_l2(got, &exact), rel_l2(got, &rounded));
        let (tol_exact, tol_rounded) = match dtype {
            ActDtype::F32 => (4e-3, 5e-4),
            ActDtype::Bf16 => (6e-3, 5e-4 + 2f64.powi(-8)),
        };
        eprintln!(
            "gemm {label} {tile} → {}: rel L2 {e_exact:.2e} (f32 weights), {e_rounded:.2e} (bf16 weights)",
            dtype.suffix()
        );
        assert!(e_exact <= tol_exact, "{label} {tile} {dtype:?}: rel L2 {e_exact:e} vs f32 weights");
        assert!(e_rounded <= tol_rounded, "{label} {tile} {dtype:?}: rel L2 {e_rounded:e} vs bf16 weights");
    });
}

/// Runs the GEMM of `g` on `xd` (from `c.x_offset`) into f32 and bf16 outputs, with each tile height and the
/// automatic choice, and hands each result (widened to f32) to `check` with the output dtype and tile name.
/// Outputs start as NaN, so an element the kernel does not write fails.
fn each_output(gpu: &Gpu, g: &GpuGptq, c: &Case, xd: &Act, label: &str, check: &mut dyn FnMut(ActDtype, &str, &[f32])) {
    // The 32-row tile is the tensor-core layout's alone.
    let mut tiles = vec![Some(GemmTile::M64), Some(GemmTile::M128), None];
    if g.packing == Packing::Mma {
        tiles.insert(0, Some(GemmTile::M32));
    }
    for dtype in [ActDtype::F32, ActDtype::Bf16] {
        for &tile in &tiles {
            let mut y = Act::from_f32(gpu, dtype, &vec![f32::NAN; c.m * c.n]).expect("y");
            {
                let xv = xd.view(c.x_offset, c.m * c.k);
                let mut yv = y.view_mut(0, c.m * c.n);
                match tile {
                    Some(t) => g.gemm_tiled(gpu, &xv, c.m, &mut yv, t),
                    None => g.gemm(gpu, &xv, c.m, &mut yv),
                }
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            }
            let got = y.to_f32(gpu, c.m * c.n).expect("download");
            let tile = tile.map_or_else(|| format!("auto {:?}", g.gemm_tile(gpu, c.m)), |t| format!("{t:?}"));
            check(dtype, &tile, &got);
        }
    }
}

#[test]
fn gptq_gemm_matches_the_cpu_reference() {
    if no_gpu() {
        return;
    }
    let gpu = Gpu::open(0).expect("gpu");
    eprintln!("{}", gpu.describe());
    let mut rng = Rng::new(17);
    // Every bit width, act-order g_idx, group -1/32/64/128, m 1/17/100/512, n that is no multiple of the
    // 128-column tile (GPTQ packs zeros by 32 columns, so n is always a multiple of 32), K not a multiple of 64.
    let cases = [
        case(256, 96, 3, 128, false, 1),
        Case { x_offset: 4, ..case(256, 160, 2, 32, false, 17) },
        case(512, 224, 4, 64, true, 100),
        case(256, 96, 8, 128, false, 512),
        case(512, 128, 3, -1, false, 17),
        case(1024, 544, 4, 32, true, 100),
        case(320, 32, 3, 64, false, 100),
        Case { x_offset: 3, ..case(384, 96, 3, 32, true, 17) },
        case(256, 256, 2, 64, true, 512),
        Case { x_offset: 8, ..case(512, 416, 8, -1, false, 100) },
        case(768, 160, 3, 128, false, 512),
        case(2048, 64, 8, 32, true, 1),
    ];
    // Each with random zeros, then symmetric (no zeros uploaded: the kernel takes the constant).
    for c in &cases {
        check(&gpu, &mut rng, c, false);
        check(&gpu, &mut rng, c, true);
    }
}

#[test]
fn gptq_gemm_at_the_real_shapes() {
    if no_gpu() {
        return;
    }
    let gpu = Gpu::open(0).expect("gpu");
    let mut rng = Rng::new(23);
    // MODEL_SPEC §6 at m = 256: expert gate/up, expert down, o_proj, q_b_proj (3-bit, group 128).
    for (k, n) in [(7168, 2048), (2048, 7168), (16384, 7168), (1536, 24576)] {
        check(&gpu, &mut rng, &case(k, n, 3, 128, false, 256), true);
    }
}

#[test]
fn gptq_gemm_wants_bf16_input() {
    if no_gpu() {
        return;
    }
    let gpu = Gpu::open(0).expect("gpu");
    let mut rng = Rng::new(5);
    let g = GpuGptq::upload(&gpu, &random_weight(&mut rng, 256, 64, 4, 128, false)).expect("upload");
    let x = Act::zeros(&gpu, ActDtype::F32, 32 * 256).expect("x");
    let mut y = Act::zeros(&gpu, ActDtype::F32, 32 * 64).expect("y");
    let err = g.gemm(&gpu, &x.view(0, 32 * 256), 32, &mut y.view_mut(0, 32 * 64)).expect_err("f32 x accepted");
    assert!(err.to_string().contains("bf16"), "{err}");
    let xb = Act::zeros(&gpu, ActDtype::Bf16, 32 * 256).expect("x");
    let err = g.gemm(&gpu, &xb.view(0, 31 * 256), 32, &mut y.view_mut(0, 32 * 64)).expect_err("short x accepted");
    assert!(err.to_string().contains("32 rows"), "{err}");
}

/// One case over the weight in the tensor-core (Mma) layout: both tile heights and the automatic choice, both
/// output dtypes, against the exact reference (see the module doc for the tolerances).
fn check_mma(gpu: &Gpu, rng: &mut Rng, c: &Case, sym: bool) {
    let w = weight_with_zeros(rng, (c.k, c.n, c.bits, c.group, c.act_order), sym);
    let x: Vec<f32> = (0..c.m * c.k).map(|_| bf16::from_f32(rng.uniform() * 2.0 - 1.0).to_f32()).collect();
    let exact = matmul(&w.dequantize(), &x, c.m, c.k, c.n);
    let g = GpuGptq::upload_for_tensor_cores(gpu, &w).expect("upload");
    let label = format!(
        "mma {}x{} w{} g{} act_order={} m {} x_offset {} sym={sym}",
        c.k, c.n, c.bits, c.group, c.act_order, c.m, c.x_offset
    );
    assert_eq!(g.packing, Packing::Mma, "{label}: the shape should take the tensor-core layout");
    assert_eq!(g.symmetric(), sym, "{label}: symmetric zeros detected at upload");
    let mut host = vec![0f32; c.x_offset];
    host.extend_from_slice(&x);
    let xd = Act::from_f32(gpu, ActDtype::Bf16, &host).expect("x");
    each_output(gpu, &g, c, &xd, &label, &mut |dtype, tile, got| {
        let err = rel_l2(got, &exact);
        let tol = match dtype {
            ActDtype::F32 => 1e-4,
            ActDtype::Bf16 => 1e-4 + 2f64.powi(-8),
        };
        eprintln!("gemm {label} {tile} → {}: rel L2 {err:.2e} (exact weights)", dtype.suffix());
        assert!(err <= tol, "{label} {tile} {dtype:?}: rel L2 {err:e} vs exact weights (allowed {tol:e})");
    });
}

#[test]
fn mma_gemm_matches_the_cpu_reference() {
    if no_gpu() {
        return;
    }
    let gpu = Gpu::open(0).expect("gpu");
    let mut rng = Rng::new(31);
    // Bits 2/3/4, act-order g_idx, group 128/256/-1, m 17/32/33/100/512, n that is no multiple of the 128-column
    // block (down to one 16-column tile), an odd number of 128-row chunks, and a misaligned x (realigning copy).
    let cases = [
        case(256, 96, 3, 128, false, 17),
        case(512, 224, 4, 128, true, 100),
        case(384, 96, 2, 128, false, 512),
        case(1024, 288, 3, 256, true, 100),
        case(512, 128, 2, -1, false, 17),
        Case { x_offset: 4, ..case(768, 160, 4, 128, false, 100) },
        case(640, 352, 3, 128, true, 512),
        case(256, 256, 2, 128, true, 512),
        case(256, 32, 4, 128, false, 33),
        Case { x_offset: 3, ..case(384, 160, 3, 128, false, 17) },
        case(512, 224, 3, 128, false, 32),
    ];
    // Each with random zeros, then symmetric (the kernel takes the constant zero and reads none).
    for c in &cases {
        check_mma(&gpu, &mut rng, c, false);
        check_mma(&gpu, &mut rng, c, true);
    }
}

#[test]
fn mma_gemm_at_the_real_shapes() {
    if no_gpu() {
        return;
    }
    let gpu = Gpu::open(0).expect("gpu");
    let mut rng = Rng::new(37);
    // MODEL_SPEC §6 at m = 256, 3-bit group 128: expert gate/up, 7168 → 4096 and → 7168, expert down, o_proj.
    for (k, n) in [(7168, 2048), (7168, 4096), (7168, 7168), (2048, 7168), (16384, 7168)] {
        check_mma(&gpu, &mut rng, &case(k, n, 3, 128, false, 256), false);
    }
    // o_proj at 32 decode streams: the 32-row tile, its K split in whole waves.
    check_mma(&gpu, &mut rng, &case(16384, 7168, 3, 128, false, 32), true);
}

/// `PIPEMOE_BENCH_OUT=… device_gemm --ignored bench_gemm --nocapture` on the GPU machine: the GEMM (3-bit,
/// group 128, bf16 out) at prefill shapes over both packings (checkpoint: `gptq`, tensor-core layout: `mma`) with
/// both tile heights, in TFLOP/s next to cuBLAS's bf16 GEMM on the same shape (dense bf16 weights, f32 compute)
/// measured in the same run: the ceiling. `gemv16` is what prefill over the Mma layout ran before its GEMM: the
/// mma GEMV 16 rows at a time.
#[test]
#[ignore = "benchmark: run on the GPU machine"]
fn bench_gemm() {
    use cudarc::cublas::Gemm;
    if no_gpu() {
        return;
    }
    let gpu = Gpu::open(0).expect("gpu");
    let s = gpu.stream.clone();
    let blas = pipemoe_cuda::timing::cublas(&gpu);
    if let Err(why) = &blas {
        eprintln!("no cuBLAS ceiling: {why}");
    }
    println!("{}", gpu.describe());
    for kernel in ["gptq_gemm", "gptq_mma_gemm"] {
        for tile in ["m64", "m128"] {
            let name = format!("{kernel}_w3_{tile}_bf16");
            let f = gpu.function(&name).expect("kernel");
            let (regs, local) = (f.num_regs().unwrap_or(-1), f.local_size_bytes().unwrap_or(-1));
            println!("{name}: {regs} registers, {local} bytes of local memory per thread");
        }
    }
    println!("TFLOP/s (µs per call for the best mma tile)");
    println!(
        "{:<26} {:>5} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>5} {:>8} {:>7}",
        "shape (3-bit g128)",
        "m",
        "gptq64",
        "gptq128",
        "mma64",
        "mma128",
        "mma us",
        "gemv16",
        "auto",
        "cuBLAS",
        "mma %"
    );
    let mut rows = Vec::new();
    let mut rng = Rng::new(29);
    let ms = [256usize, 512, 1024, 2048, 4096];
    let m_max = ms[ms.len() - 1];
    for (name, k, n) in [
        ("expert gate/up 7168→2048", 7168, 2048),
        ("7168→4096", 7168, 4096),
        ("7168→7168", 7168, 7168),
        ("expert down 2048→7168", 2048, 7168),
        ("o_proj 16384→7168", 16384, 7168),
    ] {
        let w = random_weight(&mut rng, k, n, 3, 128, false);
        let g = GpuGptq::upload(&gpu, &w).expect("upload");
        let gm = GpuGptq::upload_for_tensor_cores(&gpu, &w).expect("upload");
        assert_eq!(gm.packing, Packing::Mma);
        let random = |rng: &mut Rng, len: usize| -> Vec<bf16> {
            (0..len).map(|_| bf16::from_f32(rng.uniform() * 2.0 - 1.0)).collect()
        };
        let x = s.clone_htod(&random(&mut rng, m_max * k)).expect("x");
        let dense = s.clone_htod(&random(&mut rng, n * k)).expect("dense W"); // [n, k] for cuBLAS
        let mut y = s.alloc_zeros::<bf16>(m_max * n).expect("y");
        let mut partial = s.alloc_zeros::<f32>(gm.scratch_len(&gpu, 16)).expect("scratch");
        for m in ms {
            let flop = 2.0 * (m * n * k) as f64;
            let iters = (2e12 / flop).clamp(5.0, 50.0) as usize;
            let mut time_tile = |w: &GpuGptq, tile: GemmTile| -> f64 {
                time(&gpu, iters, &mut |_| {
                    let xv = pipemoe_cuda::ActView::Bf16(x.slice(0..m * k));
                    let mut yv = pipemoe_cuda::ActViewMut::Bf16(y.slice_mut(0..m * n));
                    w.gemm_tiled(&gpu, &xv, m, &mut yv, tile).expect("gemm");
                })
            };
            let t = [
                time_tile(&g, GemmTile::M64),
                time_tile(&g, GemmTile::M128),
                time_tile(&gm, GemmTile::M64),
                time_tile(&gm, GemmTile::M128),
            ];
            let gemv16 = time(&gpu, iters.div_ceil(4), &mut |_| {
                for r0 in (0..m).step_by(16) {
                    let xv = pipemoe_cuda::ActView::Bf16(x.slice(r0 * k..(r0 + 16) * k));
                    let mut yv = pipemoe_cuda::ActViewMut::Bf16(y.slice_mut(r0 * n..(r0 + 16) * n));
                    gm.gemv(&gpu, &xv, 16, &mut partial, &mut yv).expect("gemv");
                }
            });
            let auto = gm.gemm_tile(&gpu, m);
            let ceiling = blas.as_ref().ok().map(|blas| {
                let cfg = pipemoe_cuda::timing::linear_gemm(m, k, n);
                let secs = time(&gpu, iters, &mut |_| {
                    let xv = x.slice(0..m * k);
                    let mut yv = y.slice_mut(0..m * n);
                    // SAFETY: dense is [n, k], x holds m·k and y m·n elements, as the leading dimensions say.
                    unsafe { blas.gemm(cfg, &dense, &xv, &mut yv) }.expect("cublas gemm");
                });
                flop / secs / 1e12
            });
            let tf = t.map(|secs| flop / secs / 1e12);
            let (mma_best, mma_secs) = (tf[2].max(tf[3]), t[2].min(t[3]));
            let pct = ceiling.map_or("-".into(), |c| format!("{:.0}%", 100.0 * mma_best / c));
            println!(
                "{name:<26} {m:>5} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>8.1} {:>5} {:>8} {pct:>7}",
                tf[0],
                tf[1],
                tf[2],
                tf[3],
                mma_secs * 1e6,
                flop / gemv16 / 1e12,
                format!("m{}", auto.rows()),
                ceiling.map_or("-".into(), |c| format!("{c:.1}")),
            );
            let entry = |secs: f64| serde_json::json!({"seconds": secs, "tflops": flop / secs / 1e12});
            rows.push(serde_json::json!({
                "op": "gptq_gemm_w3_g128_bf16", "shape": name, "m": m, "k": k, "n": n,
                "gptq": {"m64": entry(t[0]), "m128": entry(t[1])},
                "mma": {"m64": entry(t[2]), "m128": entry(t[3]), "auto": format!("m{}", auto.rows())},
                "mma_gemv_16_rows": entry(gemv16),
                "cublas_bf16_tflops": ceiling,
            }));
        }
    }
    if let Ok(path) = std::env::var("PIPEMOE_BENCH_OUT") {
        let doc = serde_json::json!({ "device": gpu.describe(), "cublas": blas.as_ref().err(), "rows": rows });
        std::fs::write(path, serde_json::to_string_pretty(&doc).expect("json") + "\n").expect("write bench JSON");
    }
}
