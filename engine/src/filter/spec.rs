//! Filters named on a command line (`--filter significant:0.01,kkt`).

use std::fmt;
use std::str::FromStr;

use crate::base::value::Value;

use super::{Filter, Kkt, Quantize, RandomSkip, Significant, Threshold};

/// A built-in filter and its setting, as `--filter` names it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FilterSpec {
    /// `significant:T`: send a key once its accumulated change exceeds `T`.
    Significant(f64),
    /// `significant-rel:R`: ... exceeds `R` times the weight last pulled.
    SignificantRel(f64),
    /// `kkt`: skip gradients an L1 proximal step would leave at 0 (the job's `--l1`).
    Kkt,
    /// `skip:P`: send each entry with probability `P`, scaled by `1/P`.
    Skip(f64),
    /// `quantize:BITS`: values on a BITS-bit grid per push, error feedback.
    Quantize(u32),
}

const NAMES: &str = "significant:T, significant-rel:R, kkt, skip:P, quantize:BITS";

impl FromStr for FilterSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (s, None),
        };
        let number = |what: &str| -> Result<f64, String> {
            let a = arg.ok_or_else(|| format!("filter {name} needs {what}: {name}:VALUE"))?;
            let v: f64 = a
                .parse()
                .map_err(|_| format!("filter {name}: {a:?} is not a number"))?;
            if !v.is_finite() || v < 0.0 {
                return Err(format!(
                    "filter {name}: {v} must be finite and not negative"
                ));
            }
            Ok(v)
        };
        match name {
            "significant" => Ok(FilterSpec::Significant(number("a threshold")?)),
            "significant-rel" => Ok(FilterSpec::SignificantRel(number("a ratio")?)),
            "kkt" if arg.is_none() => Ok(FilterSpec::Kkt),
            "kkt" => Err("filter kkt takes no value (it uses --l1)".into()),
            "skip" => {
                let p = number("a keep probability")?;
                if p == 0.0 || p > 1.0 {
                    return Err(format!(
                        "filter skip: the keep probability {p} is not in (0, 1]"
                    ));
                }
                Ok(FilterSpec::Skip(p))
            }
            "quantize" => {
                let b = number("a number of bits")?;
                if b.fract() != 0.0 || !(2.0..=16.0).contains(&b) {
                    return Err(format!(
                        "filter quantize: {b} bits is not a whole number in 2..=16"
                    ));
                }
                Ok(FilterSpec::Quantize(b as u32))
            }
            other => Err(format!("unknown filter {other:?}; the filters are {NAMES}")),
        }
    }
}

impl fmt::Display for FilterSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FilterSpec::Significant(t) => write!(f, "significant:{t}"),
            FilterSpec::SignificantRel(r) => write!(f, "significant-rel:{r}"),
            FilterSpec::Kkt => write!(f, "kkt"),
            FilterSpec::Skip(p) => write!(f, "skip:{p}"),
            FilterSpec::Quantize(b) => write!(f, "quantize:{b}"),
        }
    }
}

impl FilterSpec {
    /// The filter, with L1 strength `l1` (for `kkt`, of which this worker holds back at
    /// most `1 / workers`) and `seed` (for `skip`).
    pub fn build<T: Value>(&self, l1: f64, workers: usize, seed: u64) -> Box<dyn Filter<T>> {
        match *self {
            FilterSpec::Significant(t) => Box::new(Significant::new(Threshold::Absolute(t))),
            FilterSpec::SignificantRel(r) => Box::new(Significant::new(Threshold::Relative(r))),
            FilterSpec::Kkt => Box::new(Kkt::with_share(l1, 1.0 / workers.max(1) as f64)),
            FilterSpec::Skip(p) => Box::new(RandomSkip::new(p, seed)),
            FilterSpec::Quantize(b) => Box::new(Quantize::new(b)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_ones_say_why() {
        for s in [
            "significant:0.01",
            "significant-rel:0.5",
            "kkt",
            "skip:0.25",
            "quantize:8",
        ] {
            let f: FilterSpec = s.parse().unwrap();
            assert_eq!(f.to_string(), s);
        }
        let e = "nope".parse::<FilterSpec>().unwrap_err();
        assert!(e.contains("unknown filter") && e.contains("kkt"), "{e}");
        assert!("significant"
            .parse::<FilterSpec>()
            .unwrap_err()
            .contains("needs"));
        assert!("significant:-1"
            .parse::<FilterSpec>()
            .unwrap_err()
            .contains("negative"));
        assert!("significant:x"
            .parse::<FilterSpec>()
            .unwrap_err()
            .contains("not a number"));
        assert!("skip:0"
            .parse::<FilterSpec>()
            .unwrap_err()
            .contains("(0, 1]"));
        assert!("kkt:1".parse::<FilterSpec>().unwrap_err().contains("--l1"));
        assert!("quantize:1"
            .parse::<FilterSpec>()
            .unwrap_err()
            .contains("2..=16"));
        assert!("quantize:7.5"
            .parse::<FilterSpec>()
            .unwrap_err()
            .contains("whole number"));
        assert_eq!(FilterSpec::Kkt.build::<f32>(0.5, 2, 0).name(), "kkt");
    }
}
