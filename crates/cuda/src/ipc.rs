//! Activations passed between worker processes through CUDA IPC (ARCHITECTURE.md "Processes"): the sender
//! copies the tensor into a buffer from `cuMemAlloc` (pool memory cannot be exported), records an interprocess
//! event after the copy, and sends both handles in the gRPC message; the receiver opens them, makes its stream
//! wait on the event and queues a copy into its own memory ahead of its layers, without waiting for it: the
//! receiver's host goes on queueing its layers (and answering) while its device waits for the sender's data.
//! The sender keeps its buffer until the next worker has answered. A ring step's receiver answers only once an
//! event recorded after its copy has completed (`landed`). A nested step's answer is the whole chain's reply, and
//! by then the receiver's copy is done: the chain's last worker synchronizes its stream before it answers, and that
//! stream waited on its sender's event, recorded after that sender's own import copy — and so on back along the
//! chain. A
//! reply that is an error can come before the copy ran; the buffer is then reused while a copy for a failed step
//! may read it, which costs nothing but that step's (discarded) values: pooled buffers are never freed.
//!
//! Both ends reuse what is expensive (docs/PERF.md: 436 µs a round trip when every hand-off allocated, exported,
//! opened and closed afresh): the sender takes its buffer and event from a pool and gets them back when the step's
//! reply arrives, so its handles repeat; the receiver keeps what it opened, keyed by the handle's bytes, and
//! closes it only when its table is full or the backend goes away. A pooled buffer is never freed while the
//! process serves (sizes are powers of two, at most one buffer per size and hand-off in flight), so a handle the
//! receiver kept can never come to name another allocation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{self, CUdeviceptr, CUevent, CUipcEventHandle, CUipcMemHandle};
use cudarc::driver::{DevicePtr, DevicePtrMut, result};
use pipemoe_model::backend::{Landed, SharedActivations};

use crate::act::Act;
use crate::backend::{CudaBackend, GpuTensor, MResult, md, shape};

/// Opened handles a receiver keeps at most (it closes them all to make room).
const OPENED_MAX: usize = 64;
/// The smallest exported buffer; sizes are rounded up to powers of two so a few buffers serve every step.
const MIN_SLOT_BYTES: usize = 64 << 10;

/// An exported buffer, its interprocess event and both handles (fixed for the buffer's life).
struct Slot {
    ptr: CUdeviceptr,
    bytes: usize,
    event: CUevent,
    mem_handle: Vec<u8>,
    event_handle: Vec<u8>,
}

// SAFETY: the pointer and event are plain driver handles, used only through the driver API with the context bound.
unsafe impl Send for Slot {}

impl Slot {
    fn new(bytes: usize) -> MResult<Slot> {
        // SAFETY: a fresh allocation of `bytes`, freed by `release`.
        let ptr = unsafe { result::malloc_sync(bytes.max(4)) }.map_err(md("cuMemAlloc"))?;
        let mut slot =
            Slot { ptr, bytes, event: std::ptr::null_mut(), mem_handle: Vec::new(), event_handle: Vec::new() };
        let flags =
            sys::CUevent_flags::CU_EVENT_INTERPROCESS as u32 | sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        let mut mh = CUipcMemHandle { reserved: [0; 64] };
        let mut eh = CUipcEventHandle { reserved: [0; 64] };
        // SAFETY: out-pointers valid; ptr from cuMemAlloc and an interprocess event, as the API requires. On an
        // error the caller drops `slot` through `release`, which handles a null event.
        let made = check(unsafe { sys::cuEventCreate(&mut slot.event, flags) }, "cuEventCreate")
            .and_then(|()| check(unsafe { sys::cuIpcGetMemHandle(&mut mh, ptr) }, "cuIpcGetMemHandle"))
            .and_then(|()| check(unsafe { sys::cuIpcGetEventHandle(&mut eh, slot.event) }, "cuIpcGetEventHandle"));
        if let Err(e) = made {
            slot.release();
            return Err(e);
        }
        slot.mem_handle = bytes_of(&mh);
        slot.event_handle = bytes_of(&eh);
        Ok(slot)
    }

    /// Frees the buffer and event (the context must be bound).
    fn release(&self) {
        // SAFETY: both were created in `new` and are released exactly once (the slot is dropped after).
        unsafe {
            if !self.event.is_null() {
                let _ = result::event::destroy(self.event);
            }
            let _ = result::free_sync(self.ptr);
        }
    }
}

/// One process's IPC state on one device: the sender's free slots and the receiver's opened handles.
#[derive(Default)]
pub(crate) struct IpcState {
    free: Vec<Slot>,
    /// Memory handle bytes → the pointer `cuIpcOpenMemHandle` gave; event handle bytes → the opened event.
    opened: HashMap<Vec<u8>, CUdeviceptr>,
    events: HashMap<Vec<u8>, CUevent>,
}

// SAFETY: as `Slot`: driver handles used only with the context bound, behind the `Gpu`'s mutex.
unsafe impl Send for IpcState {}

impl IpcState {
    /// Closes what was opened and frees the pooled slots (the context must be bound).
    pub(crate) fn clear(&mut self) {
        self.close_opened();
        for s in self.free.drain(..) {
            s.release();
        }
    }

    fn close_opened(&mut self) {
        // SAFETY: each was opened once by `import` and is closed once, here.
        unsafe {
            for (_, ev) in self.events.drain() {
                let _ = result::event::destroy(ev);
            }
            for (_, ptr) in self.opened.drain() {
                let _ = sys::cuIpcCloseMemHandle(ptr);
            }
        }
    }
}

/// A slot lent to one hand-off; back in the pool when the step's reply has come (this value dropped).
struct Lease {
    state: Arc<Mutex<IpcState>>,
    slot: Option<Slot>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.state.lock().unwrap_or_else(|e| e.into_inner()).free.push(slot);
        }
    }
}

