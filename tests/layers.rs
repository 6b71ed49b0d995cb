//! Issue 36 item 3: imports go one way. The layers are written once, in docs/ARCHITECTURE.md
//! ("Layers"); this reads them and every module under src/ (its code, not its tests) and fails
//! on an import of a module of the same or a higher layer, and on a module the table misses.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Module name -> layer, from the table under "## Layers".
fn layers() -> BTreeMap<String, u32> {
    let doc = std::fs::read_to_string(format!("{ROOT}/docs/ARCHITECTURE.md")).expect("doc");
    let section = doc
        .split("## Layers")
        .nth(1)
        .expect("docs/ARCHITECTURE.md has a Layers section");
    let mut layers = BTreeMap::new();
    for row in section.lines().take_while(|l| !l.starts_with("## ")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let Some(layer) = cells.get(1).and_then(|c| c.parse::<u32>().ok()) else {
            continue;
        };
        for module in cells[2].split(',') {
            layers.insert(module.trim().trim_matches('`').to_string(), layer);
        }
    }
    layers
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`None` for lib.rs and main.rs).
fn module_of(path: &Path) -> Option<String> {
    let relative = path.strip_prefix(format!("{ROOT}/src")).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_string())
}

/// The top-level modules named by `crate::...` paths in `code` (a `use crate::{a, b::c}` group
/// names each), and by `super::...` in a file directly under src/.
fn imports(code: &str, top_level_file: bool) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    let mut prefixes = vec!["crate::"];
    if top_level_file {
        prefixes.push("super::");
    }
    for prefix in prefixes {
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            rest = &rest[at + prefix.len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // A group: its top-level entries, up to the matching brace.
                let (mut depth, mut entry) = (0usize, String::new());
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            named.insert(first_segment(&entry));
                            entry.clear();
                            continue;
                        }
                        _ => {}
                    }
                    entry.push(c);
                }
                named.insert(first_segment(&entry));
            } else {
                named.insert(first_segment(rest));
            }
        }
    }
    named.retain(|name| !name.is_empty() && name != "self");
    named
}

fn first_segment(path: &str) -> String {
    path.trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

#[test]
fn imports_go_one_way() {
    let layers = layers();
    assert!(
        layers.len() > 10,
        "the Layers table was not read: {layers:?}"
    );
    let mut files = Vec::new();
    rust_files(Path::new(&format!("{ROOT}/src")), &mut files);
    let mut wrong = Vec::new();
    for file in files {
        let Some(module) = module_of(&file) else {
            continue;
        };
        let Some(&layer) = layers.get(&module) else {
            wrong.push(format!("{module} is not in the Layers table"));
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("read");
        // The code, not its unit tests (a test may drive a module from above).
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let top_level_file = file.parent() == Some(Path::new(&format!("{ROOT}/src")));
        for used in imports(code, top_level_file) {
            if used == module {
                continue;
            }
            match layers.get(&used) {
                Some(&other) if other < layer => {}
                Some(&other) => wrong.push(format!(
                    "{} (layer {layer}) imports {used} (layer {other})",
                    file.display()
                )),
                // Not a module of ours (a type re-exported at the crate root, say).
                None => {}
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_reader_sees_groups_and_super() {
    let names = imports("use crate::{a::{b, c}, d};\nlet x = crate::e::f;", false);
    assert_eq!(names, BTreeSet::from(["a".into(), "d".into(), "e".into()]));
    assert!(imports("use super::g;", true).contains("g"));
    assert!(imports("use super::g;", false).is_empty());
}
