//! The house rules for `agent/src`, checked on every `cargo xtask test`: no module imports one
//! that imports it back (at any distance), no function longer than a screen, and a `main.rs`
//! that only dispatches. `cargo xtask lint` prints the module map it checked.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

/// Longest function allowed, in lines from its `fn` to its closing brace.
const MAX_FUNCTION_LINES: usize = 80;
/// Longest `main.rs`: the command line and dispatch.
const MAX_MAIN_LINES: usize = 150;

/// One top-level module of the agent: its lines and the modules it names.
#[derive(Debug, Default)]
pub struct Module {
    pub lines: usize,
    pub imports: BTreeSet<String>,
}

pub fn check(root: &Path) -> anyhow::Result<()> {
    let src = root.join("agent").join("src");
    let modules = module_map(&src)?;
    for (name, m) in &modules {
        let imports: Vec<&str> = m.imports.iter().map(String::as_str).collect();
        eprintln!(
            "xtask: {name:<12} {:>5} lines -> {}",
            m.lines,
            imports.join(", ")
        );
    }
    let mut problems = Vec::new();
    for cycle in cycles(&modules) {
        problems.push(format!(
            "import circle between modules: {}",
            cycle.join(" -> ")
        ));
    }
    for file in rust_files(&src)? {
        let text = fs::read_to_string(&file)?;
        for (name, line, length) in long_functions(&text, MAX_FUNCTION_LINES) {
            problems.push(format!(
                "{}:{line}: fn {name} is {length} lines (at most {MAX_FUNCTION_LINES})",
                file.display()
            ));
        }
    }
    let main_lines = fs::read_to_string(src.join("main.rs"))?.lines().count();
    if main_lines > MAX_MAIN_LINES {
        problems.push(format!(
            "agent/src/main.rs is {main_lines} lines (at most {MAX_MAIN_LINES})"
        ));
    }
    if !problems.is_empty() {
        bail!("house rules broken:\n  {}", problems.join("\n  "));
    }
    eprintln!(
        "xtask: house rules hold: {} modules, no import circle",
        modules.len()
    );
    Ok(())
}

fn rust_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Each top-level module of `src` (a file or a folder) with its lines and the other top-level
/// modules its non-test code names through `crate::`.
pub fn module_map(src: &Path) -> anyhow::Result<BTreeMap<String, Module>> {
    let mut modules: BTreeMap<String, Module> = BTreeMap::new();
    for file in rust_files(src)? {
        let relative = file.strip_prefix(src)?;
        let top = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .unwrap_or_default()
            .trim_end_matches(".rs")
            .to_owned();
        let text = fs::read_to_string(&file)?;
        let module = modules.entry(top.clone()).or_default();
        module.lines += text.lines().count();
        if file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        module
            .imports
            .extend(crate_paths(&without_test_module(&text)));
    }
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    for (name, module) in &mut modules {
        module.imports.retain(|i| i != name && names.contains(i));
    }
    Ok(modules)
}

/// The text before a file's inline `#[cfg(test)] mod tests { .. }`.
fn without_test_module(text: &str) -> String {
    match text.find("#[cfg(test)]\nmod tests {") {
        Some(at) => text[..at].to_owned(),
        None => text.to_owned(),
    }
}

/// The first segment after every `crate::` in `text`, `use crate::{a::.., b}` groups included.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let code = strip_comments_and_strings(text);
    let mut found = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut segment_start = true;
            let mut word = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
                if depth == 1 && c == ',' {
                    if !word.is_empty() {
                        found.insert(std::mem::take(&mut word));
                    }
                    segment_start = true;
                    continue;
                }
                if segment_start {
                    if c.is_alphanumeric() || c == '_' {
                        word.push(c);
                    } else if !word.is_empty() {
                        found.insert(std::mem::take(&mut word));
                        segment_start = false;
                    }
                }
            }
            if !word.is_empty() {
                found.insert(word);
            }
        } else {
            let word: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !word.is_empty() {
                found.insert(word);
            }
        }
    }
    found
}

