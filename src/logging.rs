//! Logging set-up: plain lines on stderr (journald adds its own timestamps and levels), or with
//! `LOG_FORMAT=json` one JSON object per line (`time`, `level`, `target`, `message`) for
//! journald/Loki pipelines that parse fields. Neither format ever carries the auth secret or a
//! token: nothing logs them (tests/auth.rs checks the log of a run that uses both).

use std::io::Write;

use simplelog::{ConfigBuilder, LevelFilter, WriteLogger};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init(level: LevelFilter, format: LogFormat) {
    if format == LogFormat::Json {
        log::set_max_level(level);
        if log::set_boxed_logger(Box::new(JsonLogger { level })).is_err() {
            eprintln!("noomnim: logger already initialised");
        }
        return;
    }
    let config = ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_thread_level(LevelFilter::Off)
        .set_target_level(LevelFilter::Off)
        .add_filter_allow_str("noomnim")
        .build();
    if WriteLogger::init(level, config, std::io::stderr()).is_err() {
        eprintln!("noomnim: logger already initialised");
    }
}

/// One JSON object per line on stderr; only this crate's records (as the text format).
struct JsonLogger {
    level: LevelFilter,
}

impl log::Log for JsonLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= self.level && metadata.target().starts_with("noomnim")
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = serde_json::json!({
            "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "level": record.level().as_str().to_ascii_lowercase(),
            "target": record.target(),
            "message": record.args().to_string(),
        });
        // One write per line, so lines from several threads never interleave.
        let mut text = line.to_string();
        text.push('\n');
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}
