//! Placement (ARCHITECTURE.md "Placement"): the model's layers, in order, split into one contiguous slice per
//! device, sized by bytes — weights as the device will hold them, the KV cache for the recipe's context, and a
//! fixed workspace. Two limits per device: the recipe's budget caps the weights (the seed's `max_memory`, 18 GiB
//! on a 24 GiB RTX 3090), and the device's memory caps weights + cache + workspace (the headroom above the
//! budget is where the cache lives). The split minimises the largest slice, so devices of one size get even
//! shares; a model that does not fit is refused with the numbers that show why.

use std::fmt::Write;
use std::ops::Range;

use pipemoe_model::{Checkpoint, ModelConfig};

/// Bytes of one decoder layer on the device.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerCost {
    pub weight_bytes: u64,
}

/// What the model costs, independent of where it goes.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelCost {
    /// `embed_tokens`, held by the first slice.
    pub embed_bytes: u64,
    /// Final norm and `lm_head`, held by the last slice.
    pub head_bytes: u64,
    pub layers: Vec<LayerCost>,
    /// KV cache (latent + k_pe + indexer key) per token per layer.
    pub kv_bytes_per_token_layer: u64,
}

/// One device and how much of it the model may use.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceBudget {
    pub device: String,
    /// Weights at most this (the recipe's `max_memory_gib`).
    pub budget_bytes: u64,
    /// Weights + KV cache + workspace at most this (the device's memory; for a CPU worker, the budget).
    pub capacity_bytes: u64,
}

/// One worker's share.
#[derive(Clone, Debug, PartialEq)]
pub struct StagePlan {
    pub rank: usize,
    pub device: String,
    pub layers: Range<usize>,
    pub embed: bool,
    pub head: bool,
    pub weight_bytes: u64,
    pub kv_bytes: u64,
    pub workspace_bytes: u64,
    pub budget_bytes: u64,
    pub capacity_bytes: u64,
}

impl StagePlan {
    pub fn total_bytes(&self) -> u64 {
        self.weight_bytes + self.kv_bytes + self.workspace_bytes
    }

    /// Within both of its device's limits.
    pub fn fits(&self) -> bool {
        self.weight_bytes <= self.budget_bytes && self.total_bytes() <= self.capacity_bytes
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("no devices to place the model on")]
    NoDevices,
    #[error("{devices} devices but only {layers} layers: every worker needs at least one layer")]
    MoreDevicesThanLayers { devices: usize, layers: usize },
    #[error(
        "the model does not fit on {devices} devices: it needs {} of weights (budgets give {}) and {} in all with \
         {} of KV cache for {context} tokens and {} of workspace (the devices hold {}); the largest layer alone \
         is {}",
        gib(*weights), gib(*budget), gib(*needed), gib(*kv), gib(*workspace), gib(*capacity), gib(*largest)
    )]
    DoesNotFit {
        needed: u64,
        weights: u64,
        kv: u64,
        workspace: u64,
        context: usize,
        budget: u64,
        capacity: u64,
        devices: usize,
        largest: u64,
    },
    #[error("placement override: {reason}")]
    BadOverride { reason: String },
}

pub fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

/// Placement inputs.
pub struct PlanInput<'a> {
    pub cost: &'a ModelCost,
    pub devices: &'a [DeviceBudget],
    /// The recipe's max_model_len: the cache is sized for one full context per device slice.
    pub context_tokens: usize,
    /// Activations, CUDA context, allocator slack: per device.
    pub workspace_bytes: u64,
}

