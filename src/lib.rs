//! Entitle: a self-hosted entitlement server.

pub mod app;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod config_check;
pub mod db;
pub mod domain;
pub mod error;
pub mod events;
pub mod graphql;
pub mod http_io;
pub mod jobs;
pub mod jwks;
pub mod keys;
pub mod metrics;
pub mod policy;
pub mod providers;
pub mod rate_limit;
pub mod rest;
pub mod service;
pub mod state;
