//! The agent's parsing code, compiled from its own source files, so the fuzz build does not pull
//! in the AWS SDK or the kernel loader.
#![allow(dead_code)]

#[path = "../../src/token.rs"]
pub mod token;

#[path = "../../src/attribution.rs"]
pub mod attribution;

#[path = "../../src/request.rs"]
pub mod request;
