//! The latent KV cache on the device, block-paged: per layer, one pool of fixed-size blocks of [`BLOCK`]
//! positions holding the normed latent, the roped k_pe and (V3.2) the indexer key in the recipe's
//! `kv_cache_dtype`, plus one scale per position and component (fp8 e4m3 stores `x / scale` with
//! `scale = max|x| / 448`; f32 and bf16 store 1). Each sequence owns a block table kept on the host and uploaded
//! with each step's row descriptors ([`StepTables`]); kernels find position `p` of a sequence at pool slot
//! `table[p / BLOCK] · BLOCK + p % BLOCK`.
//!
//! The pool is sized from the memory budget ([`CacheBudget`]) and allocated in full on the first write (weights
//! are on the device by then); a step that does not fit is refused before anything is written
//! (`Error::CacheFull`). Without a budget the pool starts small and doubles, moving its contents, as needed.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use pipemoe_model::backend::{IndexerDims, MlaDims, Row, SeqId};

use crate::backend::{MResult, md};
use crate::gpu::Gpu;

/// Positions per block (`KV_BLOCK` in kernels/attention.cu and kernels/indexer.cu).
pub const BLOCK: usize = 64;

/// Blocks of a pool without a budget, at first; it doubles from there.
const FIRST_BLOCKS: usize = 16;

/// How cached values are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// Exact (the reference and the tests' default).
    #[default]
    F32,
    Bf16,
    /// e4m3 with a scale per position and component.
    Fp8,
}

impl KvDtype {
    /// Kernel code: 0 = f32, 1 = bf16, 2 = fp8.
    pub fn code(self) -> i32 {
        match self {
            KvDtype::F32 => 0,
            KvDtype::Bf16 => 1,
            KvDtype::Fp8 => 2,
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
            KvDtype::Fp8 => 1,
        }
    }
}

impl FromStr for KvDtype {
    type Err = String;

    /// A recipe's `kv_cache_dtype`: `auto` is bf16 (the model's activation dtype).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(KvDtype::F32),
            "auto" | "bf16" | "bfloat16" => Ok(KvDtype::Bf16),
            "fp8" | "fp8_e4m3" => Ok(KvDtype::Fp8),
            other => Err(format!("{other:?} is not a kv_cache_dtype (expected auto, bf16, fp8 or f32)")),
        }
    }
}

/// Device memory for the latent cache of `layers` layers, shared equally between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheBudget {
    pub bytes: usize,
    pub layers: usize,
}

/// The device buffers of one layer's pool, `slots = blocks · BLOCK` positions each.
pub struct Pool {
    /// `[slots, kv_lora]` in the cache dtype.
    pub latent: CudaSlice<u8>,
    /// `[slots, qk_rope]`.
    pub k_pe: CudaSlice<u8>,
    /// `[slots, index_dim]` (one element when the layer has no indexer).
    pub index_k: CudaSlice<u8>,
    /// `[slots, 3]`: latent, k_pe, indexer-key scale of each slot.
    pub scales: CudaSlice<f32>,
    blocks: usize,
    /// This allocation's number in the process (a recorded step replays only over the pools it was recorded with).
    pub id: u64,
}

/// Pool allocations so far in this process.
static POOL_IDS: AtomicU64 = AtomicU64::new(1);

#[derive(Default)]
struct SeqTable {
    blocks: Vec<u32>,
    len: usize,
}

pub struct GpuLayerCache {
    pub lora: usize,
    pub rope: usize,
    pub index_dim: usize,
    pub dtype: KvDtype,
    /// Blocks the budget allows; `None` grows without bound.
    budget_blocks: Option<usize>,
    pool: Option<Pool>,
    /// Unused block ids, the lowest last (handed out first).
    free: Vec<u32>,
    seqs: HashMap<SeqId, SeqTable>,
    /// A step's rows and slots reserved ahead of its `cache_write` ([`GpuLayerCache::reserve_ahead`]).
    reserved: Option<(Vec<Row>, Vec<i32>)>,
}

