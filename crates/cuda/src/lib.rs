//! CUDA backend (comes in a later issue): `.cu` kernels compiled at run time by NVRTC for the device's own
//! architecture and cached on disk, and the cudarc device/stream/IPC plumbing behind the model's backend trait.
//! Deliberately empty for now, and without cudarc, so the workspace builds fast on GPU-less machines.
