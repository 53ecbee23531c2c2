//! What a worker asks of its backend beyond the model's trait: the device's free memory, the KV cache's budget,
//! and the cache's size and use for Health. The CPU backend has no device memory and a cache without a bound
//! unless an operator caps it (`PIPEMOE_KV_CACHE_BYTES`, in whole blocks as on a GPU); the CUDA backend's
//! block-paged pool is sized from the memory the plan leaves it (memory.rs).

use pipemoe_cuda::CudaBackend;
use pipemoe_cuda::cache::BLOCK;
use pipemoe_model::Backend;
use pipemoe_model::cpu::{CACHE_BLOCK, CpuBackend};

/// The KV cache of one worker, over all its layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheUsage {
    /// Positions the smallest layer pool holds; `None` grows without a bound.
    pub capacity: Option<usize>,
    /// Positions cached over every live sequence; `None` when the backend does not count them.
    pub used: Option<usize>,
    /// Positions held in whole blocks.
    pub reserved: Option<usize>,
    /// Positions per block.
    pub block: usize,
    /// Device bytes the cache has allocated.
    pub allocated_bytes: u64,
}

pub trait WorkerBackend: Backend + Sized {
    /// Free memory of the backend's device after all queued work, in bytes; `None` for host memory.
    fn free_bytes(&self) -> Result<Option<u64>, String>;

    /// Gives the KV cache `bytes` of device memory shared by `layers` layers (nothing on the CPU).
    fn set_cache_budget(&mut self, bytes: u64, layers: usize);

    /// The size and use of `caches`, one per layer.
    fn cache_usage(&self, caches: &[Self::LayerCache]) -> CacheUsage;
}

impl WorkerBackend for CpuBackend {
    fn free_bytes(&self) -> Result<Option<u64>, String> {
        Ok(None)
    }

    fn set_cache_budget(&mut self, bytes: u64, layers: usize) {
        *self = self.with_cache_budget(bytes, layers);
    }

    fn cache_usage(&self, caches: &[Self::LayerCache]) -> CacheUsage {
        let capacity =
            caches.iter().map(|c| c.capacity()).collect::<Option<Vec<_>>>().and_then(|c| c.into_iter().min());
        match capacity {
            None => CacheUsage { capacity: None, used: None, reserved: None, block: 1, allocated_bytes: 0 },
            // Every layer caches the same rows; the first speaks for all.
            Some(_) => CacheUsage {
                capacity,
                used: Some(caches.first().map_or(0, |c| c.positions_used())),
                reserved: Some(caches.first().map_or(0, |c| c.positions_reserved())),
                block: CACHE_BLOCK,
                allocated_bytes: 0,
            },
        }
    }
}

impl WorkerBackend for CudaBackend {
    fn free_bytes(&self) -> Result<Option<u64>, String> {
        // Freed buffers return to the device at synchronisation; measure after it.
        self.gpu.stream.synchronize().map_err(|e| format!("cuStreamSynchronize: {e}"))?;
        let (free, _total) = self.gpu.ctx.mem_get_info().map_err(|e| format!("cuMemGetInfo: {e}"))?;
        Ok(Some(free as u64))
    }

    fn set_cache_budget(&mut self, bytes: u64, layers: usize) {
        *self = self.clone().with_cache_budget(usize::try_from(bytes).unwrap_or(usize::MAX), layers);
    }

    fn cache_usage(&self, caches: &[Self::LayerCache]) -> CacheUsage {
        let allocated_bytes = caches
            .iter()
            .filter_map(|c| c.pool())
            .map(|p| (p.latent.len() + p.k_pe.len() + p.index_k.len() + p.scales.len() * 4) as u64)
            .sum();
        CacheUsage {
            capacity: caches.iter().map(|c| c.positions_capacity()).min(),
            // Every layer caches the same rows; the first speaks for all.
            used: Some(caches.first().map_or(0, |c| c.positions_used())),
            reserved: Some(caches.iter().map(|c| c.positions_reserved()).max().unwrap_or(0)),
            block: BLOCK,
            allocated_bytes,
        }
    }
}
