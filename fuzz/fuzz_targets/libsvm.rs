//! Training data files: the LIBSVM text parser (`Dataset::parse_libsvm`, what
//! `Dataset::read_libsvm` runs on a `--data` / `--eval-data` file). A malformed line is an
//! error naming its line; nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pserv_engine::lr::Dataset;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = Dataset::parse_libsvm(std::io::Cursor::new(data), "fuzz") {
        assert!(d.len() <= data.len());
    }
});
