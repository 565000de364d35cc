//! `trim <module.wasm>`: rewrites the module in place with only close-relay's exports
//! ([`close_relay::EXPORTS`], see `e2e/src/wasm.rs`). `make build` runs it after cargo.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(path) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: trim <module.wasm>");
        return ExitCode::from(2);
    };
    let trimmed = std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| e2e::wasm::keep_exports(&bytes, close_relay::EXPORTS).map(|t| (bytes.len(), t)));
    let (before, (bytes, removed)) = match trimmed {
        Ok(t) => t,
        Err(e) => {
            eprintln!("trim {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    // A new file moved over the old one: cargo's hard link to the same module stays as built.
    let tmp = path.with_extension("wasm.trim");
    if let Err(e) = std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, &path)) {
        eprintln!("trim {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    if !removed.is_empty() {
        println!("trim {}: {before} -> {} bytes, removed exports {}", path.display(), bytes.len(), removed.join(" "));
    }
    ExitCode::SUCCESS
}
