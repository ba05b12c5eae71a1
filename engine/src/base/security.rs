//! How a node proves it belongs to its cluster: a cluster secret every connection is
//! authenticated with (see `pserv_transport::auth`), or, said explicitly, none.

use pserv_transport::{AuthConfig, Secret, TcpConfig};

use crate::base::error::EngineError;

/// The environment variable naming the cluster secret file.
pub const SECRET_ENV: &str = "PSERV_SECRET_FILE";

/// How a node authenticates its connections.
#[derive(Clone, Debug, Default)]
pub enum Security {
    /// The secret in the file `PSERV_SECRET_FILE` names (the default); when it is not
    /// set, starting the node fails with a message saying what to do.
    #[default]
    FromEnv,
    /// This secret.
    Secret(Secret),
    /// No authentication: whoever reaches a port can take part in the cluster (read and
    /// change the model, register, make servers leave). For a machine of one's own.
    Insecure,
}

impl Security {
    /// The secret file at `path`.
    pub fn from_file(path: &std::path::Path) -> Result<Security, EngineError> {
        Secret::from_file(path)
            .map(Security::Secret)
            .map_err(|e| EngineError::Config(e.to_string()))
    }

    /// The secret, `None` for [`Security::Insecure`].
    pub fn resolve(&self) -> Result<Option<Secret>, EngineError> {
        match self {
            Security::Secret(s) => Ok(Some(s.clone())),
            Security::Insecure => Ok(None),
            Security::FromEnv => match std::env::var_os(SECRET_ENV) {
                Some(p) if !p.is_empty() => {
                    Security::from_file(std::path::Path::new(&p)).and_then(|s| s.resolve())
                }
                _ => Err(EngineError::Config(format!(
                    "no cluster secret: give --secret-file FILE or set {SECRET_ENV} (make one \
                     with `pserv secret FILE`; `pserv local` makes one per job), or run \
                     without authentication with --insecure"
                ))),
            },
        }
    }

    /// Put the authentication into `tcp` (`require_identity`: refuse connections that
    /// name no node id, as a server does).
    pub fn apply(&self, tcp: &mut TcpConfig, require_identity: bool) -> Result<(), EngineError> {
        tcp.auth = self.resolve()?.map(|secret| AuthConfig {
            require_identity,
            ..AuthConfig::new(secret)
        });
        if tcp.auth.is_none() {
            tracing::warn!(
                "authentication is off (--insecure): anyone who can reach this node's ports can read and change the model"
            );
        }
        Ok(())
    }
}
