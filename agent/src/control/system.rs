// SPDX-License-Identifier: Apache-2.0
//! The non-network parts of Setup and SyncClock: hostname, `/etc/resolv.conf`, sysctls and
//! the realtime clock.
//!
//! Each setting is checked first ([`check_hostname`], [`resolv_conf`], [`check_sysctl`],
//! [`clock_target`]), so a bad request fails with the field's name before anything changes,
//! and then applied.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::time::TimeSpec;
use nix::time::{ClockId, clock_settime};
use proto::agent::control::Dns;

use super::error::ControlError;

/// Longest hostname the kernel takes (`HOST_NAME_MAX`).
pub const HOSTNAME_MAX: usize = 64;
/// Skew below which SyncClock leaves the clock alone: the request's own transit time is of
/// this order, so a smaller correction would not make the clock better.
pub const CLOCK_SKEW_THRESHOLD: Duration = Duration::from_millis(10);
/// Earliest time SyncClock accepts (2020-01-01T00:00:00Z): a host clock before it is broken.
pub const CLOCK_MIN_UNIX_SECS: i64 = 1_577_836_800;
/// Latest time SyncClock accepts (2200-01-01T00:00:00Z).
pub const CLOCK_MAX_UNIX_SECS: i64 = 7_258_118_400;
/// Entries resolv.conf takes: glibc reads three name servers and six search domains, but
/// musl and others read more; this only bounds what a host can make the agent write.
const DNS_MAX_ENTRIES: usize = 32;

/// Checks a hostname: 1..=64 bytes, printable ASCII without spaces or `/`.
pub fn check_hostname(name: &str) -> Result<(), ControlError> {
    if name.len() > HOSTNAME_MAX {
        return Err(ControlError::invalid(
            "hostname",
            format!("is {} bytes, longer than {HOSTNAME_MAX}", name.len()),
        ));
    }
    if let Some(c) = name.chars().find(|c| !c.is_ascii_graphic() || *c == '/') {
        return Err(ControlError::invalid(
            "hostname",
            format!("{name:?} contains {c:?}"),
        ));
    }
    Ok(())
}

/// Sets the hostname (of the agent's UTS namespace).
pub fn set_hostname(name: &str) -> Result<(), ControlError> {
    nix::unistd::sethostname(name)
        .map_err(|e| ControlError::from_io("hostname", "sethostname", &e.into()))
}

/// One resolv.conf word: non-empty, printable, no whitespace.
fn check_word(field: String, word: &str) -> Result<(), ControlError> {
    if word.is_empty() {
        return Err(ControlError::invalid(field, "is empty"));
    }
    if let Some(c) = word.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(ControlError::invalid(
            field,
            format!("{word:?} contains {c:?}"),
        ));
    }
    Ok(())
}

/// The resolv.conf text for `dns`, or `None` when it sets nothing.
pub fn resolv_conf(dns: &Dns) -> Result<Option<String>, ControlError> {
    if dns.servers.is_empty() && dns.searches.is_empty() && dns.options.is_empty() {
        return Ok(None);
    }
    for (name, list) in [
        ("servers", &dns.servers),
        ("searches", &dns.searches),
        ("options", &dns.options),
    ] {
        if list.len() > DNS_MAX_ENTRIES {
            return Err(ControlError::invalid(
                format!("dns.{name}"),
                format!("has {} entries, more than {DNS_MAX_ENTRIES}", list.len()),
            ));
        }
    }
    let mut text = String::from("# Written by the sandboxer agent.\n");
    for (i, server) in dns.servers.iter().enumerate() {
        let ip: IpAddr = server.parse().map_err(|_| {
            ControlError::invalid(
                format!("dns.servers[{i}]"),
                format!("{server:?} is not an IP address"),
            )
        })?;
        text.push_str(&format!("nameserver {ip}\n"));
    }
    for (i, s) in dns.searches.iter().enumerate() {
        check_word(format!("dns.searches[{i}]"), s)?;
    }
    for (i, o) in dns.options.iter().enumerate() {
        check_word(format!("dns.options[{i}]"), o)?;
    }
    if !dns.searches.is_empty() {
        text.push_str(&format!("search {}\n", dns.searches.join(" ")));
    }
    if !dns.options.is_empty() {
        text.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    Ok(Some(text))
}

/// Replaces `path` with `text` atomically (a temporary file renamed over it).
pub fn write_resolv_conf(path: &Path, text: &str) -> Result<(), ControlError> {
    let err = |what: &str, e: &std::io::Error| ControlError::from_io("dns", what, e);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(&format!("create {}", dir.display()), &e))?;
    }
    let tmp = path.with_extension("sandboxer-tmp");
    let mut file =
        std::fs::File::create(&tmp).map_err(|e| err(&format!("create {}", tmp.display()), &e))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| err(&format!("write {}", tmp.display()), &e))?;
    std::fs::rename(&tmp, path).map_err(|e| err(&format!("rename to {}", path.display()), &e))
}

