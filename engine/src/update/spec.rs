//! [`UpdateSpec`]: a built-in rule as configuration, its text form and its checks.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::base::value::Value;

use super::{Adagrad, Assign, Ftrl, Sgd, Sum, UpdateFn};

/// The learning rate of `"sgd"` when the text names none.
pub const DEFAULT_SGD_LR: f64 = 0.1;
/// The learning rate of `"adagrad"` when the text names none.
pub const DEFAULT_ADAGRAD_LR: f64 = 0.1;
/// The epsilon of `"adagrad"` and `"adagrad:LR"`.
pub const DEFAULT_ADAGRAD_EPS: f64 = 1e-8;
/// FTRL's alpha for plain `"ftrl"`.
pub const DEFAULT_FTRL_ALPHA: f64 = 0.1;
/// FTRL's beta for plain `"ftrl"`.
pub const DEFAULT_FTRL_BETA: f64 = 1.0;
/// FTRL's L1 strength for plain `"ftrl"`.
pub const DEFAULT_FTRL_L1: f64 = 0.0;
/// FTRL's L2 strength for plain `"ftrl"`.
pub const DEFAULT_FTRL_L2: f64 = 0.0;

/// A built-in update rule as configuration: what the servers' default update is set to on
/// the command line and carried in the cluster table.
///
/// Text forms ([`FromStr`] and [`Display`](fmt::Display) round-trip; names are
/// case-insensitive, spaces around the parts are ignored):
///
/// | text | rule |
/// |---|---|
/// | `assign` | [`Assign`] |
/// | `sum` | [`Sum`] |
/// | `sgd`, `sgd:LR` | [`Sgd`]; LR defaults to [`DEFAULT_SGD_LR`] |
/// | `adagrad`, `adagrad:LR`, `adagrad:LR:EPS` | [`Adagrad`]; defaults [`DEFAULT_ADAGRAD_LR`], [`DEFAULT_ADAGRAD_EPS`] |
/// | `ftrl`, `ftrl:ALPHA:BETA:L1:L2` | [`Ftrl`]; defaults alpha 0.1, beta 1, l1 0, l2 0 |
///
/// LR, EPS and ALPHA must be finite and positive; BETA, L1 and L2 finite and not
/// negative, with BETA or L2 positive. For example `sgd:0.05`, `adagrad:0.1:1e-6`,
/// `ftrl:0.1:1:2:0.5`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum UpdateSpec {
    /// [`Assign`].
    Assign,
    /// [`Sum`].
    Sum,
    /// [`Sgd`] with this learning rate.
    Sgd {
        /// Learning rate.
        lr: f64,
    },
    /// [`Adagrad`] with these parameters.
    Adagrad {
        /// Learning rate.
        lr: f64,
        /// Added to the root of the squared-gradient sum.
        eps: f64,
    },
    /// [`Ftrl`] with these parameters.
    Ftrl {
        /// Learning-rate scale.
        alpha: f64,
        /// Learning-rate smoothing.
        beta: f64,
        /// L1 strength.
        l1: f64,
        /// L2 strength.
        l2: f64,
    },
}

impl UpdateSpec {
    /// Make the rule.
    pub fn build<T: Value>(&self) -> Arc<dyn UpdateFn<T>> {
        match *self {
            UpdateSpec::Assign => Arc::new(Assign),
            UpdateSpec::Sum => Arc::new(Sum),
            UpdateSpec::Sgd { lr } => Arc::new(Sgd { lr }),
            UpdateSpec::Adagrad { lr, eps } => Arc::new(Adagrad { lr, eps }),
            UpdateSpec::Ftrl {
                alpha,
                beta,
                l1,
                l2,
            } => Arc::new(Ftrl {
                alpha,
                beta,
                l1,
                l2,
            }),
        }
    }

    /// State elements per weight element the rule keeps ([`UpdateFn::state_len`]): what a
    /// server's store must keep at least to serve this rule (`StoreConfig::state_len`).
    pub fn state_len(&self) -> usize {
        match self {
            UpdateSpec::Assign | UpdateSpec::Sum | UpdateSpec::Sgd { .. } => 0,
            UpdateSpec::Adagrad { .. } => 1,
            UpdateSpec::Ftrl { .. } => 2,
        }
    }

