//! Logging set-up: plain lines on stderr (journald adds its own timestamps and levels).

use simplelog::{ConfigBuilder, LevelFilter, WriteLogger};

pub fn init(level: LevelFilter) {
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
