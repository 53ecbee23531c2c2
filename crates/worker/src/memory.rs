//! What Health reports as `memory_bytes`: an estimate of the weights a slice holds on its device plus its cache.
//!
//! `Stage` has no accessor for the bytes its backend holds, so the weights are estimated from the checkpoint's
//! tensor headers the way the f32 CPU backend lays them out: every float tensor widened to 4 bytes per value,
//! every GPTQ Linear dequantized to `in × out × 4` bytes (its qzeros/scales/g_idx are consumed at load). The
//! cache is `kv_lora + qk_rope (+ index_head_dim)` f32 values per cached position per layer (MODEL_SPEC §2.5).
//! A GPU backend will want real accessors on `Stage`; this is the CPU engine's number.

use pipemoe_model::{Checkpoint, ModelConfig, SliceSpec, TensorMeta};

/// Bytes of one f32 value: the CPU backend's only element type.
const F32: u64 = 4;

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
