// SPDX-License-Identifier: Apache-2.0
//! `containerd-shim-sandboxer-v1`: the shim name containerd derives from the runtime type
//! `io.containerd.sandboxer.v1`, answered by the `sandboxer` binary under that name.
//!
//! containerd never starts a shim for pods of this runtime: their tasks live at the address
//! the sandbox's `Start` returned. Two code paths of containerd 2.1 still need the binary:
//!
//! - After a restart containerd reloads every task it knew and first resolves the runtime's
//!   shim binary (`containerd-shim-sandboxer-v1` on its `PATH` or beside its own binary). When
//!   there is none it drops the task, although the task's endpoint is alive, and CRI then
//!   reports the running container as exited (255, reason "Unknown").
//! - When a task's endpoint goes away it runs `<shim> -namespace … -id … -bundle … delete` to
//!   learn how the task ended, and reads a `DeleteResponse` from its stdout.
//!
//! A link named `containerd-shim-sandboxer-v1` to `sandboxer` serves both: `delete` answers
//! that the process was killed with its VM (the sandboxer already released the VM and its
//! resources), `-v` prints the version, and anything else — `start` above all — is refused:
//! this is no shim, and a containerd that tries to start one is misconfigured.

use std::io::Write;

use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{Message, MessageField};

/// The shim binary name of the runtime type `io.containerd.sandboxer.v1`.
pub const SHIM_NAME: &str = "containerd-shim-sandboxer-v1";

/// Exit status reported for a task whose endpoint went away: killed (128 + SIGKILL), as a
/// process is when its VM ends under it.
pub const KILLED_STATUS: u32 = 128 + 9;

/// Whether `argv0` calls the binary by its shim name.
pub fn is_shim_name(argv0: &str) -> bool {
    std::path::Path::new(argv0)
        .file_name()
        .is_some_and(|n| n == SHIM_NAME)
}

/// containerd's shim flags that take a value (Go `flag` syntax: `-name value` or `-name=value`).
const VALUE_FLAGS: &[&str] = &[
    "namespace",
    "address",
    "publish-binary",
    "id",
    "bundle",
    "socket",
];

/// The action (first positional argument) and whether `-v` was given.
fn parse(args: &[String]) -> Result<(Option<&str>, bool), String> {
    let mut action = None;
    let mut version = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            action.get_or_insert(arg.as_str());
            continue;
        };
        let (name, inline_value) = flag.split_once('=').unwrap_or((flag, ""));
        if VALUE_FLAGS.contains(&name) {
            if inline_value.is_empty() && it.next().is_none() {
                return Err(format!("flag -{name} needs a value"));
            }
        } else if name == "v" || name == "version" {
            version = true;
        } else if name != "debug" && name != "info" {
            return Err(format!("unknown flag -{name}"));
        }
    }
    Ok((action, version))
}

/// Runs as `containerd-shim-sandboxer-v1 <args>`; the process exit code.
pub fn run(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let refuse = |err: &mut dyn Write, why: &str| {
        let _ = writeln!(
            err,
            "{SHIM_NAME}: {why}. This is not a shim: pods of the runtime io.containerd.sandboxer.v1 \
             run in the sandboxer daemon, and containerd must reach them through the sandbox \
             controller named in the runtime's `sandboxer` setting (docs/containerd.md)"
        );
        1
    };
    match parse(args) {
        Err(why) => refuse(err, &why),
        Ok((_, true)) => {
            let _ = writeln!(out, "{SHIM_NAME}: sandboxer {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Ok((Some("delete"), false)) => {
            let mut resp = DeleteResponse::new();
            resp.exit_status = KILLED_STATUS;
            resp.exited_at = MessageField::some(Timestamp::now());
            match resp.write_to_bytes() {
                Ok(bytes) if out.write_all(&bytes).and_then(|()| out.flush()).is_ok() => 0,
                Ok(_) => 1,
                Err(e) => refuse(err, &format!("cannot encode the DeleteResponse: {e}")),
            }
        }
        Ok((Some(action), false)) => refuse(err, &format!("action {action:?} is not supported")),
        Ok((None, false)) => refuse(err, "no action given"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    fn call(s: &str) -> (u8, Vec<u8>, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run(&args(s), &mut out, &mut err);
        (code, out, String::from_utf8(err).unwrap())
    }

    #[test]
    fn names() {
        assert!(is_shim_name("/usr/local/bin/containerd-shim-sandboxer-v1"));
        assert!(is_shim_name(SHIM_NAME));
        assert!(!is_shim_name("/usr/local/bin/sandboxer"));
        assert!(!is_shim_name("containerd-shim-sandboxer-v1.bak"));
    }

    /// containerd's cleanup after a task endpoint went away.
    #[test]
    fn delete_answers_killed() {
        let before = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let (code, out, err) = call(
            "-namespace k8s.io -address /run/containerd/containerd.sock -publish-binary \
             /usr/bin/containerd -id c1 -bundle /run/containerd/x/c1 -debug delete",
        );
        assert_eq!(code, 0, "{err}");
        let resp = DeleteResponse::parse_from_bytes(&out).unwrap();
        assert_eq!(resp.exit_status, KILLED_STATUS);
        assert_eq!(resp.pid, 0);
        let secs = u64::try_from(resp.exited_at.seconds).unwrap();
        assert!(secs >= before, "{secs} < {before}");
        // `-name=value` works too.
        assert_eq!(call("-id=c1 -namespace=k8s.io delete").0, 0);
    }

    #[test]
    fn start_and_the_rest_are_refused() {
        for a in [
            "-namespace k8s.io -id c1 -address /a start",
            "-info",
            "",
            "-id",
            "-namespace k8s.io -frobnicate delete",
        ] {
            let (code, out, err) = call(a);
            assert_eq!(code, 1, "{a}");
            assert!(out.is_empty(), "{a}");
            assert!(err.contains("not a shim"), "{a}: {err}");
        }
        let (code, out, _) = call("-v");
        assert_eq!(code, 0);
        assert!(String::from_utf8(out).unwrap().contains("sandboxer"));
    }
}
