//! The worker: one process per device, holding one contiguous slice of the model, serving
//! `pipemoe.worker.v1.Worker` on a Unix socket (or TCP). Steps pass down the chain of workers; the last samples.
