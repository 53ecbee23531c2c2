//! A worker's memory: how big a GPU worker's KV cache is made ([`MemoryPlan`], [`size_cache`]), and what Health
//! reports as `memory_bytes` on the CPU (an estimate of the weights a slice holds plus its cache).
//!
//! The GPU cache gets what the plan leaves of the device's budget once the weights are loaded: the budget (the
//! plan's capacity for the device) less the weights less a workspace margin, never more than the device's real
//! free memory after the load less that margin, nor more than an operator's cap. The plan's weight figure is
//! used rather than the measured one, so that workers sharing a GPU (tests) size alike; the measured one
//! bounds the cache through the free memory.
//!
//! `Stage` has no accessor for the bytes its backend holds, so the weights are estimated from the checkpoint's
//! tensor headers the way the f32 CPU backend lays them out: every float tensor widened to 4 bytes per value,
//! every GPTQ Linear dequantized to `in × out × 4` bytes (its qzeros/scales/g_idx are consumed at load). The
//! cache is `kv_lora + qk_rope (+ index_head_dim)` f32 values per cached position per layer (MODEL_SPEC §2.5).
//! A GPU backend will want real accessors on `Stage`; this is the CPU engine's number.

use pipemoe_model::{Checkpoint, ModelConfig, SliceSpec, TensorMeta};

/// Bytes of one f32 value: the CPU backend's only element type.
const F32: u64 = 4;

/// Device memory kept free for activations and scratch when the controller does not say (it passes the plan's).
pub const DEFAULT_WORKSPACE_BYTES: u64 = 1 << 30;

/// What the placement plan allows this worker's device, as the controller passes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Weights + KV cache + workspace at most this; `None`: only the device's free memory bounds the cache.
    pub budget_bytes: Option<u64>,
    /// The plan's figure for this slice's weights; `None`: what loading measurably took.
    pub weight_bytes: Option<u64>,
    /// Left free for activations, scratch and what the backend allocates on first use.
    pub workspace_bytes: u64,
    /// An operator's cap on the cache (`PIPEMOE_KV_CACHE_BYTES`).
    pub kv_cache_bytes: Option<u64>,
}

impl Default for MemoryPlan {
    fn default() -> Self {
        Self { budget_bytes: None, weight_bytes: None, workspace_bytes: DEFAULT_WORKSPACE_BYTES, kv_cache_bytes: None }
    }
}

/// The GPU cache's size, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheSizing {
    pub cache_bytes: u64,
    /// What loading the weights took on the device (free memory before less after).
    pub loaded_bytes: u64,
    /// Which limit decided: "budget", "free memory" or "PIPEMOE_KV_CACHE_BYTES".
    pub limited_by: &'static str,
}

/// The cache's bytes from the plan and the device's free memory measured before and after loading the weights.
pub fn size_cache(plan: &MemoryPlan, free_before: u64, free_after: u64) -> CacheSizing {
    let loaded_bytes = free_before.saturating_sub(free_after);
    let weights = plan.weight_bytes.unwrap_or(loaded_bytes);
    let budget = plan.budget_bytes.map(|b| ("budget", b.saturating_sub(weights).saturating_sub(plan.workspace_bytes)));
    let free = Some(("free memory", free_after.saturating_sub(plan.workspace_bytes)));
    let cap = plan.kv_cache_bytes.map(|c| ("PIPEMOE_KV_CACHE_BYTES", c));
    // On a tie the first listed is named.
    let (limited_by, cache_bytes) =
        [budget, free, cap].into_iter().flatten().min_by_key(|&(_, bytes)| bytes).unwrap_or(("free memory", 0));
    CacheSizing { cache_bytes, loaded_bytes, limited_by }
}

/// Estimated bytes of the weights `slice` loads on the f32 CPU backend.
pub fn weight_bytes(cfg: &ModelConfig, ckpt: &Checkpoint, slice: &SliceSpec) -> u64 {
    let mut total = 0;
    for t in ckpt.tensors() {
        let copies = loaded_copies(cfg, slice, &t.name);
        if copies > 0 {
            total += copies * f32_bytes(ckpt, t);
        }
    }
    total
}

/// Cache bytes per cached position, summed over the slice's layers.
pub fn cache_bytes_per_position(cfg: &ModelConfig, slice: &SliceSpec) -> u64 {
    let index_dim = cfg.indexer.as_ref().map_or(0, |i| i.head_dim);
    let per_layer = (cfg.kv_lora_rank + cfg.qk_rope_head_dim + index_dim) as u64 * F32;
    per_layer * slice.layers.len() as u64
}

/// How many times the stage loads tensor `name` (the embedding table twice when tied and both ends are here).
fn loaded_copies(cfg: &ModelConfig, slice: &SliceSpec, name: &str) -> u64 {
    match name {
        "model.embed_tokens.weight" => u64::from(slice.embed) + u64::from(slice.head && cfg.tie_word_embeddings),
        "model.norm.weight" | "lm_head.weight" => u64::from(slice.head),
        _ => {
            let Some(rest) = name.strip_prefix("model.layers.") else { return 0 };
            let Some((layer, module)) = rest.split_once('.') else { return 0 };
            let Ok(layer) = layer.parse::<usize>() else { return 0 };
            if !slice.layers.contains(&layer) {
                return 0;
            }
            if let Some(expert) = module.strip_prefix("mlp.experts.") {
                let e = expert.split_once('.').and_then(|(e, _)| e.parse::<usize>().ok());
                return u64::from(e.is_some_and(|e| slice.holds_expert(e)));
            }
            if module.starts_with("mlp.shared_experts.") {
                return u64::from(slice.holds_shared_expert());
            }
            1
        }
    }
}

