// SPDX-License-Identifier: Apache-2.0
//! Console output. PID 1's stdout and stderr are `/dev/console` (opened by the kernel before
//! it runs init), which the VMM shows as the guest's serial console. The `log` records go to
//! stderr as `sandboxer-agent: <level>: <message>`; the readiness line goes to stdout.

use std::io::Write;

/// Printed once the agent has set up the guest; boot tests and the VMM wait for this exact line.
pub const READY_LINE: &str = "sandboxer-agent: ready";

/// Formats one log line.
pub fn format_line(level: log::Level, message: &std::fmt::Arguments<'_>) -> String {
    format!(
        "sandboxer-agent: {}: {message}\n",
        level.as_str().to_ascii_lowercase()
    )
}

/// A `log` backend writing to stderr.
#[derive(Debug)]
pub struct ConsoleLogger;

static LOGGER: ConsoleLogger = ConsoleLogger;

impl log::Log for ConsoleLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            // One write per line, so lines from several threads do not interleave.
            let line = format_line(record.level(), record.args());
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// Installs the console logger (once) with the given level.
pub fn init(level: log::LevelFilter) {
    // Fails only if a logger is already installed; then only the level changes.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Prints [`READY_LINE`] on stdout and flushes it.
pub fn announce_ready() -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{READY_LINE}")?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_format() {
        assert_eq!(
            format_line(log::Level::Warn, &format_args!("x {}", 1)),
            "sandboxer-agent: warn: x 1\n"
        );
        assert_eq!(READY_LINE, "sandboxer-agent: ready");
    }
}
