// SPDX-License-Identifier: Apache-2.0
//! Agent settings from the kernel command line (`/proc/cmdline`).
//!
//! The VMM passes settings as `sandboxer.<key>=<value>` words. Everything else on the line
//! belongs to the kernel and is ignored, as is everything after a bare `--` (the kernel hands
//! those words to init as arguments). Values may be double-quoted (`sandboxer.x="a b"`), as the
//! kernel's own parser allows.
//!
//! | key | value | default | meaning |
//! |---|---|---|---|
//! | `sandboxer.log` | `error`, `warn`, `info`, `debug`, `trace` | `info` | console log level |
//! | `sandboxer.shutdown` | `reboot`, `poweroff` | `reboot` | how the VM ends on shutdown |
//! | `sandboxer.shutdown_grace_ms` | integer | `1000` | time between SIGTERM and SIGKILL to the remaining processes at shutdown |
//! | `sandboxer.port` | vsock port | `1024` | port the agent serves ttrpc on (AF_VSOCK, any CID) |
//! | `sandboxer.ready_port` | vsock port | `1025` | host port (CID 2) the agent dials to say it is ready, see [`crate::transport`] |
//! | `sandboxer.oneshot` | `1`/`0`, `true`/`false`, `yes`/`no`, `on`/`off`, or bare | off | shut down right after `ready` (boot smoke tests, boot benchmarks) |
//! | `sandboxer.test_ignore_shutdown` | as `oneshot` | off | tests only: answer Control.Shutdown and do nothing, a guest that ignores Shutdown (the host must end it itself after the grace time) |
//!
//! `reboot` is the default end because the guest kernel has no ACPI: with no power-off driver,
//! Linux turns a power-off request into a halt that never leaves the VM, whereas a reboot
//! request follows `reboot=` (`reboot=t`: triple fault, seen by KVM as `KVM_EXIT_SHUTDOWN`,
//! and QEMU `-no-reboot` exits).
//!
//! Parsing never fails: PID 1 must come up even on a bad command line. Unknown `sandboxer.*`
//! keys and bad values are reported as warnings and the defaults are kept.

use std::fmt;
use std::time::Duration;

/// Prefix of the agent's keys.
pub const PREFIX: &str = "sandboxer.";

/// Log verbosity on the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warn,
    /// Normal progress.
    Info,
    /// Details.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "error" => Self::Error,
            "warn" => Self::Warn,
            "info" => Self::Info,
            "debug" => Self::Debug,
            "trace" => Self::Trace,
            _ => return None,
        })
    }

    /// The matching `log` filter.
    pub fn to_filter(self) -> log::LevelFilter {
        match self {
            Self::Error => log::LevelFilter::Error,
            Self::Warn => log::LevelFilter::Warn,
            Self::Info => log::LevelFilter::Info,
            Self::Debug => log::LevelFilter::Debug,
            Self::Trace => log::LevelFilter::Trace,
        }
    }
}

/// How the agent ends the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    /// `reboot(RB_AUTOBOOT)`: follows the kernel's `reboot=` method (works without ACPI).
    Reboot,
    /// `reboot(RB_POWER_OFF)`: needs a power-off driver, else the kernel halts.
    PowerOff,
}

/// Settings of the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// Console log level.
    pub log_level: LogLevel,
    /// How the VM ends.
    pub shutdown: ShutdownMode,
    /// Time the remaining processes get between SIGTERM and SIGKILL at shutdown.
    pub shutdown_grace: Duration,
    /// Shut down right after announcing readiness.
    pub oneshot: bool,
    /// Tests only: answer Control.Shutdown and do nothing.
    pub ignore_shutdown: bool,
    /// vsock port of the ttrpc server.
    pub port: u32,
    /// Host vsock port (CID 2) that receives the ready line.
    pub ready_port: u32,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            log_level: LogLevel::Info,
            shutdown: ShutdownMode::Reboot,
            shutdown_grace: Duration::from_millis(1000),
            oneshot: false,
            ignore_shutdown: false,
            port: crate::transport::DEFAULT_PORT,
            ready_port: crate::transport::DEFAULT_READY_PORT,
        }
    }
}

