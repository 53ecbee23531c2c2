//! The gRPC worker (comes in a later issue): one process per device that loads its slice of the checkpoint,
//! keeps the KV cache of its layers, runs its pipeline stage and answers `pipemoe.worker.v1.Worker`.
