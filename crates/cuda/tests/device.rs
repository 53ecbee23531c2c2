//! Device tests: every kernel against the CPU reference (pipemoe-quant's dequantization, f32 math) on fresh
//! random inputs, at small shapes and at the real model's (MODEL_SPEC §6). Skipped, with the reason printed,
//! where there is no GPU. Run on the GPU machine as documented in docs/CUDA.md.
//!
//! Tolerance: the reference sums the same inputs the kernel sees (x rounded to bf16 where the kernel takes bf16)
//! in f32; the kernels accumulate in f32 too (the tensor-core path in the mma's fp32 accumulators), in another
//! order and with fast-math intrinsics: relative L2 ≤ 1e-4 is f32-level agreement; a wrong bit, group or zero is
//! ≥ 1e-2. Outputs stored as bf16 add their rounding (2^-9 relative per value): ≤ 5e-3.

mod common;

use common::*;
use half::bf16;
use pipemoe_cuda::gemv::Packing;
use pipemoe_cuda::gpu::Apart;
use pipemoe_cuda::timing::{Grid, Reader, read_rate, read_rate_by, read_rate_in_graph};
use pipemoe_cuda::{Act, ActDtype, CudaBackend, Gpu, GpuGptq};
use pipemoe_model::backend::{Backend, HostLinear, RopeSpec, Row};

/// One GEMV shape: `(in, out, bits, group, act_order, batch)`.
type Case = (usize, usize, u32, i64, bool, usize);

/// Relative L2 of the GEMV against the reference for inputs in `xd`, outputs in `yd`, with the weight uploaded
/// for tensor cores (`mma`, where eligible) or in the checkpoint packing, and symmetric (`sym`: no zeros uploaded
/// or read) or with random zeros.
fn gemv_case(gpu: &Gpu, rng: &mut Rng, case: Case, io: (ActDtype, ActDtype), mma: bool, sym: bool) -> (f64, Packing) {
    let (k, n, bits, group, act_order, batch) = case;
    let (xd, yd) = io;
    let w = weight_with_zeros(rng, (k, n, bits, group, act_order), sym);
    let mut x: Vec<f32> = (0..batch * k).map(|_| rng.uniform() * 2.0 - 1.0).collect();
    if xd == ActDtype::Bf16 {
        x.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32());
    }
    let dense = w.dequantize(); // [n, k]
    let mut want = vec![0f32; batch * n];
    for b in 0..batch {
        for j in 0..n {
            let row = &dense[j * k..(j + 1) * k];
            want[b * n + j] = row.iter().zip(&x[b * k..(b + 1) * k]).map(|(w, x)| w * x).sum();
        }
    }
    let g = if mma { GpuGptq::upload_for_tensor_cores(gpu, &w) } else { GpuGptq::upload(gpu, &w) }.expect("upload");
    assert_eq!(g.symmetric(), sym, "symmetric zeros detected at upload");
    let xa = Act::from_f32(gpu, xd, &x).expect("x");
    let mut partial = gpu.stream.alloc_zeros::<f32>(g.scratch_len(gpu, batch)).expect("scratch");
    let mut y = Act::zeros(gpu, yd, batch * n).expect("y");
    g.gemv(gpu, &xa.view(0, batch * k), batch, &mut partial, &mut y.view_mut(0, batch * n)).expect("gemv");
    let got = y.to_f32(gpu, batch * n).expect("download");
    (rel_l2(&got, &want), g.packing)
}