/// A problem found while parsing; the setting keeps its default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmdlineWarning {
    /// A `sandboxer.*` key this agent does not know.
    UnknownKey(String),
    /// A known key with a value it cannot take.
    BadValue {
        /// The key, without the prefix.
        key: String,
        /// The rejected value.
        value: String,
    },
    /// A known key given without `=value` where a value is required.
    MissingValue(String),
}

impl fmt::Display for CmdlineWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownKey(key) => write!(f, "Unknown setting {PREFIX}{key}"),
            Self::BadValue { key, value } => {
                write!(f, "Invalid value {value:?} for {PREFIX}{key}, default kept")
            }
            Self::MissingValue(key) => write!(f, "Setting {PREFIX}{key} needs a value"),
        }
    }
}

/// Splits a kernel command line into words: whitespace separates words, double quotes group
/// (and are removed), a bare `--` ends the kernel's part.
pub fn split_words(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut quoted = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    if current == "--" {
                        return words;
                    }
                    words.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            c => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if in_word && current != "--" {
        words.push(current);
    }
    words
}

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Parses the agent's settings out of a kernel command line.
pub fn parse(cmdline: &str) -> (AgentConfig, Vec<CmdlineWarning>) {
    let mut config = AgentConfig::default();
    let mut warnings = Vec::new();
    for word in split_words(cmdline) {
        let Some(setting) = word.strip_prefix(PREFIX) else {
            continue;
        };
        let (key, value) = match setting.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (setting, None),
        };
        let bad = |warnings: &mut Vec<CmdlineWarning>, value: &str| {
            warnings.push(CmdlineWarning::BadValue {
                key: key.to_owned(),
                value: value.to_owned(),
            });
        };
        match (key, value) {
            ("log", Some(v)) => match LogLevel::parse(v) {
                Some(level) => config.log_level = level,
                None => bad(&mut warnings, v),
            },
            ("shutdown", Some(v)) => match v {
                "reboot" => config.shutdown = ShutdownMode::Reboot,
                "poweroff" => config.shutdown = ShutdownMode::PowerOff,
                _ => bad(&mut warnings, v),
            },
            ("shutdown_grace_ms", Some(v)) => match v.parse::<u32>() {
                Ok(ms) => config.shutdown_grace = Duration::from_millis(u64::from(ms)),
                Err(_) => bad(&mut warnings, v),
            },
            ("port", Some(v)) => match v.parse::<u32>() {
                Ok(port) => config.port = port,
                Err(_) => bad(&mut warnings, v),
            },
            ("ready_port", Some(v)) => match v.parse::<u32>() {
                Ok(port) => config.ready_port = port,
                Err(_) => bad(&mut warnings, v),
            },
            ("oneshot", None) => config.oneshot = true,
            ("oneshot", Some(v)) => match parse_bool(v) {
                Some(b) => config.oneshot = b,
                None => bad(&mut warnings, v),
            },
            ("test_ignore_shutdown", None) => config.ignore_shutdown = true,
            ("test_ignore_shutdown", Some(v)) => match parse_bool(v) {
                Some(b) => config.ignore_shutdown = b,
                None => bad(&mut warnings, v),
            },
            ("log" | "shutdown" | "shutdown_grace_ms" | "port" | "ready_port", None) => {
                warnings.push(CmdlineWarning::MissingValue(key.to_owned()));
            }
            _ => warnings.push(CmdlineWarning::UnknownKey(key.to_owned())),
        }
    }
    (config, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_on_a_plain_kernel_line() {
        let (config, warnings) = parse("console=ttyS0 reboot=t panic=-1 quiet\n");
        assert_eq!(config, AgentConfig::default());
        assert!(warnings.is_empty());
        assert_eq!(config.shutdown, ShutdownMode::Reboot);
        assert_eq!(config.shutdown_grace, Duration::from_secs(1));
    }

    #[test]
    fn all_keys() {
        let (config, warnings) = parse(
            "console=ttyS0 sandboxer.log=debug sandboxer.shutdown=poweroff \
             sandboxer.shutdown_grace_ms=250 sandboxer.oneshot sandboxer.port=5000 \
             sandboxer.ready_port=5001 sandboxer.test_ignore_shutdown=yes\n",
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            config,
            AgentConfig {
                log_level: LogLevel::Debug,
                shutdown: ShutdownMode::PowerOff,
                shutdown_grace: Duration::from_millis(250),
                oneshot: true,
                ignore_shutdown: true,
                port: 5000,
                ready_port: 5001,
            }
        );
    }

    #[test]
    fn later_words_win_and_bools_parse() {
        let (config, _) = parse("sandboxer.oneshot=1 sandboxer.oneshot=off sandboxer.log=warn");
        assert!(!config.oneshot);
        assert_eq!(config.log_level, LogLevel::Warn);
        for (v, want) in [
            ("yes", true),
            ("true", true),
            ("on", true),
            ("no", false),
            ("0", false),
        ] {
            let (config, w) = parse(&format!("sandboxer.oneshot={v}"));
            assert_eq!(config.oneshot, want, "{v}");
            assert!(w.is_empty());
        }
    }

    #[test]
    fn bad_values_keep_defaults_and_warn() {
        let (config, warnings) = parse(
            "sandboxer.log=loud sandboxer.shutdown_grace_ms=-5 sandboxer.shutdown=halt \
             sandboxer.oneshot=maybe sandboxer.log sandboxer.frobnicate=1 sandboxerx.log=debug",
        );
        assert_eq!(config, AgentConfig::default());
        assert_eq!(
            warnings,
            vec![
                CmdlineWarning::BadValue {
                    key: "log".into(),
                    value: "loud".into()
                },
                CmdlineWarning::BadValue {
                    key: "shutdown_grace_ms".into(),
                    value: "-5".into()
                },
                CmdlineWarning::BadValue {
                    key: "shutdown".into(),
                    value: "halt".into()
                },
                CmdlineWarning::BadValue {
                    key: "oneshot".into(),
                    value: "maybe".into()
                },
                CmdlineWarning::MissingValue("log".into()),
                CmdlineWarning::UnknownKey("frobnicate".into()),
            ]
        );
        assert_eq!(
            warnings[5].to_string(),
            "Unknown setting sandboxer.frobnicate"
        );
    }

    #[test]
    fn ports_default_and_reject_junk() {
        let (config, _) = parse("console=ttyS0");
        assert_eq!((config.port, config.ready_port), (1024, 1025));
        let (config, warnings) = parse("sandboxer.port=-1 sandboxer.ready_port=4294967296");
        assert_eq!((config.port, config.ready_port), (1024, 1025));
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        let (_, warnings) = parse("sandboxer.port");
        assert_eq!(warnings, [CmdlineWarning::MissingValue("port".into())]);
    }

    #[test]
    fn quotes_and_init_arguments() {
        assert_eq!(
            split_words(" a  b=\"x y\" \"c d\"=e\tf -- sandboxer.oneshot"),
            ["a", "b=x y", "c d=e", "f"]
        );
        assert_eq!(split_words("a --"), ["a"]);
        assert_eq!(split_words("a --x"), ["a", "--x"]);
        assert_eq!(split_words(""), Vec::<String>::new());
        assert_eq!(split_words("\"\""), [""]);
        // Words after `--` are init's arguments, not settings.
        let (config, _) = parse("console=ttyS0 -- sandboxer.oneshot");
        assert!(!config.oneshot);
        let (config, _) = parse("sandboxer.log=\"trace\"");
        assert_eq!(config.log_level, LogLevel::Trace);
    }

    #[test]
    fn unterminated_quote_and_odd_input_do_not_panic() {
        let (config, _) = parse("sandboxer.log=\"debug");
        assert_eq!(config.log_level, LogLevel::Debug);
        let _ = parse("sandboxer.=1 sandboxer. = \u{0} \u{feff}sandboxer.log=x");
    }
}
