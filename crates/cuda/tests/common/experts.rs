//! Random MoE experts and routings for the device tests (device_ops' grouped experts).

use pipemoe_model::backend::{Backend, ExpertWeights, HostLinear, Routing};

use super::{Rng, weight_with_zeros};

/// `count` random SwiGLU experts (hidden → inter → hidden) as host linears; every third (1, 4, ...) symmetric,
/// so a grouped launch's blocks meet experts with and without zeros to read (`GpuGptq::symmetric`).
pub fn host_experts(rng: &mut Rng, count: usize, hidden: usize, inter: usize, bits: u32) -> Vec<[HostLinear; 3]> {
    host_experts_ordered(rng, count, (hidden, inter, bits), |_| false, |i| i % 3 == 1)
}

/// The same, expert i's matrices with an act-order g_idx where `act_order(i)` and symmetric where `symmetric(i)`
/// (every expert of a launch symmetric and none reordered: the `_sym` kernels).
pub fn host_experts_ordered(
    rng: &mut Rng,
    count: usize,
    (hidden, inter, bits): (usize, usize, u32),
    act_order: impl Fn(usize) -> bool,
    symmetric: impl Fn(usize) -> bool,
) -> Vec<[HostLinear; 3]> {
    (0..count)
        .map(|i| {
            let shape = |k, n| (k, n, bits, 128, act_order(i));
            let mut m = |k, n| HostLinear::Gptq(weight_with_zeros(rng, shape(k, n), symmetric(i)));
            [m(hidden, inter), m(hidden, inter), m(inter, hidden)]
        })
        .collect()
}

pub fn load<B: Backend>(b: &B, hs: &[[HostLinear; 3]], held: impl Fn(usize) -> bool) -> B::Experts {
    let ws = hs.iter().enumerate().map(|(i, h)| held(i).then(|| load_one(b, h))).collect();
    b.load_experts(ws).unwrap()
}

pub fn load_one<B: Backend>(b: &B, [g, u, d]: &[HostLinear; 3]) -> ExpertWeights<B> {
    ExpertWeights {
        gate: b.load_linear(g.clone()).unwrap(),
        up: b.load_linear(u.clone()).unwrap(),
        down: b.load_linear(d.clone()).unwrap(),
    }
}

pub fn random_routing(rng: &mut Rng, rows: usize, n_experts: usize, top_k: usize) -> Routing {
    let mut experts = Vec::new();
    for _ in 0..rows {
        let mut chosen: Vec<u32> = Vec::new();
        while chosen.len() < top_k {
            let e = rng.below(n_experts as u64) as u32;
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        experts.extend(chosen);
    }
    let weights = (0..rows * top_k).map(|_| rng.uniform() + 0.1).collect();
    Routing { top_k, experts, weights }
}
