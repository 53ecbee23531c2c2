//! `RecipeStore`: the `recipes` table of the controller's SQLite database. Every write is one transaction
//! and validates first; the file runs in WAL mode with `synchronous = FULL`, so a crash loses at most the
//! write in flight and never leaves a half-written recipe. Queries are checked at run time (`query`/`query_as`,
//! no `DATABASE_URL`); the tests cover each one.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use super::{DEMO_ID, DEMO_MODEL_PATH, Recipe};
use crate::error::{Error, Result};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// How long a writer waits for another process's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

const COLUMNS: &str = "id, name, model_path, served_model_name, max_model_len, kv_cache_dtype, dtype, quantization, \
                       devices, max_memory_gib, env, extra, placement, created_at, updated_at";

#[derive(Debug, Clone)]
pub struct RecipeStore {
    pool: SqlitePool,
    /// The database's path, or `:memory:`, for error messages.
    db: String,
}

impl RecipeStore {
    /// Opens (creating it and its directory if needed) the database at `path` and applies the migrations.
    pub async fn open(path: &Path) -> Result<Self> {
        let db = path.display().to_string();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.to_path_buf(), source: e })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|e| Error::Database { db: db.clone(), source: e })?;
        Self::migrated(pool, db).await
    }

    /// A private in-memory database (tests). One connection that never expires: the data lives in it.
    pub async fn memory() -> Result<Self> {
        let db = ":memory:".to_string();
        let to_err = |e| Error::Database { db: db.clone(), source: e };
        let options = SqliteConnectOptions::from_str("sqlite::memory:").map_err(to_err)?;
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(to_err)?;
        Self::migrated(pool, db).await
    }

    async fn migrated(pool: SqlitePool, db: String) -> Result<Self> {
        MIGRATOR.run(&pool).await.map_err(|e| Error::Migrate { db: db.clone(), source: e })?;
        Ok(Self { pool, db })
    }

    fn err(&self, source: sqlx::Error) -> Error {
        Error::Database { db: self.db.clone(), source }
    }

    /// Inserts `recipe`, or replaces the stored one with the same id (its `created_at` is kept). Returns the
    /// recipe as stored, timestamps included. The input's timestamps are ignored.
    pub async fn upsert(&self, recipe: &Recipe) -> Result<Recipe> {
        recipe.validate()?;
        let devices = to_json("devices", &recipe.devices)?;
        let env = to_json("env", &recipe.env)?;
        let extra = to_json("extra", &recipe.extra)?;
        let placement = recipe.placement.as_ref().map(|p| to_json("placement", p)).transpose()?;
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        sqlx::query(
            "INSERT INTO recipes (id, name, model_path, served_model_name, max_model_len, kv_cache_dtype, dtype,
                                  quantization, devices, max_memory_gib, env, extra, placement)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (id) DO UPDATE SET
                 name = excluded.name, model_path = excluded.model_path,
                 served_model_name = excluded.served_model_name, max_model_len = excluded.max_model_len,
                 kv_cache_dtype = excluded.kv_cache_dtype, dtype = excluded.dtype,
                 quantization = excluded.quantization, devices = excluded.devices,
                 max_memory_gib = excluded.max_memory_gib, env = excluded.env, extra = excluded.extra,
                 placement = excluded.placement,
                 updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
        )
        .bind(&recipe.id)
        .bind(&recipe.name)
        .bind(&recipe.model_path)
        .bind(&recipe.served_model_name)
        .bind(i64::from(recipe.max_model_len))
        .bind(recipe.kv_cache_dtype.as_str())
        .bind(recipe.dtype.as_str())
        .bind(recipe.quantization.map(|q| q.as_str()))
        .bind(devices)
        .bind(recipe.max_memory_gib)
        .bind(env)
        .bind(extra)
        .bind(placement)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        let row: RecipeRow = sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM recipes WHERE id = ?")))
            .bind(&recipe.id)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))?;
        row.into_recipe()
    }

    pub async fn get(&self, id: &str) -> Result<Option<Recipe>> {
        let row: Option<RecipeRow> =
            sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM recipes WHERE id = ?")))
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| self.err(e))?;
        row.map(RecipeRow::into_recipe).transpose()
    }

    /// Like `get`, but a missing recipe is `Error::RecipeNotFound`.
    pub async fn require(&self, id: &str) -> Result<Recipe> {
        self.get(id).await?.ok_or_else(|| Error::RecipeNotFound { id: id.to_string() })
    }

    /// Every recipe, by id.
    pub async fn list(&self) -> Result<Vec<Recipe>> {
        let rows: Vec<RecipeRow> =
            sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM recipes ORDER BY id")))
                .fetch_all(&self.pool)
                .await
                .map_err(|e| self.err(e))?;
        rows.into_iter().map(RecipeRow::into_recipe).collect()
    }

    /// Deletes a recipe; an unknown id is `Error::RecipeNotFound`. Returns the deleted recipe.
    pub async fn remove(&self, id: &str) -> Result<Recipe> {
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        let row: Option<RecipeRow> =
            sqlx::query_as(sqlx::AssertSqlSafe(format!("DELETE FROM recipes WHERE id = ? RETURNING {COLUMNS}")))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))?;
        row.ok_or_else(|| Error::RecipeNotFound { id: id.to_string() })?.into_recipe()
    }

    /// Inserts the bundled demo recipe (`Recipe::demo`) unless a recipe `demo` exists (a changed one is
    /// kept) or the demo model is not under `repo_root` (an installed server without the fixtures should not
    /// list a recipe that cannot run). Returns whether it inserted. `repo_root` is the data dir's parent,
    /// where the relative `model_path` resolves.
    pub async fn ensure_demo(&self, repo_root: &Path) -> Result<bool> {
        if !repo_root.join(DEMO_MODEL_PATH).join("config.json").is_file() {
            return Ok(false);
        }
        let demo = Recipe::demo();
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        let inserted = sqlx::query(
            "INSERT INTO recipes (id, name, model_path, served_model_name, max_model_len, devices, max_memory_gib)
             VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
        )
        .bind(DEMO_ID)
        .bind(&demo.name)
        .bind(&demo.model_path)
        .bind(&demo.served_model_name)
        .bind(i64::from(demo.max_model_len))
        .bind(to_json("devices", &demo.devices)?)
        .bind(demo.max_memory_gib)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?
        .rows_affected()
            == 1;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(inserted)
    }

    /// Closes the pool (waits for connections to finish; a WAL checkpoint happens on the last close).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// A JSON column's text. Serializing these types (strings, numbers, string-keyed maps) cannot fail; the