#[test]
fn gptq_gemv_matches_the_cpu_reference() {
    if no_gpu() {
        return;
    }
    let gpu = Gpu::open(0).expect("gpu");
    eprintln!("{}", gpu.describe());
    let mut rng = Rng::new(7);
    // (in, out, bits, group, act_order, batch): every bit width, g_idx, group -1, batch 1..16, the real shapes.
    let cases = [
        (256, 96, 3, 128, false, 1),
        (256, 96, 2, 128, false, 3),
        (256, 96, 4, 128, true, 4),
        (256, 64, 8, 64, false, 16),
        (512, 128, 3, -1, false, 2),
        (1024, 160, 4, 32, true, 1),
        (7168, 2048, 3, 128, false, 1),  // expert gate/up
        (2048, 7168, 3, 128, false, 4),  // expert down
        (16384, 7168, 3, 128, false, 1), // o_proj
        (7168, 576, 3, 128, false, 16),  // kv_a_proj_with_mqa
        (1536, 24576, 3, 128, false, 1), // q_b_proj
        (7168, 2048, 3, 128, false, 9),  // two n8 halves on tensor cores
        (2048, 7168, 2, 128, true, 16),
        (7168, 2048, 4, 128, false, 5),
        (7168, 64, 3, 128, false, 2), // many splits of K: the last block of each column range adds them
        (7168, 128, 3, 128, true, 3), // the same with the rows gathered through g_idx
        (2048, 7168, 3, 128, false, 1), // one row over about one block an SM: the wide kernel where symmetric
        (1024, 8192, 2, 128, false, 1),
        (512, 6784, 4, 128, false, 1),
    ];
    let (f32_, bf16_) = (ActDtype::F32, ActDtype::Bf16);
    for case in cases {
        let (k, n, bits, group, act, batch) = case;
        // (x, y, tensor cores, symmetric, tolerance): the exact path, bf16 inputs on both kernels, bf16 outputs;
        // both kernels again on a symmetric weight (no zeros uploaded: the kernels take the constant; on tensor
        // cores without a row order, the `_sym` kernels, f32 and bf16 outputs).
        for (xd, yd, mma, sym, tol) in [
            (f32_, f32_, false, false, 1e-4),
            (bf16_, f32_, false, false, 1e-4),
            (bf16_, f32_, true, false, 1e-4),
            (bf16_, bf16_, true, false, 5e-3),
            (f32_, f32_, false, true, 1e-4),
            (bf16_, f32_, true, true, 1e-4),
            (bf16_, bf16_, true, true, 5e-3),
        ] {
            let (err, packing) = gemv_case(&gpu, &mut rng, case, (xd, yd), mma, sym);
            let what = format!(
                "gemv {k}x{n} w{bits} g{group} act_order={act} batch {batch} x {xd:?} y {yd:?} {packing:?} sym={sym}"
            );
            eprintln!("{what}: rel L2 {err:.2e}");
            assert!(err <= tol, "{what}: rel L2 {err:e} > {tol:e}");
        }
    }
}

/// The wide one-row kernel (`GpuGptq::gemv_wide`, kernels/gemv_wide.cu) at both block sizes against the CPU, at
/// every bit width, on a symmetric weight of one 64-column block an SM (what `gemv` gives it; the 16-warp block does
/// not fit a GPU of less shared memory, where it is reported and left out) and x of mixed signs: the chunks' sums
/// in chunk order whichever warp ran them, so within the bf16 output's rounding of the f32 reference.
#[test]
fn the_wide_gemv_matches_the_cpu_reference() {
    if no_gpu() {
        return;
    }
    let gpu = Gpu::open(0).expect("gpu");
    let mut rng = Rng::new(41);
    let n = gpu.sm_count as usize * 64;
    for (k, bits) in [(1024usize, 3u32), (640, 2), (384, 4)] {
        let w = weight_with_zeros(&mut rng, (k, n, bits, 128, false), true);
        let dense = w.dequantize(); // [n, k]
        let x: Vec<f32> = (0..k).map(|_| bf16::from_f32(rng.uniform() * 2.0 - 1.0).to_f32()).collect();
        let want: Vec<f32> =
            (0..n).map(|j| dense[j * k..(j + 1) * k].iter().zip(&x).map(|(w, x)| w * x).sum()).collect();
        let g = GpuGptq::upload_for_tensor_cores(&gpu, &w).expect("upload");
        let xa = Act::from_f32(&gpu, ActDtype::Bf16, &x).expect("x");
        for warps in [16, 8] {
            let mut y = Act::from_f32(&gpu, ActDtype::Bf16, &vec![f32::NAN; n]).expect("y"); // every value written
            match g.gemv_wide(&gpu, &xa.view(0, k), &mut y.view_mut(0, n), warps) {
                Err(e) if warps == 16 => eprintln!("the 16-warp block does not fit this GPU: {e}"),
                r => {
                    r.expect("gemv_wide");
                    let err = rel_l2(&y.to_f32(&gpu, n).expect("y"), &want);
                    eprintln!("wide {k}x{n} w{bits}, {warps} warps: rel L2 {err:.2e}");
                    assert!(err <= 5e-3, "wide {k}x{n} w{bits}, {warps} warps: rel L2 {err:e}");
                }
            }
        }
    }
}

