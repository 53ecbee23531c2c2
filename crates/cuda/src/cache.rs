//! The latent KV cache on the device: per layer, per sequence, the normed latent, the roped k_pe and (V3.2) the
//! indexer key, each a contiguous f32 buffer that doubles when full. (First version: the block-paged cache sized
//! from the memory budget, and bf16/fp8 storage, come next; see docs/CUDA.md.)

use std::collections::HashMap;

use cudarc::driver::CudaSlice;
use pipemoe_model::backend::{IndexerDims, MlaDims, SeqId};

use crate::error::{Error, Result, drv};
use crate::gpu::Gpu;

pub struct SeqBuf {
    pub latent: CudaSlice<f32>,
    pub k_pe: CudaSlice<f32>,
    pub index_k: CudaSlice<f32>,
    pub len: usize,
    pub cap: usize,
}

pub struct GpuLayerCache {
    pub lora: usize,
    pub rope: usize,
    pub index_dim: usize,
    pub seqs: HashMap<SeqId, SeqBuf>,
}

impl GpuLayerCache {
    pub fn new(d: &MlaDims, ix: Option<&IndexerDims>) -> Self {
        Self { lora: d.kv_lora, rope: d.qk_rope, index_dim: ix.map_or(0, |i| i.head_dim), seqs: HashMap::new() }
    }

    pub fn len(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.len)
    }

    /// The buffer of `seq`, grown to hold at least `need` positions.
    pub fn reserve(&mut self, gpu: &Gpu, seq: SeqId, need: usize) -> Result<&mut SeqBuf> {
        let (lora, rope, idim) = (self.lora, self.rope, self.index_dim.max(1));
        let s = &gpu.stream;
        if let std::collections::hash_map::Entry::Vacant(slot) = self.seqs.entry(seq) {
            let cap = need.max(64);
            slot.insert(SeqBuf {
                latent: s.alloc_zeros(cap * lora).map_err(drv("alloc cache"))?,
                k_pe: s.alloc_zeros(cap * rope).map_err(drv("alloc cache"))?,
                index_k: s.alloc_zeros(cap * idim).map_err(drv("alloc cache"))?,
                len: 0,
                cap,
            });
        }
        let buf =
            self.seqs.get_mut(&seq).ok_or(Error::Shape { what: "cache", reason: format!("sequence {seq} lost") })?;
        if need > buf.cap {
            let cap = need.max(buf.cap * 2);
            let grow = |old: &CudaSlice<f32>, dim: usize| -> Result<CudaSlice<f32>> {
                let mut new = s.alloc_zeros(cap * dim).map_err(drv("grow cache"))?;
                s.memcpy_dtod(&old.slice(..buf.len * dim), &mut new.slice_mut(..buf.len * dim))
                    .map_err(drv("grow cache"))?;
                Ok(new)
            };
            let latent = grow(&buf.latent, lora)?;
            let k_pe = grow(&buf.k_pe, rope)?;
            let index_k = grow(&buf.index_k, idim)?;
            *buf = SeqBuf { latent, k_pe, index_k, len: buf.len, cap };
        }
        Ok(buf)
    }
}