/// error path exists so that nothing here panics.
fn to_json<T: serde::Serialize>(field: &str, v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| super::invalid(field, e.to_string()))
}

/// One row as SQLite returns it; `into_recipe` parses the JSON and enum columns.
#[derive(sqlx::FromRow)]
struct RecipeRow {
    id: String,
    name: String,
    model_path: String,
    served_model_name: String,
    max_model_len: i64,
    kv_cache_dtype: String,
    dtype: String,
    quantization: Option<String>,
    devices: String,
    max_memory_gib: f64,
    env: String,
    extra: String,
    placement: Option<String>,
    created_at: String,
    updated_at: String,
}

impl RecipeRow {
    fn into_recipe(self) -> Result<Recipe> {
        let id = self.id.clone();
        let corrupt =
            |field: &str, reason: String| Error::CorruptRecipe { id: id.clone(), field: field.into(), reason };
        let recipe = Recipe {
            max_model_len: u32::try_from(self.max_model_len).map_err(|e| corrupt("max_model_len", e.to_string()))?,
            kv_cache_dtype: self.kv_cache_dtype.parse().map_err(|e| corrupt("kv_cache_dtype", e))?,
            dtype: self.dtype.parse().map_err(|e| corrupt("dtype", e))?,
            quantization: self.quantization.map(|q| q.parse()).transpose().map_err(|e| corrupt("quantization", e))?,
            devices: serde_json::from_str(&self.devices).map_err(|e| corrupt("devices", e.to_string()))?,
            env: serde_json::from_str(&self.env).map_err(|e| corrupt("env", e.to_string()))?,
            extra: serde_json::from_str(&self.extra).map_err(|e| corrupt("extra", e.to_string()))?,
            placement: match &self.placement {
                None => None,
                Some(p) => Some(serde_json::from_str(p).map_err(|e| corrupt("placement", e.to_string()))?),
            },
            id: self.id,
            name: self.name,
            model_path: self.model_path,
            served_model_name: self.served_model_name,
            max_memory_gib: self.max_memory_gib,
            created_at: self.created_at,
            updated_at: self.updated_at,
        };
        Ok(recipe)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::recipes::{Device, PlacementSlice, Quantization};

    fn repo_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    fn custom() -> Recipe {
        let mut r =
            Recipe::new("big-345b", "/models/DeepSeek-V3.2-REAP-345B-W3A16", vec![Device::Cuda(0), Device::Cuda(1)]);
        r.quantization = Some(Quantization::AutoRound);
        r.env.insert("CUDA_LAUNCH_BLOCKING".into(), "1".into());
        r.extra.insert("note".into(), serde_json::json!({"k": [1, 2]}));
        r.placement = Some(vec![
            PlacementSlice { layers: [0, 30], experts: None },
            PlacementSlice { layers: [30, 61], experts: Some([0, 64]) },
        ]);
        r
    }

    /// What the caller gave, with the store's timestamps.
    fn same_fields(stored: &Recipe, given: &Recipe) {
        let mut g = given.clone();
        g.created_at = stored.created_at.clone();
        g.updated_at = stored.updated_at.clone();
        assert_eq!(stored, &g);
        assert!(stored.created_at.ends_with('Z') && stored.created_at.len() == 24, "{}", stored.created_at);
    }

    #[tokio::test]
    async fn round_trip_in_memory() {
        let store = RecipeStore::memory().await.unwrap();
        assert!(store.list().await.unwrap().is_empty());
        let a = store.upsert(&custom()).await.unwrap();
        same_fields(&a, &custom());
        let d = store.upsert(&Recipe::demo()).await.unwrap();
        assert_eq!(store.get("big-345b").await.unwrap(), Some(a.clone()));
        let ids: Vec<String> = store.list().await.unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["big-345b", "demo"]);
        assert_eq!(store.remove("demo").await.unwrap(), d);
        assert_eq!(store.get("demo").await.unwrap(), None);
        assert!(matches!(store.remove("demo").await, Err(Error::RecipeNotFound { id }) if id == "demo"));
        assert!(matches!(store.require("nope").await, Err(Error::RecipeNotFound { .. })));
        assert_eq!(store.list().await.unwrap(), vec![a]);
    }

