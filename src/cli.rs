use std::{path::PathBuf, sync::Arc, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

use crate::{app, clock::SystemClock, config::Config, db::Db, domain::ApiKeyRole, service::Core};

#[derive(Parser)]
#[command(name = "entitle", version, about = "Self-hosted entitlement server")]
pub struct Cli {
    /// Configuration file (default: ./entitle.toml when it exists).
    #[arg(long, global = true, env = "ENTITLE_CONFIG")]
    pub config: Option<PathBuf>,
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

async fn core(config: &Config) -> anyhow::Result<Core> {
    let db = Db::connect(config).await?;
    Core::new(config, db, Arc::new(SystemClock))
}

pub async fn run(cli: Cli, config: Config) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => app::serve(config).await,
        Command::Migrate => {
            Db::connect_only(&config).await?.migrate().await?;
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
            let row = core(&config).await?.revoke_api_key(&id).await?;
            eprintln!("revoked API key {} ({})", row.id, row.name);
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
