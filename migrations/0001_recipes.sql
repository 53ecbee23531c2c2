-- Recipes: what `pipemoe serve` runs (crates/controller/src/recipes). The CHECKs repeat the essentials of
-- Recipe::validate so a hand edit cannot store a row the server cannot read; JSON columns hold text.
CREATE TABLE recipes (
    -- Slug and primary key.
    id                TEXT NOT NULL PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 64),
    name              TEXT NOT NULL CHECK (name <> ''),
    -- Model directory as given; a relative path resolves against the data directory's parent.
    model_path        TEXT NOT NULL CHECK (model_path <> ''),
    served_model_name TEXT NOT NULL CHECK (served_model_name <> ''),
    max_model_len     INTEGER NOT NULL DEFAULT 65536 CHECK (max_model_len > 0),
    kv_cache_dtype    TEXT NOT NULL DEFAULT 'auto' CHECK (kv_cache_dtype IN ('auto', 'bf16', 'fp8')),
    dtype             TEXT NOT NULL DEFAULT 'auto' CHECK (dtype IN ('auto', 'bfloat16', 'float16')),
    -- NULL: read the format from the checkpoint.
    quantization      TEXT CHECK (quantization IN ('auto-round', 'gptq')),
    -- JSON list of "cpu" / "cuda:N": one worker per entry, in pipeline order.
    devices           TEXT NOT NULL
                      CHECK (json_valid(devices) AND json_type(devices) = 'array' AND json_array_length(devices) >= 1),
    -- Memory budget per device, GiB.
    max_memory_gib    REAL NOT NULL DEFAULT 18.0 CHECK (max_memory_gib > 0),
    -- JSON object string -> string, the workers' extra environment.
    env               TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(env) AND json_type(env) = 'object'),
    -- Free JSON object.
    extra             TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(extra) AND json_type(extra) = 'object'),
    -- NULL, or a JSON list of {"layers": [a, b], "experts": [a, b]} (half-open), one per device.
    placement         TEXT CHECK (placement IS NULL OR (json_valid(placement) AND json_type(placement) = 'array')),
    -- RFC 3339 UTC, millisecond precision.
    created_at        TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at        TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;