/// The q_b + wq_b projection of a decode step with its two parts cut and roped in the GEMV's store
/// (`gptq_mma_gemv_rope`): what the GEMV then `rope_columns2` give, bit for bit (each value rounded to bf16 as the
/// GEMV stores it, then rotated in f32 as rope_cols2 rotates it). Shapes: the real model's (1536 → 128 heads of
/// 192 with 64 interleaved rope dims last, and 64 index heads of 128 with 64 half-split dims first), the demo
/// model's (32 rope dims), and 16 rope dims; every bit width, 1..8 rows at scattered positions, symmetric weights
/// (the `_sym` kernels on both sides) and not; a g_idx weight is not taken. The same launch with q_a's RMSNorm in
/// its blocks (`gptq_mma_gemv_rope_norm`) against rms_norm and then the launch, bit for bit.
#[test]
fn the_query_projection_ropes_in_its_store_as_the_two_launches_do() {
    if no_gpu() {
        return;
    }
    let gpu = CudaBackend::new(0).expect("cuda:0").with_act_dtype(ActDtype::Bf16);
    let mut rng = Rng::new(31);
    let spec = |heads, head_dim, offset, interleaved| RopeSpec { heads, head_dim, offset, interleaved };
    // (in, bits, act_order, symmetric, q part, index part, rope pairs)
    let cases = [
        (1536, 3, false, false, spec(128, 192, 128, true), spec(64, 128, 0, false), 32),
        (1536, 3, false, true, spec(128, 192, 128, true), spec(64, 128, 0, false), 32),
        (128, 3, false, false, spec(4, 64, 32, true), spec(32, 64, 0, false), 16),
        (256, 2, false, true, spec(2, 64, 48, true), spec(4, 64, 16, false), 8),
        (512, 4, false, false, spec(3, 128, 64, true), spec(2, 128, 32, false), 16),
        (256, 3, true, false, spec(2, 64, 32, true), spec(4, 64, 0, false), 16),
    ];
    for (k, bits, act_order, sym, q, ix, half) in cases {
        let (wq, wi) = (q.heads * q.head_dim, ix.heads * ix.head_dim);
        let host = weight_with_zeros(&mut rng, (k, wq + wi, bits, 128, act_order), sym);
        let w = gpu.load_linear(HostLinear::Gptq(host)).unwrap();
        // DeepSeek's frequencies shape (θ^(−i/half)); positions far apart, up to 64K (angles of ~6.5e4 radians).
        let inv_freq: Vec<f32> = (0..half).map(|i| 10000f32.powf(-(i as f32) / half as f32)).collect();
        for n in [1usize, 3, 8] {
            let rows: Vec<Row> =
                (0..n).map(|i| Row { seq: i as u64, pos: [0, 7, 4095, 65535, 300, 1, 2048, 999][i] }).collect();
            let x: Vec<f32> = (0..n * k).map(|_| bf16::from_f32(rng.uniform() * 2.0 - 1.0).to_f32()).collect();
            let xt = gpu.upload(n, k, x).unwrap();
            let (a, b) = ((0, q), (wq, ix));
            let what =
                format!("{k} -> {wq} + {wi} w{bits} act_order={act_order} sym={sym} rope pairs {half}, {n} rows");
            let (aq, ai) = gpu.rope_columns2(&gpu.linear(&xt, &w).unwrap(), a, b, &inv_freq, &rows).unwrap();
            let bits = |t: &<CudaBackend as Backend>::Tensor| -> Vec<u32> {
                gpu.download(t).unwrap().iter().map(|v| v.to_bits()).collect()
            };
            let fused = gpu.linear_rope_fused(&xt, &w, a, b, &inv_freq, &rows).unwrap();
            if act_order {
                // A row order of K is not taken: the op runs the two launches.
                assert!(fused.is_none(), "{what}: taken");
            } else {
                let (fq, fi) = fused.expect(&what);
                assert_eq!(bits(&fq), bits(&aq), "{what}: q");
                assert_eq!(bits(&fi), bits(&ai), "{what}: the index query");
                // q_a normed in the launch's blocks (`gptq_mma_gemv_rope_norm`), from a raw projection whose first
                // k columns are q_a (the real model's row: 1536 + 512 + 64 + 128 + 64): what rms_norm (mla_prep's
                // q_a part, the same 512-thread sums) then the fused launch give.
                let width = k + 768;
                let raw: Vec<f32> = (0..n * width).map(|_| rng.uniform() * 6.0 - 3.0).collect();
                let raw = gpu.upload(n, width, raw).unwrap();
                let norm = gpu.load_vector((0..k).map(|_| rng.uniform() * 2.0).collect()).unwrap();
                let normed = gpu.rms_norm(&gpu.columns(&raw, 0, k).unwrap(), &norm, 1e-6).unwrap();
                let (wq_, wi_) = gpu.linear_rope_fused(&normed, &w, a, b, &inv_freq, &rows).unwrap().expect(&what);
                // Taken where the rows' x fits the block's shared budget beside a ring of 2 (the real dims at 3
                // bits: up to 5 rows), always at one row.
                match gpu.linear_rope_normed(&raw, (&norm, 1e-6), &w, a, b, &inv_freq, &rows).unwrap() {
                    Some((gq, gi)) => {
                        assert_eq!(bits(&gq), bits(&wq_), "{what}: q, q_a normed in the launch");
                        assert_eq!(bits(&gi), bits(&wi_), "{what}: the index query, q_a normed in the launch");
                    }
                    None => assert!(n > 1, "{what}: the normed launch not taken at one row"),
                }
            }
            // The backend's op takes the fused launch, and with Apart::QRope the two.
            let (oq, _) = gpu.linear_rope_columns2(&xt, &w, a, b, &inv_freq, &rows).unwrap();
            gpu.gpu.set_apart(&[Apart::QRope]);
            let (pq, _) = gpu.linear_rope_columns2(&xt, &w, a, b, &inv_freq, &rows).unwrap();
            gpu.gpu.set_apart(&[]);
            assert_eq!(bits(&oq), bits(&pq), "{what}: the op, fused and apart");
        }
        // More rows than the ≤ 8-row GEMV: not taken (the op runs the two launches).
        let rows: Vec<Row> = (0..9usize).map(|i| Row { seq: i as u64, pos: i }).collect();
        let xt = gpu.upload(9, k, vec![0.5; 9 * k]).unwrap();
        assert!(gpu.linear_rope_fused(&xt, &w, (0, q), (wq, ix), &inv_freq, &rows).unwrap().is_none());
    }
}

