//! The `pserv` binary: `local` runs a whole cluster on this machine; `scheduler`,
//! `server` and `worker` run one role each. See [`pserv_engine::cli::app`].

use std::process::ExitCode;

fn main() -> ExitCode {
    pserv_engine::cli::app::main(std::env::args_os().collect(), Vec::new())
}