impl PlanInput<'_> {
    /// Bytes of layers `r` on one device, with the embeddings and head if it holds them.
    fn stage_bytes(&self, r: &Range<usize>, embed: bool, head: bool) -> (u64, u64) {
        let c = self.cost;
        let weights: u64 = c.layers[r.clone()].iter().map(|l| l.weight_bytes).sum::<u64>()
            + if embed { c.embed_bytes } else { 0 }
            + if head { c.head_bytes } else { 0 };
        let kv = c.kv_bytes_per_token_layer * self.context_tokens as u64 * r.len() as u64;
        (weights, kv)
    }

    fn stage(&self, rank: usize, layers: Range<usize>) -> StagePlan {
        let n = self.devices.len();
        let (embed, head) = (rank == 0, rank + 1 == n);
        let (weight_bytes, kv_bytes) = self.stage_bytes(&layers, embed, head);
        StagePlan {
            rank,
            device: self.devices[rank].device.clone(),
            layers,
            embed,
            head,
            weight_bytes,
            kv_bytes,
            workspace_bytes: self.workspace_bytes,
            budget_bytes: self.devices[rank].budget_bytes,
            capacity_bytes: self.devices[rank].capacity_bytes,
        }
    }

    /// Greedy fill where no stage exceeds `cap` in total or its device's limits; each device keeps at least one
    /// layer for the ones after it. `None` when the layers do not all fit.
    fn fill(&self, cap: u64) -> Option<Vec<StagePlan>> {
        let (n, l) = (self.devices.len(), self.cost.layers.len());
        let mut out = Vec::with_capacity(n);
        let mut start = 0;
        for rank in 0..n {
            let ok = |s: &StagePlan| s.total_bytes() <= cap && s.fits();
            let must_leave = n - rank - 1;
            let mut end = start;
            while end < l - must_leave && ok(&self.stage(rank, start..end + 1)) {
                end += 1;
            }
            if rank + 1 == n {
                end = l;
            }
            if end == start {
                return None;
            }
            let s = self.stage(rank, start..end);
            if !ok(&s) {
                return None;
            }
            out.push(s);
            start = end;
        }
        (start == l).then_some(out)
    }
}

/// The split that minimises the largest slice, or why none fits.
pub fn plan(input: &PlanInput<'_>) -> Result<Vec<StagePlan>, PlanError> {
    let (n, l) = (input.devices.len(), input.cost.layers.len());
    if n == 0 {
        return Err(PlanError::NoDevices);
    }
    if n > l {
        return Err(PlanError::MoreDevicesThanLayers { devices: n, layers: l });
    }
    let everything = input.stage_bytes(&(0..l), true, true);
    let needed = everything.0 + everything.1 + input.workspace_bytes * n as u64;
    let (mut lo, mut hi) = (0u64, input.devices.iter().map(|d| d.capacity_bytes).max().unwrap_or(0));
    let Some(mut best) = input.fill(hi) else {
        let largest = (0..l).map(|i| input.stage_bytes(&(i..i + 1), false, false)).map(|(w, k)| w + k).max();
        return Err(PlanError::DoesNotFit {
            needed,
            weights: everything.0,
            kv: everything.1,
            workspace: input.workspace_bytes * n as u64,
            context: input.context_tokens,
            budget: input.devices.iter().map(|d| d.budget_bytes).sum(),
            capacity: input.devices.iter().map(|d| d.capacity_bytes).sum(),
            devices: n,
            largest: largest.unwrap_or(0) + input.workspace_bytes,
        });
    };
    // Binary search on the largest slice's size.
    while lo + 1 < hi {
        let mid = lo + (hi - lo) / 2;
        match input.fill(mid) {
            Some(p) => {
                best = p;
                hi = mid;
            }
            None => lo = mid,
        }
    }
    Ok(best)
}

/// A recipe's explicit placement: one layer range per device, contiguous and covering every layer.
pub fn plan_override(input: &PlanInput<'_>, ranges: &[Range<usize>]) -> Result<Vec<StagePlan>, PlanError> {
    let bad = |reason: String| PlanError::BadOverride { reason };
    if ranges.len() != input.devices.len() {
        return Err(bad(format!("{} ranges for {} devices", ranges.len(), input.devices.len())));
    }
    let mut next = 0;
    let mut out = Vec::new();
    for (rank, r) in ranges.iter().enumerate() {
        if r.start != next || r.end <= r.start {
            return Err(bad(format!("device {rank}: layers {r:?} do not continue at layer {next}")));
        }
        next = r.end;
        let s = input.stage(rank, r.clone());
        if !s.fits() {
            return Err(bad(format!(
                "device {rank} ({}): layers {r:?} need {} of weights ({} in all), over its budget {} ({})",
                s.device,
                gib(s.weight_bytes),
                gib(s.total_bytes()),
                gib(s.budget_bytes),
                gib(s.capacity_bytes)
            )));
        }
        out.push(s);
    }
    if next != input.cost.layers.len() {
        return Err(bad(format!("the ranges end at layer {next}, the model has {}", input.cost.layers.len())));
    }
    Ok(out)
}

/// How a backend holds weights and cache, for sizing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residency {
    /// The CPU reference: every weight dequantized to f32, cache in f32.
    CpuF32,
    /// As stored in the checkpoint (packed GPTQ, bf16 dense), cache in `kv_elem_bytes` per value.
    Packed { kv_elem_bytes: u64 },
}

