//! `sqlx::migrate!` embeds `migrations/` at compile time but does not notice new files by itself
//! (DEPENDENCIES.md §2): rebuild when the folder changes.
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
