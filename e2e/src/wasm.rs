//! `make build`'s last step: the module keeps only the exports close-relay uses
//! ([`close_relay::EXPORTS`]). The SDK exports every callback of the ABI, and
//! proxy-wasm-cpp-host enters the VM for each exported one (a body chunk, a trailer, `on_log`)
//! even when the filter does nothing with it; for one it does not export it makes no call.
//! Removing an export also lets the code only it reached go (walrus's garbage collection).

/// `module` with only the exports named in `keep`; also the names removed. Refuses a module
/// that lacks one of `keep`: the list and the module would disagree about what Envoy calls.
pub fn keep_exports(module: &[u8], keep: &[&str]) -> Result<(Vec<u8>, Vec<String>), String> {
    let mut m = walrus::Module::from_buffer(module).map_err(|e| format!("not a wasm module: {e}"))?;
    let missing: Vec<&str> = keep.iter().copied().filter(|k| m.exports.iter().all(|e| e.name != *k)).collect();
    if !missing.is_empty() {
        return Err(format!("the module does not export {missing:?}"));
    }
    let drop: Vec<(walrus::ExportId, String)> =
        m.exports.iter().filter(|e| !keep.contains(&e.name.as_str())).map(|e| (e.id(), e.name.clone())).collect();
    for (id, _) in &drop {
        m.exports.delete(*id);
    }
    walrus::passes::gc::run(&mut m);
    Ok((m.emit_wasm(), drop.into_iter().map(|(_, name)| name).collect()))
}

/// The names a module exports.
pub fn exports(module: &[u8]) -> Result<Vec<String>, String> {
    let m = walrus::Module::from_buffer(module).map_err(|e| format!("not a wasm module: {e}"))?;
    Ok(m.exports.iter().map(|e| e.name.clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A module with a memory and three exported functions, `b` calling a helper.
    fn module() -> Vec<u8> {
        let mut m = walrus::Module::default();
        let memory = m.memories.add_local(false, false, 1, None, None);
        m.exports.add("memory", memory);
        let mut helper = walrus::FunctionBuilder::new(&mut m.types, &[], &[]);
        helper.func_body();
        let helper = helper.finish(vec![], &mut m.funcs);
        for name in ["a", "b", "c"] {
            let mut f = walrus::FunctionBuilder::new(&mut m.types, &[], &[]);
            if name == "b" {
                f.func_body().call(helper);
            }
            let f = f.finish(vec![], &mut m.funcs);
            m.exports.add(name, f);
        }
        m.emit_wasm()
    }

    #[test]
    fn removes_the_rest_and_what_only_they_reached() {
        let (kept, removed) = keep_exports(&module(), &["memory", "a"]).unwrap();
        assert_eq!(exports(&kept).unwrap(), ["memory", "a"]);
        assert_eq!(removed, ["b", "c"]);
        let m = walrus::Module::from_buffer(&kept).unwrap();
        assert_eq!(m.funcs.iter().count(), 1, "b's helper goes with b");
        // Idempotent: the trimmed module trims to itself.
        assert_eq!(keep_exports(&kept, &["memory", "a"]).unwrap(), (kept.clone(), vec![]));
    }

    #[test]
    fn refuses_a_list_the_module_disagrees_with() {
        let err = keep_exports(&module(), &["memory", "proxy_on_tick"]).unwrap_err();
        assert!(err.contains("proxy_on_tick"), "{err}");
        assert!(keep_exports(b"not wasm", &[]).is_err());
    }
}
