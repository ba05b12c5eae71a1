//! The LIBSVM / SVMlight text format: one example per line, `label idx:val idx:val ...`.
//!
//! - Labels `+1`, `1` (and `1.0`) are positive; `-1`, `0` (and `-1.0`, `0.0`) negative.
//! - Feature indices are unsigned 64-bit integers in any order, each at most once per line;
//!   they are hashed to keys with [`feature_key`], so the rows come out sorted by key.
//! - Values must be finite numbers.
//! - Empty lines and `#` comments (whole-line or trailing) are skipped; `qid:` tokens
//!   (ranking data) are ignored.
//!
//! A malformed line is an error naming the source and the line number; nothing panics.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use crate::base::keys::Key;

use super::data::Dataset;
use super::rng::feature_key;
use super::LrError;

impl Dataset {
    /// Reads a LIBSVM file (see the [module](self) docs for the accepted format).
    pub fn read_libsvm(path: impl AsRef<Path>) -> Result<Dataset, LrError> {
        let path = path.as_ref();
        let io_error = |source| LrError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_error)?;
        Self::parse_libsvm(BufReader::new(file), &path.display().to_string()).map_err(|e| {
            match e {
                // Attach the path to read errors coming from the reader.
                LrError::Io { source, .. } => io_error(source),
                other => other,
            }
        })
    }

    /// Parses LIBSVM text from `reader`; `source_name` names it in error messages.
    pub fn parse_libsvm(reader: impl BufRead, source_name: &str) -> Result<Dataset, LrError> {
        let mut data = Dataset::new();
        let mut pairs: Vec<(Key, f32, u64)> = Vec::new();
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for (n, line) in reader.lines().enumerate() {
            let line_no = n + 1;
            let line = line.map_err(|source| LrError::Io {
                path: source_name.into(),
                source,
            })?;
            let err = |message: String| LrError::Parse {
                source_name: source_name.to_string(),
                line: line_no,
                message,
            };
            let content = line.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let mut tokens = content.split_ascii_whitespace();
            let label_text = tokens.next().expect("a non-empty line has a token");
            let label = parse_label(label_text).map_err(err)?;
            pairs.clear();
            for token in tokens {
                if token.starts_with("qid:") {
                    continue;
                }
                let (index, value) = token
                    .split_once(':')
                    .ok_or_else(|| err(format!("expected index:value, found {token:?}")))?;
                let index: u64 = index.parse().map_err(|_| {
                    err(format!(
                        "feature index {index:?} is not an unsigned integer"
                    ))
                })?;
                let value: f32 = value.parse().map_err(|_| {
                    err(format!(
                        "value {value:?} of feature {index} is not a number"
                    ))
                })?;
                if !value.is_finite() {
                    return Err(err(format!("value of feature {index} is not finite")));
                }
                pairs.push((feature_key(index), value, index));
            }
            pairs.sort_unstable_by_key(|p| p.0);
            if let Some(w) = pairs.windows(2).find(|w| w[0].0 == w[1].0) {
                return Err(err(format!("feature {} appears twice", w[0].2)));
            }
            keys.clear();
            values.clear();
            keys.extend(pairs.iter().map(|p| p.0));
            values.extend(pairs.iter().map(|p| p.1));
            data.push_sorted_row(label, &keys, &values);
        }
        Ok(data)
    }
}

/// `1.0` for a positive label, `0.0` for a negative one.
fn parse_label(text: &str) -> Result<f32, String> {
    let y: f64 = text
        .parse()
        .map_err(|_| format!("label {text:?} is not a number"))?;
    if y == 1.0 {
        Ok(1.0)
    } else if y == -1.0 || y == 0.0 {
        Ok(0.0)
    } else {
        Err(format!("label {y} is not binary (expected -1/+1 or 0/1)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Dataset, LrError> {
        Dataset::parse_libsvm(text.as_bytes(), "test.svm")
    }

    #[test]
    fn parses_both_label_conventions() {
        let d = parse(
            "+1 3:1 1:0.5\n\
             -1 2:2.5e0\n\
             # a comment line\n\
             \n\
             1 7:1 # trailing comment\n\
             0 qid:3 4:-1\n\
             1.0\n",
        )
        .unwrap();
        assert_eq!(d.labels(), &[1.0, 0.0, 1.0, 0.0, 1.0]);
        let r = d.row(0);
        let mut want = [(feature_key(1), 0.5), (feature_key(3), 1.0)];
        want.sort_by_key(|p| p.0);
        assert_eq!(r.keys, &[want[0].0, want[1].0]);
        assert_eq!(r.values, &[want[0].1, want[1].1]);
        assert_eq!(d.row(1).values, &[2.5]);
        assert_eq!(d.row(3).keys, &[feature_key(4)]);
        assert!(d.row(4).keys.is_empty());
    }

    #[test]
    fn malformed_lines_are_errors_with_line_numbers() {
        for (text, line, needle) in [
            ("1 1:1\n2 1:1\n", 2, "not binary"),
            ("1 1:1\nyes 1:1\n", 2, "not a number"),
            ("1 1:1\n\n-1 3\n", 3, "index:value"),
            ("1 x:1\n", 1, "unsigned integer"),
            ("1 -3:1\n", 1, "unsigned integer"),
            ("1 3:abc\n", 1, "not a number"),
            ("1 3:nan\n", 1, "not finite"),
            ("1 3:inf\n", 1, "not finite"),
            ("1 3:1 3:2\n", 1, "twice"),
            ("1 99999999999999999999:1\n", 1, "unsigned integer"),
        ] {
            match parse(text) {
                Err(e @ LrError::Parse { line: l, .. }) => {
                    let msg = e.to_string();
                    assert_eq!(l, line, "{text:?}: {msg}");
                    assert!(msg.contains(needle), "{text:?}: {msg}");
                    assert!(msg.starts_with(&format!("test.svm:{line}:")), "{msg}");
                }
                other => panic!("{text:?}: expected a parse error, got {other:?}"),
            }
        }
    }

    #[test]
    fn missing_file_is_an_io_error() {
        let e = Dataset::read_libsvm("/nonexistent/pserv-lr.svm").unwrap_err();
        assert!(matches!(e, LrError::Io { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/pserv-lr.svm"));
    }

    #[test]
    fn reads_a_file() {
        let dir = std::env::temp_dir().join(format!("pserv-lr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.svm");
        std::fs::write(&path, "1 1:1 2:1\n-1 2:1\n").unwrap();
        let d = Dataset::read_libsvm(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((d.len(), d.nnz(), d.distinct_keys()), (2, 3, 2));
    }
}