/// A layer's input norm in its fused projection (`gptq_mma_gemv_addnorm`): bit for bit `rms_norm` (or `add_rms_norm`)
/// then the GEMV, and the new residual as `add_rms_norm` leaves it, at DeepSeek's 7,168 → 2,304 (q_a, kv_a, the
/// indexer's wk and weights_proj) and at other shapes and bit widths; and the backend's op, opted in.
#[test]
fn the_input_norm_in_the_projection_matches_the_two_launches() {
    if no_gpu() {
        return;
    }
    let gpu = CudaBackend::new(0).expect("cuda:0").with_act_dtype(ActDtype::Bf16);
    let mut rng = Rng::new(37);
    let eps = 1e-6;
    let bits = |t: &<CudaBackend as Backend>::Tensor| -> Vec<u32> {
        gpu.download(t).unwrap().iter().map(|v| v.to_bits()).collect()
    };
    // (in, out, bits, act_order, symmetric)
    let cases = [
        (7168, 2304, 3, false, true),
        (7168, 2304, 3, false, false),
        (7168, 576, 2, false, true),
        (1024, 320, 4, false, false),
        // One split (the launch stores y itself), and a split of K shorter than the others.
        (256, 384, 3, false, true),
        (1280, 320, 3, false, false),
        (7168, 2304, 3, true, false),
    ];
    for (k, n, b, act_order, sym) in cases {
        let w = gpu.load_linear(HostLinear::Gptq(weight_with_zeros(&mut rng, (k, n, b, 128, act_order), sym))).unwrap();
        let norm = gpu.load_vector((0..k).map(|_| rng.uniform() * 2.0).collect()).unwrap();
        for rows in [1usize, 3, 8] {
            let what = format!("{k} -> {n} w{b} act_order={act_order} sym={sym}, {rows} rows");
            let h: Vec<f32> = (0..rows * k).map(|_| rng.uniform() * 6.0 - 3.0).collect();
            let a: Vec<f32> = (0..rows * k).map(|_| rng.uniform() * 2.0 - 1.0).collect();
            let (ht, at) = (gpu.upload(rows, k, h.clone()).unwrap(), gpu.upload(rows, k, a).unwrap());
            let want = gpu.linear(&gpu.rms_norm(&ht, &norm, eps).unwrap(), &w).unwrap();
            let got = gpu.rms_norm_linear_fused(&ht, (&norm, eps), &w).unwrap();
            let mut h_two = gpu.upload(rows, k, h.clone()).unwrap();
            let want_add = gpu.linear(&gpu.add_rms_norm(&mut h_two, &at, &norm, eps).unwrap(), &w).unwrap();
            let mut h_one = gpu.upload(rows, k, h).unwrap();
            let got_add = gpu.add_rms_norm_linear_fused(&mut h_one, &at, (&norm, eps), &w).unwrap();
            match (got, got_add) {
                (Some(y), Some(y_add)) => {
                    assert!(!act_order, "{what}: taken with a row order of K");
                    assert_eq!(bits(&y), bits(&want), "{what}: the norm in the launch");
                    assert_eq!(bits(&y_add), bits(&want_add), "{what}: the add and the norm in the launch");
                    assert_eq!(bits(&h_one), bits(&h_two), "{what}: the new residual");
                }
                // Not taken with a row order of K, nor where the rows' x and a ring of 2 pass the block's budget
                // (more rows), but always at one row otherwise; never taken one way only.
                (None, None) => assert!(act_order || rows > 1, "{what}: not taken"),
                _ => panic!("{what}: taken with the add or without it only"),
            }
            // The backend's op: the fused launch at one row, the two launches else; the same bits.
            let op = gpu.rms_norm_linear(&ht, &norm, eps, &w).unwrap();
            assert_eq!(bits(&op), bits(&want), "{what}: the backend's op");
        }
    }
}

