//! Redis helpers for the event tests: a consumer written the way the
//! original billing service reads `billing:events`, and a private
//! redis-server the fault tests may stop and restart.
#![allow(dead_code)]

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use redis::{
    AsyncCommands,
    aio::MultiplexedConnection,
    streams::{StreamRangeReply, StreamReadOptions, StreamReadReply},
};
use serde_json::Value;

/// The shared Redis of the event tests: `ENTITLE_TEST_REDIS_URL`, else the
/// machine's own on the default port.
pub fn redis_url() -> String {
    std::env::var("ENTITLE_TEST_REDIS_URL")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into())
}

pub fn unique(prefix: &str) -> String {
    use rand::RngCore;
    let mut b = [0u8; 6];
    rand::rng().fill_bytes(&mut b);
    format!("{prefix}{}", hex::encode(b))
}

pub async fn connect(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("the event tests need Redis ({url}): {e}"))
}

/// Every event on the stream, in stream order, as JSON.
pub async fn stream_events(conn: &mut MultiplexedConnection, key: &str) -> Vec<Value> {
    try_stream_events(conn, key).await.unwrap()
}

async fn try_stream_events(
    conn: &mut MultiplexedConnection,
    key: &str,
) -> redis::RedisResult<Vec<Value>> {
    let reply: StreamRangeReply = conn.xrange_all(key).await?;
    Ok(reply
        .ids
        .iter()
        .map(|e| {
            let raw: String = e.get("event").expect("field `event`");
            serde_json::from_str(&raw).expect("event is JSON")
        })
        .collect())
}

/// Polls the stream until `done` holds for what it has, or panics after `secs`.
pub async fn wait_stream(
    conn: &mut MultiplexedConnection,
    key: &str,
    secs: u64,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        // A restarted server answers LOADING until it has read its file.
        match try_stream_events(conn, key).await {
            Ok(evs) if done(&evs) => return evs,
            res if Instant::now() > deadline => {
                panic!("stream {key} never got there: {:?}", res.map(|e| e.len()))
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A consumer-group reader: XREADGROUP on the stream, JSON in field `event`,
/// acknowledging what it read.
pub struct GroupConsumer {
    conn: MultiplexedConnection,
    key: String,
    group: String,
}

impl GroupConsumer {
    /// Joins (creating) a group that starts at the stream's end.
    pub async fn join(url: &str, key: &str) -> GroupConsumer {
        let mut conn = connect(url).await;
        let group = unique("entitle-test-");
        let _: () = conn.xgroup_create_mkstream(key, &group, "$").await.unwrap();
        GroupConsumer {
            conn,
            key: key.into(),
            group,
        }
    }

    /// Reads (and acknowledges) events until `want` of them satisfy `keep`,
    /// or panics after `secs`.
    pub async fn read_until(
        &mut self,
        want: usize,
        secs: u64,
        keep: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut got = Vec::new();
        while got.len() < want {
            assert!(
                Instant::now() < deadline,
                "consumer got only {got:?} within {secs} s"
            );
            let opts = StreamReadOptions::default()
                .group(&self.group, "consumer-1")
                .count(100)
                .block(500);
            let reply: StreamReadReply = self
                .conn
                .xread_options(&[&self.key], &[">"], &opts)
                .await
                .unwrap();
            for k in reply.keys {
                for id in k.ids {
                    let raw: String = id.get("event").expect("field `event`");
                    let ev: Value = serde_json::from_str(&raw).unwrap();
                    let _: i64 = self
                        .conn
                        .xack(&self.key, &self.group, &[&id.id])
                        .await
                        .unwrap();
                    if keep(&ev) {
                        got.push(ev);
                    }
                }
            }
        }
        got
    }

    pub async fn leave(mut self) {
        let _: Result<i64, _> = self.conn.xgroup_destroy(&self.key, &self.group).await;
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A redis-server of the test's own, persisting every write to an
/// append-only file so that a stop loses nothing the relay was told was stored.
pub struct PrivateRedis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        let mut r = PrivateRedis {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server outright (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
