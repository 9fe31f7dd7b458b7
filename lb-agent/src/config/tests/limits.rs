//! The bounds on what a file may expand to (`limits.rs`) and how a file is read: each
//! hostile input is refused quickly with a positioned error, large legitimate files
//! still load.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::*;

/// Parses `text`, which must be refused within `within`; returns the diagnostics.
#[track_caller]
fn refused_within(text: &str, within: Duration) -> Vec<Diagnostic> {
    let started = Instant::now();
    let result = parse(text, "test.yaml");
    let took = started.elapsed();
    let err = result.expect_err("must be refused");
    assert!(
        took < within,
        "refused after {took:?}, more than {within:?}"
    );
    err.errors
}

/// A file for `services` services with `backends` backends each. With `alias`, the
/// first service anchors its backend list and every other one repeats it.
fn services_file(services: usize, backends: usize, alias: bool) -> String {
    let mut text = String::from("services:\n");
    for s in 0..services {
        let port = s % 65_536;
        let vip = 10 + s / 65_536;
        writeln!(
            text,
            "  - name: s{s}\n    vip: 198.18.1.{vip}\n    port: {port}"
        )
        .unwrap();
        if alias && s > 0 {
            text.push_str("    backends: *all\n");
            continue;
        }
        text.push_str(if alias {
            "    backends: &all\n"
        } else {
            "    backends:\n"
        });
        for b in 0..backends {
            writeln!(
                text,
                "      - address: 198.18.{}.{}",
                2 + b / 250,
                1 + b % 250
            )
            .unwrap();
        }
    }
    text
}

#[test]
fn alias_amplification_is_refused_quickly_at_the_alias() {
    // 5,000 backends anchored once, repeated by 4,000 services: ~420 KB of text that
    // expands to 60 million nodes.
    let text = services_file(4_000, 5_000, true);
    assert!(text.len() < 500_000, "{} bytes", text.len());
    let errors = refused_within(&text, Duration::from_secs(2));
    // Nodes: 3 for the document, the `services` key and list; each service is 15,009
    // (its mapping, 7 key/value scalars, its backend list of 5,000 × 3 nodes, which
    // each alias repeats in full).
    let per_service = 1 + 7 + 1 + 5_000 * 3;
    let service = (0..)
        .find(|k| 3 + per_service * (k + 1) > MAX_NODES)
        .unwrap();
    let alias_line = 1 + 4 + 5_000 + (service as usize - 1) * 4 + 4;
    assert_eq!(text.lines().nth(alias_line - 1), Some("    backends: *all"));
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [format!(
            "test.yaml:{alias_line}:15: services[{service}].backends: this alias repeats 15001 \
             nodes and takes the file past the limit of {MAX_NODES} YAML nodes (an alias counts \
             as every node it repeats)"
        )]
    );
}

#[test]
fn deep_nesting_is_refused_quickly() {
    const LEVELS: usize = 100_000;
    let too_deep = format!("this node is nested more than {MAX_DEPTH} levels deep (the limit)");
    let first_too_deep = MAX_DEPTH + 1;
    // Refused by the pre-pass at the first node too deep, with its path.
    let cases = [
        (
            format!("{}x\n", "- ".repeat(LEVELS)),
            (1, 2 * first_too_deep - 1),
            "[0]".repeat(MAX_DEPTH),
        ),
        (
            format!("{}{}", "[".repeat(40), "]".repeat(40)),
            (1, first_too_deep),
            "[0]".repeat(MAX_DEPTH),
        ),
        (
            // Block mappings need one more space of indentation per level: 1,000 levels.
            (0..1_000)
                .map(|level| format!("{}a:\n", " ".repeat(level)))
                .collect::<String>()
                + "   1\n",
            (first_too_deep, MAX_DEPTH + 1),
            format!("a{}", ".a".repeat(MAX_DEPTH - 1)),
        ),
    ];
    for (text, (line, column), path) in cases {
        let errors = refused_within(&text, Duration::from_secs(2));
        let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [format!("test.yaml:{line}:{column}: {path}: {too_deep}")],
            "{}...",
            &text[..20]
        );
    }
    // Deeper flow collections are refused by the YAML scanner, which reads ahead of
    // the parser and stops at 255 levels, before the parser reaches the limit.
    let flow = [
        (
            format!("{}{}", "[".repeat(LEVELS), "]".repeat(LEVELS)),
            (1, 256),
        ),
        (
            format!("{}{}", "[\n".repeat(LEVELS), "]".repeat(LEVELS)),
            (256, 1),
        ),
        (
            format!("{}1{}", "{a: ".repeat(LEVELS), "}".repeat(LEVELS)),
            (1, 4 * 255 + 1),
        ),
    ];
    for (text, (line, column)) in flow {
        let errors = refused_within(&text, Duration::from_secs(2));
        let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [format!("test.yaml:{line}:{column}: {too_deep}")],
            "{}...",
            &text[..20]
        );
    }
}