#[test]
fn a_missing_device_is_an_error() {
    if no_gpu() {
        return;
    }
    match Gpu::open(1000) {
        Err(e) => assert!(e.to_string().contains("does not exist"), "{e}"),
        Ok(_) => panic!("cuda:1000 opened"),
    }
}

/// `cargo test --release -p pipemoe-cuda --test device -- --ignored bench_gemv` on the GPU machine: GEMV time
/// and bandwidth at the real model's shapes next to the streaming-read ceiling measured in the same run (2 GiB by
/// a full grid) and a plain read of the same bytes (`read_rate`: what a launch of that size can reach at all).
/// Weights rotate through copies larger than L2 so every call reads from DRAM. The "1 chunk" shapes are o_proj's
/// and q_b's grids with one chunk of K each: a launch's start and end with almost nothing to stream.
/// `PIPEMOE_BENCH_SHAPES` (parts of shape names), `PIPEMOE_BENCH_PATHS` (`mma`, `gptq`) and
/// `PIPEMOE_BENCH_BATCHES`, comma-separated, run only those.
#[test]
#[ignore = "benchmark: run on the GPU machine"]
fn bench_gemv() {
    if no_gpu() {
        return;
    }
    let gpu = Gpu::open(0).expect("gpu");
    let s = gpu.stream.clone();
    let (ceiling, n) = read_ceiling_gbps(&gpu);
    let secs = n as f64 / ceiling / 1e9;
    let mut rows = vec![format!("{{\"op\":\"stream_read\",\"bytes\":{n},\"seconds\":{secs:e},\"gbps\":{ceiling:.1}}}")];
    println!("{} — streaming read ceiling {ceiling:.0} GB/s", gpu.describe());
    println!(
        "{:<30} {:<5} {:>5} {:>8} {:>8} {:>7} {:>8} {:>8}",
        "shape (3-bit g128)", "path", "batch", "MB", "us", "GB/s", "ceiling", "of read"
    );
    let shapes = env_list("PIPEMOE_BENCH_SHAPES");
    let paths = env_list("PIPEMOE_BENCH_PATHS");
    let batches: Vec<usize> = match env_list("PIPEMOE_BENCH_BATCHES") {
        Some(b) => b.iter().map(|v| v.parse().expect("PIPEMOE_BENCH_BATCHES: integers")).collect(),
        None => vec![1, 4, 8, 16],
    };
    let full = Grid { blocks: gpu.sm_count * 8, threads: 512 };
    let mut rng = Rng::new(11);
    for (name, k, nn) in [
        ("expert gate/up 7168x2048", 7168, 2048),
        ("expert down 2048x7168", 2048, 7168),
        ("o_proj 16384x7168", 16384, 7168),
        ("dense gate 7168x18432", 7168, 18432),
        ("q_a 7168x1536", 7168, 1536),
        ("indexer wk 7168x128", 7168, 128),
        ("q_b 1536x24576", 1536, 24576),
        ("o_proj grid, 1 chunk 128x7168", 128, 7168),
        ("q_b grid, 1 chunk 128x24576", 128, 24576),
    ] {
        if shapes.as_ref().is_some_and(|want| !want.iter().any(|w| name.contains(w.as_str()))) {
            continue;
        }
        let w = random_weight(&mut rng, k, nn, 3, 128, false);
        for mma in [false, true] {
            if paths.as_ref().is_some_and(|want| !want.iter().any(|p| p == if mma { "mma" } else { "gptq" })) {
                continue;
            }
            let upload = |w| if mma { GpuGptq::upload_for_tensor_cores(&gpu, w) } else { GpuGptq::upload(&gpu, w) };
            let one = upload(&w).expect("upload");
            let read = read_rate(&gpu, one.bytes(), 256 << 20, full).expect("read rate") / 1e9;
            let copies = (256usize << 20).div_ceil(one.bytes()).max(2);
            let ws: Vec<GpuGptq> = (0..copies).map(|_| upload(&w).expect("upload")).collect();
            let kernel = format!("{:?}", one.packing);
            for &batch in &batches {
                // Random inputs: zeros can run faster than real data (METHOD.md).
                let xs: Vec<f32> = (0..batch * k).map(|_| rng.uniform() * 2.0 - 1.0).collect();
                let x = Act::from_f32(&gpu, ActDtype::Bf16, &xs).expect("x");
                let mut partial = s.alloc_zeros::<f32>(one.scratch_len(&gpu, batch)).expect("scratch");
                let mut y = Act::zeros(&gpu, ActDtype::Bf16, batch * nn).expect("y");
                let mut i = 0;
                let secs = time(&gpu, 40, &mut |_| {
                    let (xv, mut yv) = (x.view(0, batch * k), y.view_mut(0, batch * nn));
                    ws[i % copies].gemv(&gpu, &xv, batch, &mut partial, &mut yv).expect("gemv");
                    i += 1;
                });
                let gbps = one.bytes() as f64 / secs / 1e9;
                println!(
                    "{name:<30} {kernel:<5} {batch:>5} {:>8.1} {:>8.1} {gbps:>7.0} {:>7.0}% {:>7.0}%",
                    one.bytes() as f64 / 1e6,
                    secs * 1e6,
                    100.0 * gbps / ceiling,
                    100.0 * gbps / read
                );
                rows.push(format!("{{\"op\":\"gptq_gemv_w3\",\"kernel\":\"{kernel}\",\"shape\":\"{name}\",\"batch\":{batch},\"bytes\":{},\"seconds\":{secs:e},\"gbps\":{gbps:.1},\"ceiling_gbps\":{ceiling:.1},\"same_size_read_gbps\":{read:.1}}}", one.bytes()));
            }
        }
    }
    if let Ok(path) = std::env::var("PIPEMOE_BENCH_OUT") {
        std::fs::write(path, format!("[{}]\n", rows.join(",\n"))).expect("write bench JSON");
    }
}

