//! One CUDA device with pipemoe's kernels loaded: the libraries checked first (cudarc panics without them),
//! then the context, the device's own architecture, and every kernel compiled (or read from the cache) for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream};
use cudarc::nvrtc::Ptx;

use crate::error::{Error, Result, drv};
use crate::nvrtc;

pub fn driver_present() -> bool {
    // SAFETY: only dlopens libcuda and checks a symbol.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// How many CUDA devices the driver reports.
pub fn device_count() -> Result<usize> {
    let n = CudaContext::device_count().map_err(drv("cuDeviceGetCount"))?;
    Ok(n.max(0) as usize)
}

/// Why there is no usable GPU here, or `None` when there is one.
pub fn unavailable() -> Option<String> {
    if !driver_present() {
        return Some(Error::NoDriver.to_string());
    }
    if !nvrtc::nvrtc_present() {
        return Some(Error::NoNvrtc.to_string());
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => None,
        Ok(_) => Some("the CUDA driver reports no devices".into()),
        Err(e) => Some(format!("the CUDA driver failed to count devices: {e}")),
    }
}

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// `sm_86` on an RTX 3090, `sm_90` on an H200.
    pub arch: String,
    pub name: String,
    pub sm_count: u32,
    /// Shared memory one multiprocessor holds (bytes): 100 KiB on an RTX 3090, 228 KiB on an H200.
    pub smem_per_sm: usize,
    /// One module per kernel source file (`nvrtc::KERNELS`), with its cubin to find which file defines a symbol.
    pub(crate) modules: Vec<(Arc<CudaModule>, Vec<u8>)>,
    /// The same modules compiled with `PIPEMOE_NVRTC_VARIANT`'s defines too (empty when it is unset): what
    /// `function` hands out under `Apart::Variant`.
    variant_modules: Vec<(Arc<CudaModule>, Vec<u8>)>,
    /// Functions found so far by symbol. Each is leaked once per `Gpu` and symbol (a few hundred bytes each, a
    /// bounded set), so `function` can hand out plain references without holding the lock.
    pub(crate) functions: Mutex<HashMap<String, &'static CudaFunction>>,
    /// Functions opted in to more than the default dynamic shared memory, with the most each may take.
    opted_in: Mutex<HashMap<usize, usize>>,
    /// Blocks of a function resident at once on the whole device, by the caller's key, block threads, shared bytes.
    resident: Mutex<HashMap<ResidentKey, usize>>,
    /// Per-op timing while on (`profile.rs`).
    pub(crate) profiler: crate::profile::Profiler,
    /// Exported buffers for reuse and opened IPC handles (`ipc.rs`).
    pub(crate) ipc: Arc<Mutex<crate::ipc::IpcState>>,
    /// Small read-only inputs uploaded recently, by content (`uploaded_*`).
    recent: Mutex<Recent>,
    /// Arrival counters of split launches (the tensor-core GEMV's last block adds the splits of its column
    /// range): zero between launches, as each launch's last block leaves its counter.
    pub(crate) counters: CudaSlice<i32>,
    /// The running step's inputs and the recorded steps (`graph.rs`).
    pub steps: crate::graph::Steps,
    /// A second stream for a branch of a step beside the main stream's next launches ([`Gpu::branch`]).
    side: Mutex<Side>,
    /// The [`Apart`] switches a benchmark's A/B has turned on (none otherwise).
    apart: std::sync::atomic::AtomicU32,
    /// Rows of a step up to which MLA reads the quantized kv_b_proj (`kvb.rs`; `PIPEMOE_KVB_QUANT_ROWS`).
    kvb_quant_rows: std::sync::atomic::AtomicUsize,
}

