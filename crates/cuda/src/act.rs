//! Activations on the device: `[rows, cols]` row-major in f32 (the exact path the tests compare to the CPU
//! reference at f32 precision) or bf16 (the serving path: half the bytes, tensor-core inputs). Kernels are
//! templates instantiated for both; their symbols end in `_f32` or `_bf16` ([`ActDtype::suffix`]).

use std::str::FromStr;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchArgs, PushKernelArg};
use half::bf16;

use crate::error::{Result, drv};
use crate::gpu::Gpu;

/// The element type of activations between kernels. Reductions (norms, softmax, dot products) accumulate in
/// f32 either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ActDtype {
    F32,
    #[default]
    Bf16,
}

impl ActDtype {
    /// The kernel symbol suffix.
    pub fn suffix(self) -> &'static str {
        match self {
            ActDtype::F32 => "f32",
            ActDtype::Bf16 => "bf16",
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            ActDtype::F32 => 4,
            ActDtype::Bf16 => 2,
        }
    }
}

impl FromStr for ActDtype {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(ActDtype::F32),
            "bf16" | "bfloat16" | "auto" => Ok(ActDtype::Bf16),
            other => Err(format!("{other:?} is not an activation dtype (expected bf16 or f32)")),
        }
    }
}

/// A device buffer of activations in either dtype.
pub enum Act {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<bf16>),
}

impl Act {
    /// `n` zeros (at least one element, so empty tensors still have a valid pointer).
    pub fn zeros(gpu: &Gpu, dtype: ActDtype, n: usize) -> Result<Act> {
        let s = &gpu.stream;
        Ok(match dtype {
            ActDtype::F32 => Act::F32(s.alloc_zeros(n.max(1)).map_err(drv("alloc activations"))?),
            ActDtype::Bf16 => Act::Bf16(s.alloc_zeros(n.max(1)).map_err(drv("alloc activations"))?),
        })
    }

    /// `n` values left as the allocator hands them out, for a kernel that writes every one before anything reads
    /// them (saves the memset `zeros` launches, a few µs of a decode step each).
    ///
    /// # Safety
    /// The caller's next use of the buffer must write all `n` values.
    pub unsafe fn uninit(gpu: &Gpu, dtype: ActDtype, n: usize) -> Result<Act> {
        let s = &gpu.stream;
        // SAFETY: bf16 and f32 have no invalid bit patterns; the caller writes every value before reading.
        Ok(unsafe {
            match dtype {
                ActDtype::F32 => Act::F32(s.alloc(n.max(1)).map_err(drv("alloc activations"))?),
                ActDtype::Bf16 => Act::Bf16(s.alloc(n.max(1)).map_err(drv("alloc activations"))?),
            }
        })
    }

    /// Host f32 values stored in `dtype` (rounded to nearest even for bf16).
    pub fn from_f32(gpu: &Gpu, dtype: ActDtype, v: &[f32]) -> Result<Act> {
        let s = &gpu.stream;
        Ok(match dtype {
            ActDtype::F32 => Act::F32(s.clone_htod(v).map_err(drv("upload activations"))?),
            ActDtype::Bf16 => {
                let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
                Act::Bf16(s.clone_htod(&h).map_err(drv("upload activations"))?)
            }
        })
    }

    /// The first `n` values widened to f32 on the host.
    pub fn to_f32(&self, gpu: &Gpu, n: usize) -> Result<Vec<f32>> {
        let s = &gpu.stream;
        let mut v = match self {
            Act::F32(d) => s.clone_dtoh(d).map_err(drv("download activations"))?,
            Act::Bf16(d) => {
                s.clone_dtoh(d).map_err(drv("download activations"))?.into_iter().map(|x| x.to_f32()).collect()
            }
        };
        v.truncate(n);
        Ok(v)
    }

