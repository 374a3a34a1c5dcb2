//! The README's "Trying it" section works as written: its `sh` block is taken from README.md
//! and run verbatim (`sh -e`: every command must succeed), with the built `voxgate` on PATH,
//! in an empty directory holding only the clip it plays, inside a new network namespace (its
//! own loopback, so the default ports are free and nothing else on the machine is reached).
//! Edit the README and this test runs the edit.

mod common;

use std::path::Path;
use std::process::Command;

/// The first ```sh block after the `## Trying it` heading.
fn trying_it(readme: &str) -> String {
    let section = readme
        .split("\n## Trying it\n")
        .nth(1)
        .expect("README.md has a \"## Trying it\" section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let block = section
        .split("```sh\n")
        .nth(1)
        .expect("the section has a ```sh block");
    block
        .split("\n```")
        .next()
        .expect("the block is closed")
        .to_string()
}

#[test]
fn the_readme_trying_it_section_runs_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let script = trying_it(&readme);
    assert!(script.contains("voxgate serve"), "{script}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tests/data")).unwrap();
    std::fs::copy(
        root.join("tests/data/speech-8k.wav"),
        dir.path().join("tests/data/speech-8k.wav"),
    )
    .unwrap();
    std::fs::write(dir.path().join("trying-it.sh"), &script).unwrap();
    let bin_dir = Path::new(common::BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // A private network namespace with only loopback, brought up.
    let netns = Command::new("unshare")
        .args(["-rn", "sh", "-c", "ip link set lo up"])
        .output();
    match netns {
        Ok(o) if o.status.success() => {}
        other => {
            let msg = format!("cannot make a network namespace (unshare -rn, ip): {other:?}");
            if std::env::var_os("CI").is_some() {
                panic!("{msg}");
            }
            eprintln!("SKIPPED: {msg}");
            return;
        }
    }
    let out = Command::new("timeout")
        .args([
            "120",
            "unshare",
            "-rn",
            "sh",
            "-c",
            "ip link set lo up && exec sh -e trying-it.sh",
        ])
        .current_dir(dir.path())
        .env("PATH", path)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the README's commands failed ({}):\n--- script\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    // What a reader would check: the call completed, bob recorded audio, the call has its
    // record, and stats printed percentiles.
    let call: serde_json::Value = stdout
        .lines()
        .find_map(|l| {
            serde_json::from_str(l)
                .ok()
                .filter(|v: &serde_json::Value| v["role"] == "caller")
        })
        .unwrap_or_else(|| panic!("no phone JSON in:\n{stdout}\n{stderr}"));
    assert_eq!(call["result"], "completed", "{call}");
    assert!(call["received"]["mos"].as_f64().is_some(), "{call}");
    let heard = std::fs::metadata(dir.path().join("heard.wav")).expect("heard.wav");
    assert!(heard.len() > 8000, "heard.wav has {} bytes", heard.len());
    assert!(
        stdout.contains("+15550001 -> +15550002  normal"),
        "{stdout}"
    );
    assert!(stdout.contains("p99"), "stats output: {stdout}");
}

#[test]
fn the_section_is_found() {
    let readme =
        "x\n## Trying it\n\ntext\n\n```sh\na\nb\n```\n\n```sh\nc\n```\n## Next\n```sh\nd\n```\n";
    assert_eq!(trying_it(readme), "a\nb");
}
