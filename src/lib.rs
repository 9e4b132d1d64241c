//! sagawatch: an observer for choreographed sagas. It matches every trigger event with the
//! correlates that must follow it, by correlation key and within time windows defined by
//! YAML rules, and reports the ones that go missing.

/// `eprintln!` that cannot panic: a line for a stderr that is closed (`2>&1 | head`) is
/// dropped, where `eprintln!` would panic and exit 101.
#[macro_export]
macro_rules! stderr {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stderr(), $($arg)*);
    }};
}

pub mod cli;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod event;
pub mod output;
pub mod replay;
pub mod rules;
pub mod sign;
pub mod store;
pub mod testing;
pub mod time;
pub mod yaml;
