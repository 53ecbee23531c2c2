//! In-process A/B timing of the backend's fusions and overlaps (`pipemoe bench --ab`): single-stream decode with
//! one [`Apart`] switch off and on in turns, the order alternating by round, all in one process. Separate runs of
//! the bench drift by a few % (the host's time to queue each step moves by tens of µs), as much as one fusion saves.

use anyhow::Result;
use clap::ValueEnum;
use pipemoe_cuda::CudaBackend;
use pipemoe_cuda::gpu::Apart;

use super::stage::{Runner, Times};

/// A switch of `Gpu::set_apart`, as `--ab` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AbSwitch {
    /// The indexer's selection on a side-stream branch beside the query absorption.
    Branches,
    /// `mla_prep` and the cache write as one launch.
    PrepWrite,
    /// One-row grouped experts without the `experts_plan` launch.
    Plan,
    /// MLA's absorptions from the quantized kv_b_proj, not from its bf16 copy.
    DenseKvb,
    /// bf16 flash attention on bf16 q and P, not value + remainder.
    ExactFlash,
    /// The one-row post-attention add+rms_norm and router as one launch.
    NormRoute,
    /// A decode step's q_b + wq_b GEMV with the RoPE of q and the indexer's query in its store.
    QRope,
    /// The one-row down launch's warps in 2 pairs over halves of K, not 4 over quarters.
    QuarterK,
    /// The indexer's query projected on its branch, beside q's projection, not in q's launch before the fork.
    EarlyIndex,
    /// q_a normed in the fused q_b + wq_b launches, the rest of mla_prep beside the indexer's branch.
    PrepQuery,
    /// The MoE block's output added in the one-row down launch's combine, and the next layer's input norm in its
    /// fused projection.
    InputNorm,
    /// One row's grouped gate/up and down as one launch.
    MoeSplit,
    /// The usual kernels against those compiled with `PIPEMOE_NVRTC_VARIANT`'s defines too (the "old way" is the
    /// variant: a negative saving means the variant is faster).
    Variant,
}

impl AbSwitch {
    fn apart(self) -> Apart {
        match self {
            AbSwitch::Branches => Apart::Branches,
            AbSwitch::PrepWrite => Apart::PrepWrite,
            AbSwitch::Plan => Apart::Plan,
            AbSwitch::DenseKvb => Apart::DenseKvb,
            AbSwitch::ExactFlash => Apart::ExactFlash,
            AbSwitch::NormRoute => Apart::NormRoute,
            AbSwitch::QRope => Apart::QRope,
            AbSwitch::QuarterK => Apart::QuarterK,
            AbSwitch::EarlyIndex => Apart::EarlyIndex,
            AbSwitch::PrepQuery => Apart::PrepQuery,
            AbSwitch::InputNorm => Apart::InputNorm,
            AbSwitch::MoeSplit => Apart::MoeSplit,
            AbSwitch::Variant => Apart::Variant,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AbSwitch::Branches => "branches",
            AbSwitch::PrepWrite => "prep-write",
            AbSwitch::Plan => "plan",
            AbSwitch::DenseKvb => "dense-kvb",
            AbSwitch::ExactFlash => "exact-flash",
            AbSwitch::NormRoute => "norm-route",
            AbSwitch::QRope => "q-rope",
            AbSwitch::QuarterK => "quarter-k",
            AbSwitch::EarlyIndex => "early-index",
            AbSwitch::PrepQuery => "prep-query",
            AbSwitch::InputNorm => "input-norm",
            AbSwitch::MoeSplit => "moe-split",
            AbSwitch::Variant => "variant",
        }
    }
}

/// One switch's A/B, in each step's time after the host queued it (`Runner::timed_decode`: the host's jitter is
/// most of what moves between steps): medians of the rounds' medians the usual way and the old way (seconds), and
/// the median, least and largest of the rounds' differences (old − usual: what the usual way saves a step); and
/// the whole steps' medians of medians, the usual way and the old.
pub struct AbResult {
    pub switch: AbSwitch,
    pub rounds: usize,
    pub usual: f64,
    pub apart: f64,
    pub saved: (f64, f64, f64),
    pub steps: (f64, f64),
}

/// Decode positions the A/B adds to a sequence: each round runs `steps` timed steps and 3 untimed ones each way.
pub fn positions(switches: usize, rounds: usize, steps: usize) -> usize {
    2 * switches * rounds * (steps + 3)
}

/// `rounds` rounds per switch of `steps` single-stream steps each way, on sequence 1; every switch is off again
/// after.
pub fn run(
    run: &mut Runner,
    backend: &CudaBackend,
    switches: &[AbSwitch],
    rounds: usize,
    steps: usize,
) -> Result<Vec<AbResult>> {
    if switches.contains(&AbSwitch::Variant) && pipemoe_cuda::nvrtc::variant_defines().is_empty() {
        anyhow::bail!("--ab variant times the kernels of PIPEMOE_NVRTC_VARIANT's defines, and it is not set");
    }
    let mut out = Vec::new();
    for &switch in switches {
        let (mut usual, mut apart, mut saved, mut whole) = (Vec::new(), Vec::new(), Vec::new(), [vec![], vec![]]);
        for round in 0..rounds {
            let mut medians = [0.0; 2];
            for k in 0..2 {
                let old_way = (round + k) % 2 == 1;
                let on = [switch.apart()];
                backend.gpu.set_apart(if old_way { &on } else { &[] });
                let timed = run.timed_decode(&[1], 3, steps);
                backend.gpu.set_apart(&[]);
                let timed = timed?;
                medians[usize::from(old_way)] = timed.after.median;
                whole[usize::from(old_way)].push(timed.steps.median);
            }
            usual.push(medians[0]);
            apart.push(medians[1]);
            saved.push(medians[1] - medians[0]);
        }
        let least = saved.iter().copied().fold(f64::INFINITY, f64::min);
        let most = saved.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let r = AbResult {
            switch,
            rounds,
            usual: Times::of(usual).median,
            apart: Times::of(apart).median,
            saved: (Times::of(saved).median, least, most),
            steps: (Times::of(whole[0].clone()).median, Times::of(whole[1].clone()).median),
        };
        eprintln!(
            "bench: A/B {}, {rounds} rounds of {steps} steps, after the host's queueing: {:.4} ms, the old way {:.4} \
             ms (medians of the rounds' medians); saved a step: median {:.4} ms, range {:.4} .. {:.4}; whole steps \
             {:.4} / {:.4} ms",
            switch.name(),
            r.usual * 1e3,
            r.apart * 1e3,
            r.saved.0 * 1e3,
            r.saved.1 * 1e3,
            r.saved.2 * 1e3,
            r.steps.0 * 1e3,
            r.steps.1 * 1e3
        );
        out.push(r);
    }
    Ok(out)
}