/// One step's rows as kernels read them: `meta[r] = (pos, table start, key count, 0)` and the block tables of the
/// step's sequences, concatenated; uploaded as one buffer `[meta | tables]`.
pub struct StepTables {
    pub meta: Vec<i32>,
    pub tables: Vec<i32>,
}

impl StepTables {
    /// `[rows·4 meta | tables]`, and the offset of the tables.
    pub fn packed(&self) -> (Vec<i32>, usize) {
        let mut v = self.meta.clone();
        v.extend_from_slice(&self.tables);
        (v, self.meta.len())
    }
}

impl GpuLayerCache {
    pub fn new(d: &MlaDims, ix: Option<&IndexerDims>, dtype: KvDtype, budget: Option<CacheBudget>) -> Self {
        let index_dim = ix.map_or(0, |i| i.head_dim);
        let per_position = (d.kv_lora + d.qk_rope + index_dim) * dtype.bytes() + 3 * 4;
        let budget_blocks = budget.map(|b| b.bytes / b.layers.max(1) / (per_position * BLOCK));
        Self {
            lora: d.kv_lora,
            rope: d.qk_rope,
            index_dim,
            dtype,
            budget_blocks,
            pool: None,
            free: Vec::new(),
            seqs: HashMap::new(),
            reserved: None,
        }
    }