#[test]
fn the_schema_fits_well_within_the_nesting_limit() {
    let config = parse_ok(&service(&[
        "    port: 80",
        "    backends:",
        "      - address: 198.18.0.11",
        "        probe:",
        "          kind: exec",
        "          command: [/bin/true, x]",
    ]));
    assert_eq!(config.services[0].backends.len(), 1);
}

#[test]
fn a_large_legitimate_file_loads() {
    // 10,000 services of 8 backends each, 80,000 backends in all.
    let text = services_file(10_000, 8, false);
    let config = parse_ok(&text);
    assert_eq!(config.services.len(), 10_000);
    assert!(config.services.iter().all(|s| s.backends.len() == 8));
}

#[test]
fn the_largest_supported_file_is_within_the_limits() {
    // 10,000 services of 32 backends, each backend with a probe block of its own, all
    // in block style. Only the pre-pass runs here (a full parse of 320,000 backends is
    // too slow for an unoptimized test build).
    let mut text = String::from("services:\n");
    for s in 0..10_000 {
        write!(
            text,
            "  - name: service-{s}\n    vip: 2001:db8:1::{s:x}\n    port: 443\n    protocol: tcp\n    \
             probe:\n      kind: http\n      path: /healthz\n      interval: 2s\n      \
             timeout: 1s\n      rise: 2\n      fall: 3\n    backends:\n"
        )
        .unwrap();
        for b in 0..32 {
            write!(
                text,
                "      - address: 2001:db8:{s:x}::{b:x}\n        weight: 100\n        probe:\n          \
                 port: 8443\n          host: service-{s}.example.com\n"
            )
            .unwrap();
        }
    }
    assert!(text.len() as u64 <= MAX_FILE_SIZE, "{} bytes", text.len());
    crate::config::limits::check(&text, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn a_file_larger_than_the_limit_is_refused_without_reading_it() {
    let size = MAX_FILE_SIZE + 1;
    let text = "#".repeat(size as usize);
    let errors = refused_within(&text, Duration::from_secs(2));
    let message =
        format!("the file is {size} bytes, more than the limit of 67108864 bytes (64 MiB)");
    assert_eq!(errors[0].to_string(), format!("test.yaml: {message}"));

    let dir = TempDir::new("large");
    let path = dir.0.join("large.yaml");
    let file = std::fs::File::create(&path).unwrap();
    // Sparse: refused from its length alone.
    file.set_len(size).unwrap();
    let err = load(&path).expect_err("must be refused");
    assert_eq!(err.to_string(), format!("{}: {message}", path.display()));
}

#[test]
fn a_file_that_is_not_utf8_is_reported_at_the_first_bad_byte() {
    let dir = TempDir::new("utf8");
    let cases: [(&[u8], &str); 3] = [
        (
            b"services:\n  - name: w\xc3\xa9b\xff\n",
            "2:14: the file is not UTF-8 text: invalid byte sequence 0xff",
        ),
        // Latin-1 after a byte-order mark, which is not counted.
        (
            b"\xef\xbb\xbf# caf\xe9\n",
            "1:6: the file is not UTF-8 text: invalid byte sequence 0xe9",
        ),
        (
            b"services: []\n# \xe2\x82",
            "2:3: the file is not UTF-8 text: truncated byte sequence 0xe2 0x82",
        ),
    ];
    for (bytes, expected) in cases {
        let path = dir.0.join("bad.yaml");
        std::fs::write(&path, bytes).unwrap();
        let err = load(&path).expect_err("must be refused");
        assert_eq!(err.to_string(), format!("{}:{expected}", path.display()));
        assert_eq!(err.errors[0].path, "");
    }
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("lb-config-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn at_most_max_errors_are_reported() {
    // 1,500 backends without an address, each an error.
    let mut yaml = service(&["    port: 80", "    backends:"]);
    yaml.push_str(&"      - {weight: 1}\n".repeat(MAX_ERRORS + 500));
    let shown = errors(&yaml);
    assert_eq!(shown.len(), MAX_ERRORS + 1);
    assert_eq!(
        shown[0],
        "test.yaml:6:9: services[0].backends[0].address: missing required field `address`"
    );
    assert_eq!(
        shown[MAX_ERRORS],
        "test.yaml: 500 more errors not shown (at most 1000 are reported)"
    );
}
