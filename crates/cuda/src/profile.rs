//! Where a step's time goes, op by op: while profiling is on, each backend op records a CUDA event before and
//! after its launches and the host time it took to issue them. The GPU time of an op is the time between its two
//! events; what the GPU spends waiting between ops (`idle`) is the host's launch cost showing through. Off, an op
//! pays one relaxed atomic load. For benchmarks (`pipemoe bench --profile`), not for serving.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use cudarc::driver::CudaEvent;
use cudarc::driver::sys::CUevent_flags;

use crate::error::{Result, drv};
use crate::gpu::Gpu;

/// Events made when profiling starts.
const SPARE_EVENTS: usize = 1024;

#[derive(Default)]
pub struct Profiler {
    pub(crate) on: AtomicBool,
    /// Spans open now: an op called inside another (the experts' per-expert linears on the prefill path) is
    /// counted in the outer one only.
    depth: AtomicUsize,
    spans: Mutex<Vec<Span>>,
    /// Events of earlier profiles, recorded again rather than created (creating one costs host time inside the
    /// span it opens).
    spare: Mutex<Vec<CudaEvent>>,
}

struct Span {
    name: String,
    start: CudaEvent,
    end: CudaEvent,
    host_s: f64,
}

/// Records its op's end when dropped.
pub struct SpanGuard<'a> {
    gpu: &'a Gpu,
    name: String,
    start: Option<CudaEvent>,
    t0: Instant,
}

/// One op name's totals over the profiled calls.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct OpTime {
    pub name: String,
    pub calls: usize,
    /// Seconds between each call's events, summed.
    pub gpu_s: f64,
    /// Seconds the host spent issuing the calls, summed.
    pub host_s: f64,
    /// Device seconds idle just before each call (since the previous op's end), summed: where the device
    /// waits on the host.
    pub idle_before_s: f64,
}

/// A profile: per-op totals, largest GPU time first, and the whole window.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Profile {
    pub ops: Vec<OpTime>,
    /// From the first op's start to the last op's end, on the device.
    pub window_s: f64,
    /// Device time inside no op: gaps between consecutive ops (launch latency, host work between them).
    pub idle_s: f64,
}

impl Gpu {
    /// Starts recording (drops whatever was recorded before).
    pub fn profile_start(&self) {
        self.profiler.spans.lock().unwrap_or_else(|e| e.into_inner()).clear();
        // Events made ahead for the spans' starts and ends (~20 ops a layer and step; more are made as needed).
        let mut spare = self.profiler.spare.lock().unwrap_or_else(|e| e.into_inner());
        while spare.len() < SPARE_EVENTS {
            match self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)) {
                Ok(e) => spare.push(e),
                Err(_) => break,
            }
        }
        drop(spare);
        self.profiler.on.store(true, Ordering::Relaxed);
    }

    /// Stops recording, waits for the device and sums what was recorded.
    pub fn profile_take(&self) -> Result<Profile> {
        self.profiler.on.store(false, Ordering::Relaxed);
        let spans = std::mem::take(&mut *self.profiler.spans.lock().unwrap_or_else(|e| e.into_inner()));
        self.stream.synchronize().map_err(drv("cuStreamSynchronize"))?;
        let mut by_name: BTreeMap<&str, OpTime> = BTreeMap::new();
        let (mut idle_s, mut window_s) = (0.0, 0.0);
        for (i, s) in spans.iter().enumerate() {
            let gpu_s = f64::from(s.start.elapsed_ms(&s.end).map_err(drv("cuEventElapsedTime"))?) * 1e-3;
            let t = by_name.entry(&s.name).or_insert_with(|| OpTime { name: s.name.clone(), ..OpTime::default() });
            t.calls += 1;
            t.gpu_s += gpu_s;
            t.host_s += s.host_s;
            if i > 0 {
                let gap = spans[i - 1].end.elapsed_ms(&s.start).map_err(drv("cuEventElapsedTime"))?;
                let gap = f64::from(gap.max(0.0)) * 1e-3;
                t.idle_before_s += gap;
                idle_s += gap;
            }
        }
        if let (Some(first), Some(last)) = (spans.first(), spans.last()) {
            window_s = f64::from(first.start.elapsed_ms(&last.end).map_err(drv("cuEventElapsedTime"))?) * 1e-3;
        }
        let mut ops: Vec<OpTime> = by_name.into_values().collect();
        let mut spare = self.profiler.spare.lock().unwrap_or_else(|e| e.into_inner());
        spare.extend(spans.into_iter().flat_map(|s| [s.start, s.end]));
        ops.sort_by(|a, b| b.gpu_s.total_cmp(&a.gpu_s));
        Ok(Profile { ops, window_s, idle_s })
    }

    /// A span for one op while profiling is on (`name` is only built then); `None` inside another span.
    pub fn span(&self, name: impl FnOnce() -> String) -> Option<SpanGuard<'_>> {
        if !self.profiler.on.load(Ordering::Relaxed) {
            return None;
        }
        if self.profiler.depth.fetch_add(1, Ordering::Relaxed) > 0 {
            self.profiler.depth.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        // From here the guard (or this failure path) gives the depth back.
        let Some(start) = self.event().filter(|e| e.record(&self.stream).is_ok()) else {
            self.profiler.depth.fetch_sub(1, Ordering::Relaxed);
            return None;
        };
        Some(SpanGuard { gpu: self, name: name(), start: Some(start), t0: Instant::now() })
    }

    fn event(&self) -> Option<CudaEvent> {
        let spare = self.profiler.spare.lock().unwrap_or_else(|e| e.into_inner()).pop();
        spare.or_else(|| self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).ok())
    }
}

impl Drop for SpanGuard<'_> {
    fn drop(&mut self) {
        self.gpu.profiler.depth.fetch_sub(1, Ordering::Relaxed);
        let host_s = self.t0.elapsed().as_secs_f64();
        let Some(end) = self.gpu.event() else { return };
        if end.record(&self.gpu.stream).is_err() {
            return;
        }
        let Some(start) = self.start.take() else { return };
        let span = Span { name: std::mem::take(&mut self.name), start, end, host_s };
        self.gpu.profiler.spans.lock().unwrap_or_else(|e| e.into_inner()).push(span);
    }
}

impl Profile {
    /// The table, one op per line, the window last.
    pub fn table(&self) -> String {
        let gpu: f64 = self.ops.iter().map(|o| o.gpu_s).sum();
        let mut s = format!(
            "{:<44} {:>6} {:>10} {:>10} {:>6} {:>12}\n",
            "op", "calls", "gpu us", "host us", "gpu %", "idle before"
        );
        for o in &self.ops {
            s += &format!(
                "{:<44} {:>6} {:>10.1} {:>10.1} {:>5.1}% {:>12.1}\n",
                o.name,
                o.calls,
                o.gpu_s * 1e6,
                o.host_s * 1e6,
                100.0 * o.gpu_s / self.window_s.max(1e-12),
                o.idle_before_s * 1e6
            );
        }
        s += &format!(
            "window {:.1} us on the device: {:.1} us in ops, {:.1} us idle between them\n",
            self.window_s * 1e6,
            gpu * 1e6,
            self.idle_s * 1e6
        );
        s
    }
}