    /// The rule's name, as the text form starts.
    pub fn name(&self) -> &'static str {
        match self {
            UpdateSpec::Assign => "assign",
            UpdateSpec::Sum => "sum",
            UpdateSpec::Sgd { .. } => "sgd",
            UpdateSpec::Adagrad { .. } => "adagrad",
            UpdateSpec::Ftrl { .. } => "ftrl",
        }
    }

    /// Why these parameters are unusable, if they are (the same checks the parser makes;
    /// for specs built in code or deserialised).
    pub fn problem(&self) -> Option<String> {
        let mut params: Vec<(&str, f64, Bound)> = Vec::new();
        match *self {
            UpdateSpec::Assign | UpdateSpec::Sum => {}
            UpdateSpec::Sgd { lr } => params.push(("learning rate", lr, Bound::Positive)),
            UpdateSpec::Adagrad { lr, eps } => {
                params.push(("learning rate", lr, Bound::Positive));
                params.push(("epsilon", eps, Bound::Positive));
            }
            UpdateSpec::Ftrl {
                alpha,
                beta,
                l1,
                l2,
            } => {
                params.push(("alpha", alpha, Bound::Positive));
                params.push(("beta", beta, Bound::NonNegative));
                params.push(("l1", l1, Bound::NonNegative));
                params.push(("l2", l2, Bound::NonNegative));
            }
        }
        for (what, x, bound) in params {
            let ok = x.is_finite()
                && match bound {
                    Bound::Positive => x > 0.0,
                    Bound::NonNegative => x >= 0.0,
                };
            if !ok {
                let must = match bound {
                    Bound::Positive => "a finite number above 0",
                    Bound::NonNegative => "a finite number, not negative",
                };
                return Some(format!("{} {what} {x} must be {must}", self.name()));
            }
        }
        if let UpdateSpec::Ftrl { beta, l2, .. } = *self {
            if beta == 0.0 && l2 == 0.0 {
                return Some("ftrl needs beta or l2 above 0 (both are 0)".to_owned());
            }
        }
        None
    }
}

/// How a parameter is bounded.
#[derive(Clone, Copy)]
enum Bound {
    Positive,
    NonNegative,
}

impl Default for UpdateSpec {
    /// [`Sum`]: the servers aggregate what workers push.
    fn default() -> Self {
        UpdateSpec::Sum
    }
}

impl fmt::Display for UpdateSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpdateSpec::Assign => f.write_str("assign"),
            UpdateSpec::Sum => f.write_str("sum"),
            UpdateSpec::Sgd { lr } => write!(f, "sgd:{lr}"),
            UpdateSpec::Adagrad { lr, eps } => write!(f, "adagrad:{lr}:{eps}"),
            UpdateSpec::Ftrl {
                alpha,
                beta,
                l1,
                l2,
            } => write!(f, "ftrl:{alpha}:{beta}:{l1}:{l2}"),
        }
    }
}