/// `... --ignored bench_read_sizes`: the streaming read (stream_read_u32) of the GEMVs' sizes, by a full grid (8
/// blocks of 512 threads an SM) and by the tensor-core GEMV's occupancy (4 blocks of 128 an SM, its register
/// limit): how much of a GEMV's distance to the 2 GiB ceiling a plain read of its bytes, at its launch size and
/// warps, already has.
#[test]
#[ignore = "benchmark: run on the GPU machine"]
fn bench_read_sizes() {
    let Some((gpu, ceiling)) = read_bench_gpu() else { return };
    let sm = gpu.sm_count;
    let grids = [("8 x 512 an SM", sm * 8, 512), ("4 x 128 an SM", sm * 4, 128), ("2 x 128 an SM", sm * 2, 128)];
    print_reads(&gpu, ceiling, &[0.4, 4.5, 6.0, 15.3, 47.7, 53.7, 200.0], &grids, &[Reader::Plain]);
}

/// `... --ignored bench_read_inflight`: what a read at the tensor-core GEMV's occupancy (4 blocks of 128 threads an
/// SM; also 2, a 3090's by shared memory) needs to reach the ceiling: 1, 2, 4, 8, 16 loads of 16 bytes in flight a
/// thread into registers, and rings of 2–16 slots a thread copied by cp.async into shared memory, as the GEMV
/// streams its weights (its ring keeps ~12 such copies a thread in flight at one row). o_proj's and 200 MB.
#[test]
#[ignore = "benchmark: run on the GPU machine"]
fn bench_read_inflight() {
    let Some((gpu, ceiling)) = read_bench_gpu() else { return };
    let sm = gpu.sm_count;
    let mut readers = vec![Reader::Plain];
    readers.extend([2, 4, 8, 16].map(Reader::Batched));
    readers.extend([2, 4, 8, 16].map(Reader::Ring));
    let grids = [("4 x 128 an SM", sm * 4, 128), ("2 x 128 an SM", sm * 2, 128)];
    print_reads(&gpu, ceiling, &[47.7, 200.0], &grids, &readers);
}

/// A table row per size, grid and reader: µs, GB/s and the share of `ceiling` of one launch's read (`read_rate_by`,
/// 256 MB of copies rotated so each launch reads DRAM).
fn print_reads(gpu: &Gpu, ceiling: f64, mbs: &[f64], grids: &[(&str, u32, u32)], readers: &[Reader]) {
    println!("{:>8} {:>14} {:>10} {:>8} {:>8} {:>8}", "MB", "grid", "reader", "us", "GB/s", "ceiling");
    for &mb in mbs {
        let bytes = (mb * 1e6) as usize;
        for &(what, blocks, threads) in grids {
            for &reader in readers {
                let grid = Grid { blocks, threads };
                let gbps = read_rate_by(gpu, bytes, 256 << 20, grid, reader).expect("read rate") / 1e9;
                let name = match reader {
                    Reader::Plain => "load x1".to_string(),
                    Reader::Batched(n) => format!("load x{n}"),
                    Reader::Ring(n) => format!("ring {n}"),
                };
                let us = bytes as f64 / gbps / 1e3;
                println!("{mb:>8.1} {what:>14} {name:>10} {us:>8.1} {gbps:>8.0} {:>7.0}%", 100.0 * gbps / ceiling);
            }
        }
    }
}

