//! The controller's error type. Variants about files name the file; a wrapped foreign error is the variant's
//! `source()`, not part of its message, so chain printers (anyhow's `{:#}`) show it once. Add variants here
//! rather than a second enum (modules with a narrow error of their own, like the planner's, keep it).

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    /// The recipe database could not be opened, read or written (`db` is its path, or `:memory:`).
    #[error("recipe database {db}")]
    Database { db: String, source: sqlx::Error },

    #[error("recipe database {db}: applying migrations")]
    Migrate { db: String, source: sqlx::migrate::MigrateError },

    /// A recipe field holds a value the server cannot run; `field` is the recipe's field name.
    #[error("recipe field {field}: {reason}")]
    InvalidRecipe { field: String, reason: String },

    #[error("no recipe {id:?} (`pipemoe recipe list` shows the recipes)")]
    RecipeNotFound { id: String },

    /// A recipe file (`--file`) that is not valid TOML/JSON or not a table of recipe fields.
    #[error("{}: {reason}", path.display())]
    RecipeFile { path: PathBuf, reason: String },

    /// A row of the database that no longer reads as a recipe (edited by hand, or a newer schema).
    #[error("recipe database: stored recipe {id:?}: {field}: {reason}")]
    CorruptRecipe { id: String, field: String, reason: String },

    /// Another process holds the PID file's lock.
    #[error("{}", already_running(*pid, url.as_deref()))]
    AlreadyRunning { pid: Option<u32>, url: Option<String> },

    #[error("{}: {what}", path.display())]
    Lock { path: PathBuf, what: &'static str, source: nix::errno::Errno },

    #[error("{}: invalid state file", path.display())]
    StateFile { path: PathBuf, source: serde_json::Error },

    /// A PID file whose lock is held but whose content never became a pid.
    #[error("{}: locked but holds no pid ({content:?})", path.display())]
    PidFileContent { path: PathBuf, content: String },

    #[error("GET {url}: {reason}")]
    Http { url: String, reason: String },

    #[error("sending {signal} to pid {pid}")]
    Signal { pid: u32, signal: &'static str, source: nix::errno::Errno },

    /// The tokio runtime of a command-line subcommand could not be built.
    #[error("starting the async runtime")]
    Runtime { source: std::io::Error },

    /// `pipemoe start --foreground`: the server (`crate::serve::run`) failed.
    #[error("serving")]
    Serve { source: anyhow::Error },

    #[error("starting `pipemoe serve`")]
    Spawn { source: std::io::Error },

    /// `pipemoe serve` exited before its API answered; `log_tail` holds the end of its log.
    #[error("`pipemoe serve` exited ({status}) before answering{log_tail}")]
    ServeExited { status: String, log_tail: String },

    /// `pipemoe serve` is still running but did not answer within the deadline.
    #[error(
        "{url} did not answer within {secs} s; pid {pid} is still starting (`pipemoe status`, `pipemoe stop`){log_tail}"
    )]
    StartTimeout { url: String, secs: u64, pid: u32, log_tail: String },
}

fn already_running(pid: Option<u32>, url: Option<&str>) -> String {
    let pid = pid.map_or_else(|| "pid unknown".to_string(), |p| format!("pid {p}"));
    let at = url.map(|u| format!(" at {u}")).unwrap_or_default();
    format!("pipemoe is already running ({pid}){at}; `pipemoe stop` first")
}