/// `text` with comments removed and string and char literals emptied, so braces and paths in
/// them are not taken for code.
fn strip_comments_and_strings(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            i += 2;
            while i + 1 < chars.len() && !(chars[i] == '*' && chars[i + 1] == '/') {
                out.extend((chars[i] == '\n').then_some('\n'));
                i += 1;
            }
            i += 2;
        } else if c == 'r' && matches!(next, Some('"' | '#')) && !ident_before(&chars, i) {
            i = skip_raw_string(&chars, i + 1, &mut out);
        } else if c == '"' {
            out.push('"');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                out.extend((chars.get(i) == Some(&'\n')).then_some('\n'));
                i += 1;
            }
            out.push('"');
            i += 1;
        } else if c == '\'' && is_char_literal(&chars, i) {
            out.push_str("' '");
            i += 1;
            if chars.get(i) == Some(&'\\') {
                i += 1;
            }
            while i < chars.len() && chars[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident_before(chars: &[char], i: usize) -> bool {
    i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_')
}

/// Skips `#*"..."#*` starting at `i` (after the `r`); returns the index after it.
fn skip_raw_string(chars: &[char], mut i: usize, out: &mut String) -> usize {
    let mut hashes = 0;
    while chars.get(i) == Some(&'#') {
        hashes += 1;
        i += 1;
    }
    if chars.get(i) != Some(&'"') {
        return i;
    }
    i += 1;
    while i < chars.len() {
        if chars[i] == '"' && (0..hashes).all(|k| chars.get(i + 1 + k) == Some(&'#')) {
            return i + 1 + hashes;
        }
        out.extend((chars[i] == '\n').then_some('\n'));
        i += 1;
    }
    i
}

/// Whether the `'` at `i` opens a char literal rather than a lifetime.
fn is_char_literal(chars: &[char], i: usize) -> bool {
    matches!(
        (chars.get(i + 1), chars.get(i + 2)),
        (Some('\\'), _) | (Some(_), Some('\''))
    )
}

/// Functions longer than `max` lines: (name, first line, length).
pub fn long_functions(text: &str, max: usize) -> Vec<(String, usize, usize)> {
    let code = strip_comments_and_strings(text);
    let lines: Vec<&str> = code.lines().collect();
    let mut long = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let Some(name) = fn_name(line) else {
            continue;
        };
        let mut depth = 0i32;
        let mut opened = false;
        for (offset, body) in lines[start..].iter().enumerate() {
            for c in body.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    ';' if !opened && depth == 0 => break,
                    _ => {}
                }
            }
            if !opened && body.trim_end().ends_with(';') {
                break;
            }
            if opened && depth == 0 {
                if offset + 1 > max {
                    long.push((name.clone(), start + 1, offset + 1));
                }
                break;
            }
        }
    }
    long
}

/// The name of the function a line declares, if it declares one.
fn fn_name(line: &str) -> Option<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "fn")?;
    let qualifiers_only = words[..at].iter().all(|w| {
        matches!(
            *w,
            "pub" | "async" | "unsafe" | "const" | "extern" | "default"
        ) || w.starts_with("pub(")
            || w.starts_with('"')
    });
    if !qualifiers_only {
        return None;
    }
    let name: String = words
        .get(at + 1)?
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then_some(name)
}

/// Import circles, each as the modules on it (the first repeated at the end).
pub fn cycles(modules: &BTreeMap<String, Module>) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for name in modules.keys() {
        let mut path = vec![name.clone()];
        if let Some(cycle) = back_to(name, name, modules, &mut path, &mut BTreeSet::new()) {
            let mut sorted = cycle.clone();
            sorted.sort();
            if !found.iter().any(|c: &Vec<String>| {
                let mut s = c.clone();
                s.sort();
                s == sorted
            }) {
                found.push(cycle);
            }
        }
    }
    found
        .into_iter()
        .map(|mut c| {
            c.push(c[0].clone());
            c
        })
        .collect()
}

/// A path from `at` back to `target` through the imports, if there is one.
fn back_to(
    target: &str,
    at: &str,
    modules: &BTreeMap<String, Module>,
    path: &mut Vec<String>,
    seen: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    for next in modules.get(at).map(|m| &m.imports).into_iter().flatten() {
        if next == target {
            return Some(path.clone());
        }
        if seen.insert(next.clone()) {
            path.push(next.clone());
            if let Some(cycle) = back_to(target, next, modules, path, seen) {
                return Some(cycle);
            }
            path.pop();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_in_groups_code_and_strings_are_told_apart() {
        let text = "use crate::{a::X, b, c::{d, e}};\nfn f() { crate::f::g(); let s = \"crate::h\"; }\n// crate::i\n";
        let found: Vec<String> = crate_paths(text).into_iter().collect();
        assert_eq!(found, ["a", "b", "c", "f"]);
    }

    #[test]
    fn a_circle_at_any_distance_is_found() {
        let module = |imports: &[&str]| Module {
            lines: 1,
            imports: imports.iter().map(|s| s.to_string()).collect(),
        };
        let mut modules = BTreeMap::new();
        modules.insert("a".to_owned(), module(&["b"]));
        modules.insert("b".to_owned(), module(&["c"]));
        modules.insert("c".to_owned(), module(&["a"]));
        modules.insert("d".to_owned(), module(&["a"]));
        assert_eq!(cycles(&modules), vec![vec!["a", "b", "c", "a"]]);
        modules.get_mut("c").unwrap().imports.clear();
        assert!(cycles(&modules).is_empty());
    }

    #[test]
    fn long_functions_are_measured_from_fn_to_closing_brace() {
        let body = "    let x = '{';\n".repeat(5);
        let text = format!(
            "fn short() {{\n}}\npub async fn long(\n    a: u8,\n) {{\n{body}}}\nfn decl();\n"
        );
        assert_eq!(long_functions(&text, 5), vec![("long".to_owned(), 3, 9)]);
        assert!(long_functions(&text, 9).is_empty());
    }
}
