//! Launch shapes and arguments every op's launch shares: a grid over n values, one block a row, and an optional
//! argument passed as a null pointer.

use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Enough blocks of `threads` for `n` values (one at least).
pub(crate) fn grid(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(threads).max(1), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A kernel's optional argument: the value, or a null device pointer where there is none — how every kernel is
/// told an input is absent (no row order, a symmetric weight's zeros, an output not wanted).
pub(crate) trait ArgOrNull {
    fn arg_or_null<A>(&mut self, v: Option<A>) -> &mut Self
    where
        Self: PushKernelArg<A>;
}

impl ArgOrNull for cudarc::driver::LaunchArgs<'_> {
    fn arg_or_null<A>(&mut self, v: Option<A>) -> &mut Self
    where
        Self: PushKernelArg<A>,
    {
        static NULL: u64 = 0;
        match v {
            Some(a) => self.arg(a),
            None => <Self as PushKernelArg<&u64>>::arg(self, &NULL),
        }
    }
}

/// One block of 512 threads per row.
pub(crate) fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 }
}