    #[tokio::test]
    async fn upsert_twice_keeps_created_at_in_a_file_that_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/controller.db");
        let store = RecipeStore::open(&path).await.unwrap();
        let first = store.upsert(&custom()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut changed = custom();
        changed.max_model_len = 8192;
        changed.quantization = None;
        changed.placement = None;
        changed.created_at = "1999-01-01T00:00:00.000Z".into(); // ignored
        let second = store.upsert(&changed).await.unwrap();
        assert_eq!(second.created_at, first.created_at);
        assert!(second.updated_at > first.updated_at, "{} vs {}", second.updated_at, first.updated_at);
        assert_eq!((second.max_model_len, second.quantization, &second.placement), (8192, None, &None));
        store.close().await;

        let reopened = RecipeStore::open(&path).await.unwrap();
        assert_eq!(reopened.list().await.unwrap(), vec![second]);
        reopened.close().await;
    }

    #[tokio::test]
    async fn invalid_recipes_are_not_written() {
        let store = RecipeStore::memory().await.unwrap();
        let mut r = custom();
        r.max_memory_gib = -1.0;
        match store.upsert(&r).await {
            Err(Error::InvalidRecipe { field, .. }) => assert_eq!(field, "max_memory_gib"),
            other => panic!("{other:?}"),
        }
        assert!(store.list().await.unwrap().is_empty());
        // The schema refuses what validation would (a hand-written row), and a bad row reads as an error.
        let bad = sqlx::query(
            "INSERT INTO recipes (id, name, model_path, served_model_name, kv_cache_dtype, devices) VALUES ('x', 'x', '/m', 'm', 'fp16', '[\"cpu\"]')",
        );
        assert!(bad.execute(&store.pool).await.is_err());
        sqlx::query("INSERT INTO recipes (id, name, model_path, served_model_name, devices) VALUES ('x', 'x', '/m', 'm', '[\"tpu\"]')")
            .execute(&store.pool)
            .await
            .unwrap();
        match store.get("x").await {
            Err(Error::CorruptRecipe { id, field, .. }) => assert_eq!((id.as_str(), field.as_str()), ("x", "devices")),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn ensure_demo_is_idempotent_and_keeps_edits() {
        let store = RecipeStore::memory().await.unwrap();
        let empty = tempfile::tempdir().unwrap();
        assert!(!store.ensure_demo(empty.path()).await.unwrap(), "no demo model there");
        assert!(store.list().await.unwrap().is_empty());

        assert!(store.ensure_demo(&repo_root()).await.unwrap());
        let demo = store.require(DEMO_ID).await.unwrap();
        same_fields(&demo, &Recipe::demo());
        assert!(!store.ensure_demo(&repo_root()).await.unwrap());
        assert_eq!(store.list().await.unwrap(), vec![demo.clone()]);

        let mut edited = demo;
        edited.max_memory_gib = 3.0;
        store.upsert(&edited).await.unwrap();
        assert!(!store.ensure_demo(&repo_root()).await.unwrap());
        assert_eq!(store.require(DEMO_ID).await.unwrap().max_memory_gib, 3.0);
    }
}