/// `... --ignored bench_launch_cost`: a read of a small kernel's size launched back to back from the host
/// (`read_rate`) and replayed inside one CUDA graph (`read_rate_in_graph`, as decode steps run), µs a launch: what
/// a kernel's start and end cost in a step, and so what fusing two kernels would save.
#[test]
#[ignore = "benchmark: run on the GPU machine"]
fn bench_launch_cost() {
    let Some((gpu, ceiling)) = read_bench_gpu() else { return };
    println!("{:>8} {:>14} {:>12} {:>12} {:>14}", "MB", "grid", "stream us", "graph us", "at ceiling us");
    let sm = gpu.sm_count;
    for mb in [0.02f64, 0.4, 1.3, 4.5, 15.3] {
        let bytes = (mb * 1e6) as usize;
        for (what, blocks, threads) in [("8 x 512 an SM", sm * 8, 512), ("4 x 128 an SM", sm * 4, 128)] {
            let grid = Grid { blocks, threads };
            let us = |rate: f64| bytes as f64 / rate * 1e6;
            let stream = us(read_rate(&gpu, bytes, 256 << 20, grid).expect("read rate"));
            let graph = us(read_rate_in_graph(&gpu, bytes, 256 << 20, grid).expect("graph read rate"));
            println!("{mb:>8.2} {what:>14} {stream:>12.2} {graph:>12.2} {:>14.2}", bytes as f64 / ceiling / 1e3);
        }
    }
}

