//! The latent KV cache and attention over it, in f32 (MODEL_SPEC §2.3, §2.5, §2.6).

use std::collections::HashMap;

use super::kernels::{dot, softmax, top_k};
use super::{CpuTensor, CpuWeight};
use crate::backend::{HostSelection, IndexerDims, MlaDims, Row, SeqId};
use crate::{Error, Result};

/// One sequence's cached positions in one layer.
#[derive(Clone, Debug, Default)]
struct SeqCache {
    /// `[len, kv_lora]`: the normed latent `c`.
    latent: Vec<f32>,
    /// `[len, qk_rope]`: the roped shared key.
    k_pe: Vec<f32>,
    /// `[len, index_head_dim]`: the indexer's roped key (V3.2).
    index_k: Vec<f32>,
    len: usize,
}

/// Positions per block of a bounded cache (as the GPU's pool: crates/cuda cache.rs).
pub const BLOCK: usize = 64;

/// One layer's cache for every live sequence.
#[derive(Clone, Debug)]
pub struct CpuLayerCache {
    kv_lora: usize,
    qk_rope: usize,
    index_dim: usize,
    seqs: HashMap<SeqId, SeqCache>,
    /// Positions it may hold over all sequences, each sequence in whole blocks; `None`: no bound.
    capacity: Option<usize>,
}

impl CpuLayerCache {
    pub fn new(dims: &MlaDims, indexer: Option<&IndexerDims>) -> Self {
        Self {
            kv_lora: dims.kv_lora,
            qk_rope: dims.qk_rope,
            index_dim: indexer.map_or(0, |i| i.head_dim),
            seqs: HashMap::new(),
            capacity: None,
        }
    }

    /// Bounded to the whole blocks of f32 values `bytes` holds.
    pub fn with_budget(self, bytes: u64) -> Self {
        let per_position = ((self.kv_lora + self.qk_rope + self.index_dim) * 4).max(1) as u64;
        let blocks = bytes / per_position / BLOCK as u64;
        Self { capacity: Some(usize::try_from(blocks).unwrap_or(usize::MAX / BLOCK) * BLOCK), ..self }
    }

