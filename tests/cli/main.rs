//! End-to-end tests: the real `dbx` binary against a real `dbx serve` on port 0, each test in
//! its own temp directories with its own HOME and config.

mod harness;

mod content;
mod errors;
mod history;
mod live;
mod roundtrip;
mod sync;
