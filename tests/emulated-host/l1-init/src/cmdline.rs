// SPDX-License-Identifier: Apache-2.0
//! The L1 kernel command line words the L1 init reads: `emu.tests=<name>[,<name>...]` (the
//! tests to run, in order) and `emu.timeout=<seconds>` (the bound of each test).

/// Default bound of one test, in seconds.
pub const DEFAULT_TIMEOUT_SECS: u64 = 240;

/// What the L1 init was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L1Settings {
    /// The tests to run, in order.
    pub tests: Vec<String>,
    /// Bound of each test in seconds.
    pub timeout_secs: u64,
    /// Words that looked like settings but were not understood.
    pub warnings: Vec<String>,
}

/// Parses `/proc/cmdline`. Never fails: bad words end up in `warnings`.
pub fn parse(cmdline: &str) -> L1Settings {
    let mut settings = L1Settings {
        tests: Vec::new(),
        timeout_secs: DEFAULT_TIMEOUT_SECS,
        warnings: Vec::new(),
    };
    for word in cmdline.split_ascii_whitespace() {
        if let Some(list) = word.strip_prefix("emu.tests=") {
            settings
                .tests
                .extend(list.split(',').filter(|t| !t.is_empty()).map(str::to_owned));
        } else if let Some(secs) = word.strip_prefix("emu.timeout=") {
            match secs.parse::<u64>() {
                Ok(s) if s > 0 => settings.timeout_secs = s,
                _ => settings.warnings.push(word.to_owned()),
            }
        } else if word.starts_with("emu.") {
            settings.warnings.push(word.to_owned());
        }
    }
    settings
}

/// A test name is a short `[a-z0-9-]` word: it becomes a path under `/tests`.
pub fn valid_test_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tests_and_timeout() {
        let s = parse("console=ttyS0 emu.tests=agent-ready,smp emu.timeout=90 quiet\n");
        assert_eq!(s.tests, ["agent-ready", "smp"]);
        assert_eq!(s.timeout_secs, 90);
        assert!(s.warnings.is_empty());
    }

    #[test]
    fn bad_words_are_warnings() {
        let s = parse("emu.timeout=0 emu.tests=,a,, emu.what=1 emu.timeout=x");
        assert_eq!(s.tests, ["a"]);
        assert_eq!(s.timeout_secs, DEFAULT_TIMEOUT_SECS);
        assert_eq!(s.warnings, ["emu.timeout=0", "emu.what=1", "emu.timeout=x"]);
    }

    #[test]
    fn test_names() {
        assert!(valid_test_name("agent-ready"));
        assert!(!valid_test_name("../x"));
        assert!(!valid_test_name(""));
        assert!(!valid_test_name("A"));
    }
}
