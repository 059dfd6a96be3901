//! Shell completions and man pages, generated from the command line: bash completes commands and
//! each command's flags (checked by sourcing the script into a real bash), and the man pages
//! render with groff without a warning and document every flag with its variable.

use std::path::Path;
use std::process::Command;

fn saga_streams(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_saga-streams"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What bash completes for `words` (the last one being completed), with the generated script.
fn complete(script: &Path, words: &[&str]) -> Vec<String> {
    let cur = words.last().unwrap();
    let prev = words[words.len() - 2];
    let program = format!(
        "source {}; COMP_WORDS=({}); COMP_CWORD={}; _saga__streams saga-streams '{cur}' '{prev}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        words
            .iter()
            .map(|w| format!("'{w}'"))
            .collect::<Vec<_>>()
            .join(" "),
        words.len() - 1
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(program)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn bash_completes_commands_and_each_commands_flags() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("saga-streams.bash");
    std::fs::write(&script, saga_streams(&["completions", "bash"])).unwrap();
    assert_eq!(
        complete(&script, &["saga-streams", "con"]),
        ["config", "contract"]
    );
    assert_eq!(
        complete(&script, &["saga-streams", "run", "--state"]),
        ["--state-dir"]
    );
    assert_eq!(
        complete(
            &script,
            &["saga-streams", "schemas", "check", "--schema-registry-u"]
        ),
        ["--schema-registry-url", "--schema-registry-user"]
    );
    assert!(complete(&script, &["saga-streams", "test", "--"]).contains(&"--help".to_string()));
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        assert!(
            saga_streams(&["completions", shell]).contains("contract"),
            "{shell}"
        );
    }
}

#[test]
fn man_pages_render_without_warnings_and_document_every_flag() {
    let dir = tempfile::tempdir().unwrap();
    saga_streams(&["man", "--out", dir.path().to_str().unwrap()]);
    for page in [
        "saga-streams.1",
        "saga-streams-run.1",
        "saga-streams-test.1",
        "saga-streams-schemas-check.1",
    ] {
        let path = dir.path().join(page);
        assert!(path.exists(), "{page}");
        let out = Command::new("groff")
            .args(["-man", "-Tutf8", "-ww"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{page}");
        assert!(
            out.stderr.is_empty(),
            "{page}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let run = Command::new("groff")
        .args(["-man", "-Tascii", "-P-cbou"])
        .arg(dir.path().join("saga-streams-run.1"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&run.stdout);
    for expected in [
        "--state-dir",
        "SAGA_STREAMS_STATE_DIR",
        "--http-token-file",
        "Examples:",
    ] {
        assert!(text.contains(expected), "{expected} missing:\n{text}");
    }
    // The main page is printed without --out.
    assert!(saga_streams(&["man"]).contains(".TH saga-streams"));
}
