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
//! NaN anywhere fails (`rel_l2`), and y starts as NaN so an element the kernel never writes fails too.

mod common;

use common::*;
use half::bf16;
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

/// `(exact, rounded)`: y `[m, n]` with the f32 weights and with them rounded to bf16, rows spread over the cores.
fn references(w: &GptqWeight, x: &[f32], m: usize) -> (Vec<f32>, Vec<f32>) {
    let (k, n) = (w.layout().in_features, w.layout().out_features);
    let exact_w = w.dequantize(); // [n, k]
    let rounded_w: Vec<f32> = exact_w.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    let mut exact = vec![0f32; m * n];
    let mut rounded = vec![0f32; m * n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let rows = m.div_ceil(threads);
    std::thread::scope(|s| {
        for (i, (ye, yr)) in exact.chunks_mut(rows * n).zip(rounded.chunks_mut(rows * n)).enumerate() {
            let (ew, rw) = (&exact_w, &rounded_w);
            s.spawn(move || {
                for (r, (ye, yr)) in ye.chunks_mut(n).zip(yr.chunks_mut(n)).enumerate() {
                    let xr = &x[(i * rows + r) * k..][..k];
                    for j in 0..n {
                        ye[j] = dot(xr, &ew[j * k..][..k]);
                        yr[j] = dot(xr, &rw[j * k..][..k]);
                    }
                }
            });
        }
    });
    (exact, rounded)
}

/// Runs one case through both tile heights, the automatic choice and both output dtypes; asserts the tolerances.
fn check(gpu: &Gpu, rng: &mut Rng, c: &Case) {
    let w = random_weight(rng, c.k, c.n, c.bits, c.group, c.act_order);
    let x: Vec<f32> = (0..c.m * c.k).map(|_| bf16::from_f32(rng.uniform() * 2.0 - 1.0).to_f32()).collect();
    let (exact, rounded) = references(&w, &x, c.m);
    let g = GpuGptq::upload(gpu, &w).expect("upload");
    let mut host = vec![0f32; c.x_offset];
    host.extend_from_slice(&x);
    let xd = Act::from_f32(gpu, ActDtype::Bf16, &host).expect("x");
    let label = format!(
        "{}x{} w{} g{} act_order={} m {} x_offset {}",
        c.k, c.n, c.bits, c.group, c.act_order, c.m, c.x_offset
    );
    for dtype in [ActDtype::F32, ActDtype::Bf16] {
        for tile in [Some(GemmTile::M64), Some(GemmTile::M128), None] {
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
            let (e_exact, e_rounded) = (rel_l2(&got, &exact), rel_l2(&got, &rounded));
            let (tol_exact, tol_rounded) = match dtype {
                ActDtype::F32 => (4e-3, 5e-4),
                ActDtype::Bf16 => (6e-3, 5e-4 + 2f64.powi(-8)),
            };
            let tile = tile.map_or_else(|| format!("auto {:?}", g.gemm_tile(gpu, c.m)), |t| format!("{t:?}"));
            eprintln!(
                "gemm {label} {tile} → {}: rel L2 {e_exact:.2e} (f32 weights), {e_rounded:.2e} (bf16 weights)",
                dtype.suffix()
            );
            assert!(e_exact <= tol_exact, "{label} {tile} {dtype:?}: rel L2 {e_exact:e} vs f32 weights");
            assert!(e_rounded <= tol_rounded, "{label} {tile} {dtype:?}: rel L2 {e_rounded:e} vs bf16 weights");
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
    for c in &cases {
        check(&gpu, &mut rng, c);
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
        check(&gpu, &mut rng, &case(k, n, 3, 128, false, 256));
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

/// Mean seconds per call of `f` over `iters` calls (after warm-up), timed with CUDA events on the GPU's stream.
fn seconds_per_call(gpu: &Gpu, iters: usize, f: &mut dyn FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let a = gpu.ctx.new_event(timing).expect("event");
    let b = gpu.ctx.new_event(timing).expect("event");
    a.record(&gpu.stream).expect("record");
    for _ in 0..iters {
        f();
    }
    b.record(&gpu.stream).expect("record");
    b.synchronize().expect("sync");
    a.elapsed_ms(&b).expect("elapsed") as f64 / iters as f64 * 1e-3
}

/// cuBLAS on the GPU's stream, or why not.
fn cublas(gpu: &Gpu) -> Result<cudarc::cublas::CudaBlas, String> {
    // SAFETY: only dlopens the library and checks a symbol.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err("libcublas.so was not found (put the CUDA toolkit's lib64 on LD_LIBRARY_PATH)".into());
    }
    cudarc::cublas::CudaBlas::new(gpu.stream.clone()).map_err(|e| format!("cublasCreate: {e:?}"))
}

/// `PIPEMOE_BENCH_OUT=… device_gemm --ignored bench_gemm --nocapture` on the GPU machine: the GEMM (3-bit,
/// group 128, bf16 out) at prefill shapes with both tile heights, in TFLOP/s next to cuBLAS's bf16 GEMM on the
/// same shape (dense bf16 weights, f32 compute) measured in the same run: the ceiling.
#[test]
#[ignore = "benchmark: run on the GPU machine"]
fn bench_gemm() {
    use cudarc::cublas::{Gemm, GemmConfig, sys::cublasOperation_t};
    if no_gpu() {
        return;
    }
    let gpu = Gpu::open(0).expect("gpu");
    let s = gpu.stream.clone();
    let blas = cublas(&gpu);
    if let Err(why) = &blas {
        eprintln!("no cuBLAS ceiling: {why}");
    }
    println!("{}", gpu.describe());
    for tile in ["m64", "m128"] {
        let f = gpu.function(&format!("gptq_gemm_w3_{tile}_bf16")).expect("kernel");
        let (regs, local) = (f.num_regs().unwrap_or(-1), f.local_size_bytes().unwrap_or(-1));
        println!("gptq_gemm_w3_{tile}_bf16: {regs} registers, {local} bytes of local memory per thread");
    }
    println!(
        "{:<26} {:>5} {:>9} {:>9} {:>9} {:>9} {:>5} {:>9} {:>7}",
        "shape (3-bit g128)", "m", "m64 us", "TFLOP/s", "m128 us", "TFLOP/s", "auto", "cuBLAS", "best %"
    );
    let mut rows = Vec::new();
    let mut rng = Rng::new(29);
    let ms = [512usize, 1024, 2048, 4096];
    let m_max = ms[ms.len() - 1];
    for (name, k, n) in [
        ("expert gate/up 7168→2048", 7168, 2048),
        ("7168→4096", 7168, 4096),
        ("7168→7168", 7168, 7168),
        ("expert down 2048→7168", 2048, 7168),
    ] {
        let g = GpuGptq::upload(&gpu, &random_weight(&mut rng, k, n, 3, 128, false)).expect("upload");
        let random = |rng: &mut Rng, len: usize| -> Vec<bf16> {
            (0..len).map(|_| bf16::from_f32(rng.uniform() * 2.0 - 1.0)).collect()
        };
        let x = s.clone_htod(&random(&mut rng, m_max * k)).expect("x");
        let dense = s.clone_htod(&random(&mut rng, n * k)).expect("dense W"); // [n, k] for cuBLAS
        let mut y = s.alloc_zeros::<bf16>(m_max * n).expect("y");
        for m in ms {
            let flop = 2.0 * (m * n * k) as f64;
            let iters = (2e12 / flop).clamp(5.0, 50.0) as usize;
            let mut time_tile = |tile: GemmTile| -> f64 {
                seconds_per_call(&gpu, iters, &mut || {
                    let xv = pipemoe_cuda::ActView::Bf16(x.slice(0..m * k));
                    let mut yv = pipemoe_cuda::ActViewMut::Bf16(y.slice_mut(0..m * n));
                    g.gemm_tiled(&gpu, &xv, m, &mut yv, tile).expect("gemm");
                })
            };
            let (t64, t128) = (time_tile(GemmTile::M64), time_tile(GemmTile::M128));
            let auto = g.gemm_tile(&gpu, m);
            let ceiling = blas.as_ref().ok().map(|blas| {
                // Row-major y [m, n] = x [m, k] · Wᵀ is column-major yᵀ = (W [k×n col-major])ᵀ · (x [k×m]).
                let cfg = GemmConfig {
                    transa: cublasOperation_t::CUBLAS_OP_T,
                    transb: cublasOperation_t::CUBLAS_OP_N,
                    m: n as i32,
                    n: m as i32,
                    k: k as i32,
                    alpha: bf16::ONE,
                    lda: k as i32,
                    ldb: k as i32,
                    beta: bf16::ZERO,
                    ldc: n as i32,
                };
                let secs = seconds_per_call(&gpu, iters, &mut || {
                    let xv = x.slice(0..m * k);
                    let mut yv = y.slice_mut(0..m * n);
                    // SAFETY: dense is [n, k], x holds m·k and y m·n elements, as the leading dimensions say.
                    unsafe { blas.gemm(cfg, &dense, &xv, &mut yv) }.expect("cublas gemm");
                });
                flop / secs / 1e12
            });
            let (tf64, tf128) = (flop / t64 / 1e12, flop / t128 / 1e12);
            let best = tf64.max(tf128);
            let pct = ceiling.map_or("-".into(), |c| format!("{:.0}%", 100.0 * best / c));
            println!(
                "{name:<26} {m:>5} {:>9.1} {tf64:>9.1} {:>9.1} {tf128:>9.1} {:>5} {:>9} {pct:>7}",
                t64 * 1e6,
                t128 * 1e6,
                format!("m{}", auto.rows()),
                ceiling.map_or("-".into(), |c| format!("{c:.1}")),
            );
            rows.push(serde_json::json!({
                "op": "gptq_gemm_w3_g128_bf16", "shape": name, "m": m, "k": k, "n": n,
                "m64": {"seconds": t64, "tflops": tf64}, "m128": {"seconds": t128, "tflops": tf128},
                "auto": format!("m{}", auto.rows()),
                "cublas_bf16_tflops": ceiling,
            }));
        }
    }
    if let Ok(path) = std::env::var("PIPEMOE_BENCH_OUT") {
        let doc = serde_json::json!({ "device": gpu.describe(), "cublas": blas.as_ref().err(), "rows": rows });
        std::fs::write(path, serde_json::to_string_pretty(&doc).expect("json") + "\n").expect("write bench JSON");
    }
}
