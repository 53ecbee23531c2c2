//! The controller (comes in a later issue): OpenAI-compatible HTTP API, recipes (SQLite + `migrations/`),
//! scheduler, placement planner and worker supervisor. It never links CUDA, so it builds and tests anywhere.