fn check(r: sys::CUresult, op: &'static str) -> MResult<()> {
    r.result().map_err(md(op))
}

fn bytes_of<T>(v: &T) -> Vec<u8> {
    // SAFETY: T is a plain C struct of 64 chars (an IPC handle).
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }.to_vec()
}

fn from_bytes<T: Copy>(b: &[u8], what: &'static str) -> MResult<T> {
    if b.len() != std::mem::size_of::<T>() {
        return Err(shape(what, format!("{} bytes, expected {}", b.len(), std::mem::size_of::<T>())));
    }
    // SAFETY: the length matches and T is a plain C struct of chars, valid for any bytes.
    Ok(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
}

pub fn export(b: &CudaBackend, x: &GpuTensor) -> MResult<SharedActivations> {
    let g = &b.gpu;
    g.ctx.bind_to_thread().map_err(md("bind context"))?;
    let bytes = x.rows * x.cols * x.data.dtype().bytes();
    let pooled = {
        let mut st = g.ipc.lock().unwrap_or_else(|e| e.into_inner());
        let fits = st.free.iter().enumerate().filter(|(_, s)| s.bytes >= bytes);
        fits.min_by_key(|(_, s)| s.bytes).map(|(i, _)| i).map(|i| st.free.swap_remove(i))
    };
    let slot = match pooled {
        Some(s) => s,
        None => Slot::new(bytes.next_power_of_two().max(MIN_SLOT_BYTES))?,
    };
    let (ptr, event) = (slot.ptr, slot.event);
    let (mem_handle, event_handle) = (slot.mem_handle.clone(), slot.event_handle.clone());
    let keep = Lease { state: g.ipc.clone(), slot: Some(slot) };
    {
        let (src, _sync) = match &x.data {
            Act::F32(d) => d.device_ptr(&g.stream),
            Act::Bf16(d) => d.device_ptr(&g.stream),
        };
        // SAFETY: both ranges hold at least `bytes`; the copy is ordered on the stream before the event.
        unsafe { result::memcpy_dtod_async(ptr, src, bytes, g.stream.cu_stream()) }.map_err(md("copy for IPC"))?;
    }
    // SAFETY: event and stream are live.
    unsafe { result::event::record(event, g.stream.cu_stream()) }.map_err(md("cuEventRecord"))?;
    Ok(SharedActivations { mem_handle, event_handle, keep: Box::new(keep) })
}

/// An event recorded after every copy `import` has queued so far; waiting on it (blocking the thread, not
/// spinning) says the senders' buffers have been read. A ring step's receiver answers only then (the chain's
/// last worker synchronizing is what a nested step relies on, and a ring step's answer comes before that).
pub fn landed(b: &CudaBackend) -> MResult<Landed> {
    let blocking = Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC);
    let event = b.gpu.stream.record_event(blocking).map_err(md("cuEventRecord"))?;
    Ok(Landed::new(move || event.synchronize().map_err(md("cuEventSynchronize"))))
}

pub fn import(b: &CudaBackend, rows: usize, cols: usize, mem: &[u8], event: &[u8]) -> MResult<GpuTensor> {
    let g = &b.gpu;
    g.ctx.bind_to_thread().map_err(md("bind context"))?;
    let mh: CUipcMemHandle = from_bytes(mem, "IPC memory handle")?;
    let eh: CUipcEventHandle = from_bytes(event, "IPC event handle")?;
    // Held for the whole import: a handle closed to make room is never one a concurrent import is queueing from.
    let mut st = g.ipc.lock().unwrap_or_else(|e| e.into_inner());
    if st.opened.len() >= OPENED_MAX || st.events.len() >= OPENED_MAX {
        // Copies from what is about to be closed may still be queued.
        g.stream.synchronize().map_err(md("synchronize"))?;
        st.close_opened();
    }
    let src = match st.opened.get(mem) {
        Some(&p) => p,
        None => {
            let mut p: CUdeviceptr = 0;
            let lazy = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
            // SAFETY: out-pointer valid; the handle came from a live exporter that waits for our reply.
            check(unsafe { sys::cuIpcOpenMemHandle_v2(&mut p, mh, lazy) }, "cuIpcOpenMemHandle")?;
            st.opened.insert(mem.to_vec(), p);
            p
        }
    };
    let ev = match st.events.get(event) {
        Some(&e) => e,
        None => {
            let mut e: CUevent = std::ptr::null_mut();
            // SAFETY: out-pointer valid; an interprocess event handle from the exporter.
            check(unsafe { sys::cuIpcOpenEventHandle(&mut e, eh) }, "cuIpcOpenEventHandle")?;
            st.events.insert(event.to_vec(), e);
            e
        }
    };
    // SAFETY: stream and event live; the wait orders our copy after the sender's latest record of the event,
    // which it made before sending these handles.
    unsafe { result::stream::wait_event(g.stream.cu_stream(), ev, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }
        .map_err(md("cuStreamWaitEvent"))?;
    // SAFETY: the copy below writes all rows·cols values.
    let mut data = unsafe { Act::uninit(g, b.act, rows * cols) }.map_err(crate::backend::m)?;
    {
        let (dst, _sync) = match &mut data {
            Act::F32(d) => d.device_ptr_mut(&g.stream),
            Act::Bf16(d) => d.device_ptr_mut(&g.stream),
        };
        // SAFETY: both ranges hold rows·cols values of the fleet's activation dtype.
        unsafe { result::memcpy_dtod_async(dst, src, rows * cols * b.act.bytes(), g.stream.cu_stream()) }
            .map_err(md("copy from IPC"))?;
    }
    Ok(GpuTensor { rows, cols, data })
}