    pub fn len(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.len)
    }

    /// Positions the pool can hold: the budget's, or (without one) what is allocated so far.
    pub fn positions_capacity(&self) -> usize {
        self.budget_blocks.unwrap_or_else(|| self.pool.as_ref().map_or(0, |p| p.blocks)) * BLOCK
    }

    /// Positions cached over every live sequence.
    pub fn positions_used(&self) -> usize {
        self.seqs.values().map(|s| s.len).sum()
    }

    /// Positions reserved by live sequences (whole blocks).
    pub fn positions_reserved(&self) -> usize {
        self.seqs.values().map(|s| s.blocks.len()).sum::<usize>() * BLOCK
    }

    /// The pool, once something has been written.
    pub fn pool(&self) -> Option<&Pool> {
        self.pool.as_ref()
    }

    /// Drops a sequence and returns its blocks to the pool.
    pub fn free(&mut self, seq: SeqId) {
        if self.reserved.as_ref().is_some_and(|(rows, _)| rows.iter().any(|r| r.seq == seq)) {
            self.reserved = None;
        }
        if let Some(t) = self.seqs.remove(&seq) {
            self.free.extend(t.blocks);
            // Lowest ids last, so reuse stays compact (and deterministic).
            self.free.sort_unstable_by(|a, b| b.cmp(a));
        }
    }

    /// Reserves the slots of a step's rows: every row must continue its sequence (rows of one sequence in
    /// position order), and the new blocks must fit. All checks come first, so a refused step changes nothing.
    /// Returns the pool slot of each row.
    pub fn reserve(&mut self, gpu: &Gpu, rows: &[Row]) -> MResult<Vec<i32>> {
        let mut next: HashMap<SeqId, usize> = HashMap::new();
        for row in rows {
            let expected = *next.entry(row.seq).or_insert_with(|| self.len(row.seq));
            if row.pos != expected {
                return Err(pipemoe_model::Error::CachePosition { seq: row.seq, expected, found: row.pos });
            }
            next.insert(row.seq, expected + 1);
        }
        let needed: usize = next
            .iter()
            .map(|(s, &end)| end.div_ceil(BLOCK).saturating_sub(self.seqs.get(s).map_or(0, |t| t.blocks.len())))
            .sum();
        if needed > self.free.len() {
            self.grow(gpu, needed)?;
        }
        let mut slots = Vec::with_capacity(rows.len());
        for row in rows {
            let t = self.seqs.entry(row.seq).or_default();
            if row.pos / BLOCK == t.blocks.len() {
                let block = self.free.pop().ok_or_else(|| crate::backend::shape("cache", "no free block".into()))?;
                t.blocks.push(block);
            }
            slots.push((t.blocks[row.pos / BLOCK] as usize * BLOCK + row.pos % BLOCK) as i32);
            t.len = row.pos + 1;
        }
        Ok(slots)
    }

    /// Reserves a step's slots before its layers run (a stage reserves every layer's first, so growing a pool or
    /// refusing a full cache happens before any launch); the step's `cache_write` of the same rows takes them
    /// ([`GpuLayerCache::take_reserved`]) instead of reserving again.
    pub fn reserve_ahead(&mut self, gpu: &Gpu, rows: &[Row]) -> MResult<Vec<i32>> {
        self.reserved = None;
        let slots = self.reserve(gpu, rows)?;
        self.reserved = Some((rows.to_vec(), slots.clone()));
        Ok(slots)
    }

    /// The slots [`GpuLayerCache::reserve_ahead`] reserved for exactly these rows, once.
    pub fn take_reserved(&mut self, rows: &[Row]) -> Option<Vec<i32>> {
        match self.reserved.take() {
            Some((r, slots)) if r == rows => Some(slots),
            other => {
                self.reserved = other;
                None
            }
        }
    }

    /// Makes `needed` blocks free: the whole budget on first use, or (without one) a doubled pool; else
    /// `CacheFull`.
    fn grow(&mut self, gpu: &Gpu, needed: usize) -> MResult<()> {
        let have = self.pool.as_ref().map_or(0, |p| p.blocks);
        let want = match self.budget_blocks {
            Some(cap) => cap,
            None => (have * 2).max(FIRST_BLOCKS).max(have + needed - self.free.len()),
        };
        if want > have {
            self.regrow_pool(gpu, have, want)?;
        }
        if needed > self.free.len() {
            return Err(pipemoe_model::Error::CacheFull {
                needed: needed * BLOCK,
                used: self.positions_reserved(),
                capacity: self.positions_capacity(),
            });
        }
        Ok(())
    }

    /// Reallocates the pool from `have` to `want` blocks, keeping every block where it was.
    fn regrow_pool(&mut self, gpu: &Gpu, have: usize, want: usize) -> MResult<()> {
        let es = self.dtype.bytes();
        let (lora, rope, idim) = (self.lora * es, self.rope * es, self.index_dim * es);
        let (old, new) = (have * BLOCK, want * BLOCK);
        let prev = self.pool.as_ref();
        let grown = Pool {
            latent: regrow(gpu, prev.as_ref().map(|p| &p.latent), old * lora, new * lora)?,
            k_pe: regrow(gpu, prev.as_ref().map(|p| &p.k_pe), old * rope, new * rope)?,
            index_k: regrow(gpu, prev.as_ref().map(|p| &p.index_k), old * idim, (new * idim).max(1))?,
            scales: regrow(gpu, prev.as_ref().map(|p| &p.scales), old * 3, new * 3)?,
            blocks: want,
            id: POOL_IDS.fetch_add(1, Ordering::Relaxed),
        };
        self.pool = Some(grown);
        // New ids above the old ones, lowest last.
        let mut ids: Vec<u32> = (have as u32..want as u32).rev().collect();
        ids.append(&mut self.free);
        ids.sort_unstable_by(|a, b| b.cmp(a));
        self.free = ids;
        Ok(())
    }

    /// The rows' positions and block tables for a kernel; each row's key count is `pos + 1` (dense causal)
    /// unless `counts` says otherwise. Every row must already be cached (the step's own position included).
    pub fn step_tables(&self, rows: &[Row], counts: Option<&[usize]>) -> MResult<StepTables> {
        let mut meta = Vec::with_capacity(rows.len() * 4);
        let mut tables = Vec::new();
        let mut start: HashMap<SeqId, usize> = HashMap::new();
        for (r, row) in rows.iter().enumerate() {
            let t = self.seqs.get(&row.seq).ok_or(pipemoe_model::Error::UnknownSequence { seq: row.seq })?;
            if row.pos >= t.len {
                return Err(pipemoe_model::Error::CachePosition { seq: row.seq, expected: t.len, found: row.pos });
            }
            let at = *start.entry(row.seq).or_insert_with(|| {
                tables.extend(t.blocks.iter().map(|&b| b as i32));
                tables.len() - t.blocks.len()
            });
            let keys = counts.map_or(row.pos + 1, |c| c[r]);
            meta.extend([row.pos as i32, at as i32, keys as i32, 0]);
        }
        Ok(StepTables { meta, tables })
    }

    /// Whether the rows' sequences hold the same blocks here as in `other` (a stage's layers do: same budget, same
    /// history), so one step's tables serve both.
    pub fn same_tables(&self, other: &GpuLayerCache, rows: &[Row]) -> bool {
        rows.iter().all(|r| self.seqs.get(&r.seq).map(|t| &t.blocks) == other.seqs.get(&r.seq).map(|t| &t.blocks))
    }

    /// Table entries per sequence in [`GpuLayerCache::step_inputs`]: the most blocks any of the rows' sequences
    /// holds, to the next power of two (a step's layout changes only when a sequence doubles).
    pub fn table_cap(&self, rows: &[Row]) -> usize {
        let most = rows.iter().map(|r| self.seqs.get(&r.seq).map_or(0, |t| t.blocks.len())).max().unwrap_or(0);
        most.max(1).next_power_of_two()
    }

    /// Every input a step's kernels read, for the rows reserved at `slots`, in one buffer whose layout depends
    /// only on the row count and `cap`: `[positions | slots | meta | tables]`, `meta` as [`StepTables`]'s (dense
    /// causal key counts, each table start counted from the tables' first entry) and each sequence's block table
    /// in `cap` entries of its own, in the order of the sequences' first rows (a sequence's rows are contiguous).
    pub fn step_inputs(&self, rows: &[Row], slots: &[i32], cap: usize) -> MResult<Vec<i32>> {
        let n = rows.len();
        if slots.len() != n {
            return Err(crate::backend::shape("cache", format!("{} slots for {n} rows", slots.len())));
        }
        let seqs = rows.iter().enumerate().filter(|&(r, row)| r == 0 || rows[r - 1].seq != row.seq).count();
        let mut v = vec![0i32; 6 * n + seqs * cap];
        let mut start: HashMap<SeqId, usize> = HashMap::new();
        for (r, row) in rows.iter().enumerate() {
            let t = self.seqs.get(&row.seq).ok_or(pipemoe_model::Error::UnknownSequence { seq: row.seq })?;
            if row.pos >= t.len || t.blocks.len() > cap {
                return Err(pipemoe_model::Error::CachePosition { seq: row.seq, expected: t.len, found: row.pos });
            }
            let next = start.len() * cap;
            let at = *start.entry(row.seq).or_insert_with(|| {
                for (k, &b) in t.blocks.iter().enumerate() {
                    v[6 * n + next + k] = b as i32;
                }
                next
            });
            v[r] = row.pos as i32;
            v[n + r] = slots[r];
            v[2 * n + 4 * r..2 * n + 4 * r + 3].copy_from_slice(&[row.pos as i32, at as i32, row.pos as i32 + 1]);
        }
        Ok(v)
    }
}