/// The model's cost read from the checkpoint's headers (no weight is read).
pub fn model_cost(cfg: &ModelConfig, ckpt: &Checkpoint, residency: Residency) -> ModelCost {
    let mut layers = vec![LayerCost { weight_bytes: 0 }; cfg.num_hidden_layers];
    let (mut embed_bytes, mut head_bytes) = (0, 0);
    for t in ckpt.tensors() {
        let bytes = match residency {
            Residency::Packed { .. } => t.byte_len() as u64,
            // A quantized linear becomes in×out f32 values: qweight holds in·bits/32 × out words.
            Residency::CpuF32 if t.name.ends_with(".qweight") => {
                let in_features = layer_in_features(cfg, &t.name).unwrap_or(0) as u64;
                in_features * t.shape.get(1).copied().unwrap_or(0) as u64 * 4
            }
            Residency::CpuF32
                if t.name.ends_with(".qzeros") || t.name.ends_with(".scales") || t.name.ends_with(".g_idx") =>
            {
                0
            }
            Residency::CpuF32 => t.numel() as u64 * 4,
        };
        if t.name.starts_with("model.embed_tokens.") {
            embed_bytes += bytes;
        } else if t.name.starts_with("lm_head.") || t.name == "model.norm.weight" {
            head_bytes += bytes;
        } else if let Some(l) = layer_of(&t.name)
            && l < layers.len()
        {
            layers[l].weight_bytes += bytes;
        }
    }
    if let Residency::Packed { .. } = residency {
        // Absorbed attention reads kv_b_proj as a dense copy in the activation dtype (bf16 on GPU workers) made
        // on first use (crates/cuda backend.rs `dense_of`): heads × (qk_nope + v_head) × kv_lora values a
        // layer, 32 MiB on the real model.
        let kv_b = (cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) * cfg.kv_lora_rank) as u64 * 2;
        layers.iter_mut().for_each(|l| l.weight_bytes += kv_b);
    }
    let values = (cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.indexer.map_or(0, |i| i.head_dim)) as u64;
    // The GPU cache keeps an f32 scale per position for each of its three parts (crates/cuda cache.rs).
    let per_token = match residency {
        Residency::CpuF32 => values * 4,
        Residency::Packed { kv_elem_bytes } => values * kv_elem_bytes + 3 * 4,
    };
    ModelCost { embed_bytes, head_bytes, layers, kv_bytes_per_token_layer: per_token }
}

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

/// The in-features of a quantized linear, from the config (qweight's rows are in·bits/32, bits unknown here).
fn layer_in_features(cfg: &ModelConfig, name: &str) -> Option<usize> {
    let module = name.strip_suffix(".qweight")?;
    let last = module.rsplit('.').next()?;
    let h = cfg.hidden_size;
    Some(match last {
        "q_a_proj" | "kv_a_proj_with_mqa" | "wk" | "weights_proj" | "gate_proj" | "up_proj" | "q_proj" => h,
        "q_b_proj" | "wq_b" => cfg.q_lora_rank.unwrap_or(h),
        "kv_b_proj" => cfg.kv_lora_rank,
        "o_proj" => cfg.num_attention_heads * cfg.v_head_dim,
        "down_proj" if module.contains(".experts.") => cfg.moe_intermediate_size,
        "down_proj" if module.contains(".shared_experts") => cfg.moe_intermediate_size * cfg.n_shared_experts,
        "down_proj" => cfg.intermediate_size,
        _ => return None,
    })
}

/// The plan as a table, for logs and `serve`'s start-up output.
pub fn describe(plan: &[StagePlan]) -> String {
    let mut s = String::from(
        "rank  device    layers     weights     kv cache    workspace   total (weights budget / memory)\n",
    );
    for p in plan {
        let extra = match (p.embed, p.head) {
            (true, true) => " +embed +head",
            (true, false) => " +embed",
            (false, true) => " +head",
            _ => "",
        };
        let _ = writeln!(
            s,
            "{:<5} {:<9} {:<10} {:<11} {:<11} {:<11} {} ({} / {}){extra}",
            p.rank,
            p.device,
            format!("{}..{}", p.layers.start, p.layers.end),
            gib(p.weight_bytes),
            gib(p.kv_bytes),
            gib(p.workspace_bytes),
            gib(p.total_bytes()),
            gib(p.budget_bytes),
            gib(p.capacity_bytes),
        );
    }
    s
}

#[cfg(test)]
#[path = "planner_tests.rs"]
mod tests;