/// A text that names no usable built-in update rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "bad update rule {text:?}: {reason}; expected assign, sum, sgd[:LR], \
     adagrad[:LR[:EPS]] or ftrl[:ALPHA:BETA:L1:L2]"
)]
pub struct ParseUpdateSpecError {
    /// The text given.
    pub text: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FromStr for UpdateSpec {
    type Err = ParseUpdateSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| ParseUpdateSpecError {
            text: s.to_owned(),
            reason,
        };
        let mut parts = s.split(':').map(str::trim);
        let head = parts.next().unwrap_or_default().to_ascii_lowercase();
        let args: Vec<&str> = parts.collect();
        // The parameters, in order; trailing ones may be left out for their defaults,
        // except that ftrl takes all or none.
        let names: &[&str] = match head.as_str() {
            "assign" | "sum" => &[],
            "sgd" => &["learning rate"],
            "adagrad" => &["learning rate", "epsilon"],
            "ftrl" => &["alpha", "beta", "l1", "l2"],
            "" => return Err(err("no rule named".to_owned())),
            other => return Err(err(format!("unknown rule {other:?}"))),
        };
        if args.len() > names.len() {
            return Err(err(format!(
                "{head} takes {} parameter{}, got {}",
                names.len(),
                if names.len() == 1 { "" } else { "s" },
                args.len()
            )));
        }
        if head == "ftrl" && !args.is_empty() && args.len() < names.len() {
            return Err(err(format!(
                "ftrl takes all four of ALPHA:BETA:L1:L2 or none; {} missing",
                names[args.len()..].join(", ")
            )));
        }
        let mut vals = Vec::with_capacity(args.len());
        for (&what, &arg) in names.iter().zip(&args) {
            let x: f64 = arg
                .parse()
                .map_err(|_| err(format!("{head} {what} {arg:?} is not a number")))?;
            vals.push(x);
        }
        let val = |i: usize, default: f64| vals.get(i).copied().unwrap_or(default);
        let spec = match head.as_str() {
            "assign" => UpdateSpec::Assign,
            "sum" => UpdateSpec::Sum,
            "sgd" => UpdateSpec::Sgd {
                lr: val(0, DEFAULT_SGD_LR),
            },
            "adagrad" => UpdateSpec::Adagrad {
                lr: val(0, DEFAULT_ADAGRAD_LR),
                eps: val(1, DEFAULT_ADAGRAD_EPS),
            },
            "ftrl" => UpdateSpec::Ftrl {
                alpha: val(0, DEFAULT_FTRL_ALPHA),
                beta: val(1, DEFAULT_FTRL_BETA),
                l1: val(2, DEFAULT_FTRL_L1),
                l2: val(3, DEFAULT_FTRL_L2),
            },
            _ => unreachable!("rule names matched above"),
        };
        match spec.problem() {
            Some(reason) => Err(err(reason)),
            None => Ok(spec),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_build_their_rule() {
        let specs = [
            UpdateSpec::Assign,
            UpdateSpec::Sum,
            UpdateSpec::Sgd { lr: 0.25 },
            UpdateSpec::Adagrad { lr: 0.5, eps: 1e-6 },
            UpdateSpec::Ftrl {
                alpha: 0.1,
                beta: 1.0,
                l1: 2.0,
                l2: 0.5,
            },
        ];
        for spec in specs {
            let f32_rule = spec.build::<f32>();
            let f64_rule = spec.build::<f64>();
            assert_eq!(f32_rule.spec(), Some(spec));
            assert_eq!(f64_rule.spec(), Some(spec));
            assert_eq!(f32_rule.name(), spec.name());
            assert_eq!(f32_rule.state_len(), spec.state_len());
            assert_eq!(f64_rule.state_len(), spec.state_len());
        }
        assert_eq!(UpdateSpec::default(), UpdateSpec::Sum);
    }

    #[test]
    fn spec_text_round_trips() {
        let specs = [
            UpdateSpec::Assign,
            UpdateSpec::Sum,
            UpdateSpec::Sgd { lr: 0.05 },
            UpdateSpec::Sgd { lr: 4.0 },
            UpdateSpec::Adagrad { lr: 0.1, eps: 1e-6 },
            UpdateSpec::Adagrad {
                lr: 1.0 / 3.0,
                eps: 1e-8,
            },
            UpdateSpec::Ftrl {
                alpha: 0.1,
                beta: 1.0,
                l1: 2.0,
                l2: 0.5,
            },
            UpdateSpec::Ftrl {
                alpha: 0.7,
                beta: 0.0,
                l1: 0.0,
                l2: 1e-5,
            },
        ];
        for spec in specs {
            let text = spec.to_string();
            assert_eq!(text.parse::<UpdateSpec>(), Ok(spec), "{text}");
            let json = serde_json::to_string(&spec).unwrap();
            assert_eq!(serde_json::from_str::<UpdateSpec>(&json).unwrap(), spec);
            assert_eq!(spec.problem(), None);
        }
        // Defaults, case and spaces.
        let cases = [
            ("SUM", UpdateSpec::Sum),
            (" assign ", UpdateSpec::Assign),
            ("sgd", UpdateSpec::Sgd { lr: DEFAULT_SGD_LR }),
            ("Sgd : 0.5", UpdateSpec::Sgd { lr: 0.5 }),
            (
                "adagrad",
                UpdateSpec::Adagrad {
                    lr: DEFAULT_ADAGRAD_LR,
                    eps: DEFAULT_ADAGRAD_EPS,
                },
            ),
            (
                "adagrad:0.3",
                UpdateSpec::Adagrad {
                    lr: 0.3,
                    eps: DEFAULT_ADAGRAD_EPS,
                },
            ),
            (
                "ftrl",
                UpdateSpec::Ftrl {
                    alpha: DEFAULT_FTRL_ALPHA,
                    beta: DEFAULT_FTRL_BETA,
                    l1: DEFAULT_FTRL_L1,
                    l2: DEFAULT_FTRL_L2,
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<UpdateSpec>(), Ok(want), "{text:?}");
        }
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let cases = [
            ("", "no rule named"),
            ("momentum", "unknown rule \"momentum\""),
            ("sgd:abc", "learning rate \"abc\" is not a number"),
            ("sgd:-1", "learning rate -1 must be a finite number above 0"),
            ("sgd:0", "must be a finite number above 0"),
            ("sgd:inf", "must be a finite number above 0"),
            ("sgd:NaN", "must be a finite number above 0"),
            ("sgd:0.1:2", "sgd takes 1 parameter, got 2"),
            ("sum:1", "sum takes 0 parameters, got 1"),
            ("adagrad:0.1:0", "epsilon 0 must be a finite number above 0"),
            ("adagrad:0.1:1e-8:3", "adagrad takes 2 parameters, got 3"),
            ("ftrl:0.1:1", "ftrl takes all four"),
            (
                "ftrl:0.1:1:-2:0",
                "l1 -2 must be a finite number, not negative",
            ),
            ("ftrl:0:1:0:0", "alpha 0 must be a finite number above 0"),
            ("ftrl:0.1:0:1:0", "ftrl needs beta or l2 above 0"),
        ];
        for (text, want) in cases {
            let e = text.parse::<UpdateSpec>().unwrap_err();
            assert_eq!(e.text, text);
            let msg = e.to_string();
            assert!(msg.contains(want), "{text:?}: {msg}");
            // The message names the text and lists what would have been accepted.
            assert!(msg.contains(&format!("{text:?}")), "{msg}");
            assert!(msg.contains("expected assign, sum, sgd"), "{msg}");
        }
        // Specs built in code get the same checks.
        assert!(UpdateSpec::Sgd { lr: -0.5 }
            .problem()
            .is_some_and(|p| p.contains("learning rate")));
        assert!(UpdateSpec::Ftrl {
            alpha: 0.1,
            beta: 0.0,
            l1: 0.0,
            l2: 0.0
        }
        .problem()
        .is_some());
    }
}