/// One sequence's cached values read back to the host in f32 (scales applied): tests and diagnostics.
pub struct HostSeq {
    /// `[len, kv_lora]`.
    pub latent: Vec<f32>,
    /// `[len, qk_rope]`.
    pub k_pe: Vec<f32>,
    /// `[len, index_dim]` (empty without an indexer).
    pub index_k: Vec<f32>,
}

impl GpuLayerCache {
    /// Downloads the pool and gathers `seq`'s positions through its block table.
    pub fn read(&self, gpu: &Gpu, seq: SeqId) -> MResult<HostSeq> {
        let t = self.seqs.get(&seq).ok_or(pipemoe_model::Error::UnknownSequence { seq })?;
        let pool = self.pool.as_ref().ok_or_else(|| crate::backend::shape("cache", "nothing cached".into()))?;
        let s = &gpu.stream;
        let bytes = |b: &CudaSlice<u8>| s.clone_dtoh(b).map_err(md("download cache"));
        let scales = s.clone_dtoh(&pool.scales).map_err(md("download cache"))?;
        let (lat, pe, idx) = (bytes(&pool.latent)?, bytes(&pool.k_pe)?, bytes(&pool.index_k)?);
        let mut out = HostSeq { latent: Vec::new(), k_pe: Vec::new(), index_k: Vec::new() };
        for p in 0..t.len {
            let slot = t.blocks[p / BLOCK] as usize * BLOCK + p % BLOCK;
            for (c, (raw, dim, dst)) in [
                (&lat, self.lora, &mut out.latent),
                (&pe, self.rope, &mut out.k_pe),
                (&idx, self.index_dim, &mut out.index_k),
            ]
            .into_iter()
            .enumerate()
            {
                let es = self.dtype.bytes();
                let at = slot * dim * es;
                dst.extend(
                    raw[at..at + dim * es].chunks_exact(es).map(|v| decode(self.dtype, v) * scales[slot * 3 + c]),
                );
            }
        }
        Ok(out)
    }
}

