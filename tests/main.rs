//! Integration tests: the real binary and the real service, against the real MariaDB on this
//! machine. One test binary, so the release build links once.

mod support;

mod api;
mod cli;
mod core;
mod deploy;
mod kafka;
mod mysql_store;
mod service;
mod status_page;
mod webhooks;