    pub fn len(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.len)
    }

    /// Positions it may hold; `None` without a bound.
    pub fn capacity(&self) -> Option<usize> {
        self.capacity
    }

    /// Positions cached over every sequence.
    pub fn positions_used(&self) -> usize {
        self.seqs.values().map(|s| s.len).sum()
    }

    /// Positions held in whole blocks.
    pub fn positions_reserved(&self) -> usize {
        self.seqs.values().map(|s| s.len.div_ceil(BLOCK) * BLOCK).sum()
    }

    /// `CacheFull` unless the rows fit beside what is cached (checked before anything is written).
    fn check_room(&self, rows: &[Row]) -> Result<()> {
        let Some(capacity) = self.capacity else { return Ok(()) };
        let mut after: HashMap<SeqId, usize> = HashMap::new();
        for row in rows {
            let end = after.entry(row.seq).or_insert_with(|| self.len(row.seq));
            *end = (*end).max(row.pos + 1);
        }
        let used = self.positions_reserved();
        let grown: usize = after
            .iter()
            .map(|(&s, &end)| (end.div_ceil(BLOCK) * BLOCK).saturating_sub(self.len(s).div_ceil(BLOCK) * BLOCK))
            .sum();
        if used + grown > capacity {
            return Err(Error::CacheFull { needed: grown, used, capacity });
        }
        Ok(())
    }

    pub fn free(&mut self, seq: SeqId) {
        self.seqs.remove(&seq);
    }

    fn seq(&self, seq: SeqId) -> Result<&SeqCache> {
        self.seqs.get(&seq).ok_or(Error::UnknownSequence { seq })
    }

    pub fn write(
        &mut self,
        rows: &[Row],
        latent: &CpuTensor,
        k_pe: &CpuTensor,
        index_k: Option<&CpuTensor>,
    ) -> Result<()> {
        if latent.cols != self.kv_lora || k_pe.cols != self.qk_rope || latent.rows != rows.len() {
            return Err(Error::Backend { reason: "cache_write: latent/k_pe shape".into() });
        }
        if self.index_dim > 0 && index_k.is_none_or(|k| k.cols != self.index_dim) {
            return Err(Error::Backend { reason: "cache_write: the indexer key is missing or mis-shaped".into() });
        }
        self.check_room(rows)?;
        for (r, row) in rows.iter().enumerate() {
            let s = self.seqs.entry(row.seq).or_default();
            if row.pos != s.len {
                return Err(Error::CachePosition { seq: row.seq, expected: s.len, found: row.pos });
            }
            s.latent.extend_from_slice(latent.row(r));
            s.k_pe.extend_from_slice(k_pe.row(r));
            if let Some(k) = index_k {
                s.index_k.extend_from_slice(k.row(r));
            }
            s.len += 1;
        }
        Ok(())
    }

    /// `I(t) = Σ_h w_h · relu(q_h·k_t)` over causal keys `t ≤ pos`, top `min(topk, pos+1)`.
    /// Positive constants (HF's `head_dim^-0.5`, folded into nothing here) do not change the order.
    pub fn indexer_select(
        &self,
        q: &CpuTensor,
        w: &CpuTensor,
        dims: &IndexerDims,
        rows: &[Row],
    ) -> Result<HostSelection> {
        let d = dims.head_dim;
        let mut out = Vec::with_capacity(rows.len());
        for (r, row) in rows.iter().enumerate() {
            let n = row.pos + 1;
            if n <= dims.topk {
                out.push((0..n as u32).collect());
                continue;
            }
            let s = self.seq(row.seq)?;
            let (qr, wr) = (q.row(r), w.row(r));
            let scores: Vec<f32> = (0..n)
                .map(|t| {
                    let k = &s.index_k[t * d..(t + 1) * d];
                    (0..dims.heads).map(|h| wr[h] * dot(&qr[h * d..(h + 1) * d], k).max(0.0)).sum()
                })
                .collect();
            let mut sel = top_k(&scores, dims.topk);
            sel.sort_unstable();
            out.push(sel);
        }
        Ok(out)
    }

    /// Absorbed MLA (MODEL_SPEC §2.5): `q_abs = W_UKᵀ q_nope`, scores against the latent and k_pe, softmax in
    /// f32, the latent mix projected by `W_UV`.
    pub fn mla_attention(
        &self,
        q: &CpuTensor,
        kv_b: &CpuWeight,
        dims: &MlaDims,
        rows: &[Row],
        selection: Option<&HostSelection>,
    ) -> Result<CpuTensor> {
        let (nope, rope, vdim, lora) = (dims.qk_nope, dims.qk_rope, dims.v_head, dims.kv_lora);
        let qk = nope + rope;
        if q.cols != dims.heads * qk || kv_b.in_features != lora || kv_b.out_features != dims.heads * (nope + vdim) {
            return Err(Error::Backend { reason: "mla_attention: q or kv_b_proj shape".into() });
        }
        if selection.is_some_and(|s| s.len() != rows.len()) {
            return Err(Error::Backend { reason: "mla_attention: the selection has another row count".into() });
        }
        let mut out = vec![0f32; rows.len() * dims.heads * vdim];
        let mut q_abs = vec![0f32; lora];
        let mut o_lat = vec![0f32; lora];
        for (r, row) in rows.iter().enumerate() {
            let s = self.seq(row.seq)?;
            if row.pos >= s.len {
                return Err(Error::CachePosition { seq: row.seq, expected: s.len, found: row.pos });
            }
            let all: Vec<u32>;
            let keys: &[u32] = match selection {
                Some(sel) => &sel[r],
                None => {
                    all = (0..=row.pos as u32).collect();
                    &all
                }
            };
            let qr = q.row(r);
            for h in 0..dims.heads {
                let (q_nope, q_pe) = (&qr[h * qk..h * qk + nope], &qr[h * qk + nope..(h + 1) * qk]);
                let wbase = h * (nope + vdim);
                q_abs.iter_mut().for_each(|v| *v = 0.0);
                for (d, &qd) in q_nope.iter().enumerate() {
                    super::kernels::axpy(&mut q_abs, qd, kv_b.row(wbase + d));
                }
                let mut p: Vec<f32> = keys
                    .iter()
                    .map(|&t| {
                        let t = t as usize;
                        let c = &s.latent[t * lora..(t + 1) * lora];
                        let kpe = &s.k_pe[t * rope..(t + 1) * rope];
                        (dot(&q_abs, c) + dot(q_pe, kpe)) * dims.softmax_scale
                    })
                    .collect();
                softmax(&mut p);
                o_lat.iter_mut().for_each(|v| *v = 0.0);
                for (&t, &pt) in keys.iter().zip(&p) {
                    let t = t as usize;
                    super::kernels::axpy(&mut o_lat, pt, &s.latent[t * lora..(t + 1) * lora]);
                }
                let o = &mut out[(r * dims.heads + h) * vdim..(r * dims.heads + h + 1) * vdim];
                for (i, oi) in o.iter_mut().enumerate() {
                    *oi = dot(kv_b.row(wbase + nope + i), &o_lat);
                }
            }
        }
        Ok(CpuTensor { rows: rows.len(), cols: dims.heads * vdim, data: out })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(seq: SeqId, start: usize, n: usize) -> Vec<Row> {
        (start..start + n).map(|pos| Row { seq, pos }).collect()
    }

    fn write(c: &mut CpuLayerCache, seq: SeqId, start: usize, n: usize) -> Result<()> {
        let t = |cols: usize| CpuTensor { rows: n, cols, data: vec![0.5; n * cols] };
        c.write(&rows(seq, start, n), &t(8), &t(4), None)
    }

    #[test]
    fn a_bounded_cache_holds_whole_blocks_and_refuses_a_step_before_writing_any_of_it() {
        let dims = MlaDims { heads: 1, qk_nope: 4, qk_rope: 4, v_head: 4, kv_lora: 8, softmax_scale: 1.0 };
        // 12 f32 a position: two blocks of 64.
        let mut c = CpuLayerCache::new(&dims, None).with_budget(2 * 64 * 12 * 4 + 47);
        assert_eq!(c.capacity(), Some(128));
        write(&mut c, 1, 0, 10).unwrap();
        write(&mut c, 2, 0, 54).unwrap();
        assert_eq!((c.positions_used(), c.positions_reserved()), (64, 128));
        // Sequence 1 stays within its block; sequence 2 would need a third.
        write(&mut c, 1, 10, 54).unwrap();
        let err = write(&mut c, 2, 54, 11).expect_err("a third block");
        assert!(matches!(err, Error::CacheFull { needed: 64, used: 128, capacity: 128 }), "{err}");
        assert_eq!(c.len(2), 54, "nothing of the refused step was written");
        c.free(1);
        write(&mut c, 2, 54, 11).unwrap();
        assert_eq!(c.positions_reserved(), 128);
        // Unbounded by default.
        assert_eq!(CpuLayerCache::new(&dims, None).capacity(), None);
    }
}