/// Ways of running a step the old way, each an [`Apart`] switch of [`Gpu::set_apart`], so that a benchmark can
/// time what a fusion, an overlap or a kernel saves in one process (`pipemoe bench --ab`): separate runs drift by
/// a few %, as much as such a change is worth. Every switch selects a path the backend also takes for other shapes
/// or settings. Those that undo a fusion or an overlap leave the bits alone (golden_gpu); `DenseKvb` and
/// `ExactFlash` run other arithmetic (device_attention bounds both ways), `QuarterK` adds the down launch's sums in
/// another order (device_ops bounds both layouts against the CPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Apart {
    /// The indexer's selection on the main stream, not on a branch beside the query absorption.
    Branches = 1,
    /// `mla_prep` and `cache_write` as two launches.
    PrepWrite = 2,
    /// One-row grouped experts planned by `experts_plan`, as for more rows.
    Plan = 4,
    /// MLA's absorptions from the dense copy of kv_b_proj, not from the quantized weight.
    DenseKvb = 8,
    /// bf16 flash attention with q and P as value + remainder (`PIPEMOE_FLASH_EXACT=1` always), not as bf16.
    ExactFlash = 16,
    /// The post-attention add+rms_norm and the one-row router as two launches, not one (`add_norm_route`).
    NormRoute = 32,
    /// A decode step's fused q_b + wq_b GEMV and the RoPE of its two parts as two launches, not one
    /// (`gptq_mma_gemv_rope`).
    QRope = 64,
    /// A grouped launch of a few rows and short K (the one-row down) with its 4 warps over quarters of each run of
    /// K ([`crate::mma::Layout::SplitK`]), not 2 pairs over halves ([`crate::mma::Layout::HalfK`]).
    QuarterK = 128,
    /// A decode step's fused q_b + wq_b launch whole, the indexer's branch forked after it, not its two parts'
    /// blocks apart with the indexer's on the branch (`attention::mla_fused_query`).
    EarlyIndex = 256,
    /// The grouped experts' launches of many rows sum x in their loops (8 more mma a chunk), not read the sums of
    /// x that the plan and the SiLU reduction write (the `_xs` kernels).
    LoopSums = 512,
    /// A decode step's mla_prep (q_a normed too) before the fused q_b + wq_b launches, not q_a normed in those
    /// launches' blocks with the rest of mla_prep beside the indexer's branch (`prep::mla_prep_fused_query`).
    PrepQuery = 1024,
    /// The MoE block's output added to the residual by `add_rms_norm` in the next layer, not in the one-row down
    /// launch's combine, and the next layer's input norm a launch of its own, not in its fused projection's blocks
    /// (`addnorm.rs`, [`Gpu::input_norm`]).
    InputNorm = 2048,
    /// One row's grouped experts as two launches (gate/up, then down), not one (`gptq_mma_moe_row`: the down
    /// blocks fill the SMs as the gate/up blocks' last wave drains).
    MoeSplit = 4096,
    /// Every kernel from the set compiled with `PIPEMOE_NVRTC_VARIANT`'s defines too ([`nvrtc::variant_defines`];
    /// none set: the usual kernels): an experiment's macro against the usual kernels in one process. Not a fusion
    /// taken apart, but a switch the recorded steps are keyed by all the same.
    Variant = 8192,
}

/// The side stream and the events that fork it from the main stream and join it back.
struct Side {
    stream: Arc<CudaStream>,
    forked: CudaEvent,
    /// Recorded on the main stream for [`Branch::wait_main`].
    main_at: CudaEvent,
    done: CudaEvent,
}

/// A branch of a step on the side stream ([`Gpu::branch`]): work queued on [`Branch::fork`]'s stream runs beside
/// what the main stream queues meanwhile, until [`Branch::join`] (or the branch's drop) makes the main stream wait
/// for it. Memory: the pool is stream-ordered and every buffer here is allocated and freed on the main stream, so
/// whatever the branch reads or writes must be allocated before the fork and freed only after the join — the
/// caller keeps each such buffer alive until then. No launch of the branch may use `Gpu::counters` (the main
/// stream's split launches do).
pub struct Branch<'a> {
    side: MutexGuard<'a, Side>,
    main: &'a CudaStream,
    /// Forked and not joined since.
    open: std::cell::Cell<bool>,
}