/// One stored value in f32 (before its scale).
fn decode(dtype: KvDtype, v: &[u8]) -> f32 {
    match dtype {
        KvDtype::F32 => f32::from_le_bytes([v[0], v[1], v[2], v[3]]),
        KvDtype::Bf16 => half::bf16::from_le_bytes([v[0], v[1]]).to_f32(),
        KvDtype::Fp8 => fp8_e4m3(v[0]),
    }
}

/// OCP fp8 e4m3: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, S.1111.111 is NaN.
fn fp8_e4m3(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = (i32::from((b >> 3) & 0xf), f32::from(b & 7));
    if e == 15 && m == 7.0 {
        return f32::NAN;
    }
    sign * if e == 0 { m / 8.0 * 2f32.powi(-6) } else { (1.0 + m / 8.0) * 2f32.powi(e - 7) }
}

/// A buffer of `size` elements holding the first `used` of `old` (zeros elsewhere).
fn regrow<T: DeviceRepr + ValidAsZeroBits>(
    gpu: &Gpu,
    old: Option<&CudaSlice<T>>,
    used: usize,
    size: usize,
) -> MResult<CudaSlice<T>> {
    let s = &gpu.stream;
    let mut new = s.alloc_zeros::<T>(size.max(1)).map_err(md("alloc cache"))?;
    if let Some(old) = old
        && used > 0
    {
        s.memcpy_dtod(&old.slice(..used), &mut new.slice_mut(..used)).map_err(md("grow cache"))?;
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims() -> MlaDims {
        MlaDims { heads: 2, qk_nope: 8, qk_rope: 4, v_head: 8, kv_lora: 16, softmax_scale: 0.1 }
    }

    #[test]
    fn fp8_e4m3_decodes_its_range() {
        assert_eq!(fp8_e4m3(0x7e), 448.0);
        assert_eq!(fp8_e4m3(0x38), 1.0);
        assert_eq!(fp8_e4m3(0xb8), -1.0);
        assert_eq!(fp8_e4m3(0x01), 2f32.powi(-9));
        assert!(fp8_e4m3(0x7f).is_nan());
    }

    #[test]
    fn the_budget_sets_whole_blocks_per_layer() {
        // 16 + 4 values in f32 plus 3 scales: 92 bytes a position, 5888 a block.
        let c =
            GpuLayerCache::new(&dims(), None, KvDtype::F32, Some(CacheBudget { bytes: 10 * 5888 + 100, layers: 2 }));
        assert_eq!(c.positions_capacity(), 5 * BLOCK);
        let ix = IndexerDims { heads: 2, head_dim: 8, topk: 4 };
        let c = GpuLayerCache::new(&dims(), Some(&ix), KvDtype::Fp8, Some(CacheBudget { bytes: 1 << 20, layers: 1 }));
        assert_eq!(c.positions_capacity(), (1 << 20) / ((28 + 12) * BLOCK) * BLOCK);
        let c = GpuLayerCache::new(&dims(), None, KvDtype::Bf16, None);
        assert_eq!((c.positions_capacity(), c.positions_used()), (0, 0));
    }

    #[test]
    fn step_tables_share_a_sequence_table_between_its_rows() {
        let mut c = GpuLayerCache::new(&dims(), None, KvDtype::F32, None);
        // Host bookkeeping only: hand out blocks as `reserve` would after a grow.
        c.free = vec![7, 6, 5, 4, 2];
        c.seqs.insert(7, SeqTable { blocks: vec![3, 1], len: 70 });
        c.seqs.insert(9, SeqTable { blocks: vec![0], len: 5 });
        let rows = [Row { seq: 7, pos: 68 }, Row { seq: 7, pos: 69 }, Row { seq: 9, pos: 4 }];
        let st = c.step_tables(&rows, None).expect("tables");
        assert_eq!(st.tables, vec![3, 1, 0]);
        assert_eq!(st.meta, vec![68, 0, 69, 0, 69, 0, 70, 0, 4, 2, 5, 0]);
        let st = c.step_tables(&rows, Some(&[2, 3, 4])).expect("tables");
        assert_eq!(st.meta[2], 2);
        assert!(matches!(
            c.step_tables(&[Row { seq: 9, pos: 5 }], None),
            Err(pipemoe_model::Error::CachePosition { .. })
        ));
        assert!(matches!(
            c.step_tables(&[Row { seq: 1, pos: 0 }], None),
            Err(pipemoe_model::Error::UnknownSequence { .. })
        ));
        c.free(7);
        assert_eq!(c.free, vec![7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(c.positions_used(), 5);
    }

    #[test]
    fn step_inputs_lay_out_by_row_count_and_capacity() {
        let mut c = GpuLayerCache::new(&dims(), None, KvDtype::F32, None);
        c.seqs.insert(7, SeqTable { blocks: vec![3, 1], len: 70 });
        c.seqs.insert(9, SeqTable { blocks: vec![0], len: 5 });
        let rows = [Row { seq: 7, pos: 68 }, Row { seq: 7, pos: 69 }, Row { seq: 9, pos: 4 }];
        assert_eq!(c.table_cap(&rows), 2);
        let v = c.step_inputs(&rows, &[196, 197, 4], 4).expect("inputs");
        // positions | slots | meta (pos, table start, keys, 0) | two sequences' tables of 4 entries each.
        assert_eq!(v[..6], [68, 69, 4, 196, 197, 4]);
        assert_eq!(v[6..18], [68, 0, 69, 0, 69, 0, 70, 0, 4, 4, 5, 0]);
        assert_eq!(v[18..], [3, 1, 0, 0, 0, 0, 0, 0]);
        assert!(c.step_inputs(&rows, &[1, 2], 4).is_err(), "a slot per row");
        assert!(c.step_inputs(&rows, &[1, 2, 3], 1).is_err(), "a table longer than its capacity");
        assert!(c.step_inputs(&[Row { seq: 9, pos: 5 }], &[5], 4).is_err(), "not yet reserved");
        let mut other = GpuLayerCache::new(&dims(), None, KvDtype::F32, None);
        other.seqs.insert(7, SeqTable { blocks: vec![3, 1], len: 70 });
        other.seqs.insert(9, SeqTable { blocks: vec![2], len: 5 });
        assert!(other.same_tables(&c, &rows[..2]));
        assert!(!other.same_tables(&c, &rows), "sequence 9's block differs");
        // Slots reserved ahead go to the write of the same rows only, once; freeing a sequence drops them.
        c.reserved = Some((rows.to_vec(), vec![196, 197, 4]));
        assert_eq!(c.take_reserved(&rows[..2]), None);
        assert_eq!(c.take_reserved(&rows), Some(vec![196, 197, 4]));
        assert_eq!(c.take_reserved(&rows), None);
        c.reserved = Some((rows.to_vec(), vec![196, 197, 4]));
        c.free(9);
        assert_eq!(c.take_reserved(&rows), None);
    }
}
