use std::{path::PathBuf, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    app,
    clock::SystemClock,
    config::{Config, TokenAlgorithm},
    db::Db,
    domain::ApiKeyRole,
    service::Core,
};

#[derive(Parser)]
#[command(name = "entitle", version, about = "Self-hosted entitlement server")]
pub struct Cli {
    /// Configuration file (default: ./entitle.toml when it exists).
    #[arg(long, global = true, env = "ENTITLE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log progress (migrations, connections) for commands other than `serve`.
    #[arg(long, short, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Migrate the database and serve (the default).
    Serve,
    /// Bring the database schema up to date, then exit.
    Migrate,
    /// Print the GraphQL schema (SDL).
    ExportSchema {
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Manage API keys.
    #[command(subcommand)]
    ApiKey(ApiKeyCommand),
    /// Outbound webhook endpoints.
    #[command(subcommand)]
    Outbound(OutboundCommand),
    /// Keys that sign entitlement tokens and answers.
    #[command(subcommand)]
    SigningKey(SigningKeyCommand),
    /// Recover missed store notifications once (the stores enabled under
    /// `[reconcile]`), print what each store did, then exit.
    Reconcile {
        /// Start here instead of each store's saved cursor: an RFC 3339
        /// instant, or a duration back from now such as `24h` or `7d`.
        #[arg(long, value_parser = parse_since)]
        since: Option<DateTime<Utc>>,
    },
    /// The configuration as loaded.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// The webhook log: recorded store notifications.
    #[command(subcommand)]
    Webhooks(WebhooksCommand),
    /// Mint a JWT with the configured key (development only).
    Token {
        #[arg(long)]
        sub: String,
        #[arg(long)]
        admin: bool,
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
}

#[derive(Subcommand)]
pub enum ApiKeyCommand {
    /// Create a key; it is printed once and only its hash is stored.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        role: RoleArg,
    },
    /// Revoke a key by id or prefix.
    Revoke { id: String },
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration (defaults, file, environment) with
    /// every secret redacted, and check each store section's shape without
    /// calling the store; exits non-zero when something is wrong.
    Check {
        #[arg(long, value_enum, default_value = "toml")]
        format: crate::config_check::Format,
    },
}

#[derive(Subcommand)]
pub enum WebhooksCommand {
    /// Run again the recorded notifications that matched nothing or failed
    /// (oldest first, through the same path as a live delivery), then print
    /// what became of them. Events that already applied change nothing.
    Replay {
        /// Only this outcome (repeatable): unmatched, unknown_product,
        /// no_customer, failed, ... Default: every replayable outcome.
        #[arg(long = "outcome")]
        outcomes: Vec<String>,
        /// Only those received since: an RFC 3339 instant, or a duration
        /// back from now such as `24h` or `7d`.
        #[arg(long, value_parser = parse_since)]
        since: Option<DateTime<Utc>>,
    },
}

#[derive(Subcommand)]
pub enum OutboundCommand {
    /// Each endpoint's state and undelivered count.
    Status,
    /// Re-enable an endpoint (disabled after failing too long); its
    /// undelivered events are sent again at once, in order.
    Enable { url: String },
}

#[derive(Subcommand)]
pub enum SigningKeyCommand {
    /// Add a new key: published in the JWKS at once, signing from one
    /// `tokens.key_refresh_secs` later; the current key then retires and
    /// stays published until the last token it signed has expired.
    Rotate {
        /// Default: `tokens.algorithm`.
        #[arg(long, value_enum)]
        algorithm: Option<AlgorithmArg>,
    },
    /// Every stored key and its state (public data only).
    List,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum AlgorithmArg {
    Es256,
    Ed25519,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RoleArg {
    Client,
    Service,
    Admin,
}

impl From<RoleArg> for ApiKeyRole {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Client => ApiKeyRole::Client,
            RoleArg::Service => ApiKeyRole::Service,
            RoleArg::Admin => ApiKeyRole::Admin,
        }
    }
}

/// `--since`: an RFC 3339 instant, or `<n>s|m|h|d` before now.
fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let bad = || format!("`{s}` is neither an RFC 3339 instant nor a duration like 24h or 7d");
    let (n, unit) = s.split_at(s.len().saturating_sub(1));
    let n: i64 = n.parse().map_err(|_| bad())?;
    let d = match unit {
        "s" => chrono::Duration::try_seconds(n),
        "m" => chrono::Duration::try_minutes(n),
        "h" => chrono::Duration::try_hours(n),
        "d" => chrono::Duration::try_days(n),
        _ => None,
    }
    .filter(|_| n >= 0)
    .ok_or_else(bad)?;
    Ok(Utc::now() - d)
}

async fn core(config: &Config) -> anyhow::Result<Core> {
    let db = Db::connect(config).await?;
    Core::new(config, db, Arc::new(SystemClock))
}

impl Cli {
    /// `serve` logs at the configured level; every other command prints
    /// only its result, so `KEY=$(entitle api-key create ...)` captures the
    /// key and nothing else, unless the operator asks for `--verbose`.
    pub fn log_filter<'a>(&self, configured: &'a str) -> &'a str {
        let serving = matches!(self.command, None | Some(Command::Serve));
        if serving || self.verbose {
            configured
        } else {
            "error"
        }
    }
}