/// The field name of a sysctl key in errors.
pub fn sysctl_field(key: &str) -> String {
    format!("sysctls[{key}]")
}

/// Checks a sysctl key (`net.ipv4.ip_forward`) and returns its path under `root`
/// (`/proc/sys`): dot-separated non-empty words of `[A-Za-z0-9_-]`, so no key can leave
/// `root` (`..`, `/`) or name something odd. The value must be one line.
pub fn check_sysctl(root: &Path, key: &str, value: &str) -> Result<PathBuf, ControlError> {
    let field = sysctl_field(key);
    if key.contains("..") || key.contains('/') {
        return Err(ControlError::invalid(
            field,
            "key must not contain \"..\" or \"/\"",
        ));
    }
    let mut path = root.to_path_buf();
    for word in key.split('.') {
        if word.is_empty() {
            return Err(ControlError::invalid(field, "key has an empty part"));
        }
        if let Some(c) = word
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-')))
        {
            return Err(ControlError::invalid(
                field,
                format!("key contains {c:?} (allowed: A-Z a-z 0-9 _ - and dots)"),
            ));
        }
        path.push(word);
    }
    if value.contains('\n') || value.contains('\0') {
        return Err(ControlError::invalid(field, "value must be one line"));
    }
    Ok(path)
}

/// Writes one sysctl.
pub fn write_sysctl(key: &str, path: &Path, value: &str) -> Result<(), ControlError> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| ControlError::from_io(sysctl_field(key), &format!("write {value:?}"), &e))
}

/// What SyncClock should do with `unix_nanos` given the guest's clock `now`: `Ok(None)` when
/// the skew is below [`CLOCK_SKEW_THRESHOLD`], `Ok(Some(t))` to set the clock to `t`.
pub fn clock_target(unix_nanos: i64, now: SystemTime) -> Result<Option<TimeSpec>, ControlError> {
    let secs = unix_nanos.div_euclid(1_000_000_000);
    if !(CLOCK_MIN_UNIX_SECS..CLOCK_MAX_UNIX_SECS).contains(&secs) {
        return Err(ControlError::invalid(
            "unix_nanos",
            format!("{unix_nanos} is not a time between 2020 and 2200"),
        ));
    }
    let host = Duration::from_nanos(unix_nanos.unsigned_abs());
    let guest = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let skew = host.abs_diff(guest);
    if skew < CLOCK_SKEW_THRESHOLD {
        return Ok(None);
    }
    log::info!(
        "Clock skew {} ms: setting the clock from the host",
        skew.as_millis()
    );
    Ok(Some(TimeSpec::from_duration(host)))
}

