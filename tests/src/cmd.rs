//! Runs the system tools the testbed is built from (iproute2, curl) and turns
//! a failure into an error that names the command and what it printed.

use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error(
        "`{command}` could not start: {source} (is the tool installed? `cargo xtask setup` installs it)"
    )]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// Runs `program args…` and returns its stdout.
pub fn run(program: &str, args: &[&str]) -> Result<String, CmdError> {
    output(Command::new(program).args(args))
}

/// Runs a prepared command and returns its stdout, or an error with stderr.
pub fn output(command: &mut Command) -> Result<String, CmdError> {
    let described = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let out = command.output().map_err(|source| CmdError::Spawn {
        command: described.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(CmdError::Failed {
            command: described,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip args…`
pub fn ip(args: &[&str]) -> Result<String, CmdError> {
    run("ip", args)
}