pub async fn run(cli: Cli, config: Config) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => app::serve(config).await,
        Command::Migrate => {
            Db::migrate_only(&config).await?;
            eprintln!("database is up to date");
            Ok(())
        }
        Command::ExportSchema { out } => {
            let sdl = crate::graphql::sdl();
            match out {
                Some(path) => std::fs::write(&path, sdl)?,
                None => print!("{sdl}"),
            }
            Ok(())
        }
        Command::ApiKey(ApiKeyCommand::Create { name, role }) => {
            let created = core(&config)
                .await?
                .api_keys()
                .create_api_key(&name, role.into())
                .await?;
            eprintln!(
                "created API key {} (prefix {}); it is shown only now:",
                created.id, created.prefix
            );
            println!("{}", created.key);
            Ok(())
        }
        Command::ApiKey(ApiKeyCommand::Revoke { id }) => {
            let row = core(&config).await?.api_keys().revoke_api_key(&id).await?;
            eprintln!("revoked API key {} ({})", row.id, row.name);
            Ok(())
        }
        Command::Outbound(OutboundCommand::Status) => {
            let configured: Vec<String> = config
                .outbound
                .endpoints
                .iter()
                .map(|e| e.url.clone())
                .collect();
            let states = core(&config)
                .await?
                .outbound()
                .outbound_status(&configured)
                .await?;
            if states.is_empty() {
                eprintln!("no outbound endpoints");
            }
            for s in states {
                println!(
                    "{}\t{}{}\tpending {}\tlast success {}",
                    s.url,
                    s.describe(),
                    if s.configured {
                        ""
                    } else {
                        " (not configured)"
                    },
                    s.pending,
                    s.last_success_at
                        .map_or_else(|| "never".to_string(), |t| t.to_rfc3339()),
                );
            }
            Ok(())
        }
        Command::Outbound(OutboundCommand::Enable { url }) => {
            if !config.outbound.endpoints.iter().any(|e| e.url == url) {
                eprintln!("note: {url} is not in outbound.endpoints; nothing will deliver to it");
            }
            let due = core(&config)
                .await?
                .outbound()
                .enable_outbound_endpoint(&url)
                .await?;
            eprintln!("enabled {url}; {due} undelivered event(s) are due now");
            Ok(())
        }
        Command::SigningKey(SigningKeyCommand::Rotate { algorithm }) => {
            let core = core(&config).await?;
            // Creates the first key if there is none yet, so rotation always
            // has something to retire.
            core.tokens().start().await?;
            let alg = algorithm.map(|a| match a {
                AlgorithmArg::Es256 => TokenAlgorithm::ES256,
                AlgorithmArg::Ed25519 => TokenAlgorithm::EdDSA,
            });
            let key = core.tokens().rotate(alg).await?;
            println!("{}", key.kid);
            eprintln!(
                "new {} signing key {} is published now and signs from {}",
                key.algorithm,
                key.kid,
                key.created_at.to_rfc3339()
            );
            Ok(())
        }
        Command::SigningKey(SigningKeyCommand::List) => {
            let core = core(&config).await?;
            for k in core.tokens().list().await? {
                let opt =
                    |t: Option<DateTime<Utc>>| t.map_or_else(|| "-".into(), |t| t.to_rfc3339());
                println!(
                    "{}\t{}\tsigns from {}\tretired {}\tverifiable until {}",
                    k.kid,
                    k.algorithm,
                    k.created_at.to_rfc3339(),
                    opt(k.retired_at),
                    opt(k.verify_until)
                );
            }
            Ok(())
        }
        Command::Reconcile { since } => {
            let core = core(&config).await?;
            if crate::jobs::reconcile::enabled(&core, &config.reconcile).is_empty() {
                anyhow::bail!(
                    "no reconciliation is enabled: set reconcile.stripe, reconcile.apple or reconcile.google, with the store's API configured"
                );
            }
            let mut failed = Vec::new();
            for (source, r) in crate::jobs::reconcile::run(&core, &config.reconcile, since).await {
                match r {
                    Ok(c) => println!(
                        "{}: seen {}, applied {}, duplicates {}, skipped {}",
                        source.name(),
                        c.seen,
                        c.applied,
                        c.duplicates,
                        c.skipped
                    ),
                    Err(e) => {
                        println!("{}: failed: {}", source.name(), e.message());
                        failed.push(source.name());
                    }
                }
            }
            if failed.is_empty() {
                Ok(())
            } else {
                anyhow::bail!("reconciliation failed for {}", failed.join(", "))
            }
        }
        Command::Config(ConfigCommand::Check { format }) => {
            let report = crate::config_check::check(&config, format)?;
            print!("{}", report.rendered);
            if report.problems.is_empty() {
                return Ok(());
            }
            for p in &report.problems {
                eprintln!("problem: {p}");
            }
            anyhow::bail!("{} problem(s) in the configuration", report.problems.len())
        }
        Command::Webhooks(WebhooksCommand::Replay { outcomes, since }) => {
            let s = core(&config)
                .await?
                .operator()
                .replay_webhook_events(&outcomes, since)
                .await?;
            println!(
                "replayed {}: {} now applied, {} still unmatched, {} failed (store unavailable), {} skipped",
                s.considered, s.resolved, s.unchanged, s.failed, s.skipped
            );
            Ok(())
        }
        Command::Token {
            sub,
            admin,
            ttl_secs,
        } => {
            let jwt = config
                .auth
                .jwt
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("auth.jwt is not configured"))?;
            println!(
                "{}",
                crate::auth::mint_token(jwt, &sub, admin, Duration::from_secs(ttl_secs))?
            );
            Ok(())
        }
    }
}
