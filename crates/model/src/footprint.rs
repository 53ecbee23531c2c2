//! The bytes of a checkpoint grouped by what reads them, from the tensors actually stored (a real checkpoint or a
//! generated one), and the bytes a decode step must move: the floor of a bandwidth-bound step is these bytes over
//! the device's streaming-read bandwidth (MODEL_SPEC §6 "Active weights per decoded token").

use crate::{Checkpoint, ModelConfig};

/// One decoder layer's stored bytes (every part of a GPTQ linear counted: qweight, qzeros, scales, g_idx).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerBytes {
    pub layer: usize,
    /// `input_layernorm`, `post_attention_layernorm`.
    pub norms: u64,
    /// MLA: `q_a`, `q_b`, `kv_a`, `kv_b`, `o` and their norms.
    pub attention: u64,
    /// The V3.2 indexer (`wq_b`, `wk`, `k_norm`, `weights_proj`).
    pub indexer: u64,
    /// The router's weight and correction bias.
    pub router: u64,
    /// Each routed expert's gate, up and down, by expert id (empty for a dense layer).
    pub routed: Vec<u64>,
    pub shared: u64,
    /// The dense MLP of the first layers.
    pub dense_mlp: u64,
}

impl LayerBytes {
    /// Every tensor of the layer that the bench groups (all of them, for the layouts of MODEL_SPEC §3).
    pub fn total(&self) -> u64 {
        self.norms
            + self.attention
            + self.indexer
            + self.router
            + self.routed.iter().sum::<u64>()
            + self.shared
            + self.dense_mlp
    }

    pub fn mean_expert(&self) -> f64 {
        if self.routed.is_empty() { 0.0 } else { self.routed.iter().sum::<u64>() as f64 / self.routed.len() as f64 }
    }

    /// Weight bytes a decode step of `batch` rows reads from this layer: everything but the routed experts, plus
    /// the expected number of distinct experts that `batch` rows choose, `E·(1 − (1 − k/E)^batch)` for uniform,
    /// independent top-k choices (a random router on random activations; real routing is more concentrated).
    pub fn decode_weights(&self, top_k: usize, batch: usize) -> f64 {
        let fixed = (self.norms + self.attention + self.indexer + self.router + self.shared + self.dense_mlp) as f64;
        fixed + expected_distinct(self.routed.len(), top_k, batch) * self.mean_expert()
    }
}

/// Expected distinct experts among `batch` rows each choosing `top_k` of `experts` uniformly.
pub fn expected_distinct(experts: usize, top_k: usize, batch: usize) -> f64 {
    if experts == 0 {
        return 0.0;
    }
    let miss = 1.0 - top_k.min(experts) as f64 / experts as f64;
    experts as f64 * (1.0 - miss.powi(batch as i32))
}

/// Sum of the stored bytes of every tensor whose name starts with `prefix`.
fn bytes_under(ckpt: &Checkpoint, prefix: &str) -> u64 {
    ckpt.tensors().filter(|t| t.name.starts_with(prefix)).map(|t| t.byte_len() as u64).sum()
}

/// Layer `layer`'s bytes as stored in `ckpt`.
pub fn layer_bytes(cfg: &ModelConfig, ckpt: &Checkpoint, layer: usize) -> LayerBytes {
    let p = format!("model.layers.{layer}.");
    let indexer = bytes_under(ckpt, &format!("{p}self_attn.indexer."));
    let moe = cfg.is_moe_layer(layer);
    LayerBytes {
        layer,
        norms: bytes_under(ckpt, &format!("{p}input_layernorm."))
            + bytes_under(ckpt, &format!("{p}post_attention_layernorm.")),
        attention: bytes_under(ckpt, &format!("{p}self_attn.")) - indexer,
        indexer,
        router: if moe { bytes_under(ckpt, &format!("{p}mlp.gate.")) } else { 0 },
        routed: if moe {
            (0..cfg.n_routed_experts).map(|e| bytes_under(ckpt, &format!("{p}mlp.experts.{e}."))).collect()
        } else {
            Vec::new()
        },
        shared: if moe { bytes_under(ckpt, &format!("{p}mlp.shared_experts.")) } else { 0 },
        dense_mlp: if moe { 0 } else { bytes_under(ckpt, &format!("{p}mlp.")) },
    }
}

/// The embeddings and the head as stored (0 for what the checkpoint lacks).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HeadBytes {
    pub embed: u64,
    pub norm: u64,
    pub lm_head: u64,
}

pub fn head_bytes(ckpt: &Checkpoint) -> HeadBytes {
    let one = |name: &str| ckpt.meta(name).map_or(0, |t| t.byte_len() as u64);
    HeadBytes {
        embed: one("model.embed_tokens.weight"),
        norm: one("model.norm.weight"),
        lm_head: one("lm_head.weight"),
    }
}

/// What one layer's latent cache holds per position, in bytes, for a cache of `elem` bytes per value
/// (MODEL_SPEC §6: latent + k_pe, and the indexer key).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CacheBytes {
    pub latent: u64,
    pub index_key: u64,
    /// The indexer's top-k (DSA) when the layers have an indexer: attention reads at most this many keys.
    pub topk: Option<usize>,
}

impl CacheBytes {
    pub fn new(cfg: &ModelConfig, elem: usize, with_indexer: bool) -> Self {
        let ix = cfg.indexer.filter(|_| with_indexer);
        CacheBytes {
            latent: ((cfg.kv_lora_rank + cfg.qk_rope_head_dim) * elem) as u64,
            index_key: ix.map_or(0, |i| (i.head_dim * elem) as u64),
            topk: ix.map(|i| i.topk),
        }
    }

    /// Bytes one decode row with `context` cached positions reads from one layer's cache: every indexer key, and
    /// the latents of the keys attention uses (all of them for dense MLA, the top-k for DSA).
    pub fn decode_read(&self, context: usize) -> u64 {
        let attended = self.topk.map_or(context, |k| k.min(context));
        context as u64 * self.index_key + attended as u64 * self.latent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_distinct_experts() {
        assert_eq!(expected_distinct(128, 8, 1), 8.0);
        assert!((expected_distinct(128, 8, 2) - (16.0 - 0.5)).abs() < 1e-9);
        let many = expected_distinct(128, 8, 32);
        assert!(many > 110.0 && many < 113.0, "{many}");
        assert_eq!(expected_distinct(0, 8, 4), 0.0);
    }
}