/// Bytes of one tensor once widened to f32 (GPTQ parts: the whole dequantized Linear on its `qweight`).
fn f32_bytes(ckpt: &Checkpoint, t: &TensorMeta) -> u64 {
    let gptq_prefix = ["qzeros", "scales", "g_idx"]
        .iter()
        .find_map(|part| t.name.strip_suffix(part).and_then(|p| p.strip_suffix('.')));
    if let Some(prefix) = gptq_prefix
        && ckpt.contains(&format!("{prefix}.qweight"))
    {
        return 0;
    }
    if let Some(prefix) = t.name.strip_suffix(".qweight")
        && let Some(qzeros) = ckpt.meta(&format!("{prefix}.qzeros"))
        && let ([packed_in, out], [_, packed_out]) = (t.shape.as_slice(), qzeros.shape.as_slice())
        && *packed_out > 0
    {
        // qweight [in·bits/32, out] and qzeros [groups, out·bits/32]: in = packed_in · out / packed_out.
        return (packed_in * out / packed_out * out) as u64 * F32;
    }
    t.numel() as u64 * F32
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn the_cache_gets_what_the_weights_leave_of_the_budget() {
        let plan = MemoryPlan {
            budget_bytes: Some(18 * GIB),
            weight_bytes: Some(15 * GIB),
            workspace_bytes: GIB,
            kv_cache_bytes: None,
        };
        // A roomy device: the budget decides, with the plan's weights (not the 16 GiB loading took).
        let s = size_cache(&plan, 23 * GIB, 7 * GIB);
        assert_eq!(s, CacheSizing { cache_bytes: 2 * GIB, loaded_bytes: 16 * GIB, limited_by: "budget" });
        // Less free memory than the budget assumed: the device decides.
        let s = size_cache(&plan, 17 * GIB, 2 * GIB + GIB / 2);
        assert_eq!((s.cache_bytes, s.limited_by), (3 * GIB / 2, "free memory"));
        // The operator's cap.
        let capped = MemoryPlan { kv_cache_bytes: Some(1000), ..plan };
        assert_eq!(size_cache(&capped, 23 * GIB, 7 * GIB).cache_bytes, 1000);
        assert_eq!(size_cache(&capped, 23 * GIB, 7 * GIB).limited_by, "PIPEMOE_KV_CACHE_BYTES");
        // Weights over the budget leave nothing (never an underflow).
        let over = MemoryPlan { weight_bytes: Some(19 * GIB), ..plan };
        assert_eq!(size_cache(&over, 23 * GIB, 4 * GIB).cache_bytes, 0);
        // Without a plan: the measured weights and free memory.
        let bare = MemoryPlan { budget_bytes: Some(10 * GIB), weight_bytes: None, ..plan };
        assert_eq!(size_cache(&bare, 80 * GIB, 74 * GIB).cache_bytes, 3 * GIB);
        assert_eq!(size_cache(&MemoryPlan::default(), 80 * GIB, 74 * GIB).cache_bytes, 73 * GIB);
    }

    #[test]
    fn slices_add_up_to_the_whole_model() -> pipemoe_model::Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/models/tiny-dsv32-w3a16");
        let cfg = ModelConfig::from_dir(&dir)?;
        let ckpt = Checkpoint::open(&dir)?;
        let whole = weight_bytes(&cfg, &ckpt, &SliceSpec::full(&cfg));
        let parts = [
            SliceSpec { layers: 0..1, experts: None, embed: true, head: false },
            SliceSpec { layers: 1..3, experts: Some(0..5), embed: false, head: false },
            SliceSpec { layers: 1..3, experts: Some(5..16), embed: false, head: false },
            SliceSpec { layers: 3..4, experts: None, embed: false, head: true },
        ];
        let sum: u64 = parts.iter().map(|s| weight_bytes(&cfg, &ckpt, s)).sum();
        // The router and indexer are counted by both expert halves of layers 1..3, as both load them.
        let routers: u64 = ckpt
            .tensors()
            .filter(|t| {
                (t.name.starts_with("model.layers.1.") || t.name.starts_with("model.layers.2."))
                    && !t.name.contains(".experts.")
                    && !t.name.contains(".shared_experts.")
            })
            .map(|t| f32_bytes(&ckpt, t))
            .sum();
        assert_eq!(sum, whole + routers);
        // 3-bit weights widen to f32: more than 8× the bytes on disk (norms and bf16 tensors widen less).
        assert!(whole > 8 * ckpt.total_bytes() / 2, "{whole} vs {}", ckpt.total_bytes());
        // The demo's embedding table alone: vocab × hidden f32.
        let embed = weight_bytes(&cfg, &ckpt, &SliceSpec { layers: 0..0, experts: None, embed: true, head: false });
        assert_eq!(embed, (cfg.vocab_size * cfg.hidden_size) as u64 * F32);
        assert_eq!(cache_bytes_per_position(&cfg, &parts[1]), 2 * (128 + 32 + 64) * F32);
        Ok(())
    }
}