/// Sets the realtime clock.
pub fn set_clock(t: TimeSpec) -> Result<(), ControlError> {
    clock_settime(ClockId::CLOCK_REALTIME, t)
        .map_err(|e| ControlError::from_io("unix_nanos", "clock_settime", &e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        check_hostname("pod-1.example").unwrap();
        check_hostname(&"a".repeat(64)).unwrap();
        for bad in ["a b", "a/b", "tab\t", "é"] {
            check_hostname(bad).unwrap_err();
        }
        let e = check_hostname(&"a".repeat(65)).unwrap_err();
        assert_eq!(e.to_string(), "hostname: is 65 bytes, longer than 64");
    }

    #[test]
    fn resolv_conf_text() {
        assert_eq!(resolv_conf(&Dns::new()).unwrap(), None);
        let mut dns = Dns::new();
        dns.servers = vec!["10.0.0.2".into(), "fd00::53".into()];
        dns.searches = vec!["svc.cluster.local".into(), "cluster.local".into()];
        dns.options = vec!["ndots:5".into()];
        assert_eq!(
            resolv_conf(&dns).unwrap().unwrap(),
            "# Written by the sandboxer agent.\nnameserver 10.0.0.2\nnameserver fd00::53\n\
             search svc.cluster.local cluster.local\noptions ndots:5\n"
        );
        dns.servers[1] = "dns.google".into();
        assert_eq!(
            resolv_conf(&dns).unwrap_err().to_string(),
            "dns.servers[1]: \"dns.google\" is not an IP address"
        );
        dns.servers.truncate(1);
        dns.options[0] = "ndots:5\nnameserver 6.6.6.6".into();
        assert!(
            resolv_conf(&dns)
                .unwrap_err()
                .to_string()
                .starts_with("dns.options[0]: ")
        );
    }

    #[test]
    fn resolv_conf_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etc/resolv.conf");
        write_resolv_conf(&path, "nameserver 1.1.1.1\n").unwrap();
        write_resolv_conf(&path, "nameserver 8.8.8.8\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "nameserver 8.8.8.8\n"
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("etc")).unwrap().count(),
            1
        );
    }

    #[test]
    fn sysctl_keys() {
        let root = Path::new("/proc/sys");
        assert_eq!(
            check_sysctl(root, "net.ipv4.ip_forward", "1").unwrap(),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
        for bad in [
            "",
            "net..ipv4",
            "..",
            "net.ipv4/../../etc",
            ".net",
            "net.",
            "net.ipv4.conf.a b",
            "kernel.*",
        ] {
            let e = check_sysctl(root, bad, "1").unwrap_err();
            assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT, "{bad:?}");
            assert!(
                e.to_string().starts_with(&format!("sysctls[{bad}]: ")),
                "{e}"
            );
        }
        check_sysctl(root, "net.core.somaxconn", "1\n2").unwrap_err();
    }

    #[test]
    fn sysctl_writes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("net/core")).unwrap();
        std::fs::write(dir.path().join("net/core/somaxconn"), "4096").unwrap();
        let path = check_sysctl(dir.path(), "net.core.somaxconn", "1024").unwrap();
        write_sysctl("net.core.somaxconn", &path, "1024").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1024");
        let path = check_sysctl(dir.path(), "net.core.nope", "1").unwrap();
        let e = write_sysctl("net.core.nope", &path, "1").unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::NOT_FOUND, "{e}");
    }

    #[test]
    fn clock_decisions() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ns = 1_800_000_000_i64 * 1_000_000_000;
        assert_eq!(clock_target(ns, now).unwrap(), None);
        assert_eq!(clock_target(ns + 5_000_000, now).unwrap(), None);
        assert_eq!(clock_target(ns - 5_000_000, now).unwrap(), None);
        let t = clock_target(ns + 2_500_000_000, now).unwrap().unwrap();
        assert_eq!((t.tv_sec(), t.tv_nsec()), (1_800_000_002, 500_000_000));
        let t = clock_target(ns - 60_000_000_000, now).unwrap().unwrap();
        assert_eq!((t.tv_sec(), t.tv_nsec()), (1_799_999_940, 0));
        for bad in [-1, 0, 1_000_000_000, i64::MAX, i64::MIN] {
            let e = clock_target(bad, now).unwrap_err();
            assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT, "{bad}");
        }
    }
}
