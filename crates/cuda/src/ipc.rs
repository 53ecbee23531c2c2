//! Activations passed between worker processes through CUDA IPC (ARCHITECTURE.md "Processes"): the sender
//! copies the tensor into a buffer from `cuMemAlloc` (pool memory cannot be exported), records an interprocess
//! event after the copy, and sends both handles in the gRPC message; the receiver opens them, makes its stream
//! wait on the event, copies into its own memory, and closes the handles before it runs. The sender keeps its
//! buffer until the next worker has answered (the whole chain's reply), so the receiver never reads freed memory.

use cudarc::driver::sys::{self, CUdeviceptr, CUevent, CUipcEventHandle, CUipcMemHandle};
use cudarc::driver::{DevicePtr, DevicePtrMut, result};
use pipemoe_model::backend::SharedActivations;

use crate::act::Act;
use crate::backend::{CudaBackend, GpuTensor, MResult, md, shape};

/// The exported buffer and its event, freed when the step is over.
struct Exported {
    ctx: std::sync::Arc<cudarc::driver::CudaContext>,
    ptr: CUdeviceptr,
    event: CUevent,
}

// SAFETY: the pointer and event are plain driver handles, used only through the driver API with the context bound.
unsafe impl Send for Exported {}

impl Drop for Exported {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: both were created in `export` and are released exactly once, here.
            unsafe {
                let _ = result::event::destroy(self.event);
                let _ = result::free_sync(self.ptr);
            }
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
    // SAFETY: a fresh allocation of `bytes`, freed by `Exported`.
    let ptr = unsafe { result::malloc_sync(bytes.max(4)) }.map_err(md("cuMemAlloc"))?;
    let mut event: CUevent = std::ptr::null_mut();
    let flags = sys::CUevent_flags::CU_EVENT_INTERPROCESS as u32 | sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
    // SAFETY: out-pointer valid for the call.
    check(unsafe { sys::cuEventCreate(&mut event, flags) }, "cuEventCreate")?;
    let keep = Exported { ctx: g.ctx.clone(), ptr, event };
    {
        let (src, _sync) = match &x.data {
            Act::F32(d) => d.device_ptr(&g.stream),
            Act::Bf16(d) => d.device_ptr(&g.stream),
        };
        // SAFETY: both ranges hold `bytes`; the copy is ordered on the stream before the event.
        unsafe { result::memcpy_dtod_async(ptr, src, bytes, g.stream.cu_stream()) }.map_err(md("copy for IPC"))?;
    }
    // SAFETY: event and stream are live.
    unsafe { result::event::record(event, g.stream.cu_stream()) }.map_err(md("cuEventRecord"))?;
    let mut mh = CUipcMemHandle { reserved: [0; 64] };
    let mut eh = CUipcEventHandle { reserved: [0; 64] };
    // SAFETY: out-pointers valid; ptr from cuMemAlloc and an interprocess event, as the API requires.
    check(unsafe { sys::cuIpcGetMemHandle(&mut mh, ptr) }, "cuIpcGetMemHandle")?;
    check(unsafe { sys::cuIpcGetEventHandle(&mut eh, event) }, "cuIpcGetEventHandle")?;
    Ok(SharedActivations { mem_handle: bytes_of(&mh), event_handle: bytes_of(&eh), keep: Box::new(keep) })
}

pub fn import(b: &CudaBackend, rows: usize, cols: usize, mem: &[u8], event: &[u8]) -> MResult<GpuTensor> {
    let g = &b.gpu;
    g.ctx.bind_to_thread().map_err(md("bind context"))?;
    let mh: CUipcMemHandle = from_bytes(mem, "IPC memory handle")?;
    let eh: CUipcEventHandle = from_bytes(event, "IPC event handle")?;
    let mut src: CUdeviceptr = 0;
    let lazy = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
    // SAFETY: out-pointer valid; the handle came from a live exporter that waits for our reply.
    check(unsafe { sys::cuIpcOpenMemHandle_v2(&mut src, mh, lazy) }, "cuIpcOpenMemHandle")?;
    let mut ev: CUevent = std::ptr::null_mut();
    let opened = check(unsafe { sys::cuIpcOpenEventHandle(&mut ev, eh) }, "cuIpcOpenEventHandle");
    let result = opened.and_then(|()| {
        // SAFETY: stream and event live; the wait orders our copy after the sender's.
        unsafe { result::stream::wait_event(g.stream.cu_stream(), ev, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }
            .map_err(md("cuStreamWaitEvent"))?;
        let mut data = Act::zeros(g, b.act, rows * cols).map_err(crate::backend::m)?;
        {
            let (dst, _sync) = match &mut data {
                Act::F32(d) => d.device_ptr_mut(&g.stream),
                Act::Bf16(d) => d.device_ptr_mut(&g.stream),
            };
            // SAFETY: both ranges hold rows·cols values of the fleet's activation dtype.
            unsafe { result::memcpy_dtod_async(dst, src, rows * cols * b.act.bytes(), g.stream.cu_stream()) }
                .map_err(md("copy from IPC"))?;
        }
        g.stream.synchronize().map_err(md("synchronize"))?;
        Ok(GpuTensor { rows, cols, data })
    });
    // SAFETY: opened above; closed once, after the synchronous copy.
    unsafe {
        if !ev.is_null() {
            let _ = result::event::destroy(ev);
        }
        let _ = sys::cuIpcCloseMemHandle(src);
    }
    result
}
