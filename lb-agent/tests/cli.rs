//! `lb-agent check` as an operator runs it: exit codes and the error listing.

use std::process::Command;

fn check(path: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lb-agent")).arg("check").arg(path).output().expect("run lb-agent");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_the_examples() {
    for name in ["demo.yaml", "full.yaml"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples").join(name);
        let (code, stdout, stderr) = check(&path);
        assert_eq!(code, 0, "{name}: {stderr}");
        assert!(stdout.contains(": ok ("), "{name}: {stdout}");
    }
}

#[test]
fn check_lists_every_error_with_its_position() {
    let dir = std::env::temp_dir().join(format!("lb-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.yaml");
    std::fs::write(
        &path,
        "services:\n  - name: web\n    vip: 198.18.1.10\n    port: 80\n    table_size: 100\n    backends:\n      - address: 2001:db8::1\n        weight: 70000\n",
    )
    .unwrap();
    let (code, stdout, stderr) = check(&path);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, 1, "invalid file must exit 1: {stdout}{stderr}");
    let file = path.display().to_string();
    for (pos, field) in [("5:17", "table_size"), ("7:18", "address"), ("8:17", "weight")] {
        assert!(
            stderr.lines().any(|l| l.starts_with(&format!("{file}:{pos}:")) && l.contains(field)),
            "expected an error at {pos} about {field}:\n{stderr}"
        );
    }
}
