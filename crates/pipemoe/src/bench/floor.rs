//! What each measured figure is compared with: the bytes a decode step must read (weights of the attention, the
//! chosen and shared experts, the cache it attends over) and the FLOPs of a prefill chunk, split into the GEMMs
//! cuBLAS is timed on and the attention arithmetic (absorbed MLA, MODEL_SPEC §2.5, and the indexer, §2.6).

use pipemoe_model::ModelConfig;
use pipemoe_model::footprint::{CacheBytes, HeadBytes, LayerBytes};

use super::ceiling::Shape;

/// The slice's stored bytes, grouped.
pub struct SliceBytes {
    pub layers: Vec<LayerBytes>,
    pub head: HeadBytes,
    pub cache: CacheBytes,
    pub hidden: usize,
    pub top_k: usize,
}

impl SliceBytes {
    pub fn weights(&self) -> u64 {
        self.layers.iter().map(LayerBytes::total).sum::<u64>() + self.head.embed + self.head.norm + self.head.lm_head
    }

    /// Bytes one decode step of `batch` sequences at `context` cached positions must read: each layer's weights
    /// (expected distinct experts for the batch), each row's cache reads, the head once, an embedding row each.
    pub fn decode_step(&self, batch: usize, context: usize) -> f64 {
        let layers: f64 = self
            .layers
            .iter()
            .map(|l| l.decode_weights(self.top_k, batch) + (batch as u64 * self.cache.decode_read(context)) as f64)
            .sum();
        let embed_rows = if self.head.embed > 0 { (batch * self.hidden * 2) as f64 } else { 0.0 };
        layers + (self.head.norm + self.head.lm_head) as f64 + embed_rows
    }
}

/// The GEMMs of one prefill chunk of `m` rows through layer `layer`, each with its count (the routed experts
/// each take `m·top_k/E` rows, the even share of a random router).
pub fn prefill_shapes(cfg: &ModelConfig, layer: usize, m: usize, with_indexer: bool) -> Vec<(Shape, usize)> {
    let (h, heads) = (cfg.hidden_size, cfg.num_attention_heads);
    let s = |k: usize, n: usize| Shape { m, k, n };
    // kv_b_proj is absorbed into attention (`attention_flop`), as the backend runs it.
    let mut v = vec![(s(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim), 1), (s(heads * cfg.v_head_dim, h), 1)];
    match cfg.q_lora_rank {
        Some(r) => v.extend([(s(h, r), 1), (s(r, heads * cfg.qk_head_dim()), 1)]),
        None => v.push((s(h, heads * cfg.qk_head_dim()), 1)),
    }
    if let (true, Some(ix), Some(r)) = (with_indexer, cfg.indexer, cfg.q_lora_rank) {
        v.extend([(s(r, ix.n_heads * ix.head_dim), 1), (s(h, ix.head_dim), 1), (s(h, ix.n_heads), 1)]);
    }
    if cfg.is_moe_layer(layer) {
        let inter = cfg.moe_intermediate_size;
        let shared = inter * cfg.n_shared_experts;
        v.extend([(s(h, cfg.n_routed_experts), 1), (s(h, shared), 2), (s(shared, h), 1)]);
        let me = (m * cfg.num_experts_per_tok).div_ceil(cfg.n_routed_experts).max(1);
        let e = |k: usize, n: usize| Shape { m: me, k, n };
        v.extend([(e(h, inter), 2 * cfg.n_routed_experts), (e(inter, h), cfg.n_routed_experts)]);
    } else {
        v.extend([(s(h, cfg.intermediate_size), 2), (s(cfg.intermediate_size, h), 1)]);
    }
    v
}

/// FLOPs of attention for positions `start..end` of one sequence in one layer: absorbed MLA (query and output
/// absorption per row, scores and values per attended key: every causal key, or the indexer's top-k) and the
/// indexer's scores over every causal key.
pub fn attention_flop(cfg: &ModelConfig, start: usize, end: usize, with_indexer: bool) -> f64 {
    let (heads, lora, rope) = (cfg.num_attention_heads as f64, cfg.kv_lora_rank as f64, cfg.qk_rope_head_dim as f64);
    let per_row = 2.0 * heads * lora * (cfg.qk_nope_head_dim + cfg.v_head_dim) as f64;
    let per_key = 2.0 * heads * (lora + rope) + 2.0 * heads * lora;
    let ix = cfg.indexer.filter(|_| with_indexer);
    let per_index_key = ix.map_or(0.0, |i| 2.0 * (i.n_heads * i.head_dim) as f64);
    let topk = ix.map_or(usize::MAX, |i| i.topk);
    (start..end).map(|p| per_row + per_key * (p + 1).min(topk) as f64 + per_index_key * (p + 1) as f64).sum()
}