/// `... --ignored bench_topk`: the indexer's one-row top-k (top 2,048, one block) over rows of 4K to 128K scores
/// from several distributions, µs a launch of one row back to back from the host (the launch's own cost included,
/// the same for every kernel variant: compare variants, as `PIPEMOE_NVRTC_DEFINES` builds them, within one
/// distribution).
/// "index-like" is Σ_h w_h·relu(q_h·k) over 64 heads of Gaussian terms, as the indexer's scores are made.
#[test]
#[ignore = "benchmark: run on the GPU machine"]
fn bench_topk() {
    if no_gpu() {
        return;
    }
    let b = CudaBackend::new(0).expect("gpu");
    let mut rng = Rng::new(41);
    let mut gauss = move || {
        let (u, v) = (rng.uniform().max(1e-7), rng.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    };
    let weights: Vec<f32> = (0..64).map(|_| gauss() / 8.0).collect();
    println!("{} — top 2048 of one row, us a launch", b.gpu.describe());
    println!("{:<16} {:>6} {:>8}", "scores", "keys", "us");
    for n in [4130usize, 8192, 32768, 131072] {
        let rows: Vec<(&str, Vec<f32>)> = vec![
            ("gaussian", (0..n).map(|_| gauss()).collect()),
            ("gaussian at 4", (0..n).map(|_| 4.0 + gauss()).collect()),
            ("gaussian at 100", (0..n).map(|_| 100.0 + gauss()).collect()),
            ("uniform 0..1", (0..n).map(|_| (gauss() * 1e3).fract().abs()).collect()),
            ("index-like", (0..n).map(|_| weights.iter().map(|w| w * gauss().max(0.0)).sum()).collect()),
        ];
        for (what, scores) in rows {
            let secs = pipemoe_cuda::indexer::time_top_k_rows(&b, &[scores], 2048, 200).expect("top-k timing");
            println!("{what:<16} {n:>6} {:>8.2}", secs * 1e6);
        }
    }
}

/// The GPU of a read benchmark and the 2 GiB read ceiling (GB/s), printed as its first line; None without a GPU.
fn read_bench_gpu() -> Option<(Gpu, f64)> {
    if no_gpu() {
        return None;
    }
    let gpu = Gpu::open(0).expect("gpu");
    let (ceiling, _) = read_ceiling_gbps(&gpu);
    println!("{} — streaming read ceiling {ceiling:.0} GB/s (2 GiB, 8 blocks of 512 an SM)", gpu.describe());
    Some((gpu, ceiling))
}

/// A comma-separated list from the environment, or None when the variable is unset or empty.
fn env_list(name: &str) -> Option<Vec<String>> {
    let v = std::env::var(name).ok()?;
    let items: Vec<String> = v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    (!items.is_empty()).then_some(items)
}

/// `... --ignored bench_gemv_wide --nocapture` (docs/PERF.md session 37): the one-row GEMV as one block of 16 or 8
/// warps per 64 columns over the whole of K (`GpuGptq::gemv_wide`, kernels/gemv_wide.cu) against the split-K
/// kernel (`PIPEMOE_GEMV_WIDE=0` for `gemv`), on symmetric 3-bit weights of the one-wave shapes (o_proj, an
/// expert's down): first the same row through both (the sums' order differs, so within a few bf16 roundings),
/// then each timed over rotating copies (256 MB: DRAM, not L2), in the order split, wide 16, wide 8, wide 8,
/// wide 16, split.
#[test]
#[ignore = "benchmark: run on the GPU machine"]
fn bench_gemv_wide() {
    if no_gpu() {
        return;
    }
    let split_k = std::env::var("PIPEMOE_GEMV_WIDE").is_ok_and(|v| v == "0");
    assert!(split_k, "run with PIPEMOE_GEMV_WIDE=0, so that `gemv` is the split-K kernel it is compared with");
    let gpu = Gpu::open(0).expect("gpu");
    let s = gpu.stream.clone();
    let (ceiling, _) = read_ceiling_gbps(&gpu);
    println!("{} — streaming read ceiling {ceiling:.0} GB/s; µs a call (% of the ceiling)", gpu.describe());
    let mut rng = Rng::new(37);
    for (name, k, n) in [("o_proj 16384x7168", 16384, 7168), ("expert down 2048x7168", 2048, 7168)] {
        let w = weight_with_zeros(&mut rng, (k, n, 3, 128, false), true);
        let one = GpuGptq::upload_for_tensor_cores(&gpu, &w).expect("upload");
        let copies = (256usize << 20).div_ceil(one.bytes()).max(2);
        let ws: Vec<GpuGptq> =
            (0..copies).map(|_| GpuGptq::upload_for_tensor_cores(&gpu, &w).expect("upload")).collect();
        let xs: Vec<f32> = (0..k).map(|_| rng.uniform() * 2.0 - 1.0).collect();
        let x = Act::from_f32(&gpu, ActDtype::Bf16, &xs).expect("x");
        let mut partial = s.alloc_zeros::<f32>(one.scratch_len(&gpu, 1)).expect("scratch");
        let (mut y, mut y_wide) =
            (Act::zeros(&gpu, ActDtype::Bf16, n).expect("y"), Act::zeros(&gpu, ActDtype::Bf16, n).expect("y"));
        one.gemv(&gpu, &x.view(0, k), 1, &mut partial, &mut y.view_mut(0, n)).expect("gemv");
        one.gemv_wide(&gpu, &x.view(0, k), &mut y_wide.view_mut(0, n), 16).expect("gemv_wide");
        let (a, b) = (y.to_f32(&gpu, n).expect("y"), y_wide.to_f32(&gpu, n).expect("y"));
        let (mut num, mut den) = (0f64, 0f64);
        for (p, q) in a.iter().zip(&b) {
            num += f64::from(p - q).powi(2);
            den += f64::from(*p).powi(2);
        }
        let rel = (num / den).sqrt();
        // Both round each output to bf16 once from f32 sums of the same products: a sum order apart.
        assert!(rel < 4e-3 && b.iter().all(|v| v.is_finite()), "{name}: wide against split-K {rel:e}");
        let mut times = std::collections::BTreeMap::<&str, Vec<f64>>::new();
        for variant in ["split", "wide 16", "wide 8", "wide 8", "wide 16", "split"] {
            let mut i = 0;
            let secs = time(&gpu, 40, &mut |_| {
                let (xv, mut yv) = (x.view(0, k), y.view_mut(0, n));
                let w = &ws[i % copies];
                match variant {
                    "split" => w.gemv(&gpu, &xv, 1, &mut partial, &mut yv),
                    "wide 16" => w.gemv_wide(&gpu, &xv, &mut yv, 16),
                    _ => w.gemv_wide(&gpu, &xv, &mut yv, 8),
                }
                .expect("gemv");
                i += 1;
            });
            times.entry(variant).or_default().push(secs);
        }
        for (variant, t) in &times {
            let best = t.iter().cloned().fold(f64::INFINITY, f64::min);
            let gbps = one.bytes() as f64 / best / 1e9;
            println!(
                "{name:<24} {variant:<7} {:>7.2} us ({:>3.0}%)  runs {:?}  rel {rel:.1e}",
                best * 1e6,
                100.0 * gbps / ceiling,
                t.iter().map(|v| format!("{:.2}", v * 1e6)).collect::<Vec<_>>()
            );
        }
    }
}
