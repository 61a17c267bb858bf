//! The docs, checked on every `cargo xtask test`: every relative link resolves (file and
//! heading), and every command in a code block names a real subcommand and real flags of
//! `pod-identity-agent` or `cargo xtask`, so the pages cannot drift from the code.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::CommandFactory as _;

/// The pages: the README, `docs/`, and the harness's own README.
fn pages(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut pages = vec![root.join("README.md"), root.join("tests").join("README.md")];
    for entry in fs::read_dir(root.join("docs")).context("reading docs/")? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    pages.sort();
    Ok(pages)
}

pub fn check(root: &Path, agent: &Path) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    let mut commands = 0;
    for page in pages(root)? {
        let text =
            fs::read_to_string(&page).with_context(|| format!("reading {}", page.display()))?;
        let shown = page
            .strip_prefix(root)
            .unwrap_or(&page)
            .display()
            .to_string();
        for link in links(&text) {
            if let Err(why) = resolve(&page, &link) {
                problems.push(format!("{shown}: link {link}: {why}"));
            }
        }
        for line in command_lines(&text) {
            commands += 1;
            if let Err(why) = check_command(&line, agent) {
                problems.push(format!("{shown}: `{line}`: {why}"));
            }
        }
    }
    if !problems.is_empty() {
        bail!("the docs have drifted:\n  {}", problems.join("\n  "));
    }
    eprintln!(
        "xtask: docs hold: every relative link resolves, {commands} commands name real flags"
    );
    Ok(())
}

/// The targets of Markdown links `[text](target)` that are not absolute URLs.
fn links(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            let Some(end) = rest.find(')') else { break };
            let target = &rest[..end];
            if !target.contains("://") && !target.starts_with("mailto:") {
                found.push(target.to_owned());
            }
            rest = &rest[end..];
        }
    }
    found
}

/// Whether `link` (relative to `page`) names an existing file, and its `#anchor` a heading there.
fn resolve(page: &Path, link: &str) -> Result<(), String> {
    let (path, anchor) = link.split_once('#').unwrap_or((link, ""));
    let target = if path.is_empty() {
        page.to_path_buf()
    } else {
        page.parent().unwrap_or(Path::new(".")).join(path)
    };
    if !target.exists() {
        return Err(format!("{} does not exist", target.display()));
    }
    if anchor.is_empty() || target.is_dir() {
        return Ok(());
    }
    let text = fs::read_to_string(&target).map_err(|e| e.to_string())?;
    let anchors: BTreeSet<String> = text
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| anchor_of(l.trim_start_matches('#').trim()))
        .collect();
    if anchors.contains(anchor) {
        Ok(())
    } else {
        Err(format!("no heading #{anchor} in {}", target.display()))
    }
}

/// A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces as dashes.
fn anchor_of(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The lines of code blocks that run `pod-identity-agent` or `cargo xtask`, from the program's
/// name on (a prompt, `sudo` or a `kubectl exec ... --` before it is dropped).
fn command_lines(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut in_code = false;
    let mut continued = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if !in_code {
            continue;
        }
        let line = line.trim();
        if let Some(head) = line.strip_suffix('\\') {
            continued.push_str(head);
            continue;
        }
        let whole = std::mem::take(&mut continued) + line;
        for program in ["pod-identity-agent ", "cargo xtask "] {
            if let Some(at) = whole.find(program)
                && !whole[..at].contains('#')
                && !whole[..at].ends_with('/')
            {
                found.push(whole[at..].to_owned());
                break;
            }
        }
    }
    found
}

/// Whether `line`'s subcommands and flags exist.
fn check_command(line: &str, agent: &Path) -> Result<(), String> {
    let words: Vec<&str> = line
        .split(['|', ';', '>', '&'])
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let (program, args) = if words.first() == Some(&"cargo") {
        ("cargo xtask", &words[2..])
    } else {
        ("pod-identity-agent", &words[1..])
    };
    let subcommands: Vec<&str> = args
        .iter()
        .take_while(|w| !w.starts_with('-'))
        .copied()
        .collect();
    let flags: Vec<&str> = args
        .iter()
        .filter(|w| w.starts_with("--"))
        .map(|w| w.split('=').next().unwrap_or(w))
        .collect();
    let known = if program == "cargo xtask" {
        xtask_flags(&subcommands)?
    } else {
        agent_flags(agent, &subcommands)?
    };
    match flags.iter().find(|f| !known.contains(**f)) {
        Some(flag) => Err(format!("{program} {} has no {flag}", subcommands.join(" "))),
        None => Ok(()),
    }
}

/// The flags of `cargo xtask SUBCOMMAND`, from its own command-line definition.
fn xtask_flags(subcommands: &[&str]) -> Result<BTreeSet<String>, String> {
    let mut command = crate::Cli::command();
    for name in subcommands {
        command = command
            .find_subcommand(name)
            .cloned()
            .ok_or_else(|| format!("cargo xtask has no subcommand {name}"))?;
    }
    let mut flags: BTreeSet<String> = command
        .get_arguments()
        .filter_map(|a| a.get_long())
        .map(|l| format!("--{l}"))
        .collect();
    flags.insert("--help".into());
    Ok(flags)
}

/// The flags of `pod-identity-agent SUBCOMMAND...`, from its `--help`.
fn agent_flags(agent: &Path, subcommands: &[&str]) -> Result<BTreeSet<String>, String> {
    // Words after the subcommands may be positional values (`delete a-123`): take the longest
    // prefix that names a subcommand.
    for take in (0..=subcommands.len()).rev() {
        let out = Command::new(agent)
            .args(&subcommands[..take])
            .arg("--help")
            .output()
            .map_err(|e| format!("running {}: {e}", agent.display()))?;
        if out.status.success() {
            let help = String::from_utf8_lossy(&out.stdout);
            return Ok(help
                .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
                .filter(|w| w.starts_with("--"))
                .map(|w| w.split(['=', '<']).next().unwrap_or(w).to_owned())
                .collect());
        }
    }
    Err(format!(
        "pod-identity-agent has no subcommand {}",
        subcommands.join(" ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_follow_github() {
        assert_eq!(
            anchor_of("The restart gap with `--pin`"),
            "the-restart-gap-with---pin"
        );
        assert_eq!(anchor_of("Kernels and modes"), "kernels-and-modes");
    }

    #[test]
    fn commands_are_found_after_prompts_and_across_continued_lines() {
        let text = "```sh\n$ sudo pod-identity-agent doctor \\\n  --probe-addr 127.0.0.1:2703\n# cargo xtask nothing\ncargo xtask matrix --kernel 6.1\n```\npod-identity-agent pods\n";
        assert_eq!(
            command_lines(text),
            [
                "pod-identity-agent doctor --probe-addr 127.0.0.1:2703",
                "cargo xtask matrix --kernel 6.1"
            ]
        );
    }

    #[test]
    fn xtask_flags_come_from_its_definition() {
        assert!(
            check_command("cargo xtask matrix --kernel 6.1", Path::new("/nonexistent")).is_ok()
        );
        let e = check_command("cargo xtask matrix --kernal 6.1", Path::new("/nonexistent"));
        assert!(e.unwrap_err().contains("--kernal"));
        assert!(check_command("cargo xtask nothing", Path::new("/nonexistent")).is_err());
    }

    #[test]
    fn relative_links_outside_code_are_found() {
        let text = "see [a](docs/a.md#x) and [b](https://x.io)\n```\n[c](nope.md)\n```\n";
        assert_eq!(links(text), ["docs/a.md#x"]);
    }
}