impl Branch<'_> {
    /// The side stream, once it waits for everything queued on the main stream so far.
    pub fn fork(&self) -> Result<&Arc<CudaStream>> {
        self.side.forked.record(self.main).map_err(drv("cuEventRecord"))?;
        self.side.stream.wait(&self.side.forked).map_err(drv("cuStreamWaitEvent"))?;
        self.open.set(true);
        Ok(&self.side.stream)
    }

    /// The side stream's next work waits for everything queued on the main stream so far too (after the fork;
    /// nothing to do without one). What the main stream allocated before this may then be used on the branch.
    pub fn wait_main(&self) -> Result<()> {
        if !self.open.get() {
            return Ok(());
        }
        self.side.main_at.record(self.main).map_err(drv("cuEventRecord"))?;
        self.side.stream.wait(&self.side.main_at).map_err(drv("cuStreamWaitEvent"))
    }

    /// The main stream waits for everything queued on the side stream since the fork (nothing to do without one:
    /// a captured step must not wait on an event recorded outside its capture).
    pub fn join(&self) -> Result<()> {
        if !self.open.replace(false) {
            return Ok(());
        }
        self.side.done.record(&self.side.stream).map_err(drv("cuEventRecord"))?;
        self.main.wait(&self.side.done).map_err(drv("cuStreamWaitEvent"))
    }
}

impl Drop for Branch<'_> {
    fn drop(&mut self) {
        // An error path between fork and join still orders the branch before the main stream's frees.
        let _ = self.join();
    }
}

/// A function and shape of `Gpu::resident_blocks`: the caller's three numbers, block threads, shared bytes, and
/// whether the function is the variant set's.
type ResidentKey = (u32, u32, u32, u32, u32, bool);

/// Dynamic shared memory a kernel gets without opting in.
const DEFAULT_SMEM: usize = 48 * 1024;

/// Column ranges one split launch may count (the widest tensor-core GEMV has N / 32 of them at most).
const COUNTERS: usize = 1 << 16;

/// The last few small uploads of each kind: a step's positions serve its every RoPE of every layer, its cache
/// slots and attention tables every layer (the layers' caches place positions alike), a model's inverse
/// frequencies every call.
#[derive(Default)]
struct Recent {
    i32s: Vec<(Vec<i32>, Arc<CudaSlice<i32>>)>,
    f32s: Vec<(Vec<u32>, Arc<CudaSlice<f32>>)>,
}

/// Entries kept per kind (a step's i32 inputs are about four: positions, slots, tables, the experts' pair order).
const RECENT: usize = 8;

fn recall<K: PartialEq, T>(list: &mut Vec<(K, Arc<T>)>, key: K, make: impl FnOnce() -> Result<T>) -> Result<Arc<T>> {
    if let Some(i) = list.iter().position(|(k, _)| *k == key) {
        let hit = list.remove(i);
        let v = hit.1.clone();
        list.push(hit);
        return Ok(v);
    }
    let v = Arc::new(make()?);
    if list.len() >= RECENT {
        list.remove(0);
    }
    list.push((key, v.clone()));
    Ok(v)
}

impl Drop for Gpu {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // Imports queue copies from opened handles without waiting for them.
            let _ = self.stream.synchronize();
            self.ipc.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }
}

