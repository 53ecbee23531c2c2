//! Device tests: every kernel against the CPU reference (pipemoe-quant's dequantization, f32 math) on fresh
//! random inputs, at small shapes and at the real model's (MODEL_SPEC §6). Skipped, with the reason printed,
//! where there is no GPU. Run on the GPU machine as documented in docs/CUDA.md.
//!
//! Tolerance: inputs are bf16 and the kernels accumulate in f32 like the reference, in another order and with
//! fast-math intrinsics: relative L2 ≤ 1e-4 is f32-level agreement; a wrong bit, group or zero is ≥ 1e-2.

mod common;

use common::*;
use half::bf16;
use pipemoe_cuda::{Gpu, GpuGptq};

/// One GEMV shape: `(in, out, bits, group, act_order, batch)`.
type Case = (usize, usize, u32, i64, bool, usize);

fn gemv_case(gpu: &Gpu, rng: &mut Rng, case: Case) -> f64 {
    let (k, n, bits, group, act_order, batch) = case;
    let w = random_weight(rng, k, n, bits, group, act_order);
    let x: Vec<bf16> = (0..batch * k).map(|_| bf16::from_f32(rng.uniform() * 2.0 - 1.0)).collect();
    let dense = w.dequantize(); // [n, k]
    let mut want = vec![0f32; batch * n];
    for b in 0..batch {
        for j in 0..n {
            let row = &dense[j * k..(j + 1) * k];
            want[b * n + j] = row.iter().zip(&x[b * k..(b + 1) * k]).map(|(w, x)| w * x.to_f32()).sum();
        }
    }
    let g = GpuGptq::upload(gpu, &w).expect("upload");
    let s = &gpu.stream;
    let xd = s.clone_htod(&x).expect("x");
    let mut partial = s.alloc_zeros::<f32>(g.scratch_len(gpu, batch)).expect("scratch");
    let mut y = s.alloc_zeros::<f32>(batch * n).expect("y");
    g.gemv(gpu, &xd, batch, &mut partial, &mut y).expect("gemv");
    let got = s.clone_dtoh(&y).expect("download");
    rel_l2(&got, &want)
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
    ];
    for (k, n, bits, group, act, batch) in cases {
        let err = gemv_case(&gpu, &mut rng, (k, n, bits, group, act, batch));
        eprintln!("gemv {k}x{n} w{bits} g{group} act_order={act} batch {batch}: rel L2 {err:.2e}");
        assert!(err <= 1e-4, "gemv {k}x{n} w{bits} g{group} act_order={act} batch {batch}: rel L2 {err:e}");
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

/// `cargo test --release -p pipemoe-cuda --test device -- --ignored bench` on the GPU machine: GEMV time and
/// bandwidth at the real model's shapes next to the streaming-read ceiling measured in the same run.
/// Weights rotate through copies larger than L2 so every call reads from DRAM.
#[test]
#[ignore = "benchmark: run on the GPU machine"]
fn bench_gemv() {
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    if no_gpu() {
        return;
    }
    let gpu = Gpu::open(0).expect("gpu");
    let s = gpu.stream.clone();
    let ctx = gpu.ctx.clone();
    let time = |iters: usize, f: &mut dyn FnMut()| -> f64 {
        for _ in 0..3 {
            f();
        }
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let a = ctx.new_event(timing).expect("event");
        let b = ctx.new_event(timing).expect("event");
        a.record(&s).expect("record");
        for _ in 0..iters {
            f();
        }
        b.record(&s).expect("record");
        b.synchronize().expect("sync");
        a.elapsed_ms(&b).expect("elapsed") as f64 / iters as f64 * 1e-3
    };
    // Ceiling: read 2 GiB once per call.
    let n = 512usize << 20;
    let buf = s.alloc_zeros::<u32>(n).expect("buffer");
    let mut out = s.alloc_zeros::<f32>(1).expect("out");
    let f = gpu.function("stream_read_u32").expect("kernel");
    let n16 = (n / 4) as u64;
    let secs = time(10, &mut || {
        let cfg = LaunchConfig { grid_dim: (gpu.sm_count * 8, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 };
        let mut l = s.launch_builder(f);
        l.arg(&buf).arg(&n16).arg(&mut out);
        unsafe { l.launch(cfg) }.expect("launch");
    });
    let ceiling = (n * 4) as f64 / secs / 1e9;
    let mut rows =
        vec![format!("{{\"op\":\"stream_read\",\"bytes\":{},\"seconds\":{secs:e},\"gbps\":{ceiling:.1}}}", n * 4)];
    println!("{} — streaming read ceiling {ceiling:.0} GB/s", gpu.describe());
    println!("{:<28} {:>5} {:>10} {:>10} {:>9} {:>8}", "shape (3-bit g128)", "batch", "MB", "us", "GB/s", "ceiling");
    let mut rng = Rng::new(11);
    for (name, k, nn) in [
        ("expert gate/up 7168x2048", 7168, 2048),
        ("expert down 2048x7168", 2048, 7168),
        ("o_proj 16384x7168", 16384, 7168),
        ("dense gate 7168x18432", 7168, 18432),
    ] {
        let w = random_weight(&mut rng, k, nn, 3, 128, false);
        let one = GpuGptq::upload(&gpu, &w).expect("upload");
        let copies = (256usize << 20).div_ceil(one.bytes()).max(2);
        let ws: Vec<GpuGptq> = (0..copies).map(|_| GpuGptq::upload(&gpu, &w).expect("upload")).collect();
        for batch in [1usize, 4, 16] {
            let x = s.alloc_zeros::<bf16>(batch * k).expect("x");
            let mut partial = s.alloc_zeros::<f32>(one.scratch_len(&gpu, batch)).expect("scratch");
            let mut y = s.alloc_zeros::<f32>(batch * nn).expect("y");
            let mut i = 0;
            let secs = time(40, &mut || {
                ws[i % copies].gemv(&gpu, &x, batch, &mut partial, &mut y).expect("gemv");
                i += 1;
            });
            let gbps = one.bytes() as f64 / secs / 1e9;
            println!(
                "{name:<28} {batch:>5} {:>10.1} {:>10.1} {gbps:>9.0} {:>7.0}%",
                one.bytes() as f64 / 1e6,
                secs * 1e6,
                100.0 * gbps / ceiling
            );
            rows.push(format!("{{\"op\":\"gptq_gemv_w3\",\"shape\":\"{name}\",\"batch\":{batch},\"bytes\":{},\"seconds\":{secs:e},\"gbps\":{gbps:.1},\"ceiling_gbps\":{ceiling:.1}}}", one.bytes()));
        }
    }
    if let Ok(path) = std::env::var("PIPEMOE_BENCH_OUT") {
        std::fs::write(path, format!("[{}]\n", rows.join(",\n"))).expect("write bench JSON");
    }
}
