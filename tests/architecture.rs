//! The library's modules form the layers docs/ARCHITECTURE.md lists: a module imports (`crate::name`)
//! only modules of earlier layers or its own, so there is no import cycle among them.

use std::path::Path;

/// docs/ARCHITECTURE.md's layers, first to last.
const LAYERS: &[&[&str]] = &[
    &[
        "error",
        "rng",
        "schedule",
        "progress",
        "interrupt",
        "files",
        "sass",
    ],
    &["backend", "npy", "hub"],
    &["model"],
    &["image", "data"],
    &["sample"],
    &["checkpoint", "eval"],
    &["train", "sample_files"],
    &["bench"],
    &["cli"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The modules a source file names as `crate::name`.
fn imports(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        let name: String = text[i + 7..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
            .collect();
        if !name.is_empty() && !found.contains(&name) {
            found.push(name);
        }
    }
    found
}

#[test]
fn modules_import_only_earlier_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut checked = 0;
    let mut bad = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if ["lib", "main", "bin"].contains(&module.as_str()) {
            continue;
        }
        let Some(own) = layer(&module) else {
            bad.push(format!(
                "{}: module {module} is in no layer of docs/ARCHITECTURE.md",
                rel.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(f).unwrap();
        for m in imports(&text) {
            if m == module || ["Error", "Result"].contains(&m.as_str()) {
                continue;
            }
            match layer(&m) {
                Some(l) if l <= own => {}
                Some(l) => bad.push(format!(
                    "{}: {module} (layer {}) imports {m} (layer {})",
                    rel.display(),
                    own + 1,
                    l + 1
                )),
                None => bad.push(format!(
                    "{}: imports crate::{m}, in no layer",
                    rel.display()
                )),
            }
        }
        checked += 1;
    }
    assert!(
        checked >= 30,
        "only {checked} source files found under {}",
        src.display()
    );
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The check sees an import that goes up a layer (the one the train / checkpoint cycle had).
#[test]
fn an_import_of_a_later_layer_is_seen() {
    let names = imports("use crate::train::TrainOptions;\nlet x = crate::files::write_atomic;");
    assert_eq!(names, ["train", "files"]);
    assert!(layer("train").unwrap() > layer("checkpoint").unwrap());
}