impl Gpu {
    pub fn open(ordinal: usize) -> Result<Gpu> {
        if !driver_present() {
            return Err(Error::NoDriver);
        }
        let count = CudaContext::device_count().map_err(drv("cuDeviceGetCount"))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(drv("cuCtxCreate"))?;
        let (major, minor) = ctx.compute_capability().map_err(drv("cuDeviceGetAttribute"))?;
        let arch = nvrtc::arch(major, minor);
        let name = ctx.name().map_err(drv("cuDeviceGetName"))?;
        let sm_count = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(drv("cuDeviceGetAttribute"))? as u32;
        let smem_per_sm = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
            )
            .map_err(drv("cuDeviceGetAttribute"))? as usize;
        // Every buffer of a `Gpu` is allocated and freed on its main stream and used there or on a `Branch` of it
        // (which the main stream forks and joins by events), so cudarc's per-buffer events (two per allocation, a
        // record or wait per kernel argument: several driver calls per launch, most of a small decode kernel's
        // cost) order nothing that stream order and the branches' events do not already.
        // SAFETY: a buffer is used on the side stream only between a branch's fork and join, allocated before the
        // one and freed after the other (`Branch`); the IPC path orders the other process with its own
        // interprocess event. Called before any buffer exists.
        unsafe { ctx.disable_event_tracking() };
        keep_freed_memory(&ctx)?;
        let stream = ctx.new_stream().map_err(drv("cuStreamCreate"))?;
        let side = Side {
            stream: ctx.new_stream().map_err(drv("cuStreamCreate"))?,
            forked: ctx.new_event(None).map_err(drv("cuEventCreate"))?,
            main_at: ctx.new_event(None).map_err(drv("cuEventCreate"))?,
            done: ctx.new_event(None).map_err(drv("cuEventCreate"))?,
        };
        let counters = stream.alloc_zeros::<i32>(COUNTERS).map_err(drv("cuMemAlloc"))?;
        let load = |defines: &[String]| -> Result<Vec<(Arc<CudaModule>, Vec<u8>)>> {
            let mut modules = Vec::new();
            for (file, source) in nvrtc::KERNELS {
                let cubin = nvrtc::cubin_with(file, source, &arch, defines)?;
                let module = ctx.load_module(Ptx::from_binary(cubin.clone())).map_err(drv("cuModuleLoadData"))?;
                modules.push((module, cubin));
            }
            Ok(modules)
        };
        let modules = load(&[])?;
        let variant = nvrtc::variant_defines();
        let variant_modules = if variant.is_empty() { Vec::new() } else { load(&variant)? };
        Ok(Gpu {
            ctx,
            stream,
            arch,
            name,
            sm_count,
            smem_per_sm,
            modules,
            variant_modules,
            functions: Mutex::new(HashMap::new()),
            opted_in: Mutex::new(HashMap::new()),
            resident: Mutex::new(HashMap::new()),
            profiler: Default::default(),
            ipc: Default::default(),
            recent: Default::default(),
            counters,
            steps: Default::default(),
            side: Mutex::new(side),
            apart: 0.into(),
            kvb_quant_rows: crate::kvb::default_quant_rows().into(),
        })
    }

    /// A branch on the side stream (one at a time: the next caller waits until this one is dropped), or `None`
    /// while profiling (a profile times each op alone on the main stream).
    pub fn branch(&self) -> Option<Branch<'_>> {
        if self.profiling() || self.is_apart(Apart::Branches) {
            return None;
        }
        let side = self.side.lock().unwrap_or_else(|e| e.into_inner());
        Some(Branch { side, main: &self.stream, open: std::cell::Cell::new(false) })
    }

    /// Lets `f` launch with `smem` bytes of dynamic shared memory: above the 48 KiB every kernel gets, the
    /// function is opted in to everything the device allows (always that same value, so concurrent callers
    /// cannot undercut each other); more than that is an error naming both sizes.
    /// The driver is asked once per function (the answer is kept: decode launches these kernels every layer).
    pub(crate) fn allow_smem(&self, f: &CudaFunction, smem: usize) -> Result<()> {
        use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
        if smem <= DEFAULT_SMEM {
            return Ok(());
        }
        // Functions are handed out once per symbol and never freed while the Gpu lives: the address is the key.
        let key = f as *const CudaFunction as usize;
        let mut opted = self.opted_in.lock().unwrap_or_else(|e| e.into_inner());
        let max = match opted.get(&key) {
            Some(&max) => max,
            None => {
                let optin = CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN;
                let device = self.ctx.attribute(optin).map_err(drv("cuDeviceGetAttribute"))? as usize;
                let fixed = f
                    .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
                    .map_err(drv("cuFuncGetAttribute"))?;
                let max = device.saturating_sub(fixed as usize);
                f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, max as i32)
                    .map_err(drv("cuFuncSetAttribute"))?;
                opted.insert(key, max);
                max
            }
        };
        if smem > max {
            return Err(Error::Shape {
                what: "launch",
                reason: format!("{smem} bytes of shared memory exceed this device's {max}"),
            });
        }
        Ok(())
    }

    /// How many blocks of a function (`threads` each, `smem` bytes of dynamic shared memory) the device holds at
    /// once (the occupancy calculator, times the multiprocessors), asked once per `key`, which must name the
    /// function and shape (`symbol` makes the function's name only on the first ask: launch shapes call this for
    /// every GEMV); `None` when the driver cannot say (launch shapes then fall back to their defaults).
    pub(crate) fn resident_blocks(
        &self,
        key: (u32, u32, u32),
        symbol: impl FnOnce() -> String,
        threads: u32,
        smem: u32,
    ) -> Option<usize> {
        let key = (key.0, key.1, key.2, threads, smem, self.variant());
        if let Some(&n) = self.resident.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Some(n);
        }
        let f = self.function(&symbol()).ok()?;
        self.allow_smem(f, smem as usize).ok()?;
        let per_sm = f.occupancy_max_active_blocks_per_multiprocessor(threads, smem as usize, None).ok()?;
        let n = per_sm as usize * self.sm_count as usize;
        self.resident.lock().unwrap_or_else(|e| e.into_inner()).insert(key, n);
        Some(n)
    }

    /// The [`Apart`] switches on, as bits (recorded steps are keyed by them).
    /// Rows of a step up to which MLA reads the quantized kv_b_proj (decode); a step already recorded as a graph
    /// keeps the way it was recorded with.
    pub fn kvb_quant_rows(&self) -> usize {
        self.kvb_quant_rows.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets [`Gpu::kvb_quant_rows`] (tests, sweeps).
    pub fn set_kvb_quant_rows(&self, rows: usize) {
        self.kvb_quant_rows.store(rows, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn apart(&self) -> u32 {
        self.apart.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether `switch` is on: the step takes the old way.
    pub fn is_apart(&self, switch: Apart) -> bool {
        self.apart() & switch as u32 != 0
    }

    /// Turns exactly `switches` on (an empty list: every fusion and overlap as usual).
    pub fn set_apart(&self, switches: &[Apart]) {
        let bits = switches.iter().fold(0, |b, &s| b | s as u32);
        self.apart.store(bits, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a one-row step adds the MoE block's output into the residual in the down launch's combine, and norms
    /// the next layer's input in its fused projection's blocks (`addnorm.rs`): unless `Apart::InputNorm`
    /// (docs/PERF.md session 40: −0.9 µs a layer on the H200).
    pub fn input_norm(&self) -> bool {
        !self.is_apart(Apart::InputNorm)
    }

    /// Whether per-op profiling is on (a profiled step runs as launches, never as a recorded graph).
    pub fn profiling(&self) -> bool {
        self.profiler.on.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `v` on the device, uploaded once while it is among the last few such values (never write to it); a graph
    /// being recorded keeps what it reads.
    pub fn uploaded_i32(&self, v: &[i32]) -> Result<Arc<CudaSlice<i32>>> {
        let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let v = recall(&mut r.i32s, v.to_vec(), || self.stream.clone_htod(v).map_err(drv("upload")))?;
        self.steps.keep_if_capturing(v.clone());
        Ok(v)
    }

    /// As `uploaded_i32`, for f32 values (compared bit for bit).
    pub fn uploaded_f32(&self, v: &[f32]) -> Result<Arc<CudaSlice<f32>>> {
        let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let key: Vec<u32> = v.iter().map(|x| x.to_bits()).collect();
        let v = recall(&mut r.f32s, key, || self.stream.clone_htod(v).map_err(drv("upload")))?;
        self.steps.keep_if_capturing(v.clone());
        Ok(v)
    }

    /// Whether this step's kernels come from the variant set (`Apart::Variant` with `PIPEMOE_NVRTC_VARIANT` set).
    fn variant(&self) -> bool {
        self.is_apart(Apart::Variant) && !self.variant_modules.is_empty()
    }

    /// The kernel `symbol` (`<op>_<dtype>`, STYLE.md §12) from whichever source file defines it (under
    /// `Apart::Variant`, from the variant set).
    pub fn function(&self, symbol: &str) -> Result<&CudaFunction> {
        let variant = self.variant();
        let variant_key;
        let key = if variant {
            variant_key = format!("variant {symbol}");
            variant_key.as_str()
        } else {
            symbol
        };
        let mut found = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = found.get(key) {
            return Ok(f);
        }
        // Asking each module in turn would leave a failed driver call (CUDA_ERROR_NOT_FOUND) per miss, which
        // compute-sanitizer reports as errors; the cubin's string table says which module to ask.
        let set = if variant { &self.variant_modules } else { &self.modules };
        let (module, _) = set
            .iter()
            .find(|(_, cubin)| defines(cubin, symbol))
            .ok_or_else(|| Error::Shape { what: "kernel", reason: format!("no kernel named {symbol}") })?;
        let f = module.load_function(symbol).map_err(drv("cuModuleGetFunction"))?;
        prefer_carveout(&f)?;
        let f: &'static CudaFunction = Box::leak(Box::new(f));
        found.insert(key.to_string(), f);
        Ok(f)
    }

    pub fn describe(&self) -> String {
        format!("{} ({}, {} SMs)", self.name, self.arch, self.sm_count)
    }
}

/// `PIPEMOE_SMEM_CARVEOUT=P` (an experiment's knob, 0–100; unset: the driver's choice, as before) asks for the same
/// share of each SM's L1/shared memory as shared memory for every kernel, so that an SM never has to drain to change
/// its split between kernels of different needs (docs/PERF.md session 48).
fn prefer_carveout(f: &CudaFunction) -> Result<()> {
    use cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT as CARVEOUT;
    static SHARE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let share = *SHARE.get_or_init(|| {
        let text = std::env::var("PIPEMOE_SMEM_CARVEOUT").ok()?;
        let share = text.trim().parse::<usize>().ok().filter(|p| *p <= 100);
        if share.is_none() {
            eprintln!(
                "pipemoe: ignoring PIPEMOE_SMEM_CARVEOUT={text:?} (want an integer in 0..=100); the driver's choice"
            );
        }
        share
    });
    match share {
        Some(p) => f.set_attribute(CARVEOUT, p as i32).map_err(drv("cuFuncSetAttribute (carveout)")),
        None => Ok(()),
    }
}

/// Up to this much freed device memory stays in the allocator's pool across synchronizations.
pub const POOL_KEEP_BYTES: u64 = 1 << 30;

/// Buffers are allocated from the device's stream-ordered pool, which by default hands every freed byte back to
/// the driver at each synchronization — once per decode step — so the next step maps its activations afresh.
/// Keeping up to [`POOL_KEEP_BYTES`] makes a step's allocations reuse the last step's memory.
fn keep_freed_memory(ctx: &CudaContext) -> Result<()> {
    use cudarc::driver::result::{device, mem_pool};
    use cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
    let mut keep = POOL_KEEP_BYTES;
    // SAFETY: the device comes from the context; the attribute takes a u64, which `keep` is.
    unsafe {
        let pool = device::get_default_mem_pool(ctx.cu_device()).map_err(drv("cuDeviceGetDefaultMemPool"))?;
        mem_pool::set_attribute(pool, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, (&raw mut keep).cast())
            .map_err(drv("cuMemPoolSetAttribute"))?;
    }
    Ok(())
}

/// Whether an ELF cubin names `symbol`: its string table holds each kernel's name (and `.text.<name>`,
/// `.nv.info.<name>`), NUL-terminated and preceded by a NUL or a dot, so `x_foo` does not match `foo`.
fn defines(cubin: &[u8], symbol: &str) -> bool {
    let name = symbol.as_bytes();
    cubin
        .windows(name.len() + 2)
        .any(|w| matches!(w[0], 0 | b'.') && &w[1..=name.len()] == name && w[name.len() + 1] == 0)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{RECENT, defines, recall};

    #[test]
    fn recent_uploads_are_reused_by_content_and_the_oldest_is_dropped() {
        let mut list = Vec::new();
        let mut made = 0;
        let mut get = |list: &mut Vec<(Vec<i32>, Arc<usize>)>, k: Vec<i32>| {
            *recall(list, k, || {
                made += 1;
                Ok(made)
            })
            .unwrap()
        };
        assert_eq!(get(&mut list, vec![1, 2]), 1);
        assert_eq!(get(&mut list, vec![1, 2]), 1, "same content: the same upload");
        assert_eq!(get(&mut list, vec![2, 1]), 2);
        for k in 3..3 + RECENT as i32 {
            get(&mut list, vec![k]);
        }
        assert_eq!(list.len(), RECENT);
        assert_eq!(get(&mut list, vec![1, 2]), 3 + RECENT, "evicted, so uploaded again");
    }

    #[test]
    fn a_symbol_is_found_only_as_a_whole_name() {
        let table = b"\0.text.gptq_reduce_f32\0x_embed_bf16\0rms_norm_f32\0";
        assert!(defines(table, "gptq_reduce_f32"));
        assert!(defines(table, "rms_norm_f32"));
        assert!(!defines(table, "embed_bf16"), "a suffix of another name");
        assert!(!defines(table, "gptq_reduce"), "a prefix of another name");
        assert!(!defines(table, "rms_norm_bf16"));
    }
}
