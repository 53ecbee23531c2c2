//! Shared by the device tests: random GPTQ weights built through the quant crate's own packer, a seeded RNG,
//! and the skip rule (no GPU here: say why and pass, except under CI where nothing may silently skip).
#![allow(dead_code)]

pub mod cache;
pub mod experts;

use half::f16;
use pipemoe_quant::{Bits, Dtype, GptqLayout, GptqParts, GptqWeight, GroupSize, RawTensor, ZeroConvention, pack};

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `n` values uniform in [−a, a).
pub fn uniform(rng: &mut Rng, n: usize, a: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) * a).collect()
}

/// Skips (returns true) when there is no GPU, printing why.
pub fn no_gpu() -> bool {
    match pipemoe_cuda::gpu::unavailable() {
        None => false,
        Some(why) => {
            eprintln!("SKIPPED (no GPU): {why}");
            true
        }
    }
}

fn bytes_u32(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A random GPTQ weight `[out, in]`: random fields, zeros, signed scales, and an act-order g_idx when asked.
pub fn random_weight(rng: &mut Rng, n_in: usize, n_out: usize, bits: u32, group: i64, act_order: bool) -> GptqWeight {
    weight_with_zeros(rng, (n_in, n_out, bits, group, act_order), false)
}

/// The same, with a symmetric checkpoint's zeros when `symmetric`: every stored field 2^(bits−1) − 1 under the v1
/// convention (AutoRound `sym: true`, MODEL_SPEC §4.3), so every zero is 2^(bits−1) — which every kernel takes as
/// a constant, and none are uploaded (`GpuGptq::symmetric`). `shape`: (in, out, bits, group, act_order).
pub fn weight_with_zeros(rng: &mut Rng, shape: (usize, usize, u32, i64, bool), symmetric: bool) -> GptqWeight {
    let (n_in, n_out, bits, group, act_order) = shape;
    let b = Bits::new(bits).expect("bits");
    let layout = GptqLayout::new(n_in, n_out, b, GroupSize::from_config(group).expect("group")).expect("layout");
    let maxv = (1u64 << bits) - 1;
    let q: Vec<u8> = (0..n_in * n_out).map(|_| rng.below(maxv + 1) as u8).collect();
    let groups = layout.n_groups();
    // v2 zeros: any value 0..=max; v1 for a symmetric weight: the midpoint less one.
    let z: Vec<u8> = (0..groups * n_out)
        .map(|_| if symmetric { (1u8 << (bits - 1)) - 1 } else { rng.below(maxv + 1) as u8 })
        .collect();
    let scales: Vec<u8> =
        (0..groups * n_out).flat_map(|_| f16::from_f32((rng.uniform() - 0.5) * 0.02).to_le_bytes()).collect();
    let qweight = bytes_u32(&pack::pack_qweight(&q, &layout).expect("pack"));
    let qzeros = bytes_u32(&pack::pack_qzeros(&z, &layout).expect("pack zeros"));
    let g_idx: Option<Vec<u8>> = act_order.then(|| {
        let gs = n_in / groups;
        let mut perm: Vec<usize> = (0..n_in).collect();
        for i in (1..n_in).rev() {
            perm.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut g = vec![0i32; n_in];
        for (pos, &row) in perm.iter().enumerate() {
            g[row] = (pos / gs) as i32;
        }
        g.iter().flat_map(|x| x.to_le_bytes()).collect()
    });
    let qs = layout.qweight_shape();
    let zs = layout.qzeros_shape();
    let ss = layout.scales_shape();
    let gsh = layout.g_idx_shape();
    let parts = GptqParts {
        qweight: RawTensor { name: "w.qweight", dtype: Dtype::I32, shape: &qs, data: &qweight },
        qzeros: RawTensor { name: "w.qzeros", dtype: Dtype::I32, shape: &zs, data: &qzeros },
        scales: RawTensor { name: "w.scales", dtype: Dtype::F16, shape: &ss, data: &scales },
        g_idx: g_idx.as_ref().map(|d| RawTensor { name: "w.g_idx", dtype: Dtype::I32, shape: &gsh, data: d }),
    };
    let convention = if symmetric { ZeroConvention::V1 } else { ZeroConvention::V2 };
    GptqWeight::from_parts(layout, convention, &parts).expect("weight")
}

/// `‖a − b‖ / ‖b‖`; NaN anywhere fails.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    assert!(a.iter().all(|v| v.is_finite()), "non-finite output");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Seconds per call of `f` (given the call's index) after 3 warm-up calls, over `iters` calls (CUDA events).
pub fn time(gpu: &pipemoe_cuda::Gpu, iters: usize, f: &mut dyn FnMut(usize)) -> f64 {
    pipemoe_cuda::timing::seconds_per_call(gpu, 3, iters, &mut |i| {
        f(i);
        Ok::<(), pipemoe_cuda::Error>(())
    })
    .expect("timing")
}

/// The streaming-read ceiling over 2 GiB in GB/s, and the bytes read.
pub fn read_ceiling_gbps(gpu: &pipemoe_cuda::Gpu) -> (f64, usize) {
    let (bps, bytes) = pipemoe_cuda::timing::read_ceiling(gpu, 2 << 30).expect("read ceiling");
    (bps / 1e9, bytes)
}
