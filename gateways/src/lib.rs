//! imflow's doors: the WebSocket gateway and the REST API.
//!
//! Both speak PROTOCOL.md and share one implementation of its operations
//! ([`api::Api`]); the connection registry ([`connections::Connections`]) is
//! the `Presence` through which the pipeline's `push` stage reaches clients.

pub mod api;
pub mod auth;
pub mod cluster;
pub mod connections;
pub mod discovery;
pub mod error;
pub mod handshake;
pub mod http;
pub mod openapi;
pub mod reload;
pub mod rest;
pub mod tap;
pub mod web;
pub mod ws;

pub use error::Error;