    /// Copies `src` (same dtype and length) over these values, in stream order.
    pub fn copy_from(&mut self, gpu: &Gpu, src: &Act) -> Result<()> {
        let s = &gpu.stream;
        match (self, src) {
            (Act::F32(d), Act::F32(x)) if d.len() == x.len() => s.memcpy_dtod(x, d),
            (Act::Bf16(d), Act::Bf16(x)) if d.len() == x.len() => s.memcpy_dtod(x, d),
            (d, _) => {
                return Err(crate::error::Error::Shape {
                    what: "copy",
                    reason: format!("{:?} [{}] from {:?} [{}]", d.dtype(), d.len(), src.dtype(), src.len()),
                });
            }
        }
        .map_err(drv("copy activations"))
    }

    pub fn dtype(&self) -> ActDtype {
        match self {
            Act::F32(_) => ActDtype::F32,
            Act::Bf16(_) => ActDtype::Bf16,
        }
    }

    /// Elements allocated.
    pub fn len(&self) -> usize {
        match self {
            Act::F32(d) => d.len(),
            Act::Bf16(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `[start, start + len)`.
    pub fn view(&self, start: usize, len: usize) -> ActView<'_> {
        match self {
            Act::F32(d) => ActView::F32(d.slice(start..start + len)),
            Act::Bf16(d) => ActView::Bf16(d.slice(start..start + len)),
        }
    }

    /// Elements `[start, start + len)`, writable.
    pub fn view_mut(&mut self, start: usize, len: usize) -> ActViewMut<'_> {
        match self {
            Act::F32(d) => ActViewMut::F32(d.slice_mut(start..start + len)),
            Act::Bf16(d) => ActViewMut::Bf16(d.slice_mut(start..start + len)),
        }
    }
}

/// A writable range of an [`Act`] buffer.
pub enum ActViewMut<'a> {
    F32(CudaViewMut<'a, f32>),
    Bf16(CudaViewMut<'a, bf16>),
}

impl ActViewMut<'_> {
    pub fn dtype(&self) -> ActDtype {
        match self {
            ActViewMut::F32(_) => ActDtype::F32,
            ActViewMut::Bf16(_) => ActDtype::Bf16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            ActViewMut::F32(d) => d.len(),
            ActViewMut::Bf16(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ActView<'_> {
    pub fn dtype(&self) -> ActDtype {
        match self {
            ActView::F32(_) => ActDtype::F32,
            ActView::Bf16(_) => ActDtype::Bf16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            ActView::F32(d) => d.len(),
            ActView::Bf16(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A range of an [`Act`] buffer.
pub enum ActView<'a> {
    F32(CudaView<'a, f32>),
    Bf16(CudaView<'a, bf16>),
}

// SAFETY: both impls push exactly what cudarc pushes for the slice or view they hold (a device pointer, with the
// stream-ordering bookkeeping cudarc does for it), so an `Act` argument is a `T*` of the matching element type.
unsafe impl<'a, 'b: 'a> PushKernelArg<&'b Act> for LaunchArgs<'a> {
    #[inline(always)]
    fn arg(&mut self, arg: &'b Act) -> &mut Self {
        match arg {
            Act::F32(d) => self.arg(d),
            Act::Bf16(d) => self.arg(d),
        }
    }
}

unsafe impl<'a, 'b: 'a> PushKernelArg<&'b mut Act> for LaunchArgs<'a> {
    #[inline(always)]
    fn arg(&mut self, arg: &'b mut Act) -> &mut Self {
        match arg {
            Act::F32(d) => self.arg(d),
            Act::Bf16(d) => self.arg(d),
        }
    }
}

unsafe impl<'a, 'b: 'a, 'c: 'b> PushKernelArg<&'b ActView<'c>> for LaunchArgs<'a> {
    #[inline(always)]
    fn arg(&mut self, arg: &'b ActView<'c>) -> &mut Self {
        match arg {
            ActView::F32(d) => self.arg(d),
            ActView::Bf16(d) => self.arg(d),
        }
    }
}

unsafe impl<'a, 'b: 'a, 'c: 'b> PushKernelArg<&'b mut ActViewMut<'c>> for LaunchArgs<'a> {
    #[inline(always)]
    fn arg(&mut self, arg: &'b mut ActViewMut<'c>) -> &mut Self {
        match arg {
            ActViewMut::F32(d) => self.arg(d),
            ActViewMut::Bf16(d) => self.arg(d),
        }
    }
}
