//! Entitle: a self-hosted entitlement server.

pub mod app;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod db;
pub mod domain;
pub mod error;
pub mod events;
pub mod graphql;
pub mod jobs;
pub mod jwks;
pub mod metrics;
pub mod policy;
pub mod providers;
pub mod rest;
pub mod service;
