//! The shape of `src/`: no module imports one that imports it back, directly or around a cycle.
//! A module's state lives with it (`docs/architecture.md`, "Per-VM state"); a cycle is where
//! that rule breaks first.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

/// Each module of `src/` and the modules its code names (`crate::x`, `use crate::{x, y}`),
/// comments left out; the unit-test files and the native fake host are not the module's code.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut modules = BTreeMap::new();
    for entry in fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.extension().is_some_and(|e| e == "rs") && !name.ends_with("_tests") && name != "fake_host" && name != "lib" {
            let code: String = fs::read_to_string(&path).unwrap().lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
            modules.insert(name, code);
        }
    }
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    let mut graph = BTreeMap::new();
    for (name, code) in &modules {
        let mut deps = BTreeSet::new();
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + 7..];
            let named: Vec<&str> = match rest.strip_prefix('{') {
                Some(list) => list[..list.find('}').unwrap_or(0)].split(',').map(|i| i.trim().split("::").next().unwrap_or("")).collect(),
                None => vec![rest.split(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap_or("")],
            };
            deps.extend(named.into_iter().filter(|m| names.contains(*m) && *m != name).map(String::from));
        }
        graph.insert(name.clone(), deps);
    }
    graph
}

/// A cycle through `start`, if there is one: the path back to it.
fn cycle_through(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_string(), vec![start.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((node, path)) = stack.pop() {
        for next in graph.get(&node).into_iter().flatten() {
            if next == start {
                return Some([path.clone(), vec![start.to_string()]].concat());
            }
            if seen.insert(next.clone()) {
                stack.push((next.clone(), [path.clone(), vec![next.clone()]].concat()));
            }
        }
    }
    None
}

#[test]
fn no_module_of_src_imports_itself_back() {
    let graph = graph();
    assert!(graph.len() > 15 && graph["root"].contains("network"), "the graph was not read: {graph:?}");
    let cycles: Vec<String> = graph.keys().filter_map(|m| cycle_through(&graph, m)).map(|c| c.join(" -> ")).collect();
    assert!(cycles.is_empty(), "import cycles in src/:\n{}", cycles.join("\n"));
}
